"""Eager reference for the HyPe noise ops: the executable spec of ``fusednoise/kernels/noise.py``.

Element ``i`` (row-major logical order of the tensor) belongs to philox block ``j = i // 4`` and takes word
``w = i % 4`` of ``philox(seed, c0=j_lo, c1=j_hi, c2=0, c3=0)``:

* uniform: ``eps = sigma * (2 * uniform(word_w) - 1)``, i.e. U(-sigma, sigma);
* normal: Box-Muller of the word pairs (0, 1) and (2, 3); elements ``4j, 4j+1`` take the cos and sin outputs of
  the first pair, ``4j+2, 4j+3`` those of the second, times sigma.

Drawing four values from each philox call (not one, as ``tl.randn`` does) quarters the integer work, which is
what keeps a half-precision noise kernel memory-bound rather than compute-bound on a GPU.

Everything is computed in float32: ``out = (x + residual) + eps``, then stored in x's dtype, rounded to
nearest or stochastically (the uniform of word ``i % 4`` of ``philox(seed, j_lo, j_hi, 0, 1)`` picks between
the two neighbours of the float32 value with probability proportional to closeness).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import rng

DISTRIBUTIONS = ("normal", "uniform")
WORDS_PER_BLOCK = 4


def _block_words(seed: int, numel: int, device, purpose: int, first_index: int = 0):
    n_blocks = -(-numel // WORDS_PER_BLOCK)
    first_block = first_index // WORDS_PER_BLOCK
    blocks = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    lo, hi = rng.block_counters(blocks)
    return rng.philox4x32(seed, lo, hi, 0, purpose)


def _interleave(values, numel: int) -> torch.Tensor:
    return torch.stack(values, dim=1).reshape(-1)[:numel]


def standard_noise(numel: int, distribution: str, seed: int, device="cpu", first_index: int = 0) -> torch.Tensor:
    """Unit-scale noise for ``numel`` elements in logical order: N(0, 1) or U(-1, 1), float32.

    ``first_index`` (a multiple of 4) starts the draw at that flat index of a larger tensor.
    """
    n_blocks = -(-numel // WORDS_PER_BLOCK)
    # Row j: the uniforms of block j's four words, so flattening puts word w of block j at element 4j + w.
    uniforms = rng.philox_uniforms(seed, n_blocks, first_index // WORDS_PER_BLOCK, 0, rng.PURPOSE_NOISE, device)
    if distribution == "uniform":
        return (2.0 * uniforms - 1.0).view(-1)[:numel]
    if distribution == "normal":
        # Both pairs at once: (cos, sin) of pair (0, 1) are elements 4j, 4j+1, those of pair (2, 3) 4j+2, 4j+3.
        cos, sin = rng.box_muller(uniforms[:, 0::2], uniforms[:, 1::2])
        return torch.stack([cos, sin], dim=2).view(-1)[:numel]
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def rounding_uniforms(numel: int, seed: int, device="cpu", first_index: int = 0) -> torch.Tensor:
    """The uniforms that drive stochastic rounding, one per element (purpose word 1)."""
    words = _block_words(seed, numel, device, rng.PURPOSE_ROUNDING, first_index)
    return _interleave([rng.uint_to_uniform(w) for w in words], numel)


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, uniform: torch.Tensor) -> torch.Tensor:
    """Round float32 ``value`` to ``dtype`` (float16 or bfloat16) up or down at random, unbiased.

    ``lo`` is ``value`` rounded toward zero, ``up`` the next representable magnitude; ``up`` is taken when
    ``uniform * (|up| - |lo|) < |value| - |lo|``. Works on the 16-bit patterns, so it is exact for both
    formats, subnormals and signed zeros included; NaN and inf pass through.
    """
    if dtype == torch.float32:
        return value
    nearest = value.to(dtype)
    bits = nearest.view(torch.int16)
    rounded_away = nearest.to(torch.float32).abs() > value.abs()
    lo_bits = torch.where(rounded_away, bits - 1, bits)
    up_bits = lo_bits + 1
    lo_mag = lo_bits.view(dtype).to(torch.float32).abs()
    up_mag = up_bits.view(dtype).to(torch.float32).abs()
    take_up = uniform * (up_mag - lo_mag) < value.abs() - lo_mag
    return torch.where(take_up, up_bits, lo_bits).view(dtype)


def noisy_sum(x: torch.Tensor, residual: Optional[torch.Tensor], sigma: float, distribution: str, seed: int,
              stochastic: bool = False, first_index: int = 0) -> torch.Tensor:
    """``x (+ residual) + sigma * noise`` as a new tensor of x's dtype and shape (any strides)."""
    numel = x.numel()
    eps = standard_noise(numel, distribution, seed, x.device, first_index)
    eps = eps * torch.tensor(sigma, dtype=torch.float32, device=x.device)
    total = x.reshape(-1).to(torch.float32)
    if residual is not None:
        total = total + residual.reshape(-1).to(torch.float32)
    total = total + eps
    if stochastic and x.dtype != torch.float32:
        out = stochastic_round(total, x.dtype, rounding_uniforms(numel, seed, x.device, first_index))
    else:
        out = total.to(x.dtype)
    return out.reshape(x.shape)


def add_noise_(x: torch.Tensor, sigma: float, distribution: str, seed: int, stochastic: bool = False) -> None:
    """In place: ``x += sigma * noise`` (through a temporary: this is the readable version, not the fast one)."""
    with torch.no_grad():
        x.copy_(noisy_sum(x, None, sigma, distribution, seed, stochastic))
