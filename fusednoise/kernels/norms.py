"""Triton kernels for the fused residual-add + norm ops, with HyPe's noise in the same pass.

``reference/norms.py`` is the spec (what is rounded where); ``reference/noise.py`` the noise layout, which the
forward kernels draw exactly as ``kernels/noise.py`` does for the flattened tensor: each program holds whole rows
as a ``(ROWS, BLOCK_Q, VEC)`` tile, VEC contiguous elements (16 bytes: 8 half-precision values from one philox
block's 16-bit halves, 4 float32 values from one block's words) per group, and group ``g = row * N / VEC + q`` is the flat group index that
``noise_kernel`` calls ``row``. That identity needs ``N % VEC == 0`` (every real hidden size); the op runs the
noise kernel and then the norm otherwise.

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
from .draws import _normal4, _offset_words, _philox_draw, _uniform, _noise16, fast_math
from .launch import Launch
from .noise import _round_nearest, _stochastic_round
from .offsets import host_offset

DIST_NORMAL = 0
DIST_UNIFORM = 1
VEC_HALF = 8
VEC_FLOAT = 4
# Elements one forward program holds (whole rows): enough independent loads per program to hide latency on a GPU.
TILE_ELEMENTS = 4096
MAX_FEATURES = 16384          # the widest row one program holds in registers
MAX_BACKWARD_PROGRAMS = 528   # 4 per H100 SM; a constant (not the device's SM count) so results never depend on it


@triton.jit
def _units3(w0, w1, w2, w3, DISTRIBUTION: tl.constexpr, FAST: tl.constexpr):
    if DISTRIBUTION == 0:
        return _normal4(w0, w1, w2, w3, FAST)
    return 2.0 * _uniform(w0) - 1.0, 2.0 * _uniform(w1) - 1.0, 2.0 * _uniform(w2) - 1.0, 2.0 * _uniform(w3) - 1.0


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
           OUT_DTYPE: tl.constexpr):
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
            n0, n1, n2, n3 = _units3(w0, w1, w2, w3, DISTRIBUTION, FAST)
            eps = _spread4(v, n0, n1, n2, n3) * sigma
        total = total + eps
    if STOCHASTIC:
        # One purpose-1 block per group of 8 (VEC == 8): element m takes 16-bit half m % 2 of word m // 2.
        r0, r1, r2, r3 = _philox_draw(seed, group, 1, c2, c3)
        r16 = _spread8(v, r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16, r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF,
                       r3 >> 16)
        return _stochastic_round(total, r16, OUT_DTYPE, INTERPRETED)
    return _round_nearest(total, OUT_DTYPE, INTERPRETED)


@triton.jit(do_not_specialize=["n_rows", "seed"])
def add_rms_norm_forward_kernel(x_ptr, residual_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, offset_ptr, n_rows, N, eps,
                                sigma, seed: tl.uint64, HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr,
                                HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr, DISTRIBUTION: tl.constexpr,
                                FAST: tl.constexpr, INTERPRETED: tl.constexpr, VEC: tl.constexpr,
                                BLOCK_Q: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    q = tl.arange(0, BLOCK_Q)
    v = tl.arange(0, VEC)[None, None, :]
    col = q[None, :, None] * VEC + v
    offsets = row[:, None, None] * N + col
    in_bounds = (row[:, None, None] < n_rows) & (col < N)
    group = row[:, None] * (N // VEC) + q[None, :].to(tl.int64)  # the flat group index (N % VEC == 0 with noise)

    total = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = total + tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    s = _noisy(total, group, v, seed, offset_ptr, sigma, HAS_NOISE, STOCHASTIC, DISTRIBUTION, FAST, INTERPRETED,
               VEC, x_ptr.dtype.element_ty)
    if STORE_S:
        tl.store(s_ptr + offsets, s, mask=in_bounds)
    # The norm of the stored (rounded) stream, as the eager layer normalises the tensor it holds.
    sf = tl.where(in_bounds, s.to(tl.float32), 0.0)
    mean_square = tl.sum(tl.sum(sf * sf, axis=2), axis=1) / N
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    tl.store(rstd_ptr + row, rstd, mask=row < n_rows)
    normed = _round_nearest(sf * rstd[:, None, None], x_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, _round_nearest(normed * w, y_ptr.dtype.element_ty, INTERPRETED), mask=in_bounds)


@triton.jit(do_not_specialize=["n_rows", "seed"])
def add_layer_norm_forward_kernel(x_ptr, residual_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, offset_ptr, n_rows,
                                  N, eps, sigma, seed: tl.uint64, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
                                  STOCHASTIC: tl.constexpr, DISTRIBUTION: tl.constexpr, FAST: tl.constexpr,
                                  INTERPRETED: tl.constexpr, VEC: tl.constexpr, BLOCK_Q: tl.constexpr,
                                  ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    q = tl.arange(0, BLOCK_Q)
    v = tl.arange(0, VEC)[None, None, :]
    col = q[None, :, None] * VEC + v
    offsets = row[:, None, None] * N + col
    in_bounds = (row[:, None, None] < n_rows) & (col < N)
    group = row[:, None] * (N // VEC) + q[None, :].to(tl.int64)
    dtype = x_ptr.dtype.element_ty

    total = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    total = total + tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    s = _round_nearest(total, dtype, INTERPRETED).to(tl.float32)  # the eager hidden + input_tensor
    mean = tl.sum(tl.sum(s, axis=2), axis=1) / N
    centred = tl.where(in_bounds, s - mean[:, None, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(centred * centred, axis=2), axis=1) / N + eps)
    tl.store(mean_ptr + row, mean, mask=row < n_rows)
    tl.store(rstd_ptr + row, rstd, mask=row < n_rows)
    y = centred * rstd[:, None, None] * tl.load(w_ptr + col, mask=col < N, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + col, mask=col < N, other=0.0).to(tl.float32)
    if HAS_NOISE:
        # The next layer's HyPe input: the rounded norm output plus the noise, as add_noise on the eager output.
        y = _round_nearest(y, dtype, INTERPRETED).to(tl.float32)
    out = _noisy(y, group, v, seed, offset_ptr, sigma, HAS_NOISE, STOCHASTIC, DISTRIBUTION, FAST, INTERPRETED,
                 VEC, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offsets, out, mask=in_bounds)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def add_rms_norm_backward_kernel(dy_ptr, ds_ptr, s_ptr, rstd_ptr, w_ptr, dx_ptr, dw_partial_ptr, n_rows, N,
                                 rows_per_program, HAS_DS: tl.constexpr, INTERPRETED: tl.constexpr,
                                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, ROWS):  # a fixed run of rows per program, in a fixed order
        row = first + start + tl.arange(0, ROWS).to(tl.int64)
        row_ok = row < n_rows
        offsets = row[:, None] * N + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        s = tl.load(s_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        normed = s * rstd[:, None]
        dn = dy * w[None, :]
        dot = tl.sum(dn * normed, axis=1) / N
        dx = rstd[:, None] * (dn - normed * dot[:, None])
        if HAS_DS:
            dx = dx + tl.load(ds_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, _round_nearest(dx, dx_ptr.dtype.element_ty, INTERPRETED), mask=ok)
        rounded = _round_nearest(normed, s_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        dw += tl.sum(dy * rounded, axis=0)
    tl.store(dw_partial_ptr + program.to(tl.int64) * N + cols, dw, mask=col_ok)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def add_layer_norm_backward_kernel(dy_ptr, x_ptr, residual_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, dw_partial_ptr,
                                   db_partial_ptr, n_rows, N, rows_per_program, INTERPRETED: tl.constexpr,
                                   BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, ROWS):
        row = first + start + tl.arange(0, ROWS).to(tl.int64)
        row_ok = row < n_rows
        offsets = row[:, None] * N + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        # The forward's stream, recomputed (x + residual rounded as the forward rounds it) instead of stored.
        s = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        s = s + tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        s = _round_nearest(s, x_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / N
        mean_gx = tl.sum(g * xhat, axis=1) / N
        ds = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(ds_ptr + offsets, _round_nearest(ds, ds_ptr.dtype.element_ty, INTERPRETED), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_partial_ptr + program.to(tl.int64) * N + cols, dw, mask=col_ok)
    tl.store(db_partial_ptr + program.to(tl.int64) * N + cols, db, mask=col_ok)


# --------------------------------------------------------------------------------------------- launchers
def vec_for(dtype) -> int:
    """Elements per 16-byte group for a dtype (the noise layout's group)."""
    return VEC_HALF if dtype.itemsize == 2 else VEC_FLOAT


def _forward_shape(n_rows: int, n_features: int, vec: int):
    block_q = triton.next_power_of_2(-(-n_features // vec))
    rows = max(1, min(16, TILE_ELEMENTS // (block_q * vec)))
    # 8 warps only when one row gives each of their 256 threads a 16-byte group: BERT's 768 half-precision
    # features (128 groups) under 8 warps got a layout of 64-bit accesses from the compiler, 4 warps 128-bit ones.
    warps = 8 if rows * block_q * vec >= 4096 and block_q >= 256 else 4
    return block_q, rows, (-(-n_rows // rows),), warps


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
    block_q, rows, grid, warps = _forward_shape(n_rows, n_features, vec)
    return Launch(
        add_rms_norm_forward_kernel, grid,
        (x, residual if residual is not None else x, weight, y, s if s is not None else x, rstd,
         offset if offset is not None else host_offset(x), n_rows, n_features, float(eps), float(sigma), seed),
        dict(HAS_RESIDUAL=residual is not None, STORE_S=s is not None,
             **_noise_constexprs(x, sigma, distribution, stochastic), VEC=vec, BLOCK_Q=block_q, ROWS=rows),
        warps)


def layer_norm_forward_launch(x, residual, weight, bias, y, mean, rstd, eps: float, sigma: float,
                              distribution: str, seed: int, stochastic: bool, offset=None) -> Launch:
    n_features = x.shape[-1]
    n_rows = x.numel() // n_features
    vec = vec_for(x.dtype)
    block_q, rows, grid, warps = _forward_shape(n_rows, n_features, vec)
    return Launch(
        add_layer_norm_forward_kernel, grid,
        (x, residual, weight, bias if bias is not None else weight, y, mean, rstd,
         offset if offset is not None else host_offset(x), n_rows, n_features, float(eps), float(sigma), seed),
        dict(HAS_BIAS=bias is not None, **_noise_constexprs(x, sigma, distribution, stochastic), VEC=vec,
             BLOCK_Q=block_q, ROWS=rows),
        warps)


def backward_plan(n_rows: int, n_features: int):
    """``(BLOCK_N, ROWS, programs, rows_per_program, num_warps)`` of a backward launch: a function of the shape
    only, so the partial sums are added in the same order on every device."""
    block_n = triton.next_power_of_2(n_features)
    rows = max(1, min(16, 2048 // block_n))
    programs = min(MAX_BACKWARD_PROGRAMS, max(1, -(-n_rows // rows)))
    rows_per_program = -(-(-(-n_rows // programs)) // rows) * rows
    programs = max(1, -(-n_rows // rows_per_program))
    warps = 8 if block_n >= 2048 else 4
    return block_n, rows, programs, rows_per_program, warps


def rms_backward_launch(dy, ds, s, rstd, weight, dx, dw_partial) -> Launch:
    n_features = s.shape[-1]
    n_rows = s.numel() // n_features
    block_n, rows, programs, rows_per_program, warps = backward_plan(n_rows, n_features)
    return Launch(add_rms_norm_backward_kernel, (programs,),
                  (dy, ds if ds is not None else dy, s, rstd, weight, dx, dw_partial, n_rows, n_features,
                   rows_per_program),
                  dict(HAS_DS=ds is not None, INTERPRETED=interpreter_enabled(), BLOCK_N=block_n, ROWS=rows), warps)


def layer_norm_backward_launch(dy, x, residual, weight, mean, rstd, ds, dw_partial, db_partial) -> Launch:
    n_features = x.shape[-1]
    n_rows = x.numel() // n_features
    block_n, rows, programs, rows_per_program, warps = backward_plan(n_rows, n_features)
    return Launch(add_layer_norm_backward_kernel, (programs,),
                  (dy, x, residual, weight, mean, rstd, ds, dw_partial, db_partial, n_rows, n_features,
                   rows_per_program),
                  dict(INTERPRETED=interpreter_enabled(), BLOCK_N=block_n, ROWS=rows), warps)
