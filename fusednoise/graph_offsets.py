"""The noise ops' side of the device-side offsets (``fusednoise/rng.py``, "Device-side offsets"): which offset a
call's kernel reads.

A call takes the offset path while the current CUDA stream is capturing a graph, or inside
``fusednoise.rng.graph_safe()``: it takes a ticket (the device counter's value; the counter advances by one, on
the device). Otherwise (the host path) the Triton kernels read a constant 0, cached per device, which draws the
host path's words: the kernels have one code path, so a capture launches exactly the kernels the eager warm-up
before it compiled and loaded (loading a module is one of the things a capture cannot do). The first call on a
CUDA device therefore also creates the device's counter and loads the ticket kernel.

Cost on the host path: for a CPU tensor one attribute, one flag and one dict lookup; for a CUDA tensor also
torch's capture query.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

from . import rng

_offset_kernels = None  # fusednoise.kernels.offsets, imported on first use (it imports triton)
_is_capturing = torch.cuda.is_current_stream_capturing
_host_zeros: Dict[int, torch.Tensor] = {}  # x.get_device() (-1 for CPU) -> the host path's 0 offset


def kernel_offset(x: torch.Tensor, backend: str, op: str) -> Optional[torch.Tensor]:
    """The offset a call on ``x`` reads: an int64 ``(1,)`` tensor on x's device.

    On the offset path a fresh ticket (the device's counter advances by one); on the host path the device's
    constant 0 for the triton backend, None for the reference backend (which then draws exactly as it always
    has). ``backend`` is the one that runs the call ("triton" or "reference"); ``op`` names the op in errors
    (see :func:`check_capturable`).
    """
    if x.is_cuda and _is_capturing():
        check_capturable(x, backend, op)
        return _take(x, backend)
    if rng.offsets_forced():
        return _take(x, backend)
    if backend != "triton":
        return None
    zero = _host_zeros.get(x.get_device())
    return zero if zero is not None else _prepare(x)


def offset_path_active(device: torch.device) -> bool:
    """Whether noise op calls on ``device`` take the offset path now (a capture on the current CUDA stream, or
    ``rng.graph_safe()``): code that replays its random draws (LNSR's noisy pass) then saves and restores the
    device's counter as well as torch's generators."""
    return (device.type == "cuda" and _is_capturing()) or rng.offsets_forced()


def is_ticket(x: torch.Tensor, offset: Optional[torch.Tensor]) -> bool:
    """Whether ``offset`` (from :func:`kernel_offset` for ``x``) is a ticket, not the host path's 0."""
    return offset is not None and offset is not _host_zeros.get(x.get_device())


def offset_value(offset: Optional[torch.Tensor]) -> Optional[int]:
    """The reference backend's offset: the value as an int (None on the host path)."""
    return None if offset is None else int(offset.item())


def check_capturable(x: torch.Tensor, backend: str, op: str, why: str = "") -> None:
    """Raise RuntimeError while capturing a CUDA graph when the call would run on the reference backend: its
    eager philox moves values between host and device, which a capture cannot record, so it could only fail
    or repeat its noise on every replay. ``why`` says why the reference runs when the user did not ask for it."""
    if backend != "triton" and x.is_cuda and _is_capturing():
        raise RuntimeError(
            f"fusednoise.{op}: the reference backend{why} cannot run inside a CUDA graph capture (its eager philox "
            "copies values between host and device, so the graph could not draw new noise on each replay). Use "
            "the triton backend for captured code (the default for CUDA tensors when triton is installed).")


def _kernels():
    global _offset_kernels
    if _offset_kernels is None:
        _offset_kernels = importlib.import_module(".kernels.offsets", __package__)
    return _offset_kernels


def _take(x: torch.Tensor, backend: str) -> torch.Tensor:
    state = rng.offset_state(x.device)
    if backend == "reference":
        return rng.take_offset_reference(state)
    return _kernels().take_offset(state)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    """First triton-backend call on x's device: its 0 offset, its counter, and on CUDA the ticket kernel
    compiled and loaded (run once on a scratch counter), all before any capture needs them."""
    rng.offset_state(x.device)
    zero = rng.persistent_zero(x.device)
    if x.is_cuda:
        scratch = rng.persistent_zero(x.device)  # allocated on a side stream of its own (see persistent_zero)
        _kernels().take_offset(scratch)          # read and written on the current stream
        # freed when this returns, into the side stream's pool: without this, a later allocation on that stream
        # could take the block while the ticket kernel still runs on the current one
        scratch.record_stream(torch.cuda.current_stream(x.device))
    _host_zeros[x.get_device()] = zero
    return zero
