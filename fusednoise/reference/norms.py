"""Eager reference for the fused residual-add + norm ops: the executable spec of ``fusednoise/kernels/norms.py``.

Both ops work on rows of the last dimension (``N`` features) and round where Hugging Face's eager layers round,
so that a patched layer equals the unpatched one (``fusednoise/fused.py``):

* ``add_rms_norm`` (pre-LN: LLaMA, Mistral, Qwen2): ``s = x (+ residual) (+ eps)`` in float32, stored in x's
  dtype (nearest or stochastic rounding, the noise and rounding bits of ``reference.noise.noisy_sum`` for the flat
  index of each element, so ``s`` equals ``add_residual_noise(x, residual)`` bit for bit); then, from the stored
  ``s``, ``n = s * rsqrt(mean(s**2) + variance_eps)`` in float32, rounded to x's dtype, and ``y = n * w`` rounded
  to the promoted dtype of x and w (what ``LlamaRMSNorm`` does: ``weight * hidden.to(input_dtype)``).
* ``add_layer_norm`` (post-LN: BERT, RoBERTa): ``s = x + residual`` rounded to x's dtype (the eager
  ``hidden + input_tensor``), ``y = layer_norm(s) * w + b`` in float32, rounded to x's dtype; with noise, the
  rounded ``y`` gets ``reference.noise.noisy_sum``'s noise (``y + eps``, the next layer's HyPe input), exactly what
  ``add_noise`` applied to the eager LayerNorm's output gives.

The backward formulas are the float32 derivatives of the unrounded maps; additive noise has the identity as its
derivative, so nothing about it is stored. Saved per row: ``rstd`` (and ``mean`` for LayerNorm), float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .noise import noisy_sum


def rms_norm_sum(x: torch.Tensor, residual: Optional[torch.Tensor], sigma: float, distribution: str, seed: int,
                 stochastic: bool, offset: Optional[int] = None) -> torch.Tensor:
    """The new residual stream ``s = x (+ residual) (+ sigma * eps)`` in x's dtype."""
    if sigma > 0:
        return noisy_sum(x, residual, sigma, distribution, seed, stochastic, offset=offset)
    if residual is None:
        return x.clone()
    if stochastic:  # the float32 sum rounded with the seed's rounding bits, as add_residual_noise at sigma 0
        return noisy_sum(x, residual, 0.0, distribution, seed, True, offset=offset)
    return (x.float() + residual.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                 sigma: float, distribution: str, seed: int, stochastic: bool,
                 offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, s, rstd)``: the normalised output, the residual stream and the float32 ``rstd`` per row."""
    s = rms_norm_sum(x, residual, sigma, distribution, seed, stochastic, offset)
    sf = s.float()
    rstd = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    n = (sf * rstd).to(x.dtype)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = (n.float() * weight.float()).to(out_dtype)
    return y, s, rstd.squeeze(-1)


def add_rms_norm_backward(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)``: ``dx`` (= dresidual) in s's dtype, ``dw`` in weight's dtype, both accumulated in float32.

    With ``n = s * rstd``: ``dn = dy * w``, ``ds_norm = rstd * (dn - n * mean(dn * n))``, plus the gradient
    ``ds`` of the returned stream; ``dw = sum over rows of dy * n`` (n rounded to s's dtype, as the eager layer
    multiplies the weight by the rounded value)."""
    n_features = s.shape[-1]
    sf = s.float().reshape(-1, n_features)
    r = rstd.float().reshape(-1, 1)
    g = dy.float().reshape(-1, n_features)
    n = sf * r
    dn = g * weight.float()
    dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
    if ds is not None:
        dx = dx + ds.float().reshape(-1, n_features)
    dw = (g * n.to(s.dtype).float()).sum(0)
    return dx.to(s.dtype).reshape(s.shape), dw.to(weight.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float, sigma: float, distribution: str, seed: int, stochastic: bool,
                   offset: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: ``layer_norm(x + residual)`` (plus the noise), and the float32 row statistics."""
    s = (x.float() + residual.float()).to(x.dtype).float()
    mean = s.mean(-1, keepdim=True)
    rstd = torch.rsqrt((s - mean).pow(2).mean(-1, keepdim=True) + eps)
    y = (s - mean) * rstd * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if sigma > 0:
        y = noisy_sum(y, None, sigma, distribution, seed, stochastic, offset=offset)
    return y, mean.squeeze(-1), rstd.squeeze(-1)


def add_layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            mean: torch.Tensor, rstd: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ds, dw, db)``: ``ds`` is both dx and dresidual (x's dtype); ``dw``, ``db`` in weight's dtype.

    With ``xhat = (s - mean) * rstd`` and ``g = dy * w``:
    ``ds = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``dw = sum dy * xhat``, ``db = sum dy``."""
    n_features = x.shape[-1]
    s = (x.float() + residual.float()).to(x.dtype).float().reshape(-1, n_features)
    xhat = (s - mean.float().reshape(-1, 1)) * rstd.float().reshape(-1, 1)
    d = dy.float().reshape(-1, n_features)
    g = d * weight.float()
    ds = rstd.float().reshape(-1, 1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return ds.to(x.dtype).reshape(x.shape), (d * xhat).sum(0).to(weight.dtype), d.sum(0).to(weight.dtype)
