"""The ticket of an offset-path call (``fusednoise/rng.py``, "Device-side offsets"): one tiny kernel that copies
the device's offset counter into a fresh one-element tensor and advances the counter by one.

One atomic add does both (``atomic_add`` returns the value it found), so a call costs one graph node, and two
graphs replayed at once on different streams still never take the same offset. The eager reference is
``rng.take_offset_reference`` (a clone and an add).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch


@triton.jit
def _take_offset_kernel(state_ptr, ticket_ptr):
    tl.store(ticket_ptr, tl.atomic_add(state_ptr, 1))


def host_offset(like: torch.Tensor) -> torch.Tensor:
    """A 0 offset (int64 ``(1,)`` on ``like``'s device), what a kernel reads on the host path: for launchers
    called without one (tests, benchmarks); the ops pass each device's cached one
    (``fusednoise.graph_offsets``)."""
    return torch.zeros(1, dtype=torch.int64, device=like.device)


def take_offset_launch(state, ticket) -> Launch:
    """The launch :func:`take_offset` runs (also built from ``meta`` tensors by ``specialisations``)."""
    return Launch(_take_offset_kernel, (1,), (state, ticket), {}, 1)


def take_offset(state: torch.Tensor) -> torch.Tensor:
    """The ticket (int64 ``(1,)`` on ``state``'s device) of one offset-path call; ``state`` advances by one."""
    ticket = torch.empty(1, dtype=torch.int64, device=state.device)
    take_offset_launch(state, ticket).run()
    return ticket
