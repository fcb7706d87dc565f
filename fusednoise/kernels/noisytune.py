"""Triton kernels for NoisyTune: all matrices of one device and dtype in two launches.

* ``_stats_kernel``: each program covers one chunk of ``STATS_CHUNK`` elements of one matrix and writes the
  chunk's mean and sum of squared deviations of ``d = W - W[0]`` (per-lane Welford over ``STATS_SUB`` lanes,
  then an exact lane merge) into its own slot: no atomics.
* ``_noise_kernel``: each program first merges its matrix's chunk statistics in a fixed order (Chan et al.'s
  parallel formula; a few hundred partials at most, from L2 cache) into the unbiased std, then adds
  ``(u - 0.5) * lambda * std`` to ``BLOCK`` elements; the first program of each matrix also writes the std out
  (for the report). A matrix with std 0 (constant) or a non-finite std is not written at all.

Both read the per-matrix table ``meta`` (int64: address, numel, stream, first partial, partial count) through
a ``(row, chunk)`` table. The arithmetic and random numbers are those of ``fusednoise/reference/noisytune.py``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .chunks import cdiv, chunk_of_program, tensor_ptr
from .launch import Launch
from .noise import _pick4, _round_nearest, _uniform

BLOCK_SIZE = 4096
NUM_WARPS = 8
STATS_SUB = 2048
STATS_ITERS = 16
STATS_CHUNK = STATS_SUB * STATS_ITERS
PARTIAL_BLOCK = 256

M_PTR, M_NUMEL, M_STREAM, M_PSTART, M_NPART = (tl.constexpr(i) for i in range(5))
META_FIELDS = 8

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _stats_kernel(meta_ptr, chunks_ptr, partial_ptr, DTYPE: tl.constexpr, META: tl.constexpr,
                  SUB: tl.constexpr, ITERS: tl.constexpr):
    c, k, j, row = chunk_of_program(meta_ptr, chunks_ptr, META)
    x_ptr = tensor_ptr(row, M_PTR, DTYPE)
    numel = tl.load(row + M_NUMEL)
    shift = tl.load(x_ptr).to(tl.float32)

    start = j * (SUB * ITERS)
    n_iters = tl.minimum(tl.cdiv(numel - start, SUB), ITERS)
    count = tl.zeros([SUB], dtype=tl.float32)
    mean = tl.zeros([SUB], dtype=tl.float32)
    m2 = tl.zeros([SUB], dtype=tl.float32)
    for it in range(0, n_iters):
        offs = start + it * SUB + tl.arange(0, SUB).to(tl.int64)
        mask = offs < numel
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - shift
        new_count = count + tl.where(mask, 1.0, 0.0)
        delta = tl.where(mask, d - mean, 0.0)
        mean = mean + delta / tl.maximum(new_count, 1.0)
        m2 = m2 + delta * tl.where(mask, d - mean, 0.0)
        count = new_count
    total = tl.sum(count, axis=0)
    chunk_mean = tl.sum(count * mean, axis=0) / total
    dev = mean - chunk_mean
    chunk_m2 = tl.sum(m2 + count * dev * dev, axis=0)
    tl.store(partial_ptr + 2 * c, chunk_mean)
    tl.store(partial_ptr + 2 * c + 1, chunk_m2)


@triton.jit
def _noise_kernel(meta_ptr, chunks_ptr, partial_ptr, std_ptr, noise_lambda, seed, DTYPE: tl.constexpr,
                  META: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, PBLOCK: tl.constexpr,
                  BF16_BY_BITS: tl.constexpr):
    c, k, j, row = chunk_of_program(meta_ptr, chunks_ptr, META)
    x_ptr = tensor_ptr(row, M_PTR, DTYPE)
    numel = tl.load(row + M_NUMEL)
    stream = tl.load(row + M_STREAM)
    pstart = tl.load(row + M_PSTART)
    npart = tl.load(row + M_NPART)

    # Merge the chunk statistics: mean = sum(n_c mean_c) / n, M2 = sum(M2_c + n_c (mean_c - mean)^2).
    weighted = tl.zeros([PBLOCK], dtype=tl.float32)
    for i in range(0, npart, PBLOCK):
        idx = i + tl.arange(0, PBLOCK)
        valid = idx < npart
        n_c = tl.minimum(numel - idx.to(tl.int64) * CHUNK, CHUNK).to(tl.float32)
        mean_c = tl.load(partial_ptr + 2 * (pstart + idx), mask=valid, other=0.0)
        weighted += tl.where(valid, n_c * mean_c, 0.0)
    n_total = numel.to(tl.float32)
    mean = tl.sum(weighted, axis=0) / n_total
    spread = tl.zeros([PBLOCK], dtype=tl.float32)
    for i in range(0, npart, PBLOCK):
        idx = i + tl.arange(0, PBLOCK)
        valid = idx < npart
        n_c = tl.minimum(numel - idx.to(tl.int64) * CHUNK, CHUNK).to(tl.float32)
        mean_c = tl.load(partial_ptr + 2 * (pstart + idx), mask=valid, other=0.0)
        m2_c = tl.load(partial_ptr + 2 * (pstart + idx) + 1, mask=valid, other=0.0)
        dev = mean_c - mean
        spread += tl.where(valid, m2_c + n_c * dev * dev, 0.0)
    std = tl.sqrt(tl.sum(spread, axis=0) / (n_total - 1.0))
    if j == 0:
        tl.store(std_ptr + k, std)
    # Write nothing unless 0 < std < inf (false for a constant matrix and for NaN).
    limit = tl.where((std > 0.0) & (std < 3.4e38), numel, 0)

    ROWS: tl.constexpr = BLOCK // 4
    block_id = j * ROWS + tl.arange(0, ROWS).to(tl.int64)
    col = tl.arange(0, 4)[None, :]
    offs = block_id[:, None] * 4 + col
    in_bounds = offs < limit
    c_lo = (block_id & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (block_id >> 32).to(tl.uint32)
    zero = c_lo * 0
    w0, w1, w2, w3 = tl.philox(seed, c_lo, c_hi, zero + stream.to(tl.uint32), zero)
    u = _pick4(col, _uniform(w0), _uniform(w1), _uniform(w2), _uniform(w3))
    x = tl.load(x_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    x = x + (u - 0.5) * (noise_lambda * std)
    tl.store(x_ptr + offs, _round_nearest(x, DTYPE, BF16_BY_BITS), mask=in_bounds)


def perturb_launches(tensors: Sequence[torch.Tensor], streams: Sequence[int], noise_lambda: float,
                     seed: int) -> Tuple[torch.Tensor, List[Launch]]:
    """The two launches :func:`launch_perturb` runs and the std tensor they fill (also built from ``meta``
    tensors by ``specialisations``)."""
    device = tensors[0].device
    stats_chunks: List[tuple] = []
    noise_chunks: List[tuple] = []
    rows = []
    for row, (x, k) in enumerate(zip(tensors, streams)):
        n = x.numel()
        n_stats = cdiv(n, STATS_CHUNK)
        rows.append([x.data_ptr(), n, int(k), len(stats_chunks), n_stats] + [0] * (META_FIELDS - 5))
        stats_chunks.extend((row, j) for j in range(n_stats))
        noise_chunks.extend((row, j) for j in range(cdiv(n, BLOCK_SIZE)))
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    chunks = torch.tensor(stats_chunks + noise_chunks, dtype=torch.int32).reshape(-1, 2).to(device)
    partial = torch.empty(2 * len(stats_chunks), dtype=torch.float32, device=device)
    std = torch.empty(len(tensors), dtype=torch.float32, device=device)
    dtype = _TL_DTYPES[tensors[0].dtype]
    stats = Launch(_stats_kernel, (len(stats_chunks),), (meta, chunks, partial),
                   dict(DTYPE=dtype, META=META_FIELDS, SUB=STATS_SUB, ITERS=STATS_ITERS), NUM_WARPS)
    noise = Launch(_noise_kernel, (len(noise_chunks),),
                   (meta, chunks[len(stats_chunks):], partial, std, float(noise_lambda), int(seed)),
                   dict(DTYPE=dtype, META=META_FIELDS, BLOCK=BLOCK_SIZE, CHUNK=STATS_CHUNK, PBLOCK=PARTIAL_BLOCK,
                        BF16_BY_BITS=interpreter_enabled()), NUM_WARPS)
    return std, [stats, noise]


def launch_perturb(tensors: Sequence[torch.Tensor], streams: Sequence[int], noise_lambda: float,
                   seed: int) -> torch.Tensor:
    """Perturb contiguous ``tensors`` (one device and dtype, each >= 2 elements) in place; returns their stds
    (float32, on their device) in order. Two launches whatever the number of tensors."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    std, launches = perturb_launches(tensors, streams, noise_lambda, seed)
    for launch in launches:
        launch.run()
    return std
