"""Two small kernels for the coalescing check of ``benchmarks/ttgir_coalescing.py`` (issue 23): both write four
float32 values per thread with four separate stores; one lays each thread's four values side by side (thread i
writes 4i..4i+3, so consecutive lanes' addresses are 16 bytes apart and each store fills a quarter of every
sector it touches), the other writes four coalesced blocks (value k of thread i at k * BLOCK + i).

    python tests/coalescing_probes.py     # compiles both for sm_90 (no TRITON_INTERPRET), prints their accesses

The printed JSON is {kernel name: [access records]}; ``tests/test_kernels_compile.py`` runs it in a subprocess.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def strided_store_kernel(out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    value = i.to(tl.float32)
    first = 4 * i  # this thread's four values are adjacent: lanes 16 bytes apart in every store
    tl.store(out_ptr + first, value, mask=first < n)
    tl.store(out_ptr + first + 1, value + 1.0, mask=first + 1 < n)
    tl.store(out_ptr + first + 2, value + 2.0, mask=first + 2 < n)
    tl.store(out_ptr + first + 3, value + 3.0, mask=first + 3 < n)


@triton.jit
def coalesced_store_kernel(out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    start = tl.program_id(0) * 4 * BLOCK
    value = i.to(tl.float32)
    first = start + i  # value k of this thread at k * BLOCK: lanes 4 bytes apart in every store
    tl.store(out_ptr + first, value, mask=first < n)
    tl.store(out_ptr + first + BLOCK, value + 1.0, mask=first + BLOCK < n)
    tl.store(out_ptr + first + 2 * BLOCK, value + 2.0, mask=first + 2 * BLOCK < n)
    tl.store(out_ptr + first + 3 * BLOCK, value + 3.0, mask=first + 3 * BLOCK < n)


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [root, os.path.join(root, "benchmarks")]
    import ttgir_coalescing
    from fusednoise.kernels.compile_check import compile_launch, refuse_under_interpreter
    from fusednoise.kernels.launch import Launch

    refuse_under_interpreter()
    n = 1 << 24
    out = torch.empty(n, dtype=torch.float32, device="meta")
    report = {}
    for kernel in (strided_store_kernel, coalesced_store_kernel):
        launch = Launch(kernel, (n // (4 * BLOCK),), (out, n), {"BLOCK": BLOCK}, num_warps=4)
        ttgir = compile_launch(launch, 90).asm["ttgir"]
        report[kernel.__name__] = [a.as_dict() for a in ttgir_coalescing.accesses(ttgir)]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
