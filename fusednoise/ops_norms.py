"""Fused residual-add + norm ops with optional HyPe noise in the same pass, registered with ``torch.library``.

* :func:`add_rms_norm` (pre-LN, LLaMA / Mistral / Qwen2): ``s = x (+ residual) (+ eps)``, ``y = rms_norm(s) * w``;
  returns ``(y, s)``, ``s`` being the new residual stream (and, with noise, HyPe's noisy layer input).
* :func:`add_layer_norm` (post-LN, BERT / RoBERTa): ``y = layer_norm(x + residual) (+ eps)``: the next layer's
  input with its HyPe noise.

Rounding follows Hugging Face's eager layers, so a patched layer equals the unpatched one
(``reference/norms.py`` says where). The noise is the noise of :func:`fusednoise.add_residual_noise` /
:func:`fusednoise.add_noise` for the same seed, element for element (same philox words), including
``rounding="stochastic"`` and the CUDA-graph offset path.

Backward: ``dx = dresidual`` and ``dW`` (``dB``) accumulated in float32, the weight gradients as per-program
partial sums added in a fixed order (deterministic, no atomics). The noise is additive, so its derivative is the
identity: nothing is stored for it.

Schemas (all ``torch.library.custom_op``; the seed is drawn inside the op when ``None`` and the noise is on)::

    fusednoise::add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, float sigma,
                             str distribution, int? seed, bool stochastic) -> (Tensor y, Tensor s, Tensor rstd)
    fusednoise::add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps, float sigma,
                               str distribution, int? seed, bool stochastic) -> (Tensor y, Tensor mean, Tensor rstd)

``s`` is an empty tensor when it would equal ``x`` (no residual, no noise): an op's outputs may not alias its
inputs, and a copy would cost a pass; the Python functions return ``x`` itself then.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Tuple

import torch

from . import backends as _backend
from . import graph_offsets, rng
from .ops import DISTRIBUTIONS, ROUNDINGS
from .reference import norms as _reference
from .validation import check_float_tensor, check_real

_kernels = None  # fusednoise.kernels.norms, imported on the first kernel launch (it imports triton)


def _norm_kernels():
    global _kernels
    if _kernels is None:
        _kernels = importlib.import_module(".kernels.norms", __package__)
    return _kernels


# --------------------------------------------------------------------------------------------- validation
def _check(x, residual, weight, bias, eps, sigma, distribution, rounding, seed, residual_required: bool) -> None:
    check_float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (the features), got shape {tuple(x.shape)}")
    if residual is not None or residual_required:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        check_float_tensor(tensor, name)
        if tensor.shape != (x.shape[-1],) or tensor.device != x.device:
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) on {x.device}, got {tuple(tensor.shape)} on "
                             f"{tensor.device}")
    check_real(eps, "eps")
    check_real(sigma, "sigma")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if seed is not None:
        rng.check_seed(seed)


def _seed(seed: Optional[int], random: bool) -> int:
    # Drawn at run time inside the op (never in traced Python), and only when something random is drawn.
    if seed is None:
        return rng.draw_seed() if random else 0
    return seed


def _use_kernel(x: torch.Tensor, op: str) -> Tuple[str, bool]:
    """The backend of a call; a row wider than the kernel holds is an error naming the op on the triton one."""
    backend = _backend.resolve(x)
    if backend == "triton" and x.shape[-1] > _norm_kernels().MAX_FEATURES:
        raise ValueError(f"fusednoise.{op}: rows of {x.shape[-1]} features are wider than the kernel's "
                         f"{_norm_kernels().MAX_FEATURES}; use the reference backend for this call")
    return backend, backend == "triton"


# --------------------------------------------------------------------------------------------- RMSNorm
@torch.library.custom_op("fusednoise::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                     sigma: float, distribution: str, seed: Optional[int], stochastic: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noisy = sigma > 0 or (stochastic and residual is not None)
    seed = _seed(seed, noisy)
    backend, _ = _use_kernel(x, "add_rms_norm")
    offset = graph_offsets.kernel_offset(x, backend, "add_rms_norm") if noisy else None
    keeps_x = residual is None and not noisy
    stochastic = stochastic and noisy  # rounding an x already in its dtype changes nothing
    if backend == "reference":
        y, s, rstd = _reference.add_rms_norm(x, residual, weight, eps, sigma, distribution, seed, stochastic,
                                             offset=graph_offsets.offset_value(offset))
        return y, (x.new_empty(0) if keeps_x else s), rstd
    kernels = _norm_kernels()
    x_c = x.contiguous()
    residual_c = residual.contiguous() if residual is not None else None
    n_features = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if sigma > 0 and n_features % kernels.vec_for(x.dtype):
        # The in-row groups of the noise layout need N % VEC == 0: add the noise in its own pass instead.
        s = torch.empty_like(x_c)
        importlib.import_module(".kernels.noise", __package__).launch_noise(
            x_c, residual_c, s, sigma, distribution, seed, stochastic, 0, offset)
        kernels.rms_forward_launch(s, None, weight.contiguous(), y, None, rstd, eps, 0.0, distribution, seed,
                                   False, offset).run()
        return y, s, rstd
    s = None if keeps_x else torch.empty_like(x_c)
    if x.numel():
        kernels.rms_forward_launch(x_c, residual_c, weight.contiguous(), y, s, rstd, eps, sigma, distribution, seed,
                                   stochastic, offset).run()
    return y, (x.new_empty(0) if s is None else s), rstd


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, sigma, distribution, seed, stochastic):
    keeps_x = residual is None and not (sigma > 0)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    s = x.new_empty(0) if keeps_x else torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, s, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fusednoise::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward_op(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, rstd: torch.Tensor,
                              weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if _backend.resolve(s) == "reference" or s.numel() == 0:
        return _reference.add_rms_norm_backward(dy, ds, s, rstd, weight)
    kernels = _norm_kernels()
    n_features = s.shape[-1]
    plan = kernels.backward_plan(s.numel() // n_features, n_features, s.dtype.itemsize)
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    partial = torch.empty((plan[2], n_features), dtype=torch.float32, device=s.device)
    kernels.rms_backward_launch(dy.contiguous(), ds.contiguous() if ds is not None else None, s.contiguous(),
                                rstd.contiguous(), weight.contiguous(), dx, partial).run()
    return dx, partial.sum(0).to(weight.dtype)


@_add_rms_norm_backward_op.register_fake
def _(dy, ds, s, rstd, weight):
    return torch.empty_like(s, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_setup(ctx, inputs, output):
    x, residual, weight = inputs[0], inputs[1], inputs[2]
    _, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.keeps_x = s.numel() == 0 and x.numel() != 0
    ctx.save_for_backward(x if ctx.keeps_x else s, rstd, weight)


def _rms_backward(ctx, dy, ds, _drstd):
    s, rstd, weight = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s, dtype=torch.promote_types(s.dtype, weight.dtype))
    if ctx.keeps_x:
        ds = None  # s is x itself there: its gradient reaches x directly, not through this op
    dx, dw = torch.ops.fusednoise.add_rms_norm_backward(dy, ds, s, rstd, weight)
    return dx, (dx if ctx.has_residual else None), dw, None, None, None, None, None


torch.library.register_autograd("fusednoise::add_rms_norm", _rms_backward, setup_context=_rms_setup)


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-6,
                 sigma: float = 0.0, distribution: str = "normal", seed: Optional[int] = None,
                 rounding: str = "nearest", unit_offset: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, s)``: ``s = x (+ residual) (+ eps)``, ``y = rms_norm(s) * weight`` (LlamaRMSNorm's rounding).

    Args:
        x, residual: float32/float16/bfloat16 tensors of one shape, dtype and device; rows along the last dim.
            ``residual=None``: ``s = x (+ eps)``, and ``s`` is ``x`` itself when there is no noise.
        weight: the norm's ``(N,)`` weight; ``y`` has the promoted dtype of x and weight, as in the eager layer.
        eps: the variance epsilon (``config.rms_norm_eps``; LLaMA 1e-6 or 1e-5).
        sigma: HyPe noise scale (0: none). ``normal``: N(0, sigma^2); ``uniform``: U(-sigma, sigma). HyPe's
            default is 1e-5.
        distribution, seed, rounding: as :func:`fusednoise.add_residual_noise`, whose noise ``s`` equals.
        unit_offset: Gemma's RMSNorm, ``y = (rms_norm(s) * (1 + weight))`` with ``1 + weight`` taken in float32
            and ``y`` in float32 (``GemmaRMSNorm``: ``(x.float() * rsqrt(...) * (1.0 + w.float())).type_as(x)``).
            float32 ``x`` only: the op rounds the normalised value to x's dtype before the weight multiply (the
            LLaMA order), which in bfloat16 / float16 is not Gemma's single rounding (about a quarter of the
            outputs would be one unit in the last place off), so half-precision ``x`` is a TypeError.
    """
    _check(x, residual, weight, None, eps, sigma, distribution, rounding, seed, False)
    if not isinstance(unit_offset, bool):
        raise TypeError(f"unit_offset must be a bool, got {type(unit_offset).__name__}")
    if unit_offset:
        if x.dtype != torch.float32:
            raise TypeError(
                f"add_rms_norm(unit_offset=True) (Gemma's x * (1 + w), rounded once) needs float32 x, got {x.dtype}: "
                "the fused op rounds the normalised value to x's dtype before multiplying by the weight, which is "
                "not Gemma's arithmetic in half precision")
        weight = 1.0 + weight.float()  # GemmaRMSNorm's own float32 (1.0 + w); its gradient reaches w unchanged
    y, s, _ = torch.ops.fusednoise.add_rms_norm(x, residual, weight, float(eps), float(sigma), distribution, seed,
                                                rounding == "stochastic")
    return y, (x if s.numel() == 0 and x.numel() != 0 else s)


# --------------------------------------------------------------------------------------------- LayerNorm
@torch.library.custom_op("fusednoise::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       eps: float, sigma: float, distribution: str, seed: Optional[int], stochastic: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = _seed(seed, sigma > 0)
    backend, _ = _use_kernel(x, "add_layer_norm")
    offset = graph_offsets.kernel_offset(x, backend, "add_layer_norm") if sigma > 0 else None
    if backend == "reference":
        return _reference.add_layer_norm(x, residual, weight, bias, eps, sigma, distribution, seed, stochastic,
                                         offset=graph_offsets.offset_value(offset))
    kernels = _norm_kernels()
    x_c, residual_c = x.contiguous(), residual.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    bias_c = bias.contiguous() if bias is not None else None
    if x.numel() == 0:
        return y, mean, rstd
    if sigma > 0 and x.shape[-1] % kernels.vec_for(x.dtype):
        normed = torch.empty_like(y)
        kernels.layer_norm_forward_launch(x_c, residual_c, weight.contiguous(), bias_c, normed, mean, rstd, eps,
                                          0.0, distribution, seed, False, offset).run()
        importlib.import_module(".kernels.noise", __package__).launch_noise(
            normed, None, y, sigma, distribution, seed, stochastic, 0, offset)
        return y, mean, rstd
    kernels.layer_norm_forward_launch(x_c, residual_c, weight.contiguous(), bias_c, y, mean, rstd, eps, sigma,
                                      distribution, seed, stochastic, offset).run()
    return y, mean, rstd


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, sigma, distribution, seed, stochastic):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("fusednoise::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                mean: torch.Tensor, rstd: torch.Tensor) -> List[torch.Tensor]:
    if _backend.resolve(x) == "reference" or x.numel() == 0:
        return list(_reference.add_layer_norm_backward(dy, x, residual, weight, mean, rstd))
    kernels = _norm_kernels()
    n_features = x.shape[-1]
    plan = kernels.backward_plan(x.numel() // n_features, n_features, x.dtype.itemsize)
    ds = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((plan[2], n_features), dtype=torch.float32, device=x.device)
    db_partial = torch.empty_like(dw_partial)
    kernels.layer_norm_backward_launch(dy.contiguous(), x.contiguous(), residual.contiguous(), weight.contiguous(),
                                       mean.contiguous(), rstd.contiguous(), ds, dw_partial, db_partial).run()
    return [ds, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)]


@_add_layer_norm_backward_op.register_fake
def _(dy, x, residual, weight, mean, rstd):
    return [torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(weight)]


def _ln_setup(ctx, inputs, output):
    x, residual, weight, bias = inputs[:4]
    _, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, residual, weight, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = torch.ops.fusednoise.add_layer_norm_backward(dy, x, residual, weight, mean, rstd)
    return ds, ds, dw, (db if ctx.has_bias else None), None, None, None, None, None


torch.library.register_autograd("fusednoise::add_layer_norm", _ln_backward, setup_context=_ln_setup)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float = 1e-12, sigma: float = 0.0, distribution: str = "normal", seed: Optional[int] = None,
                   rounding: str = "nearest") -> torch.Tensor:
    """``layer_norm(x + residual) * weight + bias (+ eps)`` in one pass: a post-LN layer's output, with the
    next layer's HyPe noise (``add_noise`` of the eager output, same seed: the same noise).

    Args:
        x, residual: float32/float16/bfloat16 tensors of one shape, dtype and device; rows along the last dim.
        weight, bias: the LayerNorm's ``(N,)`` affine parameters (x's dtype; ``bias`` may be None).
        eps: the LayerNorm epsilon (BERT's ``layer_norm_eps``, 1e-12).
        sigma, distribution, seed, rounding: the noise, as :func:`fusednoise.add_noise` (0: none).
    """
    _check(x, residual, weight, bias, eps, sigma, distribution, rounding, seed, True)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
    y, _, _ = torch.ops.fusednoise.add_layer_norm(x, residual, weight, bias, float(eps), float(sigma), distribution,
                                                  seed, rounding == "stochastic")
    return y


__all__ = ["add_layer_norm", "add_rms_norm"]
