"""The public HyPe noise ops: input checks, backend dispatch and autograd, registered with ``torch.library``.

Each op is a ``torch.library.custom_op`` so ``torch.compile(fullgraph=True)`` traces through it without a
graph break; the seed is drawn *inside* the op from torch's CPU generator when the caller gives none (a draw
in Python would break the graph, and drawing at run time is what makes activation checkpointing replay the
same noise).

Gradients pass through unchanged: the noise is additive and independent of the input, d(x + eps)/dx = I.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backend
from . import rng
from .reference import noise as _reference
from .validation import check_float_tensor, check_real

DISTRIBUTIONS = ("normal", "uniform")
ROUNDINGS = ("nearest", "stochastic")


# --------------------------------------------------------------------------------------------- validation
def _check_args(x, sigma, distribution, rounding, seed, residual=None) -> None:
    check_float_tensor(x, "x")
    check_real(sigma, "sigma")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if seed is not None:
        rng.check_seed(seed)
    if residual is not None:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")


# --------------------------------------------------------------------------------------------- dispatch
def _run(x: torch.Tensor, residual: Optional[torch.Tensor], out: Optional[torch.Tensor], sigma: float,
         distribution: str, seed: int, stochastic: bool) -> torch.Tensor:
    """Compute ``x (+ residual) + noise`` into ``out`` (a new tensor when None; ``x`` itself for in place)."""
    if _backend.resolve(x) == "reference":
        result = _reference.noisy_sum(x, residual, sigma, distribution, seed, stochastic)
        if out is None:
            return result
        out.copy_(result)
        return out
    from .kernels.noise import launch_noise  # triton is imported only when a kernel runs

    x_c = x.contiguous()
    residual_c = residual.contiguous() if residual is not None else None
    target = out
    if target is None:
        target = torch.empty_like(x_c, memory_format=torch.contiguous_format)
    elif not target.is_contiguous():
        # In place on a strided view: the kernel writes a contiguous copy that is then scattered back.
        target = torch.empty_like(x_c, memory_format=torch.contiguous_format)
    launch_noise(x_c, residual_c, target, sigma, distribution, seed, stochastic)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def _seed_or_draw(seed: Optional[int]) -> int:
    return rng.draw_seed() if seed is None else seed


# --------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fusednoise::add_noise_", mutates_args=("x",))
def _add_noise_inplace_op(x: torch.Tensor, sigma: float, distribution: str, seed: Optional[int],
                          stochastic: bool) -> None:
    with torch.no_grad():
        _run(x, None, x, sigma, distribution, _seed_or_draw(seed), stochastic)


@_add_noise_inplace_op.register_fake
def _(x, sigma, distribution, seed, stochastic):
    return None


@torch.library.custom_op("fusednoise::add_noise", mutates_args=())
def _add_noise_op(x: torch.Tensor, sigma: float, distribution: str, seed: Optional[int],
                  stochastic: bool) -> torch.Tensor:
    return _run(x, None, None, sigma, distribution, _seed_or_draw(seed), stochastic)


@_add_noise_op.register_fake
def _(x, sigma, distribution, seed, stochastic):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fusednoise::add_residual_noise", mutates_args=())
def _add_residual_noise_op(x: torch.Tensor, residual: torch.Tensor, sigma: float, distribution: str,
                           seed: Optional[int], stochastic: bool) -> torch.Tensor:
    return _run(x, residual, None, sigma, distribution, _seed_or_draw(seed), stochastic)


@_add_residual_noise_op.register_fake
def _(x, residual, sigma, distribution, seed, stochastic):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _identity_backward(ctx, grad):
    return grad, None, None, None, None


def _residual_backward(ctx, grad):
    return grad, grad, None, None, None, None


torch.library.register_autograd("fusednoise::add_noise", _identity_backward)
torch.library.register_autograd("fusednoise::add_residual_noise", _residual_backward)


class _AddNoiseInplace(torch.autograd.Function):
    """In-place noise under autograd: ``mark_dirty`` gives autograd's own checks (leaf tensors, saved
    tensors modified in place) and the identity backward."""

    @staticmethod
    def forward(ctx, x, sigma, distribution, seed, stochastic):
        torch.ops.fusednoise.add_noise_(x, sigma, distribution, seed, stochastic)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def _refuse_inplace_on_leaf(x: torch.Tensor) -> None:
    # autograd.Function only checks a leaf after forward has already written it: check first, so an error
    # leaves the tensor untouched. Same messages as autograd's own.
    if x.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    if x._base is not None and x._base.is_leaf and x._base.requires_grad:
        raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")


# --------------------------------------------------------------------------------------------- public API
def add_noise_(x: torch.Tensor, sigma: float, distribution: str = "normal", seed: Optional[int] = None,
               rounding: str = "nearest") -> torch.Tensor:
    """Add noise to ``x`` in place and return it: one read and one write of ``x``, no noise tensor.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (non-contiguous views are handled through a
            contiguous copy).
        sigma: noise scale, >= 0. ``normal``: eps ~ N(0, sigma^2) (sigma is the standard deviation);
            ``uniform``: eps ~ U(-sigma, sigma). HyPe's default is 1e-5.
        distribution: "normal" (HyPe-N) or "uniform" (HyPe-U).
        seed: philox seed in [0, 2**62); ``None`` draws one from torch's CPU generator.
        rounding: "nearest" or "stochastic" (float16/bfloat16 only: unbiased rounding of the float32 sum, so a
            noise far below the format's resolution still moves the values in expectation).

    Gradients pass through unchanged. Where autograd forbids an in-place change (a leaf that requires grad,
    a tensor saved for backward) autograd raises its usual error.
    """
    _check_args(x, sigma, distribution, rounding, seed)
    stochastic = rounding == "stochastic"
    if torch.is_grad_enabled() and x.requires_grad:
        _refuse_inplace_on_leaf(x)
        return _AddNoiseInplace.apply(x, float(sigma), distribution, seed, stochastic)
    torch.ops.fusednoise.add_noise_(x, float(sigma), distribution, seed, stochastic)
    return x


def add_noise(x: torch.Tensor, sigma: float, distribution: str = "normal", seed: Optional[int] = None,
              rounding: str = "nearest") -> torch.Tensor:
    """``x + eps`` as a new tensor; the same noise as :func:`add_noise_` for the same seed."""
    _check_args(x, sigma, distribution, rounding, seed)
    return torch.ops.fusednoise.add_noise(x, float(sigma), distribution, seed, rounding == "stochastic")


def add_residual_noise(x: torch.Tensor, residual: torch.Tensor, sigma: float, distribution: str = "normal",
                       seed: Optional[int] = None, rounding: str = "nearest") -> torch.Tensor:
    """``x + residual + eps`` in one pass (the residual add that produces the next layer's input).

    ``residual`` must match ``x`` in shape, dtype and device. The noise equals :func:`add_noise`'s for the
    same seed; the sum is taken in float32 as ``(x + residual) + eps``.
    """
    _check_args(x, sigma, distribution, rounding, seed, residual=residual)
    return torch.ops.fusednoise.add_residual_noise(x, residual, float(sigma), distribution, seed,
                                                   rounding == "stochastic")
