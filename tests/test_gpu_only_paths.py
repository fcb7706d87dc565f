"""The branches only a GPU takes, run on CPU (issue 18, "Code that only a GPU runs must still be tested on CPU").

* The fast Box-Muller (``kernels/draws.py``, ``FAST=True``, every GPU launch) differs from the interpreter's path
  only in ``_box_muller_primitives``: three libdevice calls (``fast_log2f``, ``fast_cosf``, ``fast_sinf``), which the
  interpreter cannot run. Here they are replaced by accurate stand-ins, and the rest of the FAST path (the clamp,
  which output takes cos and which sin, the scaling, every call site in the kernels) runs under the interpreter.
* The capturable step-count advance of ``PATSAdamax`` (one slice per run of consecutive parameters, on the
  parameters' device) is forced onto CPU counts.
"""
import math
import types

import pytest
import torch
import triton
import triton.language as tl

import fusednoise
from fusednoise import rng
from fusednoise.kernels import draws, lnsr_noise, noise, pats as pats_kernels
from fusednoise.optim import pats as pats_module
from fusednoise.optim import PATSAdamax


@triton.jit
def _accurate_log2(x):
    return tl.log2(x)


@triton.jit
def _accurate_cos(x):
    return tl.cos(x)


@triton.jit
def _accurate_sin(x):
    return tl.sin(x)


@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """FAST=True in every launcher, with libdevice's three fast calls replaced by accurate ones."""
    monkeypatch.setattr(draws, "libdevice", types.SimpleNamespace(
        fast_log2f=_accurate_log2, fast_cosf=_accurate_cos, fast_sinf=_accurate_sin))
    for module in (noise, lnsr_noise, pats_kernels):
        monkeypatch.setattr(module, "fast_math", lambda: True)


@triton.jit
def _box_muller_kernel(words_ptr, out_ptr, N: tl.constexpr, FAST: tl.constexpr):
    i = tl.arange(0, N)
    cos_out, sin_out = draws._box_muller(tl.load(words_ptr + i).to(tl.uint32),
                                         tl.load(words_ptr + N + i).to(tl.uint32), FAST)
    tl.store(out_ptr + i, cos_out)
    tl.store(out_ptr + N + i, sin_out)


def _expected_box_muller(words):
    # the formula in float64, from the uniforms of the words (rng.uint_to_uniform: tl.uint_to_uniform_float)
    u1 = rng.uint_to_uniform(words[0]).double().clamp(min=1e-7)
    theta = 2 * math.pi * rng.uint_to_uniform(words[1]).double()
    radius = (-2 * u1.log()).sqrt()
    return radius * theta.cos(), radius * theta.sin()


@pytest.mark.parametrize("fast", [False, True])
def test_both_box_muller_paths_pair_cos_and_sin_alike(fast, fast_path_on_cpu):
    n = 256
    words = torch.randint(0, 2**32, (2, n), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    words[0, :4] = torch.tensor([0, 1, 2**31 - 1, 2**32 - 1])  # u1 at 0 (clamped) and just below 1
    out = torch.empty(2, n)
    _box_muller_kernel[(1,)](words, out, N=n, FAST=fast)
    expected_cos, expected_sin = _expected_box_muller(words)
    # float32 rounding of u1, theta (|theta| < 2 pi) and the radius (< 5.7)
    torch.testing.assert_close(out[0].double(), expected_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1].double(), expected_sin, rtol=0, atol=2e-5)


def test_fast_noise_ops_match_the_reference_on_cpu(fast_path_on_cpu):
    """Every call site of the fast path (HyPe's noise, LNSR's noise, PATS' update) against the reference."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, generator=gen)
    with fusednoise.backend("triton"):
        fused = fusednoise.add_noise(x, 0.3, seed=5)
        fused_lnsr = fusednoise.ops_lnsr.scaled_noise(x, 0.05, seed=6)
    with fusednoise.backend("reference"):
        expected = fusednoise.add_noise(x, 0.3, seed=5)
        expected_lnsr = fusednoise.ops_lnsr.scaled_noise(x, 0.05, seed=6)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_lnsr, expected_lnsr, rtol=1e-5, atol=1e-6)

    def pats(backend):
        g = torch.Generator().manual_seed(2)
        p = torch.nn.Parameter(0.05 * torch.randn(3000, generator=g))
        opt = PATSAdamax([p], lr=1e-3, noise_lambda=1e-2, noise_prob=0.5, seed=7)
        with fusednoise.backend(backend):
            for _ in range(2):
                p.grad = 1e-2 * torch.randn(p.shape, generator=g)
                opt.step()
        return p.detach()

    torch.testing.assert_close(pats("triton"), pats("reference"), rtol=0, atol=1e-6)


def test_consecutive_runs():
    assert pats_module.consecutive_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert pats_module.consecutive_runs([4]) == [(4, 5)]
    assert pats_module.consecutive_runs([]) == []


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_capturable_step_counts_advance_by_slices_on_cpu(backend, monkeypatch):
    """The GPU's advance (slices) on CPU counts: parameters without a gradient in a step keep their count, and
    the capturable run equals the normal one step by step."""
    has_grad = [[True, True, True, True, True], [True, False, True, False, True], [False, True, True, True, False]]
    runs = []
    for capturable in (False, True):
        # the normal run advances its CPU counts with index_add_, the capturable one with the GPU's slices
        monkeypatch.setattr(pats_module._StepCounts, "SLICES_ON_CPU", capturable)
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(0.05 * torch.randn(n, generator=gen)) for n in (30, 7, 1100, 5, 64)]
        opt = PATSAdamax(params, lr=1e-3, noise_lambda=1e-3, noise_prob=0.5, seed=11, capturable=capturable)
        history = []
        with fusednoise.backend(backend):
            for step in has_grad:
                for p, grad in zip(params, step):
                    p.grad = 1e-2 * torch.randn(p.shape, generator=gen) if grad else None
                opt.step()
                history.append([p.detach().clone() for p in params])
        assert opt._steps[torch.device("cpu")].by_slices == capturable
        runs.append((history, [float(opt.state[p]["step"]) for p in params]))
    (normal, normal_counts), (captured, captured_counts) = runs
    expected_counts = [float(sum(column)) for column in zip(*has_grad)]
    assert normal_counts == expected_counts and captured_counts == expected_counts
    for step_a, step_b in zip(normal, captured):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)
