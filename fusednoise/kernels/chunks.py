"""Multi-tensor launches: one Triton program per fixed-size chunk of one tensor listed in a metadata table.

The host writes, per tensor, an int64 row of fields (data pointers stored as integers, sizes, hyperparameters)
and a chunk table of ``(tensor index k, chunk index j within tensor k)`` pairs, one per program. NoisyTune's and
PATS's kernels read both through these helpers, so every tensor of a model is handled in one launch.
"""
from __future__ import annotations

import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv goes through the JIT machinery when called on the host: slow per tensor


@triton.jit
def chunk_of_program(meta_ptr, chunks_ptr, META: tl.constexpr):
    # This program's chunk: (chunk id c, tensor index k, chunk index j within tensor k, tensor k's metadata row).
    c = tl.program_id(0)
    k = tl.load(chunks_ptr + 2 * c).to(tl.int64)
    j = tl.load(chunks_ptr + 2 * c + 1).to(tl.int64)
    return c, k, j, meta_ptr + k * META


@triton.jit
def tensor_ptr(row, field: tl.constexpr, DTYPE: tl.constexpr):
    # A tensor's data pointer, stored as an int64 in its metadata row.
    return tl.load(row + field).to(tl.pointer_type(DTYPE))
