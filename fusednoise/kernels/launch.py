"""One kernel launch as data: the kernel, its grid, the arguments a launcher passes, and num_warps.

Every launcher builds its launches as :class:`Launch` records and runs them. Building is separate from running
so that :mod:`fusednoise.kernels.specialisations` can build the very launches a large input would produce (from
tensors on the ``meta`` device, which have shapes and dtypes but no memory) and compile them ahead of time, with
the argument specialisation the JIT would apply: what ``compile_check`` and ``benchmarks/sass_roofline.py``
compile cannot drift from what runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class Launch:
    kernel: Any                  # a @triton.jit function
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]        # the runtime (non-constexpr) arguments, in the kernel's order
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
