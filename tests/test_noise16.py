"""The 16-bit draws of half-precision HyPe noise (``reference/noise.py``): the layout from the formula, and the
statistical quality the README states (moments, a KS test, the largest value each distribution can produce).

Large-n statistics run on the reference (the kernel equals it: tests/test_ops.py, tests/test_fused.py); the
layout is checked on the kernel under the interpreter with small sizes.
"""
import math

import pytest
import scipy.stats
import torch

from devices import KERNEL_DEVICE
from fusednoise import rng
from fusednoise.kernels.noise import launch_noise
from fusednoise.reference import noise as reference

SEED = 20231
N = 2**20


def _halves(seed, n_blocks, first_block=0):
    """The 16-bit halves of blocks first_block.. of philox(seed, j, 0, 0), in element order (8 per block), from
    the plain-torch philox."""
    blocks = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64)
    words = rng._philox4x32_torch(seed, blocks & rng.MASK32, blocks >> 32, torch.zeros_like(blocks),
                                  torch.zeros_like(blocks), 10)
    return torch.stack([part for w in words for part in (w & 0xFFFF, w >> 16)], dim=1).reshape(-1)


def test_uniform_layout_from_the_formula():
    halves = _halves(SEED, 9, first_block=3)
    expected = (2.0 * halves.double() + 1.0 - 65536.0) / 65536.0
    got = reference.standard_noise(70, "uniform", SEED, first_index=24, bits=16)
    assert torch.equal(got.double(), expected[:70])  # every value exact in float32


def test_normal_layout_from_the_formula():
    halves = _halves(SEED, 8).double()
    low, high = halves[0::2], halves[1::2]
    radius = torch.sqrt(-2.0 * torch.log((low + 1.0) / 65536.0))
    theta = 2.0 * math.pi * high / 65536.0
    expected = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=1).reshape(-1)
    got = reference.standard_noise(63, "normal", SEED, bits=16).double()
    assert torch.allclose(got, expected[:63], rtol=0, atol=3e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_kernel_draws_the_16_bit_layout(dtype, distribution):
    # x = 0 and sigma = 1: the stored output is the unit noise rounded to dtype; the formula's values, rounded.
    n = 4096 + 24
    x = torch.zeros(n, dtype=dtype, device=KERNEL_DEVICE)
    out = torch.empty_like(x)
    launch_noise(x, None, out, 1.0, distribution, SEED, False)
    halves = _halves(SEED, n // 8).double()
    if distribution == "uniform":
        expected = (2.0 * halves + 1.0 - 65536.0) / 65536.0
    else:
        low, high = halves[0::2], halves[1::2]
        radius = torch.sqrt(-2.0 * torch.log((low + 1.0) / 65536.0))
        theta = 2.0 * math.pi * high / 65536.0
        expected = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=1).reshape(-1)
    if distribution == "uniform":  # exact in float32, then rounded to nearest: bitwise
        assert torch.equal(out.cpu(), expected[:n].to(dtype))
    else:  # float32 log/cos/sin against float64: within one step of dtype
        step = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
        error = (out.cpu().double() - expected[:n]).abs()
        assert bool((error <= step * expected[:n].abs() + 1e-6).all()), float(error.max())


def test_half_precision_first_index_must_start_a_block():
    x = torch.zeros(16, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="first_index"):
        launch_noise(x, None, x, 1.0, "normal", SEED, False, first_index=4)
    with pytest.raises(ValueError, match="first_index"):
        reference.standard_noise(16, "normal", SEED, first_index=4, bits=16)


def test_uniform16_moments_ks_and_extremes():
    u = reference.standard_noise(N, "uniform", SEED, bits=16).double()
    assert abs(float(u.mean())) < 4 * math.sqrt(1 / 3 / N)
    assert abs(float(u.var()) - 1 / 3) < 0.003          # U(-1, 1): 1/3 (the 16-bit grid: 1/3 - 2**-32 / 3)
    assert scipy.stats.kstest(u.numpy(), scipy.stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    # The largest value: b = 65535 gives 1 - 2**-16, b = 0 its negative; symmetric, never +-1, mean exactly 0.
    grid = (2.0 * torch.arange(65536, dtype=torch.float64) + 1 - 65536) / 65536
    assert float(grid.max()) == reference.UNIFORM16_MAX == 1 - 2**-16 and float(grid.sum()) == 0.0
    assert float(u.abs().max()) <= reference.UNIFORM16_MAX


def test_normal16_moments_ks_and_extremes():
    z = reference.standard_noise(N, "normal", SEED, bits=16).double()
    assert abs(float(z.mean())) < 4 / math.sqrt(N)
    assert abs(float(z.var()) - 1) < 0.01
    kurtosis = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurtosis - 3) < 0.05
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # The largest |value|: u1 = (low16 + 1) / 2**16 >= 2**-16, so the radius is at most sqrt(-2 ln 2**-16) =
    # sqrt(32 ln 2) = 4.71, attained at low16 = 0 (theta = 0: the cos output).
    assert reference.NORMAL16_MAX == pytest.approx(math.sqrt(32 * math.log(2)))
    assert float(z.abs().max()) <= reference.NORMAL16_MAX * (1 + 1e-6)
    u1, u2 = torch.tensor([2.0**-16]), torch.tensor([0.0])
    cos, _ = rng.box_muller(u1, u2)
    assert float(cos) == pytest.approx(reference.NORMAL16_MAX, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_the_reference_sum_is_a_tensor_of_its_own(dtype, stochastic):
    # FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the pre-backward hook): the
    # reference of a fused layer must return a row-major tensor of its own, whatever x's strides, with the values of
    # the contiguous input's sum.
    x = torch.randn(4, 3, 8).to(dtype).transpose(0, 1)
    residual = torch.randn(4, 3, 8).to(dtype).transpose(0, 1)
    out = reference.noisy_sum(x, residual, 0.1, "normal", 5, stochastic)
    assert out._base is None and out.is_contiguous() and out.shape == x.shape
    expected = reference.noisy_sum(x.contiguous(), residual.contiguous(), 0.1, "normal", 5, stochastic)
    assert torch.equal(out, expected)
