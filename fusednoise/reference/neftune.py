"""Eager reference for NEFTune's noise (SPEC section 4b): the executable spec of ``fusednoise/kernels/neftune.py``.

For embeddings ``x`` of shape (..., T, D) (rows of D features, T tokens per example) and an optional attention
mask ``m`` of shape x.shape[:-1] (nonzero keeps a token, 0 marks padding; all ones when absent)::

    L_b   = number of kept tokens of example b                     (the paper's L, per example)
    s_b   = alpha / sqrt(L_b * D)                                   (0 when L_b = 0)
    out   = x + s_b * U(-1, 1)   on kept tokens,   out = x   on padded tokens (bit for bit)

Packed and padding-free rows (TRL's packing, ``DataCollatorWithFlattening``) hold several sequences: with
``position_ids`` a row's sequences start at its first token and wherever ``position_ids`` is 0; with
``cu_seq_lens`` (the cumulative sequence lengths over the flattened tokens, as the varlen attention kernels take
them) at each of its entries. ``L_b`` is then each *sequence*'s kept-token count (:func:`token_lengths`), and every
token takes its own sequence's scale.

``s_b`` is float32 arithmetic with IEEE rounding at each step: ``float32(L_b * D)``, its correctly rounded square
root, then the correctly rounded quotient (numpy's float32 ``sqrt`` and ``/``; torch's CPU ``sqrt`` is not always
correctly rounded, and the kernel uses ``sqrt_rn``/``div_rn``, so both backends get the same bits).

Counter rule (the same as LNSR's scaled noise): the token rows ``n`` of ``x`` (flattened to (N, D)) start each on
a fresh philox block; element ``(n, d)`` takes word ``d % 4`` of ``philox(seed, j_lo, j_hi, 0, 0)`` with block
``j = n * ceil(D / 4) + d // 4``, as ``U(-1, 1) = 2 u - 1`` of Triton's ``uint_to_uniform_float``. For D a multiple
of 4 (every real model) this is the flat layout of :func:`fusednoise.add_noise`'s uniform noise: the NEFTune noise
of a tensor is HyPe-U's noise with sigma 1, scaled per example.

The sum is taken in float32 and rounded to nearest in x's dtype. On the offset path (CUDA graphs) a call with
offset ``o`` draws with the counter's last two words ``rng.offset_counter_words(o)`` (see ``reference/noise.py``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .noise import standard_noise


def kept_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The (N,) bool keep flag of every token row of ``x`` (all True without a mask)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=x.device)
    return mask.reshape(-1) != 0


def token_lengths(shape, mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                  cu_seq_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (N,) int64 kept-token count of the sequence each token row of embeddings of ``shape`` (..., T, D)
    belongs to: a row's sequences start at its first token and where ``position_ids`` (x.shape[:-1]) is 0, or at
    the entries of ``cu_seq_lens`` (1-D, cumulative lengths over the N flattened tokens). A few integer ops on the
    device (a prefix sum, one scatter-add and one gather over the N tokens), the same on both backends."""
    T = shape[-2]
    n_rows = 1
    for size in shape[:-1]:
        n_rows *= size
    device = (position_ids if position_ids is not None else cu_seq_lens if cu_seq_lens is not None else mask).device
    index = torch.arange(n_rows + 1, device=device)  # one slot past the end: where cu_seq_lens' last entry falls
    starts = index % T == 0
    if position_ids is not None:
        starts[:n_rows] |= position_ids.reshape(-1) == 0
    if cu_seq_lens is not None:  # an index_put, no boolean indexing: no host sync (CUDA graphs can capture it)
        starts[cu_seq_lens.reshape(-1).to(torch.int64).clamp(0, n_rows)] = True
    starts = starts[:n_rows]
    sequence = torch.cumsum(starts, dim=0) - 1
    kept = torch.ones(n_rows, dtype=torch.int64, device=device) if mask is None else (mask.reshape(-1) != 0).long()
    counts = torch.zeros(n_rows, dtype=torch.int64, device=device).index_add_(0, sequence, kept)
    return counts[sequence]


def row_scales(lengths: torch.Tensor, alpha: float, D: int) -> torch.Tensor:
    """``alpha / sqrt(L * D)`` per example in IEEE float32 (0 where ``L == 0``), from int lengths (B,)."""
    product = (lengths.detach().cpu().numpy().astype(np.int64) * D).astype(np.float32)
    with np.errstate(divide="ignore"):
        scales = np.float32(alpha) / np.sqrt(product)
    scales = np.where(product > 0, scales, np.float32(0.0)).astype(np.float32)
    return torch.from_numpy(scales).to(lengths.device)


def uniform_rows(n_rows: int, D: int, seed: int, device="cpu", offset: Optional[int] = None) -> torch.Tensor:
    """The (n_rows, D) U(-1, 1) float32 noise of the counter rule above (``offset``: the offset path's)."""
    padded = 4 * -(-D // 4)
    return standard_noise(n_rows * padded, "uniform", seed, device, offset=offset).view(n_rows, padded)[:, :D]


def neftune_noise(x: torch.Tensor, alpha: float, mask: Optional[torch.Tensor], seed: int,
                  offset: Optional[int] = None, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + alpha / sqrt(L_b * D) * U(-1, 1)`` on kept tokens, ``x`` on padded ones; a new tensor of x's dtype
    and shape (``offset``: None on the host path). ``lengths``: packed rows' (N,) per-token sequence lengths
    (:func:`token_lengths`), None for one sequence per row."""
    D, T = x.shape[-1], x.shape[-2]
    if x.numel() == 0:
        return x.clone()
    rows = x.reshape(-1, D)
    keep = kept_tokens(x, mask)
    if lengths is None:
        scale = row_scales(keep.view(-1, T).sum(dim=1), alpha, D).repeat_interleave(T)
    else:
        scale = row_scales(lengths, alpha, D)
    noisy = rows.to(torch.float32) + uniform_rows(rows.shape[0], D, seed, x.device, offset) * scale[:, None]
    out = torch.where(keep[:, None], noisy.to(x.dtype), rows)
    return out.reshape(x.shape)
