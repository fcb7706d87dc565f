"""Triton kernels for LNSR's layer-wise diff norm: all L layers in one launch forward, one launch backward.

The L clean and L noisy hidden states are not stacked (that would copy them): the launcher passes two int64
*pointer tables* holding each layer's address, and the kernel casts ``tl.load(table + r)`` back to a pointer of
the input dtype. Every layer shares one (B, T, D) shape and, within each side, one (batch, token) stride pair with
unit stride along D, so arbitrary batch/token strides (views, the two halves of a 2B batch, XLNet's (T, B, D)
layout transposed) are read in place.

Forward: grid ``(L, chunks)``; program ``(r, c)`` sums ``m * (clean - noisy)^2`` over its fixed range of token rows
of layer r in float32 and writes the sum to slot ``partial[r, c]``. The caller reduces the (L, chunks) slots with
``torch.sum`` (a fixed order), so the result is deterministic: no atomics, same inputs -> same bits (on the same
device, whose SM count fixes the chunking).

Backward: the same grid writes ``coef_r * m * (clean - noisy)`` to the clean gradient of layer r and its negation
to the noisy gradient, with ``coef_r = 2 w_r g_r / B`` precomputed (L floats); both gradients are contiguous
(B, T, D) blocks whose addresses come in two more pointer tables.

Eager reference: :func:`fusednoise.reference.lnsr.diff_norm` / ``diff_norm_backward_into``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .noise import _round_nearest

# Elements per tile. Under the interpreter each loop iteration and each program costs milliseconds, so tiles are
# large there and there is one chunk per layer.
TILE_GPU = 4096
TILE_INTERPRETER = 1 << 15
MAX_BLOCK_D_GPU = 1024
NUM_WARPS = 8
PROGRAMS_PER_SM = 4


@triton.jit
def _row_block(mask_ptr, rows_start, row_end, T, s_cb, s_ct, s_nb, s_nt, HAS_MASK: tl.constexpr,
               BLOCK_R: tl.constexpr):
    # BLOCK_R token rows from rows_start: which lie in this program's range, which of those the mask keeps,
    # and where each row starts in the clean and the noisy layer output (batch-major, any strides).
    rows = rows_start + tl.arange(0, BLOCK_R).to(tl.int64)
    in_range = rows < row_end
    valid = in_range
    if HAS_MASK:
        rho = tl.load(mask_ptr + rows, mask=in_range, other=0.0)
        valid = valid & (rho != 0)
    else:
        rho = tl.full((BLOCK_R,), 1.0, tl.float32)
    b = rows // T
    t = rows - b * T
    return rows, in_range, valid, rho, b * s_cb + t * s_ct, b * s_nb + t * s_nt


@triton.jit
def _diff_norm_fwd_kernel(clean_tab, noisy_tab, mask_ptr, partial_ptr, ref_ptr,
                          n_rows, T, D, s_cb, s_ct, s_nb, s_nt, rows_per_prog, n_chunks,
                          HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    layer = tl.program_id(0)
    chunk = tl.program_id(1)
    dtype = ref_ptr.dtype.element_ty
    clean = tl.load(clean_tab + layer).to(tl.pointer_type(dtype))
    noisy = tl.load(noisy_tab + layer).to(tl.pointer_type(dtype))
    row_begin = chunk.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_R):
        rows, in_range, valid, rho, c_off, n_off = _row_block(mask_ptr, row_begin + i, row_end, T, s_cb, s_ct, s_nb,
                                                         s_nt, HAS_MASK, BLOCK_R)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = valid[:, None] & (cols < D)[None, :]
            cv = tl.load(clean + c_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            nv = tl.load(noisy + n_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            diff = cv - nv
            acc += rho[:, None] * (diff * diff)
    tl.store(partial_ptr + layer * n_chunks + chunk, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _diff_norm_bwd_kernel(clean_tab, noisy_tab, gclean_tab, gnoisy_tab, coef_ptr, mask_ptr, ref_ptr,
                          n_rows, T, D, s_cb, s_ct, s_nb, s_nt, rows_per_prog,
                          HAS_MASK: tl.constexpr, BF16_BY_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
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
        rows, in_range, valid, rho, c_off, n_off = _row_block(mask_ptr, row_begin + i, row_end, T, s_cb, s_ct, s_nb,
                                                         s_nt, HAS_MASK, BLOCK_R)
        g_off = rows * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = (cols < D)[None, :]
            m = valid[:, None] & col_ok
            cv = tl.load(clean + c_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            nv = tl.load(noisy + n_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            grad = (coef * rho)[:, None] * (cv - nv)
            store_mask = in_range[:, None] & col_ok
            # Padded tokens (mask 0) read nothing and get a gradient of exactly 0.
            tl.store(gclean + g_off[:, None] + cols[None, :], _round_nearest(grad, dtype, BF16_BY_BITS),
                     mask=store_mask)
            tl.store(gnoisy + g_off[:, None] + cols[None, :], _round_nearest(-grad, dtype, BF16_BY_BITS),
                     mask=store_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(n_rows: int, D: int, L: int, device: torch.device):
    """(BLOCK_R, BLOCK_D, rows_per_prog, chunks): a pure function of the shapes and the device."""
    interpreting = device.type != "cuda" or interpreter_enabled()
    tile = TILE_INTERPRETER if interpreting else TILE_GPU
    block_d = triton.next_power_of_2(max(D, 1))
    if not interpreting:
        block_d = min(block_d, MAX_BLOCK_D_GPU)
    block_d = min(block_d, tile)
    block_r = max(1, tile // block_d)
    block_r = min(block_r, triton.next_power_of_2(max(n_rows, 1)))
    if interpreting:
        chunks = 1
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = PROGRAMS_PER_SM * _sm_count(index)
        chunks = max(1, min(triton.cdiv(target, L), triton.cdiv(n_rows, block_r)))
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, chunks), block_r) * block_r
    chunks = max(1, triton.cdiv(n_rows, rows_per_prog))
    return block_r, block_d, rows_per_prog, chunks


def address_table(tensors, device: torch.device) -> torch.Tensor:
    """int64 addresses of ``tensors`` on ``device``; on CUDA through pinned memory with an async copy (a pageable
    host-to-device copy would wait for the GPU to drain)."""
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _mask_arg(mask, ref):
    if mask is None:
        return ref, False
    return mask, True


def launch_forward(clean, noisy, strides, mask) -> torch.Tensor:
    """Per-layer float32 sums of ``m * (clean - noisy)^2`` for lists of L (B, T, D) views with shared strides.

    ``strides``: (s_cb, s_ct, s_nb, s_nt) in elements. ``mask``: contiguous (B*T,) or None. Returns (L,) float32.
    """
    L = len(clean)
    B, T, D = clean[0].shape
    device = clean[0].device
    n_rows = B * T
    block_r, block_d, rows_per_prog, chunks = plan(n_rows, D, L, device)
    partial = torch.empty(L, chunks, dtype=torch.float32, device=device)
    if n_rows == 0 or D == 0:
        return partial.zero_().sum(dim=1)
    mask_t, has_mask = _mask_arg(mask, partial)
    _diff_norm_fwd_kernel[(L, chunks)](
        address_table(clean, device), address_table(noisy, device), mask_t, partial, clean[0],
        n_rows, T, D, *strides, rows_per_prog, chunks,
        HAS_MASK=has_mask, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return partial.sum(dim=1)


def launch_backward(clean, noisy, strides, mask, coef, grad_clean, grad_noisy) -> None:
    """Write the gradients of every layer (contiguous (B, T, D) tensors ``grad_clean[r]``, ``grad_noisy[r]``)."""
    L = len(clean)
    B, T, D = clean[0].shape
    device = clean[0].device
    n_rows = B * T
    if n_rows == 0 or D == 0:
        return
    block_r, block_d, rows_per_prog, chunks = plan(n_rows, D, L, device)
    mask_t, has_mask = _mask_arg(mask, coef)
    _diff_norm_bwd_kernel[(L, chunks)](
        address_table(clean, device), address_table(noisy, device), address_table(grad_clean, device),
        address_table(grad_noisy, device), coef, mask_t, clean[0],
        n_rows, T, D, *strides, rows_per_prog,
        HAS_MASK=has_mask, BF16_BY_BITS=interpreter_enabled(), BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=NUM_WARPS)
