"""A launch-bound training step: MiniLM-sized BERT at batch 8 x 64 in bfloat16, vanilla vs HyPe vs PATS.

    pytest benchmarks/test_bench_launch_bound.py --benchmark-json benchmarks/results/launch-bound-<device>.json

With 8 x 64 tokens and a 384-wide model every kernel is tiny, so a step's time is mostly the host launching
kernels: this is where the Python our ops run before each launch (benchmarks/test_bench_host.py) shows up as
wall time. The weights are bfloat16 (``model.to(torch.bfloat16)``), so HyPe adds its noise to bf16 hidden
states and PATS steps bf16 parameters (float32 state). Cases: ``vanilla-adamw`` (fused AdamW),
``vanilla-adamax`` (torch's Adamax, foreach: PATS without noise would be this), ``hype-n`` (HyPe-N at the
paper's sigma on every layer, fused AdamW), ``pats`` (PATSAdamax with the paper's groups and defaults).

On a GPU this is the device case of issue 14 (benchmarks/device_run.sh runs it). Without one a bert-tiny
version runs in float32 on the CPU (CPU reference mode), which only shows that the suite runs.
"""
import contextlib

import pytest
import torch

from benchutil import HAS_CUDA, bench_training_step, bert_classifier, classification_step, cpu_only, needs_cuda

METHODS = ["vanilla-adamw", "vanilla-adamax", "hype-n", "pats"]


def _optimizer(method, model):
    from fusednoise.optim import PATSAdamax, pats_param_groups

    if method == "pats":
        return PATSAdamax(pats_param_groups(model), lr=1e-4, seed=0)
    if method == "vanilla-adamax":
        return torch.optim.Adamax(model.parameters(), lr=1e-4, foreach=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=HAS_CUDA)


@pytest.mark.parametrize("size, batch, seq, dtype", [
    pytest.param("minilm", 8, 64, torch.bfloat16, marks=needs_cuda, id="minilm-8x64-bf16"),
    pytest.param("bert-tiny", 8, 64, torch.float32, marks=cpu_only, id="cpu-bert-tiny-8x64-fp32"),
])
@pytest.mark.parametrize("method", METHODS)
def test_launch_bound_training_step(benchmark, size, batch, seq, dtype, method):
    from fusednoise import hype

    benchmark.group = f"launch-bound train-step {size} {batch}x{seq} {str(dtype).replace('torch.', '')}"
    torch.manual_seed(0)
    model = bert_classifier(size).to(dtype)
    step = classification_step(model, _optimizer(method, model), batch, seq)
    with hype.apply(model, sigma=1e-5) if method == "hype-n" else contextlib.nullcontext():
        bench_training_step(benchmark, step, method=method, batch=batch, seq=seq, dtype=str(dtype))
