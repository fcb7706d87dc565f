"""One kernel launch as data: the kernel, its grid, the arguments a launcher passes, num_warps and the compile
options.

Every launcher builds its launches as :class:`Launch` records and runs them. Building is separate from running
so that :mod:`fusednoise.kernels.specialisations` can build the very launches a large input would produce (from
tensors on the ``meta`` device, which have shapes and dtypes but no memory) and compile them ahead of time, with
the argument specialisation the JIT would apply: what ``compile_check`` and ``benchmarks/sass_roofline.py``
compile cannot drift from what runs.

Compile options are explicit on every launch (``enable_fp_fusion`` included): Triton's default for contracting
``a + b * c`` into one FMA changes between versions (3.9 warns that 3.10 turns it off), and a kernel whose
output is claimed bitwise equal to the eager reference must not depend on that default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

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
        self.kernel[self.grid](*self.args, **self.constexprs, **self.compile_options())
