"""Compile every Triton kernel for a CUDA GPU ahead of time, without a GPU.

    python -m fusednoise.kernels.compile_check            # sm_90 (H100); --arch 80 for A100

Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU test suite runs the kernels) executes the kernels'
Python with numpy and accepts code the compiler rejects: a type mismatch across a loop, a non-constexpr block
size, an unsupported cast. This module runs the real compiler (Triton IR -> LLVM -> PTX -> cubin, with the
``ptxas`` Triton ships) on each kernel with the block sizes and dtypes its launcher uses, so a compile error shows
up on a laptop instead of on a user's first GPU step. It must run in a process without ``TRITON_INTERPRET``: with
it, ``@triton.jit`` returns interpreted functions that cannot be compiled.

It says nothing about speed or numerics on a GPU; the kernel-vs-reference tests and ``pytest benchmarks`` on a
GPU do that.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Iterator, List, Tuple

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# The first three arguments of every multi-tensor kernel (NoisyTune, PATS): see kernels/chunks.py.
TABLE_ARGS = {"meta_ptr": "*i64", "chunks_ptr": "*i32", "partial_ptr": "*fp32"}


def _cases() -> Iterator[Tuple[str, object, Dict[str, str], Dict[str, object]]]:
    """Every case of :func:`_launch_cases`, and for float32 each again with its integer scalars as i32: the JIT
    specialises an int argument to i32 when it fits (a small user seed, a tensor under 2**31 elements) and to
    i64 otherwise, so both must compile."""
    for name, kernel, runtime_types, constexprs in _launch_cases():
        yield name, kernel, runtime_types, constexprs
        if "fp32" in name and "i64" in runtime_types.values():
            narrow = {arg: "i32" if kind == "i64" else kind for arg, kind in runtime_types.items()}
            yield f"{name}[int scalars i32]", kernel, narrow, constexprs


def _launch_cases() -> Iterator[Tuple[str, object, Dict[str, str], Dict[str, object]]]:
    """(name, kernel, runtime argument types {arg: type}, constexprs {arg: value}) per specialisation to compile."""
    import triton.language as tl

    from . import diff_norm, lnsr_noise, noise, noisytune, pats, rng

    tl_dtypes = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    for ints in ("i32", "i64"):  # small stream/purpose values specialise to i32, large ones to i64
        yield (f"rng.philox_words[fp32,stream {ints}]", rng.philox_words_kernel,
               {"out_ptr": "*i64", "n": "i64", "seed": "i64", "first_counter": "i64", "stream": ints, "purpose": ints},
               {"BLOCK": rng.BLOCK_SIZE})
    for name, t in DTYPES.items():
        for residual in (False, True):
            for distribution in (noise.DIST_NORMAL, noise.DIST_UNIFORM):
                yield (f"noise[{name},residual={residual},dist={distribution}]", noise.noise_kernel,
                       {"x_ptr": f"*{t}", "residual_ptr": f"*{t}", "out_ptr": f"*{t}", "numel": "i64",
                        "sigma": "fp32", "seed": "i64", "first_block": "i64"},
                       {"HAS_RESIDUAL": residual, "DISTRIBUTION": distribution, "STOCHASTIC": name != "fp32",
                        "BF16_BY_BITS": False, "BLOCK": noise.BLOCK_SIZE})
        # LNSR at BERT-base width: D = 768 -> BLOCK_D 256, BLOCK_R = TILE_GPU // BLOCK_D; 16-byte vectors (aligned
        # inputs) without and with row weights (a mask), and scalar accesses (unaligned inputs).
        block_d = diff_norm.block_d_for(768, diff_norm.MAX_BLOCK_D_GPU)
        block_r = diff_norm.TILE_GPU // block_d
        ints = {arg: "i64" for arg in ("n_rows", "D", "s_c", "s_n", "rows_per_prog")}
        aligned = 16 // {"fp32": 4, "fp16": 2, "bf16": 2}[name]
        for has_rho, vec in ((False, aligned), (True, aligned), (True, 1)):
            tag = f"{name},row_weight={has_rho},vec={vec}"
            yield (f"diff_norm.forward[{tag}]", diff_norm._diff_norm_fwd_kernel,
                   {"clean_tab": "*i64", "noisy_tab": "*i64", "rho_ptr": "*fp32", "partial_ptr": "*fp32",
                    "ref_ptr": f"*{t}", **ints, "n_chunks": "i64"},
                   {"HAS_ROW_WEIGHT": has_rho, "VEC": vec, "BLOCK_R": block_r, "BLOCK_D": block_d})
            yield (f"diff_norm.backward[{tag}]", diff_norm._diff_norm_bwd_kernel,
                   {"clean_tab": "*i64", "noisy_tab": "*i64", "gclean_tab": "*i64", "gnoisy_tab": "*i64",
                    "coef_ptr": "*fp32", "rho_ptr": "*fp32", "ref_ptr": f"*{t}", **ints, "s_gc": "i64",
                    "s_gn": "i64"},
                   {"HAS_ROW_WEIGHT": has_rho, "BF16_BY_BITS": False, "VEC": vec, "BLOCK_R": block_r,
                    "BLOCK_D": block_d})
        for backward in (False, True):
            for one_block, D in ((True, 768), (False, 8192)):
                block_d = max(4, min(1 << (D - 1).bit_length(), lnsr_noise.MAX_BLOCK_D))
                yield (f"lnsr.scaled_noise[{name},backward={backward},D={D}]", lnsr_noise._scaled_noise_kernel,
                       {"x_ptr": f"*{t}", "g_ptr": f"*{t}", "out_ptr": f"*{t}", "n_rows": "i64", "D": "i64",
                        "G": "i64", "scale": "fp32", "seed": "i64"},
                       {"BACKWARD": backward, "ONE_BLOCK": one_block, "BF16_BY_BITS": False,
                        "BLOCK_R": max(1, lnsr_noise.TILE // block_d), "BLOCK_D": block_d})
        yield (f"lnsr.in_manifold[{name},k=10,D=768]", lnsr_noise._in_manifold_kernel,
               {"x_ptr": f"*{t}", "ids_ptr": "*i64", "w_ptr": f"*{t}", "nb_ptr": "*i64", "out_ptr": f"*{t}",
                "V": "i64", "D": "i64", "s_w": "i64", "GK": "i64", "mix_ratio": "fp32", "seed": "i64",
                "rtol2": "fp32"},
               {"K": 10, "KP": 16, "BF16_BY_BITS": False, "BLOCK_D": 1024})
        yield (f"noisytune.stats[{name}]", noisytune._stats_kernel, dict(TABLE_ARGS),
               {"DTYPE": tl_dtypes[name], "META": noisytune.META_FIELDS, "SUB": noisytune.STATS_SUB,
                "ITERS": noisytune.STATS_ITERS})
        yield (f"noisytune.noise[{name}]", noisytune._noise_kernel,
               {**TABLE_ARGS, "std_ptr": "*fp32", "noise_lambda": "fp32", "seed": "i64"},
               {"DTYPE": tl_dtypes[name], "META": noisytune.META_FIELDS, "BLOCK": noisytune.BLOCK_SIZE,
                "CHUNK": noisytune.STATS_CHUNK, "PBLOCK": noisytune.PARTIAL_BLOCK, "BF16_BY_BITS": False})
        yield (f"pats.sensitivity[{name}]", pats._sensitivity_kernel, dict(TABLE_ARGS),
               {"PARAM_DTYPE": tl_dtypes[name], "META": pats.META_FIELDS, "SUB": pats.SENS_SUB,
                "ITERS": pats.SENS_ITERS})
        yield (f"pats.update[{name}]", pats._update_kernel, dict(TABLE_ARGS),
               {"PARAM_DTYPE": tl_dtypes[name], "META": pats.META_FIELDS, "BLOCK": pats.BLOCK_SIZE,
                "PBLOCK": pats.PARTIAL_BLOCK, "BF16_BY_BITS": False})


def compile_all(arch: int = 90, warp_size: int = 32) -> List[Tuple[str, str]]:
    """Compile every case for ``cuda:sm_<arch>``; returns ``(name, error)`` pairs, error "" when it compiled."""
    from ..backends import interpreter_enabled

    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions and cannot be compiled; "
                           "run this in a process without it")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, warp_size)
    results = []
    for name, kernel, runtime_types, constexprs in _cases():
        signature = {**runtime_types, **{arg: "constexpr" for arg in constexprs}}
        missing = set(kernel.arg_names) ^ set(signature)
        if missing:  # the case table is out of date with the kernel's arguments: a bug here, say so
            results.append((name, f"signature does not match the kernel's arguments: {sorted(missing)}"))
            continue
        source = ASTSource(kernel, signature, {(kernel.arg_names.index(arg),): value
                                               for arg, value in constexprs.items()})
        try:
            compiled = triton.compile(source, target=target)
            results.append((name, "" if compiled.asm.get("cubin") else "no cubin produced"))
        except Exception as error:  # noqa: BLE001 - every compiler failure is a finding to report
            results.append((name, f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every fusednoise Triton kernel for a CUDA target "
                                                 "(Triton IR to cubin) without a GPU.")
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
