"""Compile every Triton kernel for a CUDA GPU ahead of time, without a GPU, as its launcher would run it.

    python -m fusednoise.kernels.compile_check            # sm_90 (H100); --arch 80 for A100

Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU test suite runs the kernels) executes the kernels'
Python with numpy and accepts code the compiler rejects: a type mismatch across a loop, a non-constexpr block
size, an unsupported cast. This module runs the real compiler (Triton IR -> LLVM -> PTX -> cubin, with the
``ptxas`` Triton ships) on every case of :mod:`fusednoise.kernels.specialisations`: the launches the launchers
build, with their grids, constexprs and num_warps, and with the argument specialisation the JIT applies at a
launch, computed by Triton's own binder (a pointer or an int divisible by 16 is marked so, which is what lets
the compiler emit 128-bit accesses; an int equal to 1 becomes a constant; an int is i32 when it fits; none of this
for an argument in the kernel's ``do_not_specialize``, and an annotated argument takes its annotation's type), and
with the launch's compile options (``enable_fp_fusion``). So a compile error shows up on a laptop instead of on a
user's first GPU step, and the code compiled is the code that would run. It must run in a process without
``TRITON_INTERPRET``: with it, ``@triton.jit`` returns interpreted functions that cannot be compiled.

It also checks that every per-call argument (a seed, a first block: :data:`PER_CALL_ARGUMENTS`) gives a launch
one specialisation whatever its value (1, a multiple of 16, a 32- or 64-bit value): a kernel that a CUDA-graph
capture needs must be the one its eager warm-up compiled and loaded.

It says nothing about speed or numerics on a GPU; ``benchmarks/sass_roofline.py`` models the compiled code's
speed, the kernel-vs-reference tests and ``pytest benchmarks`` on a GPU measure the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, List, Optional, Tuple

from .specialisations import DRAWN_SEED

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}

# Arguments whose value changes from one call to the next (a fresh seed each call; the first block of a slice;
# the philox words' counter, stream and purpose). The JIT must not specialise them: a value of 1 would become a
# constant (``seed.to(tl.uint64)`` does not compile on a constant), one divisible by 16 another variant, and an
# int that fits in 32 bits another type, so a CUDA-graph capture could need a kernel the eager warm-up never
# loaded (loading a module during a capture fails). Each kernel declares them in ``do_not_specialize`` and
# types them by annotation (``seed: tl.uint64``, ``first_block: tl.int64``): ``do_not_specialize`` alone still
# types an int by its value (i32 when it fits, Triton 3.4 to 3.9), two variants again, and the annotation is the
# cheapest fix: no launcher change and no cost per call (a seed in a tensor would cost a copy per call, two 32-bit
# halves an argument more). :func:`per_call_specialisations` checks that the values below give one kernel.
PER_CALL_ARGUMENTS = ("seed", "first_block", "first_counter", "stream", "purpose")
PER_CALL_VALUES = (0, 1, 16, 17, 42, 2**33, 2**40, 2**40 + 16, DRAWN_SEED)

_JIT_OF: Dict[int, Tuple[Any, Any]] = {}
_BINDERS: Dict[Tuple[int, int], Any] = {}


def jit_function(kernel):
    """The ``JITFunction`` the JIT launches for ``kernel``: the kernel itself, or, under ``TRITON_INTERPRET``
    (where ``@triton.jit`` returns an ``InterpretedFunction`` that keeps the decorator's arguments), one built
    from the same function and the same ``do_not_specialize`` lists."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if id(kernel) not in _JIT_OF:
        decorator = getattr(kernel, "kwargs", {})
        names = ("do_not_specialize", "do_not_specialize_on_alignment")
        # (kernel, its JITFunction): holding the kernel keeps its id from being reused
        _JIT_OF[id(kernel)] = (kernel, JITFunction(kernel.fn, **{k: decorator[k] for k in names if decorator.get(k)}))
    return _JIT_OF[id(kernel)][1]


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def _binder(jit, arch: int):
    """Triton's own argument binder for ``jit`` (``create_function_from_signature``, what ``JITFunction.run``
    calls on every launch), or None where this Triton's differs."""
    key = (id(jit), arch)
    if key not in _BINDERS:
        try:
            from triton.runtime.jit import create_function_from_signature

            backend = _backend(arch)
            _BINDERS[key] = (backend, create_function_from_signature(jit.signature, jit.params, backend))
        except (ImportError, TypeError, AttributeError):
            _BINDERS[key] = None
    return _BINDERS[key]


def _spelled_out(jit, values: Dict[str, Any], constexprs: Dict[str, Any]) -> List[Tuple[Any, Any]]:
    """The JIT's specialisation list spelled out, for a Triton without the binder above (the rule of Triton
    3.4 to 3.9): a constexpr keeps its value; an annotated argument takes its annotation's type (floats and
    bools never specialised); a ``do_not_specialize`` argument gets no attribute; otherwise an int equal to 1
    becomes a constant and an int or pointer divisible by 16 (16-byte aligned) gets ``"D"``; an int is i32 when
    it fits, u64 from 2**63, i64 otherwise."""
    out = []
    for p in jit.params:
        if p.is_constexpr:
            out.append(("constexpr", constexprs[p.name]))
            continue
        value, specialize = values[p.name], not p.do_not_specialize
        align = not p.do_not_specialize_on_alignment
        if isinstance(value, bool):
            kind, key = "u1", None
        elif isinstance(value, int):
            if value == 1 and specialize:
                kind, key = "constexpr", 1
            else:
                kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
                key = ("D" if align and value % 16 == 0 else "") if specialize else None
        elif isinstance(value, float):
            kind, key = "fp32", None
        elif hasattr(value, "data_ptr"):
            kind = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
            key = ("D" if align and value.data_ptr() % 16 == 0 else "") if specialize else None
        else:
            raise TypeError(f"{jit.__name__}: cannot specialise argument {p.name} of type {type(value).__name__}")
        annotated = p.annotation_type
        if annotated:
            if annotated == "u1" or annotated[:2] in ("fp", "bf"):
                specialize = False
            kind, key = (annotated, key) if specialize else (annotated, None)
        out.append((kind, key))
    return out


def specialise(launch, arch: int = 90, spelled_out: bool = False
               ) -> Tuple[Dict[str, str], Dict[tuple, Any], Dict[tuple, Any]]:
    """(signature, constexprs, attrs) for ``triton.compile``, as ``JITFunction.run`` builds them for this
    launch's argument values: through Triton's own binder (``do_not_specialize``, annotations, alignment and
    all) where this Triton has it, else (or with ``spelled_out=True``) through the same rule spelled out."""
    jit = jit_function(launch.kernel)
    runtime = [p.name for p in jit.params if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise TypeError(f"{jit.__name__} takes {len(runtime)} runtime arguments {runtime}, "
                        f"the launch passes {len(launch.args)}")
    missing = {p.name for p in jit.params if p.is_constexpr} ^ set(launch.constexprs)
    if missing:
        raise TypeError(f"{jit.__name__}: constexprs do not match the kernel's: {sorted(missing)}")
    bound = _binder(jit, arch)
    if bound is None or spelled_out:
        backend = _backend(arch)
        specialization = _spelled_out(jit, dict(zip(runtime, launch.args)), launch.constexprs)
    else:
        backend, binder = bound
        _, specialization, _ = binder(*launch.args, **launch.constexprs, **launch.compile_options())
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, (kind, key)) in enumerate(zip(jit.params, specialization)):
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = launch.constexprs[p.name] if p.is_constexpr else key
        elif isinstance(key, str):
            attrs[(i,)] = backend.parse_attr(key)
    return signature, constexprs, attrs


def specialisation_key(launch, arch: int = 90) -> Tuple:
    """Everything that picks the compiled kernel of a launch: the kernel, the JIT's specialisation of each
    argument value, the constexprs and the compile options. Two launches with equal keys run the same binary."""
    signature, constexprs, attrs = specialise(launch, arch)
    jit = jit_function(launch.kernel)
    return (f"{jit.fn.__module__}.{jit.fn.__qualname__}", tuple(signature.items()),
            tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in attrs.items())), tuple(sorted(launch.compile_options().items())))


def _with_value(launch, name: str, value):
    jit = jit_function(launch.kernel)
    runtime = [p.name for p in jit.params if not p.is_constexpr]
    args = list(launch.args)
    args[runtime.index(name)] = value
    return dataclasses.replace(launch, args=tuple(args))


def per_call_specialisations(launch, values=PER_CALL_VALUES) -> Dict[str, List[Tuple]]:
    """For each per-call argument of the launch's kernel (:data:`PER_CALL_ARGUMENTS`), the distinct
    specialisation keys the launch gets as that argument takes each of ``values``: one key each, or a capture
    can need a kernel its warm-up did not compile."""
    jit = jit_function(launch.kernel)
    out = {}
    for name in (p.name for p in jit.params if not p.is_constexpr and p.name in PER_CALL_ARGUMENTS):
        keys = []
        for value in values:
            key = specialisation_key(_with_value(launch, name, value))
            if key not in keys:
                keys.append(key)
        out[name] = keys
    return out


def compile_launch(launch, arch: int = 90, warp_size: int = 32):
    """Compile one launch for ``cuda:sm_<arch>`` with its own compile options: a ``CompiledKernel`` with
    ``asm["ptx"]`` and ``asm["cubin"]``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialise(launch, arch)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, warp_size), options=launch.compile_options())


# ------------------------------------------------------------------------------------------------ recorded launches
# The CPU suite records the specialisation of every launch it makes (tests/conftest.py) and a process without
# TRITON_INTERPRET compiles each distinct one for real (``--worker``): what the interpreter hides (an argument
# equal to 1, a multiple of 16, an unaligned pointer, an int64 size) then fails on a CPU.
# Every record is compiled for sm_90. sm_80 lowers the same Triton IR with other instructions (bf16 conversions,
# no TMA), which depends on the kernel and its argument types, not on the values the JIT specialises: it compiles
# the first record of each (kernel, signature) only, which halves a cold cache's cost (about 4 CPU seconds an
# architecture a record, some records a minute).
RECORD_ARCHS = (90, 80)
EVERY_RECORD_ARCH = 90


def _encode(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ == "dtype" and hasattr(value, "name"):  # a tl.dtype constexpr (DTYPE=tl.bfloat16)
        return {"tl.dtype": value.name}
    raise TypeError(f"cannot record a constexpr of type {type(value).__name__}")


def _decode(value):
    if isinstance(value, dict):
        import triton.language as tl

        return tl.dtype(value["tl.dtype"])
    return value


def launch_record(launch, arch: int = 90) -> Dict[str, Any]:
    """The JSON-able specialisation of a launch: the kernel's module and name, the JIT's signature, constexprs and
    attributes for its argument values, and its compile options. Equal records compile to the same kernel."""
    signature, constexprs, attrs = specialise(launch, arch)
    fn = jit_function(launch.kernel).fn
    return {"kernel": f"{fn.__module__}:{fn.__qualname__}", "signature": signature,
            "constexprs": [[list(path), _encode(v)] for path, v in sorted(constexprs.items())],
            "attrs": [[list(path), v] for path, v in sorted(attrs.items())],
            "options": dict(sorted(launch.compile_options().items()))}


def compile_record(record: Dict[str, Any], arch: int, cache_dir: Optional[str] = None) -> str:
    """Compile a recorded launch for ``cuda:sm_<arch>``: "" when it compiled, else the compiler's error. With
    ``cache_dir``, a launch already compiled with this Triton and this kernel source is not compiled again."""
    import hashlib
    import importlib
    import json
    import os

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = record["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    marker = None
    if cache_dir:
        digest = hashlib.sha256(json.dumps([triton.__version__, arch, kernel.cache_key, record],
                                           sort_keys=True).encode()).hexdigest()
        marker = os.path.join(cache_dir, digest)
        if os.path.exists(marker):
            return ""
    constexprs = {tuple(path): _decode(v) for path, v in record["constexprs"]}
    attrs = {tuple(path): v for path, v in record["attrs"]}
    try:
        compiled = triton.compile(ASTSource(kernel, record["signature"], constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=dict(record["options"]))
        error = "" if compiled.asm.get("cubin") else "no cubin produced"
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a finding to report
        error = compile_error(exc)
    if marker and not error:
        os.makedirs(cache_dir, exist_ok=True)
        open(marker, "w").close()
    return error


def worker(cache_dir: Optional[str], archs=RECORD_ARCHS) -> int:
    """Compile the launch records arriving on stdin (one JSON object a line) for each of ``archs``; one JSON
    line a record on stdout: the record's ``id``, and the error per arch ("" when it compiled)."""
    import json
    import time

    refuse_under_interpreter()
    signatures = set()  # (kernel, signature) already compiled for the architectures other than EVERY_RECORD_ARCH
    for line in sys.stdin:
        if not line.strip():
            continue
        item = json.loads(line)
        started = time.perf_counter()
        record = item["record"]
        signature = json.dumps([record["kernel"], record["signature"]], sort_keys=True)
        first = signature not in signatures
        signatures.add(signature)
        errors = {str(arch): compile_record(record, arch, cache_dir) for arch in archs
                  if arch == EVERY_RECORD_ARCH or first}
        print(json.dumps({"id": item["id"], "errors": errors, "seconds": time.perf_counter() - started}),
              flush=True)
    return 0


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


def per_call_findings(cases=None, compile_arch: Optional[int] = None) -> List[Tuple[str, str]]:
    """For every case whose kernel takes a per-call argument (a seed, ...): ``(case, finding)`` pairs, finding
    "" when the values of :data:`PER_CALL_VALUES` all give the launch one specialisation, else which argument
    gives how many. Needs no compiler, so it also runs under the interpreter. With ``compile_arch``, each
    per-call argument set to 1 and to 16 must also compile to the very kernel (the same hash) the case compiles
    to."""
    if cases is None:
        from .specialisations import cases as all_cases
        cases = all_cases()
    findings = []
    for case in cases:
        per_call = per_call_specialisations(case.launch)
        if not per_call:
            continue
        problems = [f"{name} takes {len(keys)} specialisations" for name, keys in per_call.items() if len(keys) != 1]
        if not problems and compile_arch is not None:
            base = compile_launch(case.launch, compile_arch).hash
            for name in per_call:
                for value in (1, 16):
                    try:
                        if compile_launch(_with_value(case.launch, name, value), compile_arch).hash != base:
                            problems.append(f"{name}={value} compiles to another kernel")
                    except Exception as error:  # noqa: BLE001 - a compiler failure is the finding
                        problems.append(f"{name}={value}: {compile_error(error)}")
        findings.append((case.name, "; ".join(problems)))
    return findings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every fusednoise Triton kernel for a CUDA target "
                                                 "(Triton IR to cubin) without a GPU, as the launchers run them.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100)")
    parser.add_argument("--worker", action="store_true",
                        help="compile the launch records on stdin for sm_90, and each kernel signature's first for "
                             "sm_80 (the CPU suite's compile layer, tests/conftest.py), instead of the case table")
    parser.add_argument("--cache", default=None, help="with --worker: a folder remembering what compiled")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.cache)
    results = compile_all(args.arch)
    for name, error in results:
        print(f"{'ok  ' if not error else 'FAIL'} {name}{'' if not error else ': ' + error}")
    failed = sum(1 for _, error in results if error)
    print(f"{len(results) - failed}/{len(results)} kernels compiled for sm_{args.arch}")
    findings = per_call_findings(compile_arch=args.arch)
    for name, finding in findings:
        if finding:
            print(f"FAIL {name}: {finding}")
    split = sum(1 for _, finding in findings if finding)
    values = ", ".join(str(v) for v in PER_CALL_VALUES)
    print(f"{len(findings) - split}/{len(findings)} launches with per-call arguments "
          f"({', '.join(PER_CALL_ARGUMENTS)}) have one specialisation for the values {values}, and compile to "
          f"one kernel with each set to 1 or 16")
    return 1 if failed or split else 0


if __name__ == "__main__":
    sys.exit(main())
