"""Eager reference for the LNSR ops (SPEC section 2): the executable spec of ``fusednoise/kernels/diff_norm.py``
and ``fusednoise/kernels/lnsr_noise.py``.

Layer-wise diff norm
--------------------
For L pairs of hidden states ``clean_r``, ``noisy_r`` of shape (B, T, D), a mask ``m`` (B, T) (nonzero keeps a
token, 0 drops it; all ones when absent), weights ``w_r`` (all ones when absent) and a reduction::

    term_r = w_r / B * sum_b 1/c_b * sum_{t,d} m_bt * (clean_r - noisy_r)_btd ** 2   (float32 whatever the dtype)
    c_b = 1 ("sum"),  n_b ("token_mean"),  n_b * D ("mean"),     n_b = sum_t [m_bt != 0]
    dterm_r / dclean_r = 2 w_r / (B c_b) * m * (clean_r - noisy_r),   dterm_r / dnoisy_r = -dterm_r / dclean_r

"sum" is the squared L2 distance over the tokens and hidden units of one example (the papers' formula read
literally), "token_mean" the squared distance per token vector averaged over the example's real tokens, "mean"
the mean squared error over its real tokens and hidden units. Every reduction averages over the B examples (an
example without a real token contributes 0). Both backends compute it as one float32 *row weight* per token,
``rho_bt = [m_bt != 0] / c_b`` (:func:`row_weights`; omitted when there is no mask, where ``c_b`` is the same for
every example and folds into the per-layer scale ``1 / (B c)``), so the kernel reads one float per token row.

Scaled Gaussian noise (LNSR "standard" noise, journal sec. III-E)
-----------------------------------------------------------------
For rows ``x_n`` (the last dimension, D) of ``x``: ``out_n = x_n + scale * ||x_n|| * e_n / ||e_n||`` with
``e ~ N(0, I)``; a zero row gets zero noise. Counter rule: ``e`` is the HyPe normal noise
(:func:`fusednoise.reference.noise.standard_noise`) of an ``(N, 4 * ceil(D / 4))`` matrix, of which the first D
columns are kept: element ``(n, d)`` takes word ``d % 4`` of ``philox(seed, j_lo, j_hi, 0, 0)`` with block
``j = n * ceil(D / 4) + d // 4`` (Box-Muller on the word pairs (0, 1) and (2, 3), cos then sin). Every row starts
on a fresh philox block, so a row's noise does not depend on the other rows. On the offset path (CUDA graphs) a
call with offset ``o`` draws with the counter's last two words ``rng.offset_counter_words(o)`` instead of
``(0, 0)``, here and in the in-manifold noise (see ``reference/noise.py``); every noise function below takes
``offset=None`` (the host path) or that ``o``.

The backward is the exact derivative: ``dx = g + scale * (e_n . g_n) / (||e_n|| ||x_n||) * x_n`` (only ``g`` for a
zero row, as torch's norm backward does).

In-manifold noise (journal, Algorithm 1)
----------------------------------------
For token ``t`` with neighbours ``n_1..n_k`` (its k nearest rows of the embedding matrix ``W``, nearest first):
differences ``d_j = W[n_j] - W[t]``, modified Gram-Schmidt in order j = 1..k without normalisation
(``d~_j = d_j - sum_{i<j} (d_j . d~_i) / (d~_i . d~_i) d~_i``), and ``eps = sum_j z_j d~_j`` with
``z_j = mix_ratio * N(0, 1)``. A ``d~_j`` whose squared length is at most ``DEPENDENT_RTOL2`` times that of
``d_j`` (a neighbour that duplicates the token or depends linearly on the earlier ones) is dropped (set to 0).
``z`` follows the same counter rule as the scaled noise, for an (N, k) matrix: ``z_{n,j}`` is word ``j % 4`` of
block ``n * ceil(k / 4) + j // 4``. ``out = x + eps``, computed in float32 and stored in x's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .noise import standard_noise

# A Gram-Schmidt residual below 1e-4 of its vector's length (squared: 1e-8) counts as linearly dependent.
DEPENDENT_RTOL2 = 1e-8


# --------------------------------------------------------------------------------------------- diff norm
REDUCTIONS = ("sum", "token_mean", "mean")


def row_weights(mask: Optional[torch.Tensor], reduction: str, batch: int, tokens: int,
                hidden: int) -> Tuple[Optional[torch.Tensor], float]:
    """``(rho, scale)`` with ``term_r = w_r * scale * sum_{b,t} rho_bt * sum_d (clean_r - noisy_r)^2``.

    With a mask: ``rho = [m != 0] / c_b`` as float32 (B, T) and ``scale = 1 / B``. Without one every example has
    ``c_b = c`` (1, T or T * D), so ``rho`` is None and ``scale = 1 / (B c)``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    per_token = float(hidden) if reduction == "mean" else 1.0
    if mask is None:
        count = 1.0 if reduction == "sum" else tokens * per_token
        return None, 1.0 / (max(batch, 1) * count)
    keep = (mask != 0).to(torch.float32)
    if reduction != "sum":
        # c_b = n_b (* D); an example without a real token has only zero weights, whatever c_b is.
        keep = keep / (keep.sum(dim=1, keepdim=True).clamp_min(1.0) * per_token)
    return keep, 1.0 / max(batch, 1)


def finish_terms(sums: torch.Tensor, weights: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Per-layer float32 weighted sums of squares -> the terms ``w_r * scale * sums_r`` (shared by every backend)."""
    terms = sums * scale
    if weights is not None:
        terms = terms * weights.to(torch.float32)
    return terms


def _weighted(values: torch.Tensor, rho: Optional[torch.Tensor]) -> torch.Tensor:
    # Padded rows are dropped, not multiplied by 0: what a padded position holds (even inf) must not leak in.
    if rho is None:
        return values
    return torch.where(rho[..., None] != 0, values * rho[..., None], torch.zeros((), dtype=values.dtype,
                                                                                device=values.device))


def diff_norm_sums(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor],
                   rho: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum rho * (clean_r - noisy_r)^2`` per layer, float32, shape (L,): the Python loop the kernel replaces.
    ``rho``: the (B, T) row weights of :func:`row_weights`, or None (all ones)."""
    sums = []
    for c, n in zip(clean, noisy):
        diff = c.to(torch.float32) - n.to(torch.float32)
        sums.append(_weighted(diff * diff, rho).sum())
    return torch.stack(sums)


def diff_norm(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], weights: Optional[torch.Tensor],
              mask: Optional[torch.Tensor], reduction: str = "sum") -> torch.Tensor:
    """The (L,) per-layer terms of the module docstring, float32."""
    B, T, D = clean[0].shape
    rho, scale = row_weights(mask, reduction, B, T, D)
    return finish_terms(diff_norm_sums(clean, noisy, rho), weights, scale)


def diff_norm_backward_into(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor], coef: torch.Tensor,
                            rho: Optional[torch.Tensor], grad_clean: Sequence[torch.Tensor],
                            grad_noisy: Sequence[torch.Tensor]) -> None:
    """Write ``coef_r * rho * (clean_r - noisy_r)`` into ``grad_clean[r]`` and its negation into ``grad_noisy[r]``.

    ``coef_r = 2 w_r g_r * scale`` (float32, shape (L,)), with ``g_r`` the incoming gradient of term r and
    ``scale`` from :func:`row_weights`.
    """
    for r, (c, n) in enumerate(zip(clean, noisy)):
        grad = _weighted(coef[r] * (c.to(torch.float32) - n.to(torch.float32)), rho)
        grad_clean[r].copy_(grad)
        grad_noisy[r].copy_(-grad)


# --------------------------------------------------------------------------------------------- random numbers
def row_normals(rows: int, cols: int, seed: int, device="cpu", offset: Optional[int] = None) -> torch.Tensor:
    """N(0, 1) float32 of shape (rows, cols): row n starts at philox block ``n * ceil(cols / 4)``."""
    padded = 4 * math.ceil(cols / 4)
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=torch.float32, device=device)
    return standard_noise(rows * padded, "normal", seed, device, offset=offset).view(rows, padded)[:, :cols]


# --------------------------------------------------------------------------------------------- scaled noise
def _row_sqnorm(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(dim=-1, keepdim=True)


def scaled_noise(x: torch.Tensor, scale: float, seed: int, offset: Optional[int] = None) -> torch.Tensor:
    """``x + scale * ||x|| * e / ||e||`` per row of the last dimension (new tensor, x's dtype and shape)."""
    D = x.shape[-1] if x.dim() else 1
    x32 = x.reshape(-1, D).to(torch.float32)
    e = row_normals(x32.shape[0], D, seed, x.device, offset)
    x_norm = torch.sqrt(_row_sqnorm(x32))
    e_norm = torch.sqrt(_row_sqnorm(e))
    factor = torch.where((x_norm > 0) & (e_norm > 0), float(scale) * x_norm / e_norm, torch.zeros_like(x_norm))
    return (x32 + factor * e).to(x.dtype).reshape(x.shape)


def scaled_noise_backward(grad: torch.Tensor, x: torch.Tensor, scale: float, seed: int,
                          offset: Optional[int] = None) -> torch.Tensor:
    """The exact vector-Jacobian product of :func:`scaled_noise`: ``g + scale (e.g)/(|e||x|) x`` per row."""
    D = x.shape[-1] if x.dim() else 1
    x32 = x.reshape(-1, D).to(torch.float32)
    g32 = grad.reshape(-1, D).to(torch.float32)
    e = row_normals(x32.shape[0], D, seed, x.device, offset)
    x_norm = torch.sqrt(_row_sqnorm(x32))
    e_norm = torch.sqrt(_row_sqnorm(e))
    dot = (e * g32).sum(dim=-1, keepdim=True)
    ok = (x_norm > 0) & (e_norm > 0)
    coef = torch.where(ok, float(scale) * dot / torch.where(ok, e_norm * x_norm, torch.ones_like(x_norm)),
                       torch.zeros_like(x_norm))
    return (g32 + coef * x32).to(grad.dtype).reshape(x.shape)


# --------------------------------------------------------------------------------------------- in-manifold noise
def nearest_neighbors_bruteforce(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest rows (Euclidean, self excluded, nearest first) of every row: all pairs at once (small V)."""
    w = weight.detach().to(torch.float64)
    dist = torch.cdist(w, w)
    dist.fill_diagonal_(float("inf"))
    return torch.topk(dist, k, dim=1, largest=False).indices


def nearest_neighbors(weight: torch.Tensor, k: int, row_chunk: int = 1024, col_chunk: int = 16384) -> torch.Tensor:
    """The k nearest rows (Euclidean, self excluded, nearest first) of every row of ``weight`` (V, D).

    Chunked: a block of ``row_chunk`` rows is scored against ``col_chunk`` columns at a time with one matmul
    (``|b|^2 - 2 a.b``: ``|a|^2`` is the same for a whole row and does not change its ranking) and the running
    top-k is merged, so memory stays at ``row_chunk * (col_chunk + k)`` scores; nothing V x V is held. Scores are
    float32 whatever the weight's dtype. Runs on the weight's device (a GPU matmul + topk on CUDA).
    Returns int64 (V, k).
    """
    V = weight.shape[0]
    w = weight.detach()
    device = w.device
    out = torch.empty(V, k, dtype=torch.int64, device=device)
    sq_all = torch.empty(V, dtype=torch.float32, device=device)
    for c0 in range(0, V, col_chunk):
        block = w[c0:c0 + col_chunk].to(torch.float32)
        sq_all[c0:c0 + col_chunk] = (block * block).sum(dim=1)
    for r0 in range(0, V, row_chunk):
        rows = w[r0:r0 + row_chunk].to(torch.float32)
        n_rows = rows.shape[0]
        row_ids = torch.arange(r0, r0 + n_rows, device=device)
        best_score = torch.full((n_rows, k), float("inf"), dtype=torch.float32, device=device)
        best_index = torch.zeros((n_rows, k), dtype=torch.int64, device=device)
        for c0 in range(0, V, col_chunk):
            cols = w[c0:c0 + col_chunk].to(torch.float32)
            score = sq_all[c0:c0 + cols.shape[0]][None, :] - 2.0 * (rows @ cols.T)
            col_ids = torch.arange(c0, c0 + cols.shape[0], device=device)
            score = score.masked_fill(row_ids[:, None] == col_ids[None, :], float("inf"))
            take = min(k, cols.shape[0])
            part_score, part_pos = torch.topk(score, take, dim=1, largest=False)
            merged_score = torch.cat([best_score, part_score], dim=1)
            merged_index = torch.cat([best_index, part_pos + c0], dim=1)
            best_score, pos = torch.topk(merged_score, k, dim=1, largest=False, sorted=True)
            best_index = torch.gather(merged_index, 1, pos)
        out[r0:r0 + n_rows] = best_index
    return out


def gram_schmidt_noise(diffs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sum_j z_j d~_j`` for differences (N, k, D) float32 and coefficients z (N, k): modified Gram-Schmidt."""
    d = diffs.clone()
    original = (d * d).sum(dim=-1)                                 # (N, k)
    eps = torch.zeros(d.shape[0], d.shape[2], dtype=torch.float32, device=d.device)
    k = d.shape[1]
    for j in range(k):
        dj = d[:, j]
        nj = (dj * dj).sum(dim=-1)                                  # (N,)
        keep = (nj > DEPENDENT_RTOL2 * original[:, j]) & (nj > 0)
        dj = torch.where(keep[:, None], dj, torch.zeros_like(dj))
        eps = eps + z[:, j:j + 1] * dj
        if j + 1 < k:
            rest = d[:, j + 1:]
            proj = (rest * dj[:, None, :]).sum(dim=-1) / torch.where(keep, nj, torch.ones_like(nj))[:, None]
            d[:, j + 1:] = rest - proj[..., None] * dj[:, None, :]
    return eps


def in_manifold_noise(x: torch.Tensor, token_ids: torch.Tensor, weight: torch.Tensor, neighbors: torch.Tensor,
                      mix_ratio: float, seed: int, offset: Optional[int] = None) -> torch.Tensor:
    """``x + eps`` with the in-manifold noise of the module docstring (new tensor, x's dtype and shape)."""
    D = x.shape[-1]
    ids = token_ids.reshape(-1).to(torch.int64)
    N = ids.shape[0]
    k = neighbors.shape[1]
    nb = neighbors[ids].to(torch.int64)                             # (N, k)
    w = weight.detach()
    diffs = w[nb].to(torch.float32) - w[ids].to(torch.float32)[:, None, :]
    z = float(mix_ratio) * row_normals(N, k, seed, x.device, offset)
    eps = gram_schmidt_noise(diffs, z)
    return (x.reshape(N, D).to(torch.float32) + eps).to(x.dtype).reshape(x.shape)


__all__ = [
    "DEPENDENT_RTOL2", "REDUCTIONS", "diff_norm", "diff_norm_backward_into", "diff_norm_sums", "finish_terms",
    "gram_schmidt_noise", "in_manifold_noise", "nearest_neighbors", "nearest_neighbors_bruteforce", "row_normals",
    "row_weights", "scaled_noise", "scaled_noise_backward",
]
