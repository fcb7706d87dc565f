"""Small host tables (tensor addresses, per-layer weights, per-tensor rows) copied to a GPU, kept alive for the
CUDA graphs that copy from them.

The copy is pinned and asynchronous: no host synchronisation per call (a pageable copy waits for the GPU to
drain, and cannot be captured). A copy made while a CUDA graph is being captured becomes a node of the graph that
reads the host buffer again on every replay, so the buffer must outlive the graph; fusednoise cannot know when a
graph is freed, so a buffer copied during a capture is held for the life of the process (a few hundred bytes per
captured call). Outside a capture torch's caching host allocator keeps the buffer until the copy has run.
"""
from __future__ import annotations

from typing import List

import torch

_held_for_graphs: List[torch.Tensor] = []  # pinned buffers that captured graphs copy from on every replay


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph now."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` (a CPU tensor) on ``device``: on CUDA through pinned memory with an asynchronous copy, the pinned
    buffer held for the graph's life when a graph is being captured."""
    if device.type != "cuda":
        return table.to(device)
    pinned = table.pin_memory()
    if capturing(device):
        _held_for_graphs.append(pinned)
    return pinned.to(device, non_blocking=True)
