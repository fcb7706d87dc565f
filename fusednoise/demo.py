"""``fusednoise check``: check every fused op against its reference on this device, then time a training step
of the real pretrained all-MiniLM-L6-v2 on real sentences with and without HyPe.

(``fusednoise demo`` is a small fine-tuning comparison on GLUE: :mod:`fusednoise.finetune`.)"""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import List, Optional

import torch

# Real sentences (premise / hypothesis style) used when no GLUE folder is given.
SENTENCES = [
    "The cat sat on the mat while the rain kept falling outside.",
    "A man is playing a guitar on a crowded street corner.",
    "The committee approved the new budget after a long debate.",
    "Scientists discovered a new species of frog in the rainforest.",
    "She finished the marathon despite an injury to her ankle.",
    "The museum will be closed for renovations until next spring.",
    "Stock prices fell sharply after the central bank raised interest rates.",
    "The children built a sandcastle near the edge of the water.",
    "He forgot his umbrella and got soaked on the way to work.",
    "The new bridge reduced the commute between the two towns by half.",
    "Volunteers planted three hundred trees in the city park on Saturday.",
    "The film received mixed reviews but was a success at the box office.",
    "A heavy storm knocked out power to thousands of homes overnight.",
    "The team won the championship for the third year in a row.",
    "Researchers say the vaccine is safe and effective for older adults.",
    "The restaurant on the corner serves the best noodles in town.",
]


def _load_sentences(data_dir: Optional[str], count: int) -> List[str]:
    if data_dir is None:
        return [SENTENCES[i % len(SENTENCES)] for i in range(count)]
    path = Path(data_dir) / "RTE" / "dev.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"--data-dir must hold GLUE's RTE/dev.tsv; {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [rows[i % len(rows)]["sentence1"] for i in range(count)]


def check_ops(device: str, shape=(2, 64, 384)) -> List[str]:
    """Run each fused op and its reference with the same seed on ``device``; a line per (op, dtype)."""
    import fusednoise
    from fusednoise import backends, rng

    if not backends.triton_available():
        return ["triton is not installed here: only the reference backend runs (CPU reference mode)"]
    if device == "cpu" and not backends.interpreter_enabled():
        return ["no GPU and TRITON_INTERPRET is not 1: the kernels cannot run on this machine"]
    ops = {
        "add_noise_": lambda x, r, seed: fusednoise.add_noise_(x.clone(), 1e-2, seed=seed),
        "add_noise": lambda x, r, seed: fusednoise.add_noise(x, 1e-2, "uniform", seed=seed),
        "add_residual_noise": lambda x, r, seed: fusednoise.add_residual_noise(x, r, 1e-2, seed=seed),
    }
    lines = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(shape, device=device).to(dtype)
        residual = torch.randn(shape, device=device).to(dtype)
        for name, op in ops.items():
            seed = rng.draw_seed()
            with fusednoise.backend("triton"):
                fused = op(x, residual, seed)
            with fusednoise.backend("reference"):
                eager = op(x, residual, seed)
            max_diff = (fused.float() - eager.float()).abs().max().item()
            mismatched = (fused != eager).float().mean().item()
            tolerance_ok = max_diff <= 1e-6 if dtype == torch.float32 else mismatched < 1e-3
            lines.append(f"{name:<20} {str(dtype).replace('torch.', ''):<9} max|fused-ref| = {max_diff:.2e}  "
                         f"differing elements {mismatched:.2%}  {'ok' if tolerance_ok else 'MISMATCH'}")
    return lines


def time_training_steps(model, batch, steps: int, hype_sigma: Optional[float], device: str) -> List[float]:
    """Seconds per AdamW step (forward, backward, update), after one warm-up step."""
    from tqdm.auto import tqdm

    from . import hype

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    handle = hype.apply(model, sigma=hype_sigma) if hype_sigma is not None else None
    label = "HyPe-N" if handle is not None else "vanilla"
    times = []
    model.train()
    try:
        for step in tqdm(range(steps + 1), desc=f"{label} steps", leave=False):
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step > 0:
                times.append(time.perf_counter() - start)
    finally:
        if handle is not None:
            handle.remove()
    return times


def run_check(model: Optional[str] = None, device: Optional[str] = None, steps: int = 5, batch_size: int = 16,
             max_length: int = 128, sigma: float = 1e-5, data_dir: Optional[str] = None) -> dict:
    from .models import load_classifier, resolve_model_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fusednoise check on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print("\n1. Fused ops against their eager references (same seed):")
    for line in check_ops(device):
        print("   " + line)

    print(f"\n2. Training steps of {resolve_model_path(model)}")
    torch.manual_seed(0)
    network, tokenizer = load_classifier(model, num_labels=2)
    network.to(device)
    sentences = _load_sentences(data_dir, batch_size)
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
    batch["labels"] = torch.arange(batch_size, device=device) % 2
    results = {}
    for name, method_sigma in (("vanilla", None), ("hype-n", sigma)):
        times = time_training_steps(network, batch, steps, method_sigma, device)
        results[name] = statistics.median(times)
    overhead = results["hype-n"] / results["vanilla"] - 1
    print(f"   batch {batch_size} x {max_length} tokens, median of {steps} steps")
    print(f"   vanilla  {results['vanilla'] * 1e3:9.1f} ms/step")
    print(f"   HyPe-N   {results['hype-n'] * 1e3:9.1f} ms/step   ({overhead:+.1%}, sigma={sigma:g})")
    return results


run_demo = run_check  # the name this function had when it was ``fusednoise demo``
