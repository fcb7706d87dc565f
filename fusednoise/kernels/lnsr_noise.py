"""Triton kernels for LNSR's two noise makers (SPEC section 2, journal sec. III-B/E).

* ``scaled_noise``: ``out_n = x_n + scale * ||x_n|| * e_n / ||e_n||`` per token vector (row of the last
  dimension), in one kernel: the row norm of x, the row norm of the noise drawn in registers, the scaled add. The
  backward kernel redraws the same noise from the seed (nothing is stored) and writes the exact vector-Jacobian
  product ``g + scale * (e.g) / (|e| |x|) * x``.
* ``in_manifold_noise``: one program per token gathers its k neighbour rows of the embedding matrix, forms the
  differences, runs modified Gram-Schmidt in registers (orthogonal, not normalised) and adds
  ``sum_j z_j d~_j`` to x.

The counter layout (which philox word feeds which element) is documented in :mod:`fusednoise.reference.lnsr`,
which these kernels match: the philox words bitwise, the floats within float32 rounding. Each kernel reads the
call's offset (``fusednoise/rng.py``, "Device-side offsets") once per program from ``offset_ptr``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..backends import interpreter_enabled
from ..reference.lnsr import DEPENDENT_RTOL2
from .draws import _normal4, _offset_words, _philox_draw, _pick8, fast_math
from .launch import Launch
from .offsets import host_offset
from .noise import _round_nearest

# Elements per tile: rows * padded columns.
TILE = 4096
TILE_INTERPRETER = 1 << 15
# Largest row held in registers at once; longer rows are processed in two sweeps over column blocks.
MAX_BLOCK_D = 4096
# Largest (padded k) x (padded D) tile the in-manifold kernel holds in registers; bigger calls use the reference.
# Above 1 << 15 (k = 10 with D >= 4096) the tile no longer fits 16 warps' registers and ptxas spills (sm_90, Triton
# 3.9, float32: 528 bytes of stack per thread at D = 4096, about 5 KB at D = 8192; none at D <= 2048). The results
# are unchanged and the spills stay in L1/L2; it is kept over the reference (several eager launches per call),
# which no GPU timing has compared yet, and because only the kernel can be captured in a CUDA graph.
MAX_MANIFOLD_TILE = 1 << 17


@triton.jit
def _row_normals(seed, row0, d0, G, c2, c3, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    """(BLOCK_R, BLOCK_D) normals for rows ``row0 + i`` and columns ``d0 + j`` (d0 a multiple of 8): element
    (n, d) takes word d % 4 of philox block n * G + d // 4 (with the offset's counter words ``c2``, ``c3``).
    Drawn as groups of 8 columns (two blocks) per thread, the layout of the 128-bit loads of x, then viewed as
    the row tile."""
    GB: tl.constexpr = BLOCK_D // 8
    q = tl.arange(0, BLOCK_R * GB)
    block = (row0 + (q // GB).to(tl.int64)) * G + (d0 // 4 + 2 * (q % GB)).to(tl.int64)
    a0, a1, a2, a3 = _philox_draw(seed, block, 0, c2, c3)
    b0, b1, b2, b3 = _philox_draw(seed, block + 1, 0, c2, c3)
    n0, n1, n2, n3 = _normal4(a0, a1, a2, a3, FAST)
    n4, n5, n6, n7 = _normal4(b0, b1, b2, b3, FAST)
    col = tl.arange(0, 8)[None, :]
    return tl.reshape(_pick8(col, n0, n1, n2, n3, n4, n5, n6, n7), (BLOCK_R, BLOCK_D))


@triton.jit
def _normal4_of_block(seed, block, c2, c3):
    # The four N(0, 1) values of philox block(s) `block` (int64), accurate Box-Muller (the in-manifold noise
    # draws k of them per token: their cost does not matter).
    w0, w1, w2, w3 = _philox_draw(seed, block, 0, c2, c3)
    return _normal4(w0, w1, w2, w3, False)


@triton.jit
def _scale_factor(sx, se, scale):
    ok = (sx > 0) & (se > 0)
    return tl.where(ok, scale * tl.sqrt(sx) / tl.where(ok, tl.sqrt(se), 1.0), 0.0)


@triton.jit
def _backward_coef(sx, se, dot, scale):
    ok = (sx > 0) & (se > 0)
    return tl.where(ok, scale * dot / tl.where(ok, tl.sqrt(se) * tl.sqrt(sx), 1.0), 0.0)


# Per-call values: not specialised by the JIT, typed by annotation (compile_check.PER_CALL_ARGUMENTS).
@triton.jit(do_not_specialize=["seed"])
def _scaled_noise_kernel(x_ptr, g_ptr, out_ptr, offset_ptr, n_rows, D, G, scale, seed: tl.uint64,
                         BACKWARD: tl.constexpr, ONE_BLOCK: tl.constexpr, FAST: tl.constexpr,
                         BF16_BY_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    c2, c3 = _offset_words(offset_ptr)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    dtype = out_ptr.dtype.element_ty
    if ONE_BLOCK:
        # The whole row in registers: one read of x (and g), one write.
        cols = tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.where(m, _row_normals(seed, row0, 0, G, c2, c3, BLOCK_R, BLOCK_D, FAST), 0.0)
        sx = tl.sum(x * x, axis=1)
        se = tl.sum(e * e, axis=1)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
            coef = _backward_coef(sx, se, tl.sum(e * g, axis=1), scale)
            result = g + coef[:, None] * x
        else:
            result = x + _scale_factor(sx, se, scale)[:, None] * e
        tl.store(out_ptr + offs, _round_nearest(result, dtype, BF16_BY_BITS), mask=m)
    else:
        # Long rows: a first sweep for the norms (and e.g), a second one that redraws e and writes.
        sx = tl.zeros((BLOCK_R,), dtype=tl.float32)
        se = tl.zeros((BLOCK_R,), dtype=tl.float32)
        dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (cols < D)[None, :]
            offs = rows[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            e = tl.where(m, _row_normals(seed, row0, d0, G, c2, c3, BLOCK_R, BLOCK_D, FAST), 0.0)
            sx += tl.sum(x * x, axis=1)
            se += tl.sum(e * e, axis=1)
            if BACKWARD:
                g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
                dot += tl.sum(e * g, axis=1)
        if BACKWARD:
            factor = _backward_coef(sx, se, dot, scale)
        else:
            factor = _scale_factor(sx, se, scale)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (cols < D)[None, :]
            offs = rows[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if BACKWARD:
                g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
                result = g + factor[:, None] * x
            else:
                e = tl.where(m, _row_normals(seed, row0, d0, G, c2, c3, BLOCK_R, BLOCK_D, FAST), 0.0)
                result = x + factor[:, None] * e
            tl.store(out_ptr + offs, _round_nearest(result, dtype, BF16_BY_BITS), mask=m)


def scaled_noise_launch(x, grad, out, scale: float, seed: int, offset=None) -> Launch:
    """The launch :func:`launch_scaled_noise` runs (also built from ``meta`` tensors by ``specialisations``)."""
    n_rows, D = x.shape
    tile = TILE_INTERPRETER if interpreter_enabled() else TILE
    block_d = max(8, min(triton.next_power_of_2(D), MAX_BLOCK_D))  # columns in groups of 8 (two philox blocks)
    block_r = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    return Launch(
        _scaled_noise_kernel, (triton.cdiv(n_rows, block_r),),
        (x, grad if grad is not None else x, out, offset if offset is not None else host_offset(x), n_rows, D,
         triton.cdiv(D, 4), float(scale), seed),
        dict(BACKWARD=grad is not None, ONE_BLOCK=D <= block_d, FAST=fast_math(),
             BF16_BY_BITS=interpreter_enabled(), BLOCK_R=block_r, BLOCK_D=block_d),
        4 if block_r * block_d <= 2048 else 8)


def launch_scaled_noise(x, grad, out, scale: float, seed: int, offset=None) -> None:
    """Forward (``grad is None``: ``out = x + noise``) or backward (``out = dx``) over contiguous (N, D) tensors.
    ``offset``: as for ``noise.launch_noise``."""
    n_rows, D = x.shape
    if n_rows == 0 or D == 0:
        return
    scaled_noise_launch(x, grad, out, scale, seed, offset).run()


# Per-call values: not specialised by the JIT, typed by annotation (compile_check.PER_CALL_ARGUMENTS).
@triton.jit(do_not_specialize=["seed"])
def _in_manifold_kernel(x_ptr, ids_ptr, w_ptr, nb_ptr, out_ptr, offset_ptr, V, D, s_w, GK, mix_ratio,
                        seed: tl.uint64,
                        rtol2, K: tl.constexpr, KP: tl.constexpr, BF16_BY_BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    token = tl.load(ids_ptr + n).to(tl.int64)
    # An id outside the vocabulary (not checked on the GPU, where checking would synchronise) reads nothing and
    # gets no noise instead of reading out of bounds.
    valid = tl.where((token >= 0) & (token < V), 1, 0)
    token = token * valid
    rows = tl.arange(0, KP)
    row_ok = (rows < K) & (rows * 0 + valid > 0)
    neighbours = tl.load(nb_ptr + token * K + rows, mask=row_ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m2 = row_ok[:, None] & col_ok[None, :]
    base = tl.load(w_ptr + token * s_w + cols, mask=col_ok & (cols * 0 + valid > 0), other=0.0).to(tl.float32)
    gathered = tl.load(w_ptr + neighbours[:, None] * s_w + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    d = tl.where(m2, gathered - base[None, :], 0.0)
    original = tl.sum(d * d, axis=1)

    # z_j: word j % 4 of philox block n * GK + j // 4, Box-Muller as in the scaled noise.
    c2, c3 = _offset_words(offset_ptr)
    n0, n1, n2, n3 = _normal4_of_block(seed, n * GK + (rows // 4).to(tl.int64), c2, c3)
    word = rows % 4
    z = tl.where(word == 0, n0, tl.where(word == 1, n1, tl.where(word == 2, n2, n3))) * mix_ratio

    eps = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(K):
        sel = rows == j
        dj = tl.sum(tl.where(sel[:, None], d, 0.0), axis=0)
        nj = tl.sum(dj * dj, axis=0)
        oj = tl.sum(tl.where(sel, original, 0.0), axis=0)
        keep = (nj > rtol2 * oj) & (nj > 0)
        dj = tl.where(keep, dj, 0.0)
        eps += tl.sum(tl.where(sel, z, 0.0), axis=0) * dj
        proj = tl.sum(d * dj[None, :], axis=1) / tl.where(keep, nj, 1.0)
        proj = tl.where(rows > j, proj, 0.0)
        d = d - proj[:, None] * dj[None, :]

    x = tl.load(x_ptr + n * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * D + cols, _round_nearest(x + eps, out_ptr.dtype.element_ty, BF16_BY_BITS),
             mask=col_ok)


def manifold_tile_fits(k: int, D: int) -> bool:
    """Whether one token's (k, D) neighbour tile fits the kernel's register budget."""
    return triton.next_power_of_2(max(k, 1)) * triton.next_power_of_2(max(D, 1)) <= MAX_MANIFOLD_TILE


def in_manifold_launch(x, token_ids, weight, neighbors, out, mix_ratio: float, seed: int, offset=None) -> Launch:
    """The launch :func:`launch_in_manifold` runs (also built from ``meta`` tensors by ``specialisations``)."""
    n_rows, D = x.shape
    k = neighbors.shape[1]
    kp = triton.next_power_of_2(k)
    block_d = triton.next_power_of_2(D)
    return Launch(
        _in_manifold_kernel, (n_rows,),
        (x, token_ids, weight, neighbors, out, offset if offset is not None else host_offset(x), weight.shape[0],
         D, weight.stride(0), triton.cdiv(k, 4), float(mix_ratio), seed, DEPENDENT_RTOL2),
        dict(K=k, KP=kp, BF16_BY_BITS=interpreter_enabled(), BLOCK_D=block_d),
        4 if kp * block_d <= 8192 else (8 if kp * block_d <= 32768 else 16))


def launch_in_manifold(x, token_ids, weight, neighbors, out, mix_ratio: float, seed: int, offset=None) -> None:
    """``out = x + eps`` for contiguous x/out (N, D), token_ids (N,), weight (V, D) with unit column stride and
    a contiguous neighbour table (V, k). ``offset``: as for ``noise.launch_noise``."""
    n_rows, D = x.shape
    if n_rows == 0 or D == 0:
        return
    in_manifold_launch(x, token_ids, weight, neighbors, out, mix_ratio, seed, offset).run()
