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

Sharded matrices (FSDP2, SPEC section 4c): each rank takes the float64 moments ``(n, mean, M2)`` of its shard
(:func:`shard_moments`), the ranks' moments are merged in rank order by Chan et al.'s formula
(:func:`merge_moments`), and element ``i`` of the unsharded matrix draws the word above whichever rank holds it
(:func:`add_scaled_noise_` with the shard's ``first`` index). The std agrees with the unsharded float32 one to
float32 rounding; a constant matrix still gets exactly 0 (float64 moments of equal values are exact).
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


def uniform_noise(numel: int, seed: int, stream: int, device="cpu", first: int = 0) -> torch.Tensor:
    """U[0, 1) float32 for elements ``first .. first + numel - 1`` of stream ``stream``."""
    first_block = first // WORDS_PER_BLOCK
    n_blocks = -(-(first + numel) // WORDS_PER_BLOCK) - first_block
    lo, hi = rng.block_counters(torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device))
    words = rng.philox4x32(seed, lo, hi, stream, rng.PURPOSE_NOISE)
    skip = first - first_block * WORDS_PER_BLOCK
    return torch.stack([rng.uint_to_uniform(w) for w in words], dim=1).reshape(-1)[skip:skip + numel]


def add_scaled_noise_(x: torch.Tensor, noise_lambda: float, seed: int, stream: int, std: torch.Tensor,
                      first: int = 0) -> None:
    """``x += (u - 0.5) * (lambda * std)`` in place, ``u`` the draws of elements ``first ..`` (``first``: a
    shard's index in the unsharded matrix); nothing is written when ``std`` (float32, 0-dim) is 0 or not
    finite."""
    with torch.no_grad():
        if not (bool(torch.isfinite(std)) and float(std) > 0.0) or x.numel() == 0:
            return
        scale = torch.tensor(noise_lambda, dtype=torch.float32, device=x.device) * std
        noise = (uniform_noise(x.numel(), seed, stream, x.device, first) - 0.5) * scale
        new = x.detach().reshape(-1).to(torch.float32) + noise
        x.copy_(new.view(x.shape).to(x.dtype))


def perturb_tensor_(x: torch.Tensor, noise_lambda: float, seed: int, stream: int) -> torch.Tensor:
    """``x += U(-lambda/2, lambda/2) * std(x)`` in place; returns the std (float32, 0-dim).

    A matrix whose std is 0 or not finite is left untouched.
    """
    std = matrix_std(x)
    add_scaled_noise_(x, noise_lambda, seed, stream, std)
    return std


def shard_moments(x: torch.Tensor) -> torch.Tensor:
    """``(n, mean, M2)`` of a shard's values in float64 (zeros for an empty shard), ``M2`` the sum of squared
    deviations from the shard's mean."""
    flat = x.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    mean = flat.mean()
    return torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=x.device), mean,
                        (flat - mean).square().sum()])


def merge_moments(moments: torch.Tensor) -> torch.Tensor:
    """The unbiased std (float32) of each matrix from its shards' moments: ``moments`` is ``(ranks, matrices,
    3)``, merged in rank order (Chan et al.: ``delta = mean_b - mean_a``, ``M2 += M2_b + delta^2 n_a n_b / n``)."""
    n, mean, m2 = (moments[0, :, i].clone() for i in range(3))
    for rank in range(1, moments.shape[0]):
        n_b, mean_b, m2_b = moments[rank].unbind(1)
        total = n + n_b
        safe = torch.where(total > 0, total, torch.ones_like(total))  # both shards empty: stays 0
        delta = mean_b - mean
        mean = mean + delta * (n_b / safe)
        m2 = m2 + m2_b + delta.square() * (n * n_b / safe)
        n = total
    return (m2 / (n - 1.0)).sqrt().to(torch.float32)
