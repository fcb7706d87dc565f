"""Eager reference for NoisyTune: the executable spec of ``fusednoise/kernels/noisytune.py`` (SPEC section 3).

For a parameter matrix ``W`` with stream index ``k`` (its position in the model's parameter list)::

    std  = unbiased standard deviation of W, computed in float32 on the shifted values d = W - W[0]
    W   <- W + (u - 0.5) * (lambda * std),   u ~ U[0, 1)        i.e. W + U(-lambda/2, lambda/2) * std(W)

Shifting by the first element does not change the variance, keeps the float32 sums well conditioned, and makes
the standard deviation of a constant matrix exactly 0 (plain ``torch.std`` of a constant float32 tensor can come
out at 1e-9 instead), so constant matrices are left untouched bit for bit, as the paper requires.

Random numbers (SPEC section 0, the layout of ``reference/noise.py``): element ``i`` (row-major logical order)
belongs to philox block ``j = i // 4`` and takes the uniform of word ``i % 4`` of
``philox(seed, c0 = j & 0xFFFFFFFF, c1 = j >> 32, c2 = k, c3 = 0)``. One seed per call; the stream ``k`` keeps
the matrices apart, so a matrix draws the same noise whatever else is perturbed with it.

The new value is computed in float32 and stored in the parameter's dtype (rounded to nearest).
"""
from __future__ import annotations

import torch

from .. import rng

WORDS_PER_BLOCK = 4


def matrix_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation of ``x`` (at least 2 elements) as a float32 0-dim tensor; exactly 0 when
    every element is equal."""
    flat = x.detach().reshape(-1).to(torch.float32)
    shifted = flat - flat[0]
    return torch.sqrt(shifted.var(unbiased=True))


def uniform_noise(numel: int, seed: int, stream: int, device="cpu") -> torch.Tensor:
    """U[0, 1) float32 for elements ``0 .. numel-1`` of stream ``stream``."""
    n_blocks = -(-numel // WORDS_PER_BLOCK)
    lo, hi = rng.block_counters(torch.arange(n_blocks, dtype=torch.int64, device=device))
    words = rng.philox4x32(seed, lo, hi, stream, rng.PURPOSE_NOISE)
    return torch.stack([rng.uint_to_uniform(w) for w in words], dim=1).reshape(-1)[:numel]


def perturb_tensor_(x: torch.Tensor, noise_lambda: float, seed: int, stream: int) -> torch.Tensor:
    """``x += U(-lambda/2, lambda/2) * std(x)`` in place; returns the std (float32, 0-dim).

    A matrix whose std is 0 or not finite is left untouched.
    """
    with torch.no_grad():
        std = matrix_std(x)
        if not (bool(torch.isfinite(std)) and float(std) > 0.0):
            return std
        scale = torch.tensor(noise_lambda, dtype=torch.float32, device=x.device) * std
        noise = (uniform_noise(x.numel(), seed, stream, x.device) - 0.5) * scale
        new = x.detach().reshape(-1).to(torch.float32) + noise
        x.copy_(new.view(x.shape).to(x.dtype))
        return std
