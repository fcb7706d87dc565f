"""Host time: the Python our ops spend before a kernel runs, with the Triton launch replaced by a no-op.

    pytest benchmarks/test_bench_host.py --benchmark-json benchmarks/results/host-<device>.json

A HyPe model calls a noise op once per layer per forward, and PATS steps every parameter tensor each step: in
launch-bound regimes (small models, small batches, LoRA on a small GPU) that Python can cost more wall time than
the kernels. Here the launches are stubbed (``fusednoise.kernels.noise.launch_noise``, the PATS kernels'
``__getitem__``), so each case times only our wrapper: argument checks, backend choice, seed draw, output
allocation, autograd node, launch arguments. The reference point is the whole eager ``x + randn_like(x) * s``
(three small kernels on a CPU tensor). Target (issue 14): at most 10 us per op call.

On a CPU the ops run on the Triton backend through Triton's interpreter switch (``TRITON_INTERPRET=1``, set by
benchutil) so that the kernel path is the one timed; on a GPU, on CUDA tensors. ``extra_info["host_us"]`` is
the median per call in microseconds.
"""
import pytest
import torch

import fusednoise
from benchutil import DEVICE

SIGMA = 1e-5


def _noop(*args, **kwargs):
    return None


class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return _noop


@pytest.fixture
def stubbed_launches(monkeypatch):
    from fusednoise.kernels import noise as noise_kernels
    from fusednoise.kernels import pats as pats_kernels

    monkeypatch.setattr(noise_kernels, "launch_noise", _noop)
    monkeypatch.setattr(pats_kernels, "_sensitivity_kernel", _StubKernel())
    monkeypatch.setattr(pats_kernels, "_update_kernel", _StubKernel())
    with fusednoise.backend("triton"):
        yield


def _record(benchmark, **info):
    benchmark.extra_info.update(info, device=DEVICE)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["host_us"] = round(stats.stats.median * 1e6, 2)


OP_CASES = {
    "add_noise": lambda x, r, g: fusednoise.add_noise(x, SIGMA),
    "add_noise-requires-grad": lambda x, r, g: fusednoise.add_noise(g, SIGMA),
    "add_noise_": lambda x, r, g: fusednoise.add_noise_(x, SIGMA),
    "add_residual_noise": lambda x, r, g: fusednoise.add_residual_noise(x, r, SIGMA),
    "eager-x+randn_like*s": lambda x, r, g: x + torch.randn_like(x) * SIGMA,
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_host_us_per_op_call(benchmark, stubbed_launches, case):
    """One call on a 4x4 tensor: nothing but host work (the eager case runs its three tiny kernels)."""
    benchmark.group = "host-per-op-call 4x4"
    x = torch.randn(4, 4, device=DEVICE)
    residual = torch.randn(4, 4, device=DEVICE)
    leaf = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    op = OP_CASES[case]
    op(x, residual, leaf)
    benchmark.pedantic(op, args=(x, residual, leaf), rounds=200, iterations=50, warmup_rounds=5)
    _record(benchmark, case=case, shape=[4, 4])


def _many_tensor_model(n_tensors=200, numel=64):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, device=DEVICE)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("case", ["pats-fused-stubbed", "adamax-foreach", "adamw-fused"])
def test_host_us_per_optimizer_step(benchmark, stubbed_launches, case):
    """One optimizer step on 200 tensors of 64 elements (a BERT-base has about 200 parameter tensors): for
    PATS, our host work with both kernel launches stubbed; torch's Adamax/AdamW for scale (their steps run
    their tiny kernels too)."""
    from fusednoise.optim import PATSAdamax

    benchmark.group = "host-per-optimizer-step 200 tensors"
    params = _many_tensor_model()
    if case == "pats-fused-stubbed":
        opt = PATSAdamax([{"params": params[:150]}, {"params": params[150:], "noise": False}], lr=1e-3, seed=1)
    elif case == "adamax-foreach":
        opt = torch.optim.Adamax(params, lr=1e-3, foreach=True)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt.step()
    benchmark.pedantic(opt.step, rounds=30, iterations=5, warmup_rounds=2)
    _record(benchmark, case=case, tensors=len(params))
