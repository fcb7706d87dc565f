"""Supervised fine-tuning of a causal LM with LoRA through TRL's SFTTrainer, plus the fusednoise methods.

    pip install -e ".[llm]"
    python examples/sft_lora.py --tiny --max-steps 4                    # offline, CPU, under a minute
    python examples/sft_lora.py --model Qwen/Qwen2-0.5B --method neftune --method hype --max-steps 200

``--tiny`` builds a small random LLaMA config and a word-level tokenizer, and trains on an instruction set made
from GLUE's SST-2 (``Review: <sentence>\\nSentiment:`` -> `` positive`` / `` negative``; TRL puts the loss on
the completion only). ``--model`` takes any causal-LM folder or hub name instead. The data comes from
``--data-dir`` (GLUE's TSV layout; by default ``../shared/data/glue`` when that folder exists, else the hub).

The trainer is one line: ``class Trainer(FusedNoiseMixin, SFTTrainer)``; each ``--method`` adds one argument:

* ``neftune``: NEFTune on the input embeddings, alpha 5, scaled by each example's own length (not the padded one);
* ``hype``: HyPe-N on every decoder layer's input, sigma 1e-5, stochastic rounding when the model is bf16 (with
  round-to-nearest that noise would mostly round away in a bf16 residual stream);
* ``lnsr``: the LNSR penalty on the decoder layers' outputs, masked by the attention mask;
* ``noisytune``: NoisyTune on the pretrained (frozen) weights before training; the LoRA matrices are left alone;
* ``pats``: PATSAdamax, with its noise on the LoRA matrices (the only trainable matrices inside the layers).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("neftune", "hype", "lnsr", "noisytune", "pats")
DEFAULT_DATA_DIR = Path("../shared/data/glue")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a small random LLaMA and a word-level tokenizer")
    source.add_argument("--model", help="a causal-LM folder or hub name")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None,
                        help="GLUE's TSV folder (default ../shared/data/glue if present, else the hub)")
    parser.add_argument("--method", action="append", choices=METHODS, default=None,
                        help="a fusednoise method; repeat to combine (default: neftune, hype, pats)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (default 2e-4)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--neftune-alpha", type=float, default=5.0, help="(the paper's grid: 5, 10, 15)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="train in bfloat16 (default: on a GPU that supports it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="checkpoints and logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.method = tuple(dict.fromkeys(args.method or ("neftune", "hype", "pats")))
    if args.max_steps < 1 or args.train_examples < 1 or args.batch_size < 1:
        parser.error("--max-steps, --train-examples and --batch-size must be >= 1")
    return args


def load_model_and_tokenizer(args, data, dtype):
    if args.tiny:
        from fusednoise.experiments.llm import tiny_causal_lm, word_tokenizer

        tokenizer = word_tokenizer(list(data["prompt"]) + list(data["completion"]))
        return tiny_causal_lm("llama", vocab_size=len(tokenizer), dtype=dtype, seed=args.seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=local)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # many causal LMs ship without one
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=local)
    return model, tokenizer


def method_arguments(methods, bf16: bool, neftune_alpha: float) -> dict:
    """FusedNoiseMixin's keyword arguments for the chosen methods."""
    from fusednoise.integrations.trainer import HyPeConfig, LNSRConfig, NEFTuneConfig, NoisyTuneConfig, PATSConfig

    chosen = set(methods)
    return {
        "neftune": NEFTuneConfig(alpha=neftune_alpha) if "neftune" in chosen else None,
        "hype": HyPeConfig(sigma=1e-5, rounding="stochastic" if bf16 else "nearest") if "hype" in chosen else None,
        "lnsr": LNSRConfig() if "lnsr" in chosen else None,
        "noisytune": NoisyTuneConfig(noise_lambda=0.15, exclude=("lora_",)) if "noisytune" in chosen else None,
        "pats": PATSConfig() if "pats" in chosen else None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import datasets
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    from fusednoise.integrations.trainer import FusedNoiseMixin
    from fusednoise.experiments.llm import sst2_instructions

    class Trainer(FusedNoiseMixin, SFTTrainer):
        """TRL's SFTTrainer with hype=, lnsr=, noisytune=, pats= and neftune=."""

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    data = sst2_instructions(args.data_dir, args.train_examples, seed=args.seed)
    model, tokenizer = load_model_and_tokenizer(args, data, torch.bfloat16 if bf16 else torch.float32)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="sft-lora-")
    config = SFTConfig(
        output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        max_length=args.max_length, bf16=bf16, use_cpu=not cuda, seed=args.seed, disable_tqdm=args.tiny)
    trainer = Trainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM"),
        **method_arguments(args.method, bf16, args.neftune_alpha))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"model: {'tiny random LLaMA' if args.tiny else args.model}, {'bf16' if bf16 else 'fp32'}, "
          f"{trainable} trainable LoRA parameters; methods: {', '.join(args.method)}")
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    print(f"loss {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {trainer.state.global_step} "
          f"({type(optimizer).__name__}; {time.perf_counter() - start:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
