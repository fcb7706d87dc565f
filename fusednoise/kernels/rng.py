"""Triton side of ``fusednoise/rng.py``: the raw philox words of the kernels' generator
(``draws._philox``), for checking the torch philox against it bit for bit (the property every
reference/kernel comparison rests on)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .draws import _philox
from .launch import Launch

BLOCK_SIZE = 1024


# Per-call values: not specialised by the JIT, typed by annotation (compile_check.PER_CALL_ARGUMENTS).
@triton.jit(do_not_specialize=["seed", "first_counter", "stream", "purpose"])
def philox_words_kernel(out_ptr, n, seed: tl.uint64, first_counter: tl.int64, stream: tl.int64, purpose: tl.int64,
                        BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_bounds = index < n
    counter = index + first_counter
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    # stream and purpose arrive as int64 scalars (their annotation); tl.philox needs every counter word as
    # uint32: widen to an int64 tensor, then truncate (`zero + stream` with a uint32 zero fails to compile).
    wide_zero = index * 0
    c_stream = (wide_zero + stream).to(tl.uint32)
    c_purpose = (wide_zero + purpose).to(tl.uint32)
    w0, w1, w2, w3 = _philox(seed, c_lo, c_hi, c_stream, c_purpose)
    # The rows' offsets in int64: n arrives as i32 when it fits, and 2 * n, 3 * n in i32 wrap from n = 2**30 and
    # n = 715,827,883 on (the interpreter computes them in int64 and never shows it).
    plane = wide_zero + n
    tl.store(out_ptr + index, w0.to(tl.int64) & 0xFFFFFFFF, mask=in_bounds)
    tl.store(out_ptr + (plane + index), w1.to(tl.int64) & 0xFFFFFFFF, mask=in_bounds)
    tl.store(out_ptr + (2 * plane + index), w2.to(tl.int64) & 0xFFFFFFFF, mask=in_bounds)
    tl.store(out_ptr + (3 * plane + index), w3.to(tl.int64) & 0xFFFFFFFF, mask=in_bounds)


def philox_words_launch(out, seed: int, n: int, first_counter: int = 0, stream: int = 0,
                        purpose: int = 0) -> Launch:
    return Launch(philox_words_kernel, (triton.cdiv(n, BLOCK_SIZE),), (out, n, seed, first_counter, stream, purpose),
                  dict(BLOCK=BLOCK_SIZE))


def philox_words(seed: int, n: int, first_counter: int = 0, stream: int = 0, purpose: int = 0,
                 device="cuda") -> torch.Tensor:
    """The four uint32 philox words (as int64, shape (4, n)) of counters ``first_counter + arange(n)``."""
    out = torch.empty(4, n, dtype=torch.int64, device=device)
    philox_words_launch(out, seed, n, first_counter, stream, purpose).run()
    return out
