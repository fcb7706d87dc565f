"""Triton kernels for LNSR's layer-wise diff norm: all L layers in one launch forward, one launch backward.

The L clean and L noisy hidden states are not stacked (that would copy them): the launcher passes two int64
*pointer tables* holding each layer's address, and the kernel casts ``tl.load(table + r)`` back to a pointer of
the input dtype.

Rows: every layer is read as ``n_rows = B * T`` token rows of D contiguous values, row ``i`` starting at
``i * row_stride`` (one stride per side). The host (:func:`row_layout`) orders the rows batch-major (stride
``s_t`` when ``s_b == T * s_t``: contiguous tensors, views of one layer of a stack, either half of a 2B batch) or
token-major (stride ``s_b`` when ``s_t == B * s_b``: XLNet's (T, B, D) storage read as (B, T, D)), so a row's
address is one multiplication: no division by T in the kernel. Other layouts are copied first.

Row weights: ``rho`` (float32, one per row, in the same order) is ``mask / c_b`` of
:func:`fusednoise.reference.lnsr.row_weights`; rows with ``rho == 0`` (padding) are not read and get a zero
gradient. Without a mask there is no ``rho`` (``HAS_ROW_WEIGHT=False``); the reduction's constant divisor is in
the per-layer scale the caller applies.

Forward: grid ``(L, chunks)``; program ``(r, c)`` sums ``rho * (clean - noisy)^2`` over its fixed range of rows
of layer r in float32 and writes the sum to slot ``partial[r, c]``. The caller reduces the (L, chunks) slots with
``torch.sum`` (a fixed order), so the result is deterministic: no atomics, same inputs -> same bits (on the same
device, whose SM count fixes the chunking).

Backward: the same grid writes ``coef_r * rho * (clean - noisy)`` to the clean gradient of layer r and its
negation to the noisy gradient, with ``coef_r = 2 w_r g_r * scale`` precomputed (L floats); the gradients' row
strides come as two more arguments and their addresses in two more pointer tables.

Vector width: when every address in the tables is 16-byte aligned and D and every row stride are multiples of
``VEC = 16 / itemsize`` elements, the host passes ``VEC`` and the kernel states the alignment
(``tl.multiple_of`` / ``tl.max_constancy``), so a thread moves 16 bytes per access (``LDG.E.128``); otherwise
``VEC = 1`` and the accesses are scalar.

Eager reference: :func:`fusednoise.reference.lnsr.diff_norm` / ``diff_norm_backward_into``.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..backends import interpreter_enabled
from . import host_tables
from .launch import Launch
from .noise import _round_nearest

# Elements per tile. Under the interpreter each loop iteration and each program costs milliseconds, so tiles are
# large there and there is one chunk per layer (tests force more with ROWS_PER_PROGRAM_OVERRIDE).
TILE_GPU = 4096
TILE_INTERPRETER = 1 << 15
MAX_BLOCK_D_GPU = 1024
NUM_WARPS = 8
PROGRAMS_PER_SM = 4
# Rows per program, when set (a multiple of nothing in particular: the plan rounds it to whole row blocks).
ROWS_PER_PROGRAM_OVERRIDE: Optional[int] = None


@triton.jit
def _rows(rho_ptr, rows_start, row_end, HAS_ROW_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr):
    # BLOCK_R row indices from rows_start: which lie in this program's range, which of those are read (rho != 0),
    # and their weights.
    rows = rows_start + tl.arange(0, BLOCK_R).to(tl.int64)
    in_range = rows < row_end
    if HAS_ROW_WEIGHT:
        rho = tl.load(rho_ptr + rows, mask=in_range, other=0.0)
        return rows, in_range, in_range & (rho != 0), rho
    return rows, in_range, in_range, tl.full((BLOCK_R,), 1.0, tl.float32)


@triton.jit
def _tile_ptrs(base, rows, row_stride, cols, VEC: tl.constexpr):
    ptrs = base + (rows * row_stride)[:, None] + cols[None, :]
    if VEC > 1:  # the host checked: 16-byte aligned addresses, D and the row strides multiples of VEC
        ptrs = tl.multiple_of(ptrs, [1, 16])
    return ptrs


@triton.jit
def _tile_mask(valid, cols, D, VEC: tl.constexpr):
    m = valid[:, None] & (cols < D)[None, :]
    if VEC > 1:
        m = tl.max_constancy(m, [1, VEC])
    return m


@triton.jit
def _diff_norm_fwd_kernel(clean_tab, noisy_tab, rho_ptr, partial_ptr, ref_ptr,
                          n_rows, D, s_c, s_n, rows_per_prog, n_chunks,
                          HAS_ROW_WEIGHT: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    layer = tl.program_id(0)
    chunk = tl.program_id(1)
    dtype = ref_ptr.dtype.element_ty
    clean = tl.load(clean_tab + layer).to(tl.pointer_type(dtype))
    noisy = tl.load(noisy_tab + layer).to(tl.pointer_type(dtype))
    row_begin = chunk.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_R):
        rows, in_range, valid, rho = _rows(rho_ptr, row_begin + i, row_end, HAS_ROW_WEIGHT, BLOCK_R)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = _tile_mask(valid, cols, D, VEC)
            cv = tl.load(_tile_ptrs(clean, rows, s_c, cols, VEC), mask=m, other=0.0).to(tl.float32)
            nv = tl.load(_tile_ptrs(noisy, rows, s_n, cols, VEC), mask=m, other=0.0).to(tl.float32)
            diff = cv - nv
            if HAS_ROW_WEIGHT:
                acc += rho[:, None] * (diff * diff)
            else:
                acc += diff * diff
    tl.store(partial_ptr + layer * n_chunks + chunk, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _diff_norm_bwd_kernel(clean_tab, noisy_tab, gclean_tab, gnoisy_tab, coef_ptr, rho_ptr, ref_ptr,
                          n_rows, D, s_c, s_n, s_gc, s_gn, rows_per_prog,
                          HAS_ROW_WEIGHT: tl.constexpr, BF16_BY_BITS: tl.constexpr, VEC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    layer = tl.program_id(0)
    chunk = tl.program_id(1)
    dtype = ref_ptr.dtype.element_ty
    clean = tl.load(clean_tab + layer).to(tl.pointer_type(dtype))
    noisy = tl.load(noisy_tab + layer).to(tl.pointer_type(dtype))
    gclean = tl.load(gclean_tab + layer).to(tl.pointer_type(dtype))
    gnoisy = tl.load(gnoisy_tab + layer).to(tl.pointer_type(dtype))
    coef = tl.load(coef_ptr + layer)
    row_begin = chunk.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    for i in range(0, rows_per_prog, BLOCK_R):
        rows, in_range, valid, rho = _rows(rho_ptr, row_begin + i, row_end, HAS_ROW_WEIGHT, BLOCK_R)
        row_coef = coef * rho
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = _tile_mask(valid, cols, D, VEC)
            cv = tl.load(_tile_ptrs(clean, rows, s_c, cols, VEC), mask=m, other=0.0).to(tl.float32)
            nv = tl.load(_tile_ptrs(noisy, rows, s_n, cols, VEC), mask=m, other=0.0).to(tl.float32)
            grad = row_coef[:, None] * (cv - nv)
            # Padded rows (rho 0) read nothing and get a gradient of exactly 0.
            store_mask = _tile_mask(in_range, cols, D, VEC)
            tl.store(_tile_ptrs(gclean, rows, s_gc, cols, VEC), _round_nearest(grad, dtype, BF16_BY_BITS),
                     mask=store_mask)
            tl.store(_tile_ptrs(gnoisy, rows, s_gn, cols, VEC), _round_nearest(-grad, dtype, BF16_BY_BITS),
                     mask=store_mask)


# --------------------------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_d_for(D: int, limit: int) -> int:
    """The widest power-of-two column block (at most ``limit``) whose masked lanes past D are at most D / 16:
    1024 for D = 1000, 1024 or 4096, 256 for 768, 128 for 384 (a 1024-wide block would idle a quarter of the
    lanes of every BERT-base row)."""
    width = min(limit, triton.next_power_of_2(max(D, 1)))
    while width > 1 and triton.cdiv(D, width) * width - D > D // 16:
        width //= 2
    return width


def plan(n_rows: int, D: int, L: int, device: torch.device, sm_count: Optional[int] = None):
    """(BLOCK_R, BLOCK_D, rows_per_prog, chunks): a pure function of the shapes and the device (and
    :data:`ROWS_PER_PROGRAM_OVERRIDE`). ``sm_count`` stands in for the CUDA device's SM count (static tools
    that compile for a GPU they do not have: ``plan(..., torch.device("meta"), sm_count=132)`` is an H100's)."""
    interpreting = (device.type != "cuda" and sm_count is None) or interpreter_enabled()
    tile = TILE_INTERPRETER if interpreting else TILE_GPU
    block_d = block_d_for(D, tile if interpreting else min(tile, MAX_BLOCK_D_GPU))
    block_r = max(1, tile // block_d)
    block_r = min(block_r, triton.next_power_of_2(max(n_rows, 1)))
    if ROWS_PER_PROGRAM_OVERRIDE is not None:
        block_r = min(block_r, triton.next_power_of_2(max(1, ROWS_PER_PROGRAM_OVERRIDE)))
        chunks = triton.cdiv(n_rows, max(1, ROWS_PER_PROGRAM_OVERRIDE))
    elif interpreting:
        chunks = 1
    else:
        if sm_count is None:
            sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target = PROGRAMS_PER_SM * sm_count
        chunks = max(1, min(triton.cdiv(target, L), triton.cdiv(n_rows, block_r)))
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, chunks), block_r) * block_r
    chunks = max(1, triton.cdiv(n_rows, rows_per_prog))
    return block_r, block_d, rows_per_prog, chunks


def _row_stride(view: torch.Tensor, token_major: bool) -> Optional[int]:
    """The stride between consecutive rows of a (B, T, D) view with unit stride along D, its rows taken
    batch-major (row ``b * T + t``) or token-major (row ``t * B + b``); None when no single stride does."""
    B, T, D = view.shape
    s_b, s_t, s_d = view.stride()
    if D > 1 and s_d != 1:
        return None
    inner, outer, n_inner, n_outer = (s_b, s_t, B, T) if token_major else (s_t, s_b, T, B)
    if n_inner == 1:
        return outer
    if n_outer == 1 or outer == n_inner * inner:
        return inner
    return None


def _shared_row_stride(views: Sequence[torch.Tensor], token_major: bool) -> Optional[int]:
    strides = {_row_stride(v, token_major) for v in views}
    return strides.pop() if len(strides) == 1 and None not in strides else None


def row_layout(clean: Sequence[torch.Tensor], noisy: Sequence[torch.Tensor]):
    """``(clean, noisy, s_c, s_n, token_major)``: the views (copied to contiguous where they are not rows with
    one stride per side) and their row strides, batch-major unless every view of both sides is token-major."""
    for token_major in (False, True):
        s_c, s_n = _shared_row_stride(clean, token_major), _shared_row_stride(noisy, token_major)
        if s_c is not None and s_n is not None:
            return list(clean), list(noisy), s_c, s_n, token_major
    s_c = _shared_row_stride(clean, False)
    s_n = _shared_row_stride(noisy, False)
    if s_c is None:
        clean = [v.contiguous() for v in clean]
        s_c = clean[0].shape[2]
    if s_n is None:
        noisy = [v.contiguous() for v in noisy]
        s_n = noisy[0].shape[2]
    return list(clean), list(noisy), s_c, s_n, False


def address_table(tensors, device: torch.device) -> torch.Tensor:
    """int64 addresses of ``tensors`` on ``device``; on CUDA through pinned memory with an async copy (a pageable
    host-to-device copy would wait for the GPU to drain), held for the graph's life when one is being captured
    (:mod:`.host_tables`)."""
    return host_tables.to_device(torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), device)


def vector_width(tensors: Sequence[torch.Tensor], strides: Sequence[int]) -> int:
    """``16 / itemsize`` when every address is 16-byte aligned and D and every row stride are multiples of it
    (each row then starts on a 16-byte boundary), else 1."""
    vec = 16 // tensors[0].element_size()
    D = tensors[0].shape[-1]
    if D % vec or any(s % vec for s in strides) or any(t.data_ptr() % 16 for t in tensors):
        return 1
    return vec


def _row_weight_arg(rho: Optional[torch.Tensor], token_major: bool, ref: torch.Tensor):
    """The (B, T) row weights as a flat float32 tensor in the rows' order (``ref`` stands in when absent)."""
    if rho is None:
        return ref, False
    return (rho.t() if token_major else rho).contiguous().view(-1), True


def forward_launch(clean: List[torch.Tensor], noisy: List[torch.Tensor], rho: Optional[torch.Tensor],
                   sm_count: Optional[int] = None):
    """``(launch, partial, inputs)``: the forward launch for lists of L (B, T, D) views of one shape and dtype
    (B * T and D nonzero), the (L, chunks) float32 buffer it fills, and the tensors its address tables point to
    (contiguous copies among them), which must outlive the launch. ``sm_count``: see :func:`plan` (meta tensors
    with ``sm_count`` give the launch a GPU with that many SMs would run)."""
    L = len(clean)
    B, T, D = clean[0].shape
    device = clean[0].device
    block_r, block_d, rows_per_prog, chunks = plan(B * T, D, L, device, sm_count)
    partial = torch.empty(L, chunks, dtype=torch.float32, device=device)
    clean, noisy, s_c, s_n, token_major = row_layout(clean, noisy)
    rho_arg, has_rho = _row_weight_arg(rho, token_major, partial)
    vec = vector_width(clean + noisy, (s_c, s_n))
    launch = Launch(_diff_norm_fwd_kernel, (L, chunks),
                    (address_table(clean, device), address_table(noisy, device), rho_arg, partial, clean[0],
                     B * T, D, s_c, s_n, rows_per_prog, chunks),
                    dict(HAS_ROW_WEIGHT=has_rho, VEC=vec, BLOCK_R=block_r, BLOCK_D=block_d), NUM_WARPS)
    return launch, partial, (clean, noisy)


def launch_forward(clean: List[torch.Tensor], noisy: List[torch.Tensor], rho: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-layer float32 sums of ``rho * (clean - noisy)^2`` for lists of L (B, T, D) views of one shape and dtype.

    ``rho``: (B, T) float32 row weights or None (all ones). Returns (L,) float32.
    """
    B, T, D = clean[0].shape
    if B * T == 0 or D == 0:
        return torch.zeros(len(clean), dtype=torch.float32, device=clean[0].device)
    launch, partial, inputs = forward_launch(clean, noisy, rho)
    launch.run()
    del inputs  # held until the launch is queued
    return partial.sum(dim=1)


def backward_launch(clean: List[torch.Tensor], noisy: List[torch.Tensor], rho: Optional[torch.Tensor],
                    coef: torch.Tensor, grad_clean: List[torch.Tensor], grad_noisy: List[torch.Tensor],
                    sm_count: Optional[int] = None):
    """``(launch, copies, inputs)``: the backward launch of :func:`launch_backward`, the (gradient, buffer) pairs
    to copy back after it (gradient views that are not rows in the inputs' order are written through a buffer),
    and the input tensors its address tables point to (contiguous copies among them), which must outlive it."""
    L = len(clean)
    B, T, D = clean[0].shape
    device = clean[0].device
    block_r, block_d, rows_per_prog, chunks = plan(B * T, D, L, device, sm_count)
    clean, noisy, s_c, s_n, token_major = row_layout(clean, noisy)
    targets = []
    for grads in (grad_clean, grad_noisy):
        stride = _shared_row_stride(grads, token_major)
        buffers = list(grads)
        if stride is None:  # written contiguous in the rows' order, copied back after the launch
            buffers = [torch.empty((T, B, D) if token_major else (B, T, D), dtype=g.dtype, device=device)
                       for g in grads]
            buffers = [b.transpose(0, 1) for b in buffers] if token_major else buffers
            stride = B * D if token_major else D
        targets.append((grads, buffers, stride))
    (_, gc_buf, s_gc), (_, gn_buf, s_gn) = targets
    rho_arg, has_rho = _row_weight_arg(rho, token_major, coef)
    vec = vector_width(clean + noisy + gc_buf + gn_buf, (s_c, s_n, s_gc, s_gn))
    launch = Launch(_diff_norm_bwd_kernel, (L, chunks),
                    (address_table(clean, device), address_table(noisy, device), address_table(gc_buf, device),
                     address_table(gn_buf, device), coef, rho_arg, clean[0],
                     B * T, D, s_c, s_n, s_gc, s_gn, rows_per_prog),
                    dict(HAS_ROW_WEIGHT=has_rho, BF16_BY_BITS=interpreter_enabled(), VEC=vec, BLOCK_R=block_r,
                         BLOCK_D=block_d), NUM_WARPS)
    copies = [(g, b) for grads, buffers, _ in targets for g, b in zip(grads, buffers) if g is not b]
    return launch, copies, (clean, noisy)


def launch_backward(clean: List[torch.Tensor], noisy: List[torch.Tensor], rho: Optional[torch.Tensor],
                    coef: torch.Tensor, grad_clean: List[torch.Tensor], grad_noisy: List[torch.Tensor]) -> None:
    """Write ``coef_r * rho * (clean_r - noisy_r)`` into ``grad_clean[r]`` and its negation into ``grad_noisy[r]``
    ((B, T, D) views laid out as rows in the order :func:`row_layout` picks for the inputs; a gradient view that
    is not is written through a contiguous buffer)."""
    B, T, D = clean[0].shape
    if B * T == 0 or D == 0:
        return
    launch, copies, inputs = backward_launch(clean, noisy, rho, coef, grad_clean, grad_noisy)
    launch.run()
    del inputs  # held until the launch is queued
    for grad, buffer in copies:
        grad.copy_(buffer)
