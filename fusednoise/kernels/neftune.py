"""Triton kernel for NEFTune's noise (SPEC section 4b): ``out = x + alpha / sqrt(L_b * D) * U(-1, 1)`` on the
tokens an attention mask keeps, ``out = x`` on padded ones, in one pass.

One read of x and one write of out per element, no noise tensor: the uniforms are drawn in registers, four per
philox call. Per token row the kernel also reads the row's mask entry and its example's token count ``L_b`` (one
integer per example, counted by the caller from the mask; for packed rows one per token, its sequence's count,
with ``T = 1``), and turns ``L_b`` into the row's scale itself with
IEEE-rounded ``sqrt_rn``/``div_rn`` (a handful of instructions per row, not per element). The counter layout and
the rounding of the scale are those of :mod:`fusednoise.reference.neftune`, which this kernel matches: the
philox words bitwise, so ``x = 0`` gives bitwise the reference's noise. The kernel reads the call's offset
(``fusednoise/rng.py``, "Device-side offsets") once per program.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .draws import _offset_words, _pick4, _uniform
from .launch import Launch
from .noise import _round_nearest
from .offsets import host_offset

# Elements per program: rows * padded columns (the interpreter, ~9 ms per program, gets bigger tiles).
TILE = 4096
TILE_INTERPRETER = 1 << 15
MAX_BLOCK_D = 1024


@triton.jit
def _row_uniforms(seed, row0, d0, G, c2, c3, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) U(-1, 1) values for rows ``row0 + i``, columns ``d0 + j`` (d0 a multiple of 4): word
    ``d % 4`` of philox block ``row * G + d // 4`` (with the offset's counter words ``c2``, ``c3``)."""
    GB: tl.constexpr = BLOCK_D // 4
    q = tl.arange(0, BLOCK_R * GB)
    rows = row0 + (q // GB).to(tl.int64)
    block = rows * G + (d0 // 4 + q % GB).to(tl.int64)
    c_lo = (block & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (block >> 32).to(tl.uint32)
    zero = c_lo * 0
    # tl.philox, not draws._philox: the same words, and in this tile layout 2.3 fewer issue slots per element in
    # half precision on the static model (draws._philox's 64-bit products raise the register count 48 -> 80).
    w0, w1, w2, w3 = tl.philox(seed, c_lo, c_hi, zero + c2, zero + c3)
    col = tl.arange(0, 4)[None, :]
    unit = _pick4(col, 2.0 * _uniform(w0) - 1.0, 2.0 * _uniform(w1) - 1.0, 2.0 * _uniform(w2) - 1.0,
                  2.0 * _uniform(w3) - 1.0)
    return tl.reshape(unit, (BLOCK_R, BLOCK_D))


# Per-call values: not specialised by the JIT, typed by annotation (compile_check.PER_CALL_ARGUMENTS).
@triton.jit(do_not_specialize=["seed"])
def _neftune_kernel(x_ptr, mask_ptr, len_ptr, out_ptr, offset_ptr, n_rows, T, D, G, alpha, seed: tl.uint64,
                    HAS_MASK: tl.constexpr, BF16_BY_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < n_rows
    if HAS_MASK:
        keep = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
        length = tl.load(len_ptr + rows // T, mask=row_ok, other=0).to(tl.int64)
    else:
        keep = row_ok
        length = rows * 0 + T
    # The per-row scale alpha / sqrt(L * D), IEEE-rounded as in the reference; 0 for an example with no token.
    has_tokens = length > 0
    root = tl.sqrt_rn(tl.where(has_tokens, length * D, 1).to(tl.float32))
    scale = tl.where(has_tokens, tl.div_rn(alpha + root * 0.0, root), 0.0)

    offsets = rows[:, None] * D + cols[None, :]
    in_bounds = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0)
    c2, c3 = _offset_words(offset_ptr)
    unit = _row_uniforms(seed, row0, d0, G, c2, c3, BLOCK_R, BLOCK_D)
    noisy = _round_nearest(x.to(tl.float32) + unit * scale[:, None], out_ptr.dtype.element_ty, BF16_BY_BITS)
    # Padded tokens keep x's bits exactly (x + 0 would turn -0.0 into +0.0).
    tl.store(out_ptr + offsets, tl.where(keep[:, None], noisy, x), mask=in_bounds)


def block_shape(D: int):
    """(BLOCK_R, BLOCK_D) for rows of D features: a whole row up to MAX_BLOCK_D columns, rows filling the tile."""
    tile = TILE_INTERPRETER if interpreter_enabled() else TILE
    block_d = max(4, min(1 << max(D - 1, 1).bit_length(), MAX_BLOCK_D))
    return max(1, tile // block_d), block_d


def neftune_launch(x, mask, lengths, out, alpha: float, seed: int, offset=None, tokens_per_length=None) -> Launch:
    """The launch :func:`launch_neftune` runs (also built from ``meta`` tensors by ``specialisations``)."""
    D, T = x.shape[-1], x.shape[-2] if tokens_per_length is None else tokens_per_length
    n_rows = x.numel() // D if D else 0
    block_r, block_d = block_shape(D)
    return Launch(
        _neftune_kernel, (triton.cdiv(n_rows, block_r), triton.cdiv(D, block_d)),
        (x, mask if mask is not None else x, lengths if lengths is not None else x, out,
         offset if offset is not None else host_offset(x), n_rows, T, D, -(-D // 4), float(alpha), seed),
        dict(HAS_MASK=mask is not None, BF16_BY_BITS=interpreter_enabled(), BLOCK_R=block_r, BLOCK_D=block_d))


def launch_neftune(x, mask, lengths, out, alpha: float, seed: int, offset=None, tokens_per_length=None) -> None:
    """Noise contiguous ``x`` (..., T, D) into contiguous ``out``. ``mask``: contiguous (N,) integer/float keep
    flags of the N = x.numel() / D token rows, or None (every token kept, ``L_b = T``); ``lengths``: the (B,)
    int64 kept-token counts of the examples (ignored without a mask), one per ``tokens_per_length`` token rows
    (default T; 1 for packed rows, whose every token has its own sequence's count). ``offset``: as for
    ``noise.launch_noise``."""
    if x.numel() == 0:
        return
    neftune_launch(x, mask, lengths, out, alpha, seed, offset, tokens_per_length).run()
