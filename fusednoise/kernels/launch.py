"""One kernel launch as data: the kernel, its grid, the arguments a launcher passes, and num_warps.

Every launcher builds its launches as :class:`Launch` records and runs them. Building is separate from running
so that :mod:`fusednoise.kernels.specialisations` can build the very launches a large input would produce (from
tensors on the ``meta`` device, which have shapes and dtypes but no memory) and compile them ahead of time, with
the argument specialisation the JIT would apply: what ``compile_check`` and ``benchmarks/sass_roofline.py``
compile cannot drift from what runs.

Every launch runs on its tensors' GPU: Triton launches on the *current* device and its current stream, whatever
device the pointers belong to, so a model on ``cuda:1`` (``device_map="auto"``, ``model.to("cuda:1")``) would
otherwise launch on ``cuda:0`` with ``cuda:1`` addresses. :func:`device_guard` makes the first tensor argument's
device current for the launch (and with it that device's current stream, the one torch's own ops on those
tensors use).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

_cuda_device = torch.cuda.device  # the device guard (a name of its own so a CPU test can record what it is given)
_NO_GUARD = contextlib.nullcontext()


def launch_device(args: Sequence[Any]) -> Optional[torch.device]:
    """The CUDA device a launch with runtime arguments ``args`` must run on: that of its first tensor argument
    (None when that tensor is not on a CUDA device, or there is none)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            device = arg.device
            return device if device.type == "cuda" else None
    return None


def device_guard(args: Sequence[Any]):
    """A context that makes :func:`launch_device` of ``args`` the current CUDA device (a no-op off CUDA)."""
    device = launch_device(args)
    return _NO_GUARD if device is None else _cuda_device(device)


@dataclass(frozen=True)
class Launch:
    kernel: Any                  # a @triton.jit function
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]        # the runtime (non-constexpr) arguments, in the kernel's order
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    def run(self) -> None:
        with device_guard(self.args):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
