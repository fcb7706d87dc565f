"""Compile every Triton kernel for a CUDA GPU ahead of time, without a GPU, as its launcher would run it.

    python -m fusednoise.kernels.compile_check            # sm_90 (H100); --arch 80 for A100

Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU test suite runs the kernels) executes the kernels'
Python with numpy and accepts code the compiler rejects: a type mismatch across a loop, a non-constexpr block
size, an unsupported cast. This module runs the real compiler (Triton IR -> LLVM -> PTX -> cubin, with the
``ptxas`` Triton ships) on every case of :mod:`fusednoise.kernels.specialisations`: the launches the launchers
build, with their grids, constexprs and num_warps, and with the argument specialisation the JIT applies at a
launch (a pointer or an int divisible by 16 is marked so, which is what lets the compiler emit 128-bit accesses;
an int equal to 1 becomes a constant; an int is i32 when it fits). So a compile error shows up on a laptop
instead of on a user's first GPU step, and the code compiled is the code that would run. It must run in a
process without ``TRITON_INTERPRET``: with it, ``@triton.jit`` returns interpreted functions that cannot be
compiled.

It says nothing about speed or numerics on a GPU; ``benchmarks/sass_roofline.py`` models the compiled code's
speed, the kernel-vs-reference tests and ``pytest benchmarks`` on a GPU measure the rest.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Tuple

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _specialise_value(value) -> Tuple[str, Any]:
    """(type, attribute key) as the JIT specialises a runtime argument: Triton's own rule where this Triton
    exposes it, else the same rule spelled out (16-byte alignment / divisibility by 16 gives key "D")."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return tuple(native_specialize_impl(CUDABackend, value, False, True, True)[:2])
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if hasattr(value, "data_ptr"):
        dtype = _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
        return f"*{dtype}", "D" if value.data_ptr() % 16 == 0 else ""
    raise TypeError(f"cannot specialise an argument of type {type(value).__name__}")


def specialise(launch) -> Tuple[Dict[str, str], Dict[tuple, Any], Dict[tuple, Any]]:
    """(signature, constexprs, attrs) for ``triton.compile``, as ``JITFunction.run`` builds them for this
    launch's argument values."""
    from triton.backends.nvidia.compiler import CUDABackend

    kernel = launch.kernel
    runtime = [p.name for p in kernel.params if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise TypeError(f"{kernel.__name__} takes {len(runtime)} runtime arguments {runtime}, "
                        f"the launch passes {len(launch.args)}")
    values = dict(zip(runtime, launch.args))
    missing = {p.name for p in kernel.params if p.is_constexpr} ^ set(launch.constexprs)
    if missing:
        raise TypeError(f"{kernel.__name__}: constexprs do not match the kernel's: {sorted(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = launch.constexprs[name]
            continue
        kind, key = _specialise_value(values[name])
        signature[name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[(i,)] = key
        elif key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def compile_launch(launch, arch: int = 90, warp_size: int = 32):
    """Compile one launch for ``cuda:sm_<arch>``: a ``CompiledKernel`` with ``asm["cubin"]``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialise(launch)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, warp_size), options={"num_warps": launch.num_warps})


def refuse_under_interpreter() -> None:
    from ..backends import interpreter_enabled

    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions and cannot be compiled; "
                           "run this in a process without it")


def compile_error(error: Exception) -> str:
    """The innermost cause of a compiler error (Triton wraps it in one CompilationError per inlined function)."""
    while error.__cause__ is not None or (error.__context__ is not None and not str(error).strip()):
        error = error.__cause__ or error.__context__
    lines = [line for line in str(error).strip().splitlines() if line.strip(" ^")] or [""]
    return f"{type(error).__name__}: {lines[-1].strip()[:300]}"


def compile_all(arch: int = 90) -> List[Tuple[str, str]]:
    """Compile every case for ``cuda:sm_<arch>``; returns ``(name, error)`` pairs, error "" when it compiled."""
    refuse_under_interpreter()
    from .specialisations import cases

    results = []
    for case in cases():
        try:
            compiled = compile_launch(case.launch, arch)
            results.append((case.name, "" if compiled.asm.get("cubin") else "no cubin produced"))
        except Exception as error:  # noqa: BLE001 - every compiler failure is a finding to report
            results.append((case.name, compile_error(error)))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every fusednoise Triton kernel for a CUDA target "
                                                 "(Triton IR to cubin) without a GPU, as the launchers run them.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100)")
    args = parser.parse_args(argv)
    results = compile_all(args.arch)
    for name, error in results:
        print(f"{'ok  ' if not error else 'FAIL'} {name}{'' if not error else ': ' + error}")
    failed = sum(1 for _, error in results if error)
    print(f"{len(results) - failed}/{len(results)} kernels compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
