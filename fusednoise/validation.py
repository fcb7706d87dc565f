"""Argument checks shared by the public ops: each error names the argument it is about."""
from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(x, name: str) -> None:
    """A dense float32/float16/bfloat16 tensor, else TypeError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def check_real(value, name: str, minimum: float = 0.0) -> float:
    """A finite real number >= ``minimum``, returned as float; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value}")
    return value


def check_name_patterns(value, name: str) -> tuple:
    """Parameter-name patterns: one string or a sequence of strings, returned as a tuple; TypeError naming
    ``name`` otherwise."""
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a string or a sequence of strings, got {type(value).__name__}") from None
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"{name} must contain only strings, got {patterns!r}")
    return patterns


def check_module_list(value, name: str, accepted: str = "a list of modules") -> list:
    """An ``nn.ModuleList`` or an iterable (of modules, or of whatever the caller accepts), as a list. A single
    module is refused with a hint: iterating it would be a mistake, not a list of one. ``accepted`` words the
    TypeError for anything that is not iterable."""
    from torch import nn

    if isinstance(value, nn.Module) and not isinstance(value, nn.ModuleList):
        raise TypeError(f"{name} must be an nn.ModuleList or a list of modules, not a single "
                        f"{type(value).__name__}; wrap it in a list: {name}=[module]")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__}") from None


def memory_span(x: torch.Tensor):
    """``(device name, storage address, first byte, end byte)``: the bytes of its storage that ``x``'s elements may
    occupy (for a strided view, the range from its first to its last element); None for a tensor without memory
    (no elements, or on the ``meta`` device)."""
    if x.numel() == 0 or x.device.type == "meta":
        return None
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()))
    size = x.element_size()
    first = x.storage_offset() * size
    return str(x.device), x.untyped_storage().data_ptr(), first, first + extent * size


def first_overlap(tensors) -> "tuple | None":
    """``(i, j)`` (``i < j``), positions in ``tensors`` of two whose memory spans (:func:`memory_span`) overlap,
    or None. Two views of one storage that a fused launch updates together would race on a GPU (and be updated
    twice, one after the other, by the reference); the span is conservative: two interleaved views (``x[::2]``,
    ``x[1::2]``) count as overlapping."""
    spans = sorted((span, i) for i, span in ((i, memory_span(t)) for i, t in enumerate(tensors))
                   if span is not None)
    for (a, i), (b, j) in zip(spans, spans[1:]):
        if a[:2] == b[:2] and b[2] < a[3]:
            return min(i, j), max(i, j)
    return None
