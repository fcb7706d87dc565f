"""Triton kernels for the fused residual-add + norm ops, with HyPe's noise in the same pass.

``reference/norms.py`` is the spec (what is rounded where); ``reference/noise.py`` the noise layout, which the
forward kernels draw exactly as ``kernels/noise.py`` does for the flattened tensor: each program holds whole rows
as a ``(ROWS, BLOCK_Q, VEC)`` tile, VEC contiguous elements (16 bytes: 8 half-precision values from one philox
block's 16-bit halves, 4 float32 values from one block's words) per group, and group ``g = row * N / VEC + q`` is the flat group index that
``noise_kernel`` calls ``row``. That identity needs ``N % VEC == 0`` (every real hidden size); the op runs the
noise kernel and then the norm otherwise.

A row is held as ``CHUNKS`` such tiles of ``BLOCK_Q`` groups each (``row_chunks``), ``q`` counting groups across
them: the largest power-of-two chunk that divides the row, so a width that is not a power of two (BERT's 768 = 3 x
256, LLaMA-13B's 5120 = 5 x 1024) pads no lane, where one power-of-two tile would have masked a quarter of 1024.

Forward: one read of each input, one write of ``y`` (and of the residual stream ``s`` for RMSNorm), the per-row
float32 statistics. Backward: a fixed grid of at most ``MAX_BACKWARD_PROGRAMS`` programs, each walking a fixed run
of rows and writing its float32 partial sums of dW (and dB) to its own row of a buffer, summed afterwards by
``torch.sum``: deterministic, no atomics. The gradient of the additive noise is the identity: nothing is stored
or replayed for it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .draws import _noise16, _offset_words, _philox_draw, fast_math
from .launch import Launch
from .noise import _round_nearest, _stochastic_round, _units
from .offsets import host_offset

DIST_NORMAL = 0
DIST_UNIFORM = 1
VEC_HALF = 8
VEC_FLOAT = 4
# Elements one forward program holds (whole rows): enough independent loads per program to hide latency on a GPU.
TILE_ELEMENTS = 4096
LAYER_NORM_HALF_TILE_ELEMENTS = 8192  # the LayerNorm forward in half precision: layer_norm_forward_launch
MAX_FEATURES = 16384          # the widest row one program holds in registers
MAX_BACKWARD_PROGRAMS = 528   # 4 per H100 SM; a constant (not the device's SM count) so results never depend on it


@triton.jit
def _spread4(v, a0, a1, a2, a3):
    # Spread four (R, Q) values over the (R, Q, 4) tile: element v of a group takes a_v.
    return tl.where(v == 0, a0[:, :, None], tl.where(v == 1, a1[:, :, None],
                                                     tl.where(v == 2, a2[:, :, None], a3[:, :, None])))


@triton.jit
def _spread8(v, a0, a1, a2, a3, a4, a5, a6, a7):
    return tl.where(v < 4, _spread4(v, a0, a1, a2, a3), _spread4(v - 4, a4, a5, a6, a7))


@triton.jit
def _noisy(total, group, v, seed, offset_ptr, sigma, HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr,
           DISTRIBUTION: tl.constexpr, FAST: tl.constexpr, INTERPRETED: tl.constexpr, VEC: tl.constexpr,
           OUT_DTYPE: tl.constexpr, ONE_COMPARE: tl.constexpr):
    """``total + sigma * eps`` rounded to OUT_DTYPE, with ``noise_kernel``'s words for flat group ``group``."""
    if HAS_NOISE or STOCHASTIC:
        c2, c3 = _offset_words(offset_ptr)
    if HAS_NOISE:
        if VEC == 8:
            # 16-bit draws (half precision): the group's one block, element m from half m % 2 of word m // 2.
            w0, w1, w2, w3 = _philox_draw(seed, group, 0, c2, c3)
            e0, e1, e2, e3, e4, e5, e6, e7 = _noise16(w0, w1, w2, w3, sigma, DISTRIBUTION, FAST)
            eps = _spread8(v, e0, e1, e2, e3, e4, e5, e6, e7)
        else:
            w0, w1, w2, w3 = _philox_draw(seed, group, 0, c2, c3)
            n0, n1, n2, n3 = _units(w0, w1, w2, w3, DISTRIBUTION, FAST)
            eps = _spread4(v, n0, n1, n2, n3) * sigma
        total = total + eps
    if STOCHASTIC:
        # One purpose-1 block per group of 8 (VEC == 8): element m takes 16-bit half m % 2 of word m // 2.
        r0, r1, r2, r3 = _philox_draw(seed, group, 1, c2, c3)
        r16 = _spread8(v, r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16, r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF,
                       r3 >> 16)
        return _stochastic_round(total, r16, OUT_DTYPE, INTERPRETED, ONE_COMPARE)
    return _round_nearest(total, OUT_DTYPE, INTERPRETED)


@triton.jit
def _chunk_tile(row, c: tl.constexpr, N, n_rows, VEC: tl.constexpr, BLOCK_Q: tl.constexpr, PADDED: tl.constexpr):
    """Chunk ``c`` of the rows: ``(offsets, in_bounds, group, v)`` of its ``(ROWS, BLOCK_Q, VEC)`` tile, columns
    ``c * BLOCK_Q * VEC`` on, and the flat group index of each ``(row, q)`` (the noise layout's)."""
    q = c * BLOCK_Q + tl.arange(0, BLOCK_Q)
    v = tl.arange(0, VEC)[None, None, :]
    col = q[None, :, None] * VEC + v
    offsets = row[:, None, None] * N + col
    if PADDED:   # one power-of-two tile wider than the row: its last lanes are masked
        in_bounds = (row[:, None, None] < n_rows) & (col < N)
    else:        # chunks that tile the row exactly: only whole rows past the end are masked (v < VEC: the shape)
        in_bounds = (row[:, None, None] < n_rows) & (v < VEC)
    group = row[:, None] * (N // VEC) + q[None, :].to(tl.int64)  # N % VEC == 0 whenever the noise is drawn here
    return offsets, in_bounds, group, v


@triton.jit
def _weight_chunk(w_ptr, c: tl.constexpr, N, VEC: tl.constexpr, BLOCK_Q: tl.constexpr, PADDED: tl.constexpr,
                  ROWS: tl.constexpr):
    # Chunk c of a weight vector as a (ROWS, BLOCK_Q, VEC) tile, each row loading it again (cache hits): in the
    # layout of the rows' tiles, 16 bytes a thread. A (1, BLOCK_Q, VEC) load of a chunk smaller than the threads'
    # 16-byte groups gets a narrower layout of its own and a conversion through shared memory per use.
    col = (c * BLOCK_Q + tl.arange(0, BLOCK_Q))[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]
    col = tl.broadcast_to(col, (ROWS, BLOCK_Q, VEC))
    if PADDED:
        return tl.load(w_ptr + col, mask=col < N, other=0.0).to(tl.float32)
    return tl.load(w_ptr + col).to(tl.float32)


@triton.jit(do_not_specialize=["n_rows", "seed"])
def add_rms_norm_forward_kernel(x_ptr, residual_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, offset_ptr, n_rows, N, eps,
                                sigma, seed: tl.uint64, HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr,
                                HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr, DISTRIBUTION: tl.constexpr,
                                FAST: tl.constexpr, INTERPRETED: tl.constexpr, VEC: tl.constexpr,
                                BLOCK_Q: tl.constexpr, CHUNKS: tl.constexpr, PADDED: tl.constexpr,
                                ROWS: tl.constexpr):
    # Each program holds ROWS whole rows, each as CHUNKS register tiles of BLOCK_Q groups of VEC elements (a row
    # of 5120 = 5 x 1024, no lane padded); PADDED: one power-of-two tile wider than the row (CHUNKS == 1).
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    squares = tl.zeros([ROWS, BLOCK_Q, VEC], dtype=tl.float32)  # summed over the chunks, then reduced once
    streams = ()
    for c in tl.static_range(CHUNKS):
        offsets, in_bounds, group, v = _chunk_tile(row, c, N, n_rows, VEC, BLOCK_Q, PADDED)
        total = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            total = total + tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        s = _noisy(total, group, v, seed, offset_ptr, sigma, HAS_NOISE, STOCHASTIC, DISTRIBUTION, FAST,
                   INTERPRETED, VEC, x_ptr.dtype.element_ty, False)
        if STORE_S:
            tl.store(s_ptr + offsets, s, mask=in_bounds)
        # The norm of the stored (rounded) stream, as the eager layer normalises the tensor it holds. Padded lanes
        # hold noise: zero them (a row past the end only feeds its own statistics, which are not stored).
        sf = s.to(tl.float32)
        if PADDED:
            sf = tl.where(in_bounds, sf, 0.0)
        squares += sf * sf
        streams = streams + (sf,)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, axis=2), axis=1) / N + eps)
    tl.store(rstd_ptr + row, rstd, mask=row < n_rows)
    for c in tl.static_range(CHUNKS):
        offsets, in_bounds, group, v = _chunk_tile(row, c, N, n_rows, VEC, BLOCK_Q, PADDED)
        normed = _round_nearest(streams[c] * rstd[:, None, None], x_ptr.dtype.element_ty, INTERPRETED)
        w = _weight_chunk(w_ptr, c, N, VEC, BLOCK_Q, PADDED, ROWS)
        tl.store(y_ptr + offsets, _round_nearest(normed.to(tl.float32) * w, y_ptr.dtype.element_ty,
                                                 INTERPRETED), mask=in_bounds)


@triton.jit(do_not_specialize=["n_rows", "seed"])
def add_layer_norm_forward_kernel(x_ptr, residual_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, offset_ptr, n_rows,
                                  N, eps, sigma, seed: tl.uint64, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
                                  STOCHASTIC: tl.constexpr, DISTRIBUTION: tl.constexpr, FAST: tl.constexpr,
                                  INTERPRETED: tl.constexpr, VEC: tl.constexpr, BLOCK_Q: tl.constexpr,
                                  CHUNKS: tl.constexpr, PADDED: tl.constexpr, ROWS: tl.constexpr):
    # The tiles of add_rms_norm_forward_kernel: BERT's 768 as 3 chunks of 256 (not one of 1024, a quarter masked).
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    row_sum = tl.zeros([ROWS, BLOCK_Q, VEC], dtype=tl.float32)  # summed over the chunks, then reduced once
    streams = ()
    for c in tl.static_range(CHUNKS):
        offsets, in_bounds, group, v = _chunk_tile(row, c, N, n_rows, VEC, BLOCK_Q, PADDED)
        total = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        total = total + tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        s = _round_nearest(total, dtype, INTERPRETED).to(tl.float32)  # the eager hidden + input_tensor
        row_sum += s
        streams = streams + (s,)
    mean = tl.sum(tl.sum(row_sum, axis=2), axis=1) / N
    squares = tl.zeros([ROWS, BLOCK_Q, VEC], dtype=tl.float32)
    centred_chunks = ()
    for c in tl.static_range(CHUNKS):
        centred = streams[c] - mean[:, None, None]
        if PADDED:
            offsets, in_bounds, group, v = _chunk_tile(row, c, N, n_rows, VEC, BLOCK_Q, PADDED)
            centred = tl.where(in_bounds, centred, 0.0)
        squares += centred * centred
        centred_chunks = centred_chunks + (centred,)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, axis=2), axis=1) / N + eps)
    tl.store(mean_ptr + row, mean, mask=row < n_rows)
    tl.store(rstd_ptr + row, rstd, mask=row < n_rows)
    for c in tl.static_range(CHUNKS):
        offsets, in_bounds, group, v = _chunk_tile(row, c, N, n_rows, VEC, BLOCK_Q, PADDED)
        y = centred_chunks[c] * rstd[:, None, None] * _weight_chunk(w_ptr, c, N, VEC, BLOCK_Q, PADDED, ROWS)
        if HAS_BIAS:
            y = y + _weight_chunk(b_ptr, c, N, VEC, BLOCK_Q, PADDED, ROWS)
        if HAS_NOISE:
            # The next layer's HyPe input: the rounded norm output plus the noise, as add_noise on the eager output.
            y = _round_nearest(y, dtype, INTERPRETED).to(tl.float32)
        out = _noisy(y, group, v, seed, offset_ptr, sigma, HAS_NOISE, STOCHASTIC, DISTRIBUTION, FAST, INTERPRETED,
                     VEC, y_ptr.dtype.element_ty, True)
        tl.store(y_ptr + offsets, out, mask=in_bounds)


@triton.jit
def _backward_tile(row, c: tl.constexpr, N, n_rows, BLOCK_N: tl.constexpr, PADDED: tl.constexpr):
    """``(offsets, ok)`` of chunk ``c`` (columns ``c * BLOCK_N`` on) of the rows ``row``."""
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = row[:, None] * N + cols[None, :]
    if PADDED:
        ok = (row < n_rows)[:, None] & (cols < N)[None, :]
    else:  # chunks that tile the row exactly: whole rows past the end only
        ok = (row < n_rows)[:, None] & (tl.arange(0, BLOCK_N) < BLOCK_N)[None, :]
    return offsets, ok


@triton.jit
def _weight_chunks(w_ptr, N, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """The weight's CHUNKS chunks of BLOCK_N columns in float32 (masked past N: the padded single chunk)."""
    weights = ()
    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        weights = weights + (tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32),)
    return weights


@triton.jit
def _xhat(s, mean, rstd, ok, PADDED: tl.constexpr):
    xhat = (s.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if PADDED:  # a row past the end has rstd 0 (its xhat is 0); padded columns do not
        xhat = tl.where(ok, xhat, 0.0)
    return xhat


@triton.jit
def _zero_chunks(BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    zeros = ()
    for c in tl.static_range(CHUNKS):
        zeros = zeros + (tl.zeros([BLOCK_N], dtype=tl.float32),)
    return zeros


@triton.jit
def _store_chunks(partial_ptr, program, sums, N, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(partial_ptr + program.to(tl.int64) * N + cols, sums[c], mask=cols < N)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def add_rms_norm_backward_kernel(dy_ptr, ds_ptr, s_ptr, rstd_ptr, w_ptr, dx_ptr, dw_partial_ptr, n_rows, N,
                                 rows_per_program, HAS_DS: tl.constexpr, INTERPRETED: tl.constexpr,
                                 BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, PADDED: tl.constexpr,
                                 ROWS: tl.constexpr):
    # A row as CHUNKS chunks of BLOCK_N columns (the forward's chunks: 5120 = 5 x 1024, nothing padded), or one
    # power-of-two chunk wider than the row (PADDED); each chunk's dW sum carried across the row tiles.
    program = tl.program_id(0)
    weights = _weight_chunks(w_ptr, N, BLOCK_N, CHUNKS)
    dw = _zero_chunks(BLOCK_N, CHUNKS)
    first = program.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, ROWS):  # a fixed run of rows per program, in a fixed order
        row = first + start + tl.arange(0, ROWS).to(tl.int64)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        products = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)  # summed over the chunks, then reduced once
        s_chunks = ()   # the loads in their own dtype (16-bit ones two to a register), widened again at each use
        dy_chunks = ()
        for c in tl.static_range(CHUNKS):
            offsets, ok = _backward_tile(row, c, N, n_rows, BLOCK_N, PADDED)
            s = tl.load(s_ptr + offsets, mask=ok, other=0.0)
            dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0)
            products += dy.to(tl.float32) * weights[c][None, :] * (s.to(tl.float32) * rstd[:, None])
            s_chunks = s_chunks + (s,)
            dy_chunks = dy_chunks + (dy,)
        dot = tl.sum(products, axis=1) / N
        sums = ()
        for c in tl.static_range(CHUNKS):
            offsets, ok = _backward_tile(row, c, N, n_rows, BLOCK_N, PADDED)
            normed = s_chunks[c].to(tl.float32) * rstd[:, None]
            dy = dy_chunks[c].to(tl.float32)
            dx = rstd[:, None] * (dy * weights[c][None, :] - normed * dot[:, None])
            if HAS_DS:
                dx = dx + tl.load(ds_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offsets, _round_nearest(dx, dx_ptr.dtype.element_ty, INTERPRETED), mask=ok)
            rounded = _round_nearest(normed, s_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
            sums = sums + (dw[c] + tl.sum(dy * rounded, axis=0),)
        dw = sums
    _store_chunks(dw_partial_ptr, program, dw, N, BLOCK_N, CHUNKS)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def add_layer_norm_backward_kernel(dy_ptr, x_ptr, residual_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, dw_partial_ptr,
                                   db_partial_ptr, n_rows, N, rows_per_program, INTERPRETED: tl.constexpr,
                                   BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, PADDED: tl.constexpr,
                                   ROWS: tl.constexpr):
    # The chunks of add_rms_norm_backward_kernel: BERT's 768 as 3 x 256 (not 1024, a quarter masked).
    program = tl.program_id(0)
    weights = _weight_chunks(w_ptr, N, BLOCK_N, CHUNKS)
    dw = _zero_chunks(BLOCK_N, CHUNKS)
    db = _zero_chunks(BLOCK_N, CHUNKS)
    first = program.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, ROWS):
        row = first + start + tl.arange(0, ROWS).to(tl.int64)
        mean = tl.load(mean_ptr + row, mask=row < n_rows, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
        g_sum = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)   # summed over the chunks, then reduced once
        gx_sum = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        s_chunks = ()   # in x's dtype (16-bit ones two to a register), widened again at each use
        dy_chunks = ()
        for c in tl.static_range(CHUNKS):
            offsets, ok = _backward_tile(row, c, N, n_rows, BLOCK_N, PADDED)
            # The forward's stream, recomputed (x + residual rounded as the forward rounds it) instead of stored.
            s = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            s = _round_nearest(s + tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32),
                               x_ptr.dtype.element_ty, INTERPRETED)
            dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0)
            xhat = _xhat(s, mean, rstd, ok, PADDED)
            g = dy.to(tl.float32) * weights[c][None, :]
            g_sum += g
            gx_sum += g * xhat
            s_chunks = s_chunks + (s,)
            dy_chunks = dy_chunks + (dy,)
        mean_g = tl.sum(g_sum, axis=1) / N
        mean_gx = tl.sum(gx_sum, axis=1) / N
        dw_sums = ()
        db_sums = ()
        for c in tl.static_range(CHUNKS):
            offsets, ok = _backward_tile(row, c, N, n_rows, BLOCK_N, PADDED)
            xhat = _xhat(s_chunks[c], mean, rstd, ok, PADDED)
            dy = dy_chunks[c].to(tl.float32)
            ds = rstd[:, None] * (dy * weights[c][None, :] - mean_g[:, None] - xhat * mean_gx[:, None])
            tl.store(ds_ptr + offsets, _round_nearest(ds, ds_ptr.dtype.element_ty, INTERPRETED), mask=ok)
            dw_sums = dw_sums + (dw[c] + tl.sum(dy * xhat, axis=0),)
            db_sums = db_sums + (db[c] + tl.sum(dy, axis=0),)
        dw = dw_sums
        db = db_sums
    _store_chunks(dw_partial_ptr, program, dw, N, BLOCK_N, CHUNKS)
    _store_chunks(db_partial_ptr, program, db, N, BLOCK_N, CHUNKS)


# --------------------------------------------------------------------------------------------- launchers
def vec_for(dtype) -> int:
    """Elements per 16-byte group for a dtype (the noise layout's group)."""
    return VEC_HALF if dtype.itemsize == 2 else VEC_FLOAT


MAX_CHUNKS = 8  # register tiles per row at most (each unrolled): wider non-power-of-two rows are padded


def row_chunks(n_features: int, vec: int):
    """``(BLOCK_Q, CHUNKS)``: a row of ``n_features`` as CHUNKS tiles of BLOCK_Q groups of ``vec`` elements.

    The largest power-of-two number of groups that divides the row's, so no lane is padded (BERT's 768 half
    precision: 3 x 32 groups of 8; LLaMA-13B's 5120: 5 x 128), while at most ``MAX_CHUNKS`` tiles cover it;
    otherwise (and when ``vec`` does not divide the row: the noise's two-pass path) one power-of-two tile, masked."""
    groups = -(-n_features // vec)
    if n_features % vec == 0:
        block_q = groups & -groups  # the largest power of two dividing groups
        if groups // block_q <= MAX_CHUNKS:
            return block_q, groups // block_q
    return triton.next_power_of_2(groups), 1


def _forward_shape(n_rows: int, n_features: int, vec: int, tile_elements: int = TILE_ELEMENTS):
    block_q, chunks = row_chunks(n_features, vec)
    rows = min(16, max(1, tile_elements // (chunks * block_q * vec)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two (tl.arange)
    # 8 warps only when one chunk of a row gives each of their 256 threads a 16-byte group: 1024 half-precision
    # features (128 groups) under 8 warps got a layout of 64-bit accesses from the compiler, 4 warps 128-bit ones.
    warps = 8 if rows * chunks * block_q * vec >= 4096 and block_q >= 256 else 4
    return block_q, chunks, rows, (-(-n_rows // rows),), warps


def forward_lanes_per_element(n_features: int, vec: int) -> float:
    """Lanes of the forward's tiles per element of a row (1 when the chunks tile it exactly)."""
    block_q, chunks = row_chunks(n_features, vec)
    return chunks * block_q * vec / n_features


def _noise_constexprs(x, sigma: float, distribution: str, stochastic: bool) -> dict:
    """The noise's constexprs, shared by both forwards (stochastic rounding only where the output is 16-bit)."""
    return dict(HAS_NOISE=sigma > 0, STOCHASTIC=bool(stochastic) and x.dtype.itemsize == 2,
                DISTRIBUTION=DIST_NORMAL if distribution == "normal" else DIST_UNIFORM, FAST=fast_math(),
                INTERPRETED=interpreter_enabled())


def rms_forward_launch(x, residual, weight, y, s, rstd, eps: float, sigma: float, distribution: str, seed: int,
                       stochastic: bool, offset=None) -> Launch:
    """The launch of :func:`launch_rms_forward` (also built from ``meta`` tensors by ``specialisations``)."""
    n_features = x.shape[-1]
    n_rows = x.numel() // n_features
    vec = vec_for(x.dtype)
    block_q, chunks, rows, grid, warps = _forward_shape(n_rows, n_features, vec)
    return Launch(
        add_rms_norm_forward_kernel, grid,
        (x, residual if residual is not None else x, weight, y, s if s is not None else x, rstd,
         offset if offset is not None else host_offset(x), n_rows, n_features, float(eps), float(sigma), seed),
        dict(HAS_RESIDUAL=residual is not None, STORE_S=s is not None,
             **_noise_constexprs(x, sigma, distribution, stochastic), VEC=vec, BLOCK_Q=block_q, CHUNKS=chunks,
             PADDED=chunks * block_q * vec != n_features, ROWS=rows),
        warps)


def layer_norm_forward_launch(x, residual, weight, bias, y, mean, rstd, eps: float, sigma: float,
                              distribution: str, seed: int, stochastic: bool, offset=None) -> Launch:
    n_features = x.shape[-1]
    n_rows = x.numel() // n_features
    vec = vec_for(x.dtype)
    # Half precision: twice the rows of TILE_ELEMENTS (8 BERT-base rows of 768, 96 registers, 20 warps per SM,
    # no spills): the per-program work (offset words, weight and bias loads, index arithmetic) spread over twice
    # the elements, about 4 issue slots per element fewer, which the stochastic-rounding variants need on an
    # H200. float32 keeps 4 rows (8 took 130 registers and 12 warps per SM).
    tile = LAYER_NORM_HALF_TILE_ELEMENTS if vec == VEC_HALF else TILE_ELEMENTS
    block_q, chunks, rows, grid, warps = _forward_shape(n_rows, n_features, vec, tile)
    return Launch(
        add_layer_norm_forward_kernel, grid,
        (x, residual, weight, bias if bias is not None else weight, y, mean, rstd,
         offset if offset is not None else host_offset(x), n_rows, n_features, float(eps), float(sigma), seed),
        dict(HAS_BIAS=bias is not None, **_noise_constexprs(x, sigma, distribution, stochastic), VEC=vec,
             BLOCK_Q=block_q, CHUNKS=chunks, PADDED=chunks * block_q * vec != n_features, ROWS=rows),
        warps)


def backward_plan(n_rows: int, n_features: int, itemsize: int):
    """``(BLOCK_N, ROWS, programs, rows_per_program, num_warps, CHUNKS)`` of a backward launch: a function of the
    shape (and the element size) only, so the partial sums are added in the same order on every device. A row is
    CHUNKS chunks of BLOCK_N columns (``row_chunks``: 768 = 3 x 256), or one power-of-two chunk wider than the
    row; a chunk of the ROWS rows gives each thread 16 bytes of each tensor, 8 half-precision elements."""
    block_n, chunks = row_chunks(n_features, 1)
    lanes, vec = block_n * chunks, 16 // itemsize
    rows = min(16, max(1, 2048 // lanes, 128 * vec // block_n))  # 16 bytes a thread per chunk under 4 warps
    rows = 1 << (rows.bit_length() - 1)  # a power of two (tl.arange)
    programs = min(MAX_BACKWARD_PROGRAMS, max(1, -(-n_rows // rows)))
    rows_per_program = -(-(-(-n_rows // programs)) // rows) * rows
    programs = max(1, -(-n_rows // rows_per_program))
    warps = 8 if rows * lanes >= 4096 and rows * block_n >= 256 * vec else 4
    return block_n, rows, programs, rows_per_program, warps, chunks


def _backward_constexprs(n_features: int, block_n: int, chunks: int, rows: int) -> dict:
    return dict(INTERPRETED=interpreter_enabled(), BLOCK_N=block_n, CHUNKS=chunks,
                PADDED=block_n * chunks != n_features, ROWS=rows)


def rms_backward_launch(dy, ds, s, rstd, weight, dx, dw_partial) -> Launch:
    n_features = s.shape[-1]
    n_rows = s.numel() // n_features
    block_n, rows, programs, rows_per_program, warps, chunks = backward_plan(n_rows, n_features, s.dtype.itemsize)
    return Launch(add_rms_norm_backward_kernel, (programs,),
                  (dy, ds if ds is not None else dy, s, rstd, weight, dx, dw_partial, n_rows, n_features,
                   rows_per_program),
                  dict(HAS_DS=ds is not None, **_backward_constexprs(n_features, block_n, chunks, rows)), warps)


def layer_norm_backward_launch(dy, x, residual, weight, mean, rstd, ds, dw_partial, db_partial) -> Launch:
    n_features = x.shape[-1]
    n_rows = x.numel() // n_features
    block_n, rows, programs, rows_per_program, warps, chunks = backward_plan(n_rows, n_features, x.dtype.itemsize)
    return Launch(add_layer_norm_backward_kernel, (programs,),
                  (dy, x, residual, weight, mean, rstd, ds, dw_partial, db_partial, n_rows, n_features,
                   rows_per_program),
                  _backward_constexprs(n_features, block_n, chunks, rows), warps)
