"""The public HyPe noise ops: input checks, backend dispatch and autograd, registered with ``torch.library``.

Each op is defined with the low-level ``torch.library`` API (a schema, one ``CompositeExplicitAutograd`` kernel
for every device, a fake kernel, and for the out-of-place ops an autograd formula), so
``torch.compile(fullgraph=True)``, ``torch.export``, fake tensors and tensor subclasses see one opaque op. The
seed is drawn *inside* the op from torch's CPU generator when the caller gives none (a draw in traced Python
would be baked into the graph, and drawing at run time is what makes activation checkpointing replay the same
noise).

Host cost. A HyPe model calls an op once per layer per forward, so in launch-bound regimes (small models, small
batches) the Python before the kernel matters. Plain eager calls (a plain ``torch.Tensor``, no dispatch mode,
no functorch transform, not being traced) therefore skip the dispatcher and run the same implementation
directly (a ``torch.library.custom_op`` costs about 12 us per call before any work, the low-level op about 3
us, the direct call nothing); argument checks are cached per (dtype, layout, sigma, distribution, rounding).
Everything else goes through ``torch.ops.fusednoise.*``.

Gradients pass through unchanged: the noise is additive and independent of the input, d(x + eps)/dx = I.

CUDA graphs: while a stream is capturing (or inside ``fusednoise.rng.graph_safe()``) each call's kernel reads its
offset from a device ticket taken inside the op (:mod:`fusednoise.graph_offsets`), so every replay draws new
noise; the schemas do not change, as the offset, like the seed, is the op's own business.

Schemas::

    fusednoise::add_noise(Tensor x, float sigma, str distribution, int? seed, bool stochastic) -> Tensor
    fusednoise::add_noise_(Tensor(a!) x, float sigma, str distribution, int? seed, bool stochastic) -> ()
    fusednoise::add_residual_noise(Tensor x, Tensor residual, float sigma, str distribution, int? seed,
                                   bool stochastic) -> Tensor
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import backends as _backend
from . import graph_offsets, rng
from .reference import noise as _reference
from .validation import check_float_tensor, check_real

DISTRIBUTIONS = ("normal", "uniform")
ROUNDINGS = ("nearest", "stochastic")


# --------------------------------------------------------------------------------------------- validation
def _check_args(x, sigma, distribution, rounding, residual=None) -> None:
    check_float_tensor(x, "x")
    check_real(sigma, "sigma")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if residual is not None:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")


# Validated (dtype, layout, type(sigma), sigma, distribution, rounding) -> (float sigma, stochastic). type(sigma)
# keeps True apart from 1; NaN never hits (NaN != NaN) and is refused by the full check.
_validated: dict = {}
_VALIDATED_MAX = 1024


def _checked(x, sigma, distribution, rounding, seed, residual=None):
    """``(float(sigma), stochastic)`` after the argument checks, which run in full only on a new combination."""
    if seed is not None:
        rng.check_seed(seed)
    try:
        key = (x.dtype, x.layout, type(sigma), sigma, distribution, rounding) if isinstance(x, torch.Tensor) else None
        hit = _validated.get(key) if key is not None else None
    except TypeError:  # an unhashable argument: the full check names it
        key = hit = None
    if residual is not None and not (type(residual) is torch.Tensor and residual.dtype == x.dtype
                                     and residual.shape == x.shape and residual.device == x.device):
        hit = None  # anything unusual about the residual: the full check says what
    if hit is None:
        _check_args(x, sigma, distribution, rounding, residual)
        hit = (float(sigma), rounding == "stochastic")
        if key is not None:
            if len(_validated) >= _VALIDATED_MAX:
                _validated.clear()
            _validated[key] = hit
    return hit


def _direct(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may skip the dispatcher: eager, a plain tensor, no dispatch mode or functorch
    transform that would need to see the op. ``is_compiling`` comes first: dynamo folds it to True and traces
    the op."""
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active())


# --------------------------------------------------------------------------------------------- implementation
_noise_kernels = None  # fusednoise.kernels.noise, imported on the first kernel launch (it imports triton)


def _run(x: torch.Tensor, residual: Optional[torch.Tensor], out: Optional[torch.Tensor], sigma: float,
         distribution: str, seed: Optional[int], stochastic: bool) -> torch.Tensor:
    """Compute ``x (+ residual) + noise`` into ``out`` (a new tensor when None; ``x`` itself for in place).
    ``seed=None`` draws one from torch's CPU generator."""
    global _noise_kernels
    if seed is None:
        seed = rng.draw_seed()
    backend = _backend.resolve(x)
    offset = graph_offsets.kernel_offset(x, backend, "add_noise")  # a ticket while capturing a CUDA graph
    if backend == "reference":
        result = _reference.noisy_sum(x, residual, sigma, distribution, seed, stochastic,
                                      offset=graph_offsets.offset_value(offset))
        if out is None:
            return result
        out.copy_(result)
        return out
    if _noise_kernels is None:
        _noise_kernels = importlib.import_module(".kernels.noise", __package__)
    x_c = x.contiguous()
    residual_c = residual.contiguous() if residual is not None else None
    target = out
    if target is None or not target.is_contiguous():
        # New output, or in place on a strided view: the kernel writes a contiguous tensor (scattered back below).
        target = torch.empty_like(x_c, memory_format=torch.contiguous_format)
    _noise_kernels.launch_noise(x_c, residual_c, target, sigma, distribution, seed, stochastic, 0, offset)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def _add_noise_inplace(x, sigma, distribution, seed, stochastic) -> None:
    with torch.no_grad():
        _run(x, None, x, sigma, distribution, seed, stochastic)


def _add_noise(x, sigma, distribution, seed, stochastic):
    return _run(x, None, None, sigma, distribution, seed, stochastic)


def _add_residual_noise(x, residual, sigma, distribution, seed, stochastic):
    return _run(x, residual, None, sigma, distribution, seed, stochastic)


# --------------------------------------------------------------------------------------------- registration
_library = torch.library.Library("fusednoise", "FRAGMENT")
_OPS = {  # name: (schema, implementation)
    "add_noise_": ("(Tensor(a!) x, float sigma, str distribution, int? seed, bool stochastic) -> ()",
                   _add_noise_inplace),
    "add_noise": ("(Tensor x, float sigma, str distribution, int? seed, bool stochastic) -> Tensor", _add_noise),
    "add_residual_noise": ("(Tensor x, Tensor residual, float sigma, str distribution, int? seed, "
                           "bool stochastic) -> Tensor", _add_residual_noise),
}
for _name, (_schema, _implementation) in _OPS.items():
    _library.define(_name + _schema)
    _library.impl(_name, _implementation, "CompositeExplicitAutograd")


@torch.library.register_fake("fusednoise::add_noise_", lib=_library)
def _(x, sigma, distribution, seed, stochastic):
    return None


@torch.library.register_fake("fusednoise::add_noise", lib=_library)
def _(x, sigma, distribution, seed, stochastic):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusednoise::add_residual_noise", lib=_library)
def _(x, residual, sigma, distribution, seed, stochastic):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _identity_backward(ctx, grad):
    return grad, None, None, None, None


def _residual_backward(ctx, grad):
    return grad, grad, None, None, None, None


torch.library.register_autograd("fusednoise::add_noise", _identity_backward, lib=_library)
torch.library.register_autograd("fusednoise::add_residual_noise", _residual_backward, lib=_library)


class _AddNoise(torch.autograd.Function):
    """Eager out-of-place noise under autograd (the direct path's counterpart of the registered formula)."""

    @staticmethod
    def forward(ctx, x, residual, args):
        ctx.has_residual = residual is not None
        return _run(x, residual, None, *args)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad if ctx.has_residual else None, None


# Function.apply's Python wrapper (default-argument binding, functorch's dead-wrapper unwrapping: a pytree walk)
# costs about as much as the op itself; on the direct path (no functorch transform active) the C++ apply it ends
# in is called straight away.
def _c_apply(function):
    apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
    return apply.__get__(None, function) if apply is not None else function.apply


_apply_add_noise = _c_apply(_AddNoise)


class _AddNoiseInplace(torch.autograd.Function):
    """In-place noise under autograd: ``mark_dirty`` gives autograd's own checks (leaf tensors, saved
    tensors modified in place) and the identity backward."""

    @staticmethod
    def forward(ctx, x, sigma, distribution, seed, stochastic):
        if _direct(x):
            _run(x, None, x, sigma, distribution, seed, stochastic)
        else:
            torch.ops.fusednoise.add_noise_(x, sigma, distribution, seed, stochastic)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


_apply_add_noise_inplace = _c_apply(_AddNoiseInplace)


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
    sigma, stochastic = _checked(x, sigma, distribution, rounding, seed)
    direct = _direct(x)
    if torch.is_grad_enabled() and x.requires_grad:
        _refuse_inplace_on_leaf(x)
        apply = _apply_add_noise_inplace if direct else _AddNoiseInplace.apply
        return apply(x, sigma, distribution, seed, stochastic)
    if direct:
        _run(x, None, x, sigma, distribution, seed, stochastic)
    else:
        torch.ops.fusednoise.add_noise_(x, sigma, distribution, seed, stochastic)
    return x


def add_noise(x: torch.Tensor, sigma: float, distribution: str = "normal", seed: Optional[int] = None,
              rounding: str = "nearest") -> torch.Tensor:
    """``x + eps`` as a new tensor; the same noise as :func:`add_noise_` for the same seed."""
    sigma, stochastic = _checked(x, sigma, distribution, rounding, seed)
    if _direct(x):
        if x.requires_grad and torch.is_grad_enabled():
            return _apply_add_noise(x, None, (sigma, distribution, seed, stochastic))
        return _run(x, None, None, sigma, distribution, seed, stochastic)
    return torch.ops.fusednoise.add_noise(x, sigma, distribution, seed, stochastic)


def add_residual_noise(x: torch.Tensor, residual: torch.Tensor, sigma: float, distribution: str = "normal",
                       seed: Optional[int] = None, rounding: str = "nearest") -> torch.Tensor:
    """``x + residual + eps`` in one pass (the residual add that produces the next layer's input).

    ``residual`` must match ``x`` in shape, dtype and device. The noise equals :func:`add_noise`'s for the
    same seed; the sum is taken in float32 as ``(x + residual) + eps``.
    """
    sigma, stochastic = _checked(x, sigma, distribution, rounding, seed, residual)
    if _direct(x) and type(residual) is torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad):
            return _apply_add_noise(x, residual, (sigma, distribution, seed, stochastic))
        return _run(x, residual, None, sigma, distribution, seed, stochastic)
    return torch.ops.fusednoise.add_residual_noise(x, residual, sigma, distribution, seed, stochastic)
