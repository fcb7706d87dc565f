"""Eager reference for the HyPe noise ops: the executable spec of ``fusednoise/kernels/noise.py``.

The draw's resolution follows the output's precision (:func:`noise_bits`).

float32 outputs (32-bit draws): element ``i`` (row-major logical order of the tensor) belongs to philox block
``j = i // 4`` and takes word ``w = i % 4`` of ``philox(seed, c0=j_lo, c1=j_hi, c2=0, c3=0)``:

* uniform: ``eps = sigma * (2 * uniform(word_w) - 1)``, i.e. U(-sigma, sigma);
* normal: Box-Muller of the word pairs (0, 1) and (2, 3); elements ``4j, 4j+1`` take the cos and sin outputs of
  the first pair, ``4j+2, 4j+3`` those of the second, times sigma.

bfloat16 and float16 outputs (16-bit draws, one philox block per 8 elements): element ``i`` belongs to block
``j = i // 8`` and takes the 16-bit half ``h = i % 2`` (0: the low 16 bits) of word ``k = (i % 8) // 2`` of the
same ``philox(seed, c0=j_lo, c1=j_hi, c2=0, c3=0)``:

* uniform: the element's half ``b`` in [0, 65536) gives ``(2b + 1 - 65536) / 65536``: symmetric in (-1, 1),
  mean exactly 0, largest value ``1 - 2**-16``, every value exact in float32;
* normal: Box-Muller of word ``k``'s two halves, ``u1 = (low16 + 1) / 65536`` in [2**-16, 1] (never 0: no
  clamp) and ``theta = 2 pi high16 / 65536``; element ``8j + 2k`` takes ``radius * cos(theta)``, ``8j + 2k + 1``
  ``radius * sin(theta)``. The largest value is ``sqrt(-2 ln 2**-16) = sqrt(32 ln 2) = 4.71`` (at low16 = 0),
  against 5.68 for the 32-bit draws (u1 >= 1e-7); the quality (moments, KS, the extremes) is tested in
  ``tests/test_noise16.py`` and stated in the README.

A bfloat16 or float16 value keeps 8 or 11 significant bits, so 16 random bits per value resolve the noise
beyond what the output stores; eight values per philox block (``tl.randn`` draws one) take an eighth of the
integer work per element: what keeps a half-precision noise kernel memory-bound rather than issue-bound on a
GPU. A half-precision draw must start at a block boundary: ``first_index`` a multiple of 8.

Everything is computed in float32: ``out = (x + residual) + eps``, then stored in x's dtype, rounded to
nearest or stochastically. Stochastic rounding takes 16 random bits per element: element ``i`` uses the 16-bit
half ``i % 2`` (0: the low half) of word ``(i % 8) // 2`` of ``philox(seed, c0=q_lo, c1=q_hi, c2=0, c3=1)``
with ``q = i // 8``, so one philox call serves 8 elements (see :func:`stochastic_round` for the rule).

Offset path (CUDA graphs, ``fusednoise/rng.py``): a call with offset ``o`` draws the same layout with the
counter's last two words ``(o mod 2**32, purpose + 2 * (o >> 32))`` (``rng.offset_counter_words``) instead of
``(0, purpose)``; every function below takes ``offset=None`` (the host path) or that ``o``. Offset 0 is the host
path.

On a GPU the normal noise uses the hardware's approximate log2/sin/cos (``kernels/draws.py``): the uniform
noise and the philox words are bitwise those of this module, the normal values differ by at most
:func:`fast_normal_error_bound` (a few 1e-6 for a typical draw; see there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import rng

DISTRIBUTIONS = ("normal", "uniform")
WORDS_PER_BLOCK = 4
# 16-bit draws (half-precision noise, stochastic-rounding bits): two values per 32-bit word, 8 per philox block
HALF_ELEMENTS_PER_BLOCK = 8
HALF_SCALE = 2.0**-16
# The largest |value| each 16-bit draw can produce: Box-Muller's radius at u1 = 2**-16, and the uniform's top.
NORMAL16_MAX = (-2.0 * math.log(2.0**-16)) ** 0.5  # sqrt(32 ln 2) = 4.7096
UNIFORM16_MAX = 1.0 - 2.0**-16
F16_SMALLEST_NORMAL = 2.0**-14

# The GPU's Box-Muller (kernels/draws.py) runs on the hardware approximations lg2.approx, sin.approx and
# cos.approx, whose documented worst-case errors are an absolute 2**-22 for log2 on [0.5, 2] (2 ulp elsewhere)
# and an absolute 2**-20.5 for sin/cos of |x| <= 100 pi. They bound |fused - reference| for one N(0, 1) value
# with radius R = sqrt(-2 ln u1) by  FAST_TRIG_ERROR * (1 + R) + min(sqrt(FAST_LOG_ERROR), FAST_LOG_ERROR / R):
# the log's absolute error moves R**2 by up to FAST_LOG_ERROR (2 ln 2 * 2**-22 and float32 rounding), which
# matters only for small radii (u1 near 1); the angle's error, sqrt.approx and the roundings scale with R.
# tests/test_fast_math.py checks the bound against a model of the approximations.
FAST_LOG_ERROR = 3.5e-7
FAST_TRIG_ERROR = 2.0e-6


def _block_words(seed: int, numel: int, device, purpose: int, first_index: int = 0,
                 offset: Optional[int] = None):
    n_blocks = -(-numel // WORDS_PER_BLOCK)
    first_block = first_index // WORDS_PER_BLOCK
    blocks = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    lo, hi = rng.block_counters(blocks)
    return rng.philox4x32(seed, lo, hi, *rng.offset_counter_words(offset, purpose))


def _interleave(values, numel: int) -> torch.Tensor:
    return torch.stack(values, dim=1).reshape(-1)[:numel]


def noise_bits(dtype: torch.dtype) -> int:
    """The resolution of the HyPe draws for an output of ``dtype``: 16 bits for bfloat16 and float16, 32 for
    float32 (and anything wider)."""
    return 16 if dtype in (torch.bfloat16, torch.float16) else 32


def standard_noise(numel: int, distribution: str, seed: int, device="cpu", first_index: int = 0,
                   offset: Optional[int] = None, bits: int = 32) -> torch.Tensor:
    """Unit-scale noise for ``numel`` elements in logical order: N(0, 1) or U(-1, 1), float32.

    ``bits``: 32 (four values per philox block; what NEFTune, LNSR and float32 HyPe draw) or 16 (eight values per
    block, half-precision HyPe; the module docstring has both layouts). ``first_index`` (a multiple of 4, of 8
    with ``bits=16``) starts the draw at that flat index of a larger tensor; ``offset`` is the offset path's
    (None: the host path).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if bits == 16:
        return _standard_noise16(numel, distribution, seed, device, first_index, offset)
    if bits != 32:
        raise ValueError(f"bits must be 16 or 32, got {bits!r}")
    n_blocks = -(-numel // WORDS_PER_BLOCK)
    stream, purpose = rng.offset_counter_words(offset, rng.PURPOSE_NOISE)
    # Row j: the uniforms of block j's four words, so flattening puts word w of block j at element 4j + w.
    uniforms = rng.philox_uniforms(seed, n_blocks, first_index // WORDS_PER_BLOCK, stream, purpose, device)
    if distribution == "uniform":
        return (2.0 * uniforms - 1.0).view(-1)[:numel]
    # Both pairs at once: (cos, sin) of pair (0, 1) are elements 4j, 4j+1, those of pair (2, 3) 4j+2, 4j+3.
    cos, sin = rng.box_muller(uniforms[:, 0::2], uniforms[:, 1::2])
    return torch.stack([cos, sin], dim=2).view(-1)[:numel]


def _standard_noise16(numel: int, distribution: str, seed: int, device, first_index: int,
                      offset: Optional[int]) -> torch.Tensor:
    if first_index % HALF_ELEMENTS_PER_BLOCK:
        raise ValueError(f"first_index must be a multiple of {HALF_ELEMENTS_PER_BLOCK} for 16-bit draws "
                         f"(bfloat16/float16), got {first_index}")
    halves = _sixteen_bit_halves(numel + numel % 2, seed, device, rng.PURPOSE_NOISE, first_index, offset)
    if distribution == "uniform":
        return ((2 * halves + 1 - 65536).to(torch.float32) * HALF_SCALE)[:numel]
    u1 = (halves[0::2] + 1).to(torch.float32) * HALF_SCALE   # (low16 + 1) / 2**16: in [2**-16, 1], never 0
    u2 = halves[1::2].to(torch.float32) * HALF_SCALE         # high16 / 2**16: theta = 2 pi u2
    cos, sin = rng.box_muller(u1, u2)
    return torch.stack([cos, sin], dim=1).view(-1)[:numel]


def _sixteen_bit_halves(numel: int, seed: int, device, purpose: int, first_index: int,
                        offset: Optional[int]) -> torch.Tensor:
    """int64 in [0, 2**16) per element: element ``i`` takes half ``i % 2`` (0: the low 16 bits) of word
    ``(i % 8) // 2`` of block ``i // 8`` (flat indices from ``first_index``)."""
    first_block = first_index // HALF_ELEMENTS_PER_BLOCK
    last_block = (first_index + numel - 1) // HALF_ELEMENTS_PER_BLOCK
    blocks = torch.arange(first_block, last_block + 1, dtype=torch.int64, device=device)
    lo, hi = rng.block_counters(blocks)
    words = rng.philox4x32(seed, lo, hi, *rng.offset_counter_words(offset, purpose))
    halves = [part for w in words for part in (w & 0xFFFF, w >> 16)]
    start = first_index - first_block * HALF_ELEMENTS_PER_BLOCK
    return _interleave(halves, start + numel)[start:]


def fast_normal_error_bound(u1: torch.Tensor) -> torch.Tensor:
    """Largest ``|fused - reference|`` of a unit normal drawn by the GPU's fast Box-Muller from the uniform
    ``u1`` (the radius word's uniform), in float64: a few 1e-6 for a radius ``R`` near 1, 1.4e-5 at the
    largest radius; more only for u1 > 0.9994 (``R < 0.035``, and ``|n| <= R``), up to 6e-4 as u1 approaches 1."""
    radius = torch.sqrt(-2.0 * torch.log(u1.double().clamp(min=rng.BOX_MULLER_MIN_U)))
    log_part = torch.minimum(torch.full_like(radius, FAST_LOG_ERROR ** 0.5), FAST_LOG_ERROR / radius)
    return FAST_TRIG_ERROR * (1.0 + radius) + log_part


def standard_noise_error_bound(numel: int, distribution: str, seed: int, device="cpu",
                               first_index: int = 0, offset: Optional[int] = None, bits: int = 32) -> torch.Tensor:
    """Per element, the largest ``|fused - reference|`` of :func:`standard_noise` on a GPU (float64): 0 for
    uniform noise (no transcendentals), :func:`fast_normal_error_bound` of the element's pair for normal."""
    if distribution == "uniform":
        return torch.zeros(numel, dtype=torch.float64, device=device)
    if bits == 16:
        halves = _sixteen_bit_halves(numel + numel % 2, seed, device, rng.PURPOSE_NOISE, first_index, offset)
        bound = fast_normal_error_bound((halves[0::2] + 1).to(torch.float32) * HALF_SCALE)
        return bound.repeat_interleave(2)[:numel]
    words = _block_words(seed, numel, device, rng.PURPOSE_NOISE, first_index, offset)
    first = fast_normal_error_bound(rng.uint_to_uniform(words[0]))
    second = fast_normal_error_bound(rng.uint_to_uniform(words[2]))
    return _interleave([first, first, second, second], numel)


def rounding_bits(numel: int, seed: int, device="cpu", first_index: int = 0,
                  offset: Optional[int] = None) -> torch.Tensor:
    """The 16 random bits (int64 in [0, 2**16)) that drive the stochastic rounding of each element (purpose 1):
    element ``i`` takes half ``i % 2`` of word ``(i % 8) // 2`` of block ``i // 8``."""
    return _sixteen_bit_halves(numel, seed, device, rng.PURPOSE_ROUNDING, first_index, offset)


def _truncate_to_half(value: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 rounded toward zero (what ``cvt.rz.f16.f32`` does): finite values beyond the range
    saturate at +-65504, non-finite values pass through."""
    bits = value.view(torch.int32)
    kept = (bits & ~0x1FFF).view(torch.float32)  # 10 mantissa bits: exact in float16's normal range
    fixed_step = torch.trunc(value * 2.0**24) * 2.0**-24  # below 2**-14 float16's step is 2**-24
    truncated = torch.where(value.abs() < F16_SMALLEST_NORMAL, fixed_step, kept)
    finite = value.abs() < float("inf")
    return torch.where(finite, truncated.clamp(-65504.0, 65504.0), value).to(torch.float16)


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, bits16: torch.Tensor) -> torch.Tensor:
    """Round float32 ``value`` to ``dtype`` (float16 or bfloat16) up or down at random, unbiased.

    ``bits16`` (integers in [0, 2**16)) are added below the bits the target format keeps, and the sum is
    truncated: the magnitude rounds up with probability equal to the dropped fraction of a step, exactly.

    * bfloat16: ``(bits(value) + bits16) >> 16`` on the float32 bit pattern (a carry into the exponent is the
      next binade's value, so this is exact everywhere, subnormals included);
    * float16 with ``|value| >= 2**-14``: ``bits(value) + (bits16 >> 3)`` (13 bits), truncated to float16
      (round toward zero; finite values beyond the range saturate at +-65504);
    * float16 with ``|value| < 2**-14``, where float16's step is the fixed ``2**-24``:
      ``value + sign(value) * bits16 * 2**-40`` in float32, truncated; the float32 sum is rounded, so the
      probability is exact to ``2**-14`` of a step.

    NaN and infinities pass through; signed zeros keep their sign.
    """
    if dtype == torch.float32:
        return value
    bits = value.view(torch.int32).to(torch.int64) & rng.MASK32
    finite = value.abs() < float("inf")
    if dtype == torch.bfloat16:
        dithered = torch.where(finite, (bits + bits16) & rng.MASK32, bits) >> 16
        rounded = torch.empty(value.shape, dtype=torch.bfloat16, device=value.device)  # its own tensor, not a view
        rounded.view(torch.int16).copy_(_to_int16(dithered))
        return rounded
    normal = _from_uint32(bits + (bits16 >> 3)).view(torch.float32)
    signed_step = _from_uint32((bits & 0x80000000) | 0x2B800000).view(torch.float32)  # +-2**-40
    tiny = value + bits16.to(torch.float32) * signed_step
    dithered = torch.where(value.abs() < F16_SMALLEST_NORMAL, tiny, normal)
    return _truncate_to_half(torch.where(finite, dithered, value))


def _to_int16(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values >= 2**15, values - 2**16, values).to(torch.int16)


def _from_uint32(values: torch.Tensor) -> torch.Tensor:
    values = values & rng.MASK32
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def noisy_sum(x: torch.Tensor, residual: Optional[torch.Tensor], sigma: float, distribution: str, seed: int,
              stochastic: bool = False, first_index: int = 0, offset: Optional[int] = None) -> torch.Tensor:
    """``x (+ residual) + sigma * noise`` as a new tensor of x's dtype and shape (any strides)."""
    numel = x.numel()
    eps = standard_noise(numel, distribution, seed, x.device, first_index, offset, noise_bits(x.dtype))
    # Computed in x's shape (the flat draws in row-major order are a view of that shape), so the result is a tensor
    # of its own, not a view of a flat temporary: FSDP2 warns about a module returning a view (an in-place op on it
    # would skip its pre-backward hook).
    eps = (eps * torch.tensor(sigma, dtype=torch.float32, device=x.device)).view(x.shape)
    total = x.to(torch.float32)
    if residual is not None:
        total = total + residual.to(torch.float32)
    total = (total + eps).contiguous()  # x's strides may be any; the result is laid out row-major, as the ops' is
    if stochastic and x.dtype != torch.float32:
        bits = rounding_bits(numel, seed, x.device, first_index, offset).view(x.shape)
        return stochastic_round(total, x.dtype, bits)
    return total.to(x.dtype)


def add_noise_(x: torch.Tensor, sigma: float, distribution: str, seed: int, stochastic: bool = False,
               offset: Optional[int] = None) -> None:
    """In place: ``x += sigma * noise`` (through a temporary: this is the readable version, not the fast one)."""
    with torch.no_grad():
        x.copy_(noisy_sum(x, None, sigma, distribution, seed, stochastic, offset=offset))
