"""One kernel launch as data: the kernel, its grid, the arguments a launcher passes, num_warps and the compile
options.

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

Compile options are explicit on every launch (``enable_fp_fusion`` included): Triton's default for contracting
``a + b * c`` into one FMA changes between versions (3.9 warns that 3.10 turns it off), and a kernel whose
output is claimed bitwise equal to the eager reference must not depend on that default.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


# Contract a + b * c into one FMA (one rounding instead of two): what Triton has done by default so far. A
# launch whose result is claimed bitwise equal to an eager reference passes NO_FP_FUSION instead.
FP_FUSION = {"enable_fp_fusion": True}
NO_FP_FUSION = {"enable_fp_fusion": False}

# Callables that see every launch before it runs (tests/conftest.py records the JIT's specialisation of each one
# for the CPU compile layer). Empty outside the test suite: one truth test per launch.
observers: List[Callable[["Launch"], None]] = []


@dataclass(frozen=True)
class Launch:
    kernel: Any                  # a @triton.jit function
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]        # the runtime (non-constexpr) arguments, in the kernel's order
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    options: Dict[str, Any] = field(default_factory=lambda: dict(FP_FUSION))  # Triton compile options

    def compile_options(self) -> Dict[str, Any]:
        """What ``kernel[grid](...)`` and ``compile_check.compile_launch`` pass to the compiler."""
        return {"num_warps": self.num_warps, **self.options}

    def run(self) -> None:
        if observers:
            for observe in observers:
                observe(self)
        with device_guard(self.args):
            self.kernel[self.grid](*self.args, **self.constexprs, **self.compile_options())
