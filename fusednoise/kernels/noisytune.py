"""Triton kernels for NoisyTune: all matrices of one device and dtype in two launches.

* ``_stats_kernel``: each program covers one chunk of ``STATS_CHUNK`` elements of one matrix and writes the
  chunk's mean and sum of squared deviations of ``d = W - W[0]`` (per-lane Welford over ``STATS_SUB`` lanes,
  then an exact lane merge) into its own slot: no atomics.
* ``_noise_kernel``: each program first merges its matrix's chunk statistics in a fixed order (Chan et al.'s
  parallel formula; a few hundred partials at most, from L2 cache) into the unbiased std, then adds
  ``(u - 0.5) * lambda * std`` to ``BLOCK`` elements; the first program of each matrix also writes the std out
  (for the report). A matrix with std 0 (constant) or a non-finite std is not written at all.

Both read the per-matrix table ``meta`` (int64: address, numel, stream, first partial, partial count, and the
index of the tensor's first element in the unsharded matrix) through a ``(row, chunk)`` table. The arithmetic and
random numbers are those of ``fusednoise/reference/noisytune.py``.

Shards of FSDP2-sharded matrices (``GIVEN_STD``): the caller has merged the ranks' moments into each matrix's std,
so only ``_noise_kernel`` runs, reading the std; element ``j`` of a shard draws the word of the unsharded index
``offset + j`` (the tile's blocks shifted by ``offset / 4``). Shards whose offset is not a multiple of 4 (a rare
cut) take a launch of their own, ``PER_ELEMENT``, that draws a philox block per element.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .chunks import cdiv, chunk_of_program, tensor_ptr
from .draws import _philox_block, _pick4, _pick8, _uniform
from .launch import Launch
from .noise import _round_nearest

BLOCK_SIZE = 8192  # noise elements per program: the per-program merge of the statistics is amortised over them
NUM_WARPS = 8
# Elements per row of the noise tile: 16 bytes (two philox blocks of half-precision values, one of float32).
VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
STATS_SUB = 2048
STATS_ITERS = 16
STATS_CHUNK = STATS_SUB * STATS_ITERS
PARTIAL_BLOCK = 256

M_PTR, M_NUMEL, M_STREAM, M_PSTART, M_NPART, M_OFFSET = (tl.constexpr(i) for i in range(6))
META_FIELDS = 8

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _stats_kernel(meta_ptr, chunks_ptr, partial_ptr, DTYPE: tl.constexpr, META: tl.constexpr,
                  SUB: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr):
    c, k, j, row = chunk_of_program(meta_ptr, chunks_ptr, META)
    x_ptr = tensor_ptr(row, M_PTR, DTYPE)
    numel = tl.load(row + M_NUMEL)
    shift = tl.load(x_ptr).to(tl.float32)

    # Per-lane Welford over the chunk's full sub-blocks, unmasked: every lane has seen it + 1 values, so the
    # division by the count is one scalar reciprocal per sub-block, not one per element.
    start = j * (SUB * ITERS)
    n_full = tl.minimum((numel - start) // SUB, ITERS)
    mean = tl.zeros([SUB], dtype=tl.float32)
    m2 = tl.zeros([SUB], dtype=tl.float32)
    for it in range(0, n_full):
        offs = start + it * SUB + tl.arange(0, SUB).to(tl.int64)
        ptrs = x_ptr + offs
        if ALIGNED:  # every tensor starts on a 16-byte boundary (host check): 128-bit loads. (multiple_of must
            ptrs = tl.multiple_of(ptrs, 16)  # sit where the pointers are computed, not in a helper function.)
        d = tl.load(ptrs).to(tl.float32) - shift
        delta = d - mean
        mean = mean + delta * (1.0 / (it + 1.0))
        m2 = m2 + delta * (d - mean)
    count = tl.zeros([SUB], dtype=tl.float32) + n_full.to(tl.float32)
    if n_full < ITERS:  # a tensor's last chunk: its partial sub-block, lane by lane
        offs = start + n_full * SUB + tl.arange(0, SUB).to(tl.int64)
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
def _uniform_tile(seed, stream, rows, col, first_block, VEC: tl.constexpr):
    # U[0, 1) of the elements of rows `rows` (VEC elements each, VEC / 4 philox blocks): element i of the tensor
    # takes word i % 4 of block i // 4 (stream k), the layout of reference.noisytune; first_block: the tensor's
    # first element's block in the unsharded matrix (0 unless it is a shard).
    if VEC == 8:
        a0, a1, a2, a3 = _philox_block(seed, 2 * rows + first_block, stream, 0)
        b0, b1, b2, b3 = _philox_block(seed, 2 * rows + first_block + 1, stream, 0)
        return _pick8(col, _uniform(a0), _uniform(a1), _uniform(a2), _uniform(a3),
                      _uniform(b0), _uniform(b1), _uniform(b2), _uniform(b3))
    w0, w1, w2, w3 = _philox_block(seed, rows + first_block, stream, 0)
    return _pick4(col, _uniform(w0), _uniform(w1), _uniform(w2), _uniform(w3))


@triton.jit
def _uniform_at(seed, stream, index):
    # U[0, 1) of the elements at unsharded indices `index`, one philox block each (word index % 4 of block
    # index // 4): the path of a shard whose first element is not the first word of a block.
    w0, w1, w2, w3 = _philox_block(seed, index >> 2, stream, 0)
    word = index & 3
    return tl.where(word == 0, _uniform(w0), tl.where(word == 1, _uniform(w1),
                                                      tl.where(word == 2, _uniform(w2), _uniform(w3))))


@triton.jit
def _merged_std(partial_ptr, pstart, npart, numel, CHUNK: tl.constexpr, PBLOCK: tl.constexpr):
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
    return tl.sqrt(tl.sum(spread, axis=0) / (n_total - 1.0))


# Per-call values: not specialised by the JIT, typed by annotation (compile_check.PER_CALL_ARGUMENTS).
@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(meta_ptr, chunks_ptr, partial_ptr, std_ptr, noise_lambda, seed: tl.uint64, DTYPE: tl.constexpr,
                  META: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, PBLOCK: tl.constexpr,
                  VEC: tl.constexpr, ALIGNED: tl.constexpr, BF16_BY_BITS: tl.constexpr, GIVEN_STD: tl.constexpr,
                  PER_ELEMENT: tl.constexpr):
    c, k, j, row = chunk_of_program(meta_ptr, chunks_ptr, META)
    x_ptr = tensor_ptr(row, M_PTR, DTYPE)
    numel = tl.load(row + M_NUMEL)
    stream = tl.load(row + M_STREAM).to(tl.uint32)
    offset = tl.load(row + M_OFFSET)

    if GIVEN_STD:  # a shard: the std of its matrix, merged over the ranks by the caller
        std = tl.load(std_ptr + k)
    else:
        std = _merged_std(partial_ptr, tl.load(row + M_PSTART), tl.load(row + M_NPART), numel, CHUNK, PBLOCK)
        if j == 0:
            tl.store(std_ptr + k, std)
    # Write nothing unless 0 < std < inf (false for a constant matrix and for NaN).
    limit = tl.where((std > 0.0) & (std < 3.4e38), numel, 0)
    scale = noise_lambda * std

    # Rows of VEC elements (16 bytes). A program whose BLOCK elements all lie below the limit (all but the last
    # of a tensor) reads and writes them without a mask, 128 bits at a time when the host found every tensor
    # 16-byte aligned; the last program of a tensor masks element by element.
    ROWS: tl.constexpr = BLOCK // VEC
    rows = j * ROWS + tl.arange(0, ROWS).to(tl.int64)
    col = tl.arange(0, VEC)[None, :]
    offs = rows[:, None] * VEC + col
    if PER_ELEMENT:
        u = _uniform_at(seed, stream, offset + offs)
    else:  # offset is a multiple of 4 (0 unless a shard)
        u = _uniform_tile(seed, stream, rows, col, offset >> 2, VEC)
    ptrs = x_ptr + offs
    if (j + 1) * BLOCK <= limit:
        if ALIGNED:  # multiple_of must sit where the pointers are computed, not in a helper function
            ptrs = tl.multiple_of(ptrs, [1, 16])
        x = tl.load(ptrs).to(tl.float32)
        tl.store(ptrs, _round_nearest(x + (u - 0.5) * scale, DTYPE, BF16_BY_BITS))
    else:
        in_bounds = offs < limit
        x = tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        tl.store(ptrs, _round_nearest(x + (u - 0.5) * scale, DTYPE, BF16_BY_BITS), mask=in_bounds)


def perturb_launches(tensors: Sequence[torch.Tensor], streams: Sequence[int], noise_lambda: float,
                     seed: int, offsets: Optional[Sequence[int]] = None,
                     std: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[Launch]]:
    """The launches :func:`launch_perturb` runs and the std tensor they fill (also built from ``meta``
    tensors by ``specialisations``): the statistics and the noise, or, with ``std`` given, the noise alone (one
    launch for the shards whose offset is a multiple of 4, one for the others)."""
    device = tensors[0].device
    given = std is not None
    if not given:
        std = torch.empty(len(tensors), dtype=torch.float32, device=device)
    offsets = [0] * len(tensors) if offsets is None else [int(offset) for offset in offsets]
    stats_chunks: List[tuple] = []
    noise_chunks: Tuple[List[tuple], List[tuple]] = ([], [])  # (tile path, per-element path)
    rows = []
    for row, (x, k, offset) in enumerate(zip(tensors, streams, offsets)):
        n = x.numel()
        n_stats = 0 if given else cdiv(n, STATS_CHUNK)
        rows.append([x.data_ptr(), n, int(k), len(stats_chunks), n_stats, offset] + [0] * (META_FIELDS - 6))
        stats_chunks.extend((row, j) for j in range(n_stats))
        noise_chunks[offset % 4 != 0].extend((row, j) for j in range(cdiv(n, BLOCK_SIZE)))
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    chunks = torch.tensor(stats_chunks + noise_chunks[0] + noise_chunks[1], dtype=torch.int32).reshape(-1, 2).to(
        device)
    partial = torch.empty(max(2 * len(stats_chunks), 1), dtype=torch.float32, device=device)
    dtype = _TL_DTYPES[tensors[0].dtype]
    aligned = all(x.data_ptr() % 16 == 0 for x in tensors)
    launches = []
    if stats_chunks:
        launches.append(Launch(_stats_kernel, (len(stats_chunks),), (meta, chunks, partial),
                               dict(DTYPE=dtype, META=META_FIELDS, SUB=STATS_SUB, ITERS=STATS_ITERS, ALIGNED=aligned),
                               NUM_WARPS))
    start = len(stats_chunks)
    for per_element, part in enumerate(noise_chunks):
        if part:
            launches.append(Launch(_noise_kernel, (len(part),),
                                   (meta, chunks[start:], partial, std, float(noise_lambda), int(seed)),
                                   dict(DTYPE=dtype, META=META_FIELDS, BLOCK=BLOCK_SIZE, CHUNK=STATS_CHUNK,
                                        PBLOCK=PARTIAL_BLOCK, VEC=VEC[tensors[0].dtype], ALIGNED=aligned,
                                        BF16_BY_BITS=interpreter_enabled(), GIVEN_STD=given,
                                        PER_ELEMENT=bool(per_element)), NUM_WARPS))
            start += len(part)
    return std, launches


def launch_perturb(tensors: Sequence[torch.Tensor], streams: Sequence[int], noise_lambda: float,
                   seed: int, offsets: Optional[Sequence[int]] = None,
                   std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Perturb contiguous ``tensors`` (one device and dtype, each >= 2 elements) in place; returns their stds
    (float32, on their device) in order. Two launches whatever the number of tensors.

    Shards of sharded matrices: ``offsets`` (each shard's first element in its unsharded matrix) and ``std``
    (float32 on their device, each matrix's std merged over the ranks): the noise alone (one launch, two when
    some offsets are not multiples of 4).
    """
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    std, launches = perturb_launches(tensors, streams, noise_lambda, seed, offsets, std)
    for launch in launches:
        launch.run()
    return std
