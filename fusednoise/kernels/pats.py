"""Triton kernels for PATS-Adamax: one fused step for every tensor of one device and dtype.

Launches per step and per (device, dtype): **two** (one when no tensor has noise), whatever the number of
tensors, plus one host-to-device copy of a small per-tensor table.

* Pass 1, ``_sensitivity_kernel`` (noise tensors only): ``s~ = beta * s~ + (1 - beta) * |theta * g|``; each
  program covers one chunk of ``SENS_CHUNK`` elements of one tensor and writes the float32 sum of its new
  ``s~`` into its own slot of a partial-sum buffer. Reads theta, g, s~; writes s~ (16 bytes per element).
* Pass 2, ``_update_kernel`` (all tensors): the Adamax moments and update, and for noise tensors the
  sensitivity-scaled Bernoulli-masked Gaussian noise. Each program first adds up its own tensor's partial sums
  in a fixed order (a few hundred floats at most, from L2 cache) to get ``s_bar``, so no separate reduction
  launch and no float atomics: the same inputs give the same bits, whatever the scheduling. Reads theta, g, m,
  u (and s~); writes theta, m, u (28 bytes per element, 32 with noise).

So a noise tensor moves 48 bytes per float32 element per step, a no-noise tensor 28 (AdamW's count).

Sharded tensors (FSDP2, SPEC section 4c; see :meth:`PatsLauncher.launches`): a third, small launch between the
passes, ``_local_sums_kernel``, adds each sharded tensor's partial sums (the same fixed-order loop) into a float64
vector; the caller adds that vector across the ranks (one collective for all tensors) and pass 2 reads the
reduced sum and divides by the unsharded element count instead of adding its own partial sums. Every draw is keyed
by the element's index in the unsharded tensor (the shard's offset plus the local index).

Capturable steps (``PATSAdamax(capturable=True)``): the host writes the optimizer's seed, ``lr``, ``beta1`` and
the address of the tensor's step count on the device into the table, never a step-dependent number, so the table
is the same at every step. A first one-warp launch, ``_capturable_scalars_kernel``, reads each tensor's count
``t`` and writes this step's ``clr = lr / (1 - beta1**t)`` and ``seed_t = step_seed(seed, t)`` into the device
table's ``F_CLR`` and ``F_SEED`` columns, by the reference's exact operations (float64 binary exponentiation,
uint64 splitmix64); the two passes then run unchanged. A CUDA graph that captured the step advances with the
counts (the optimizer adds 1 to them on the device before the launches).

The per-tensor table (``meta``, int64, ``META_FIELDS`` columns) holds the addresses of the parameter, gradient
and state tensors, the element count, the philox stream and key, the partial-sum range, the shard's offset, its
mean slot and unsharded element count, the step count's address, and the float hyperparameters as float64 bit
patterns. Programs find their tensor through a chunk table (``(row, chunk)`` int32 pairs) that depends only on
the tensors' sizes, so it is built once and cached.

The arithmetic and the random numbers are those of ``fusednoise/reference/pats.py`` (read that first); the
noise of element ``i`` of tensor ``k`` uses ``philox(seed_t, i_lo, i_hi, k, 0)``, element-indexed, so a
tensor's chunks and the other tensors in the launch never change what it draws.
"""
from __future__ import annotations

import array
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..backends import interpreter_enabled
from ..reference.pats import PatsJob
from .chunks import cdiv, chunk_of_program, tensor_ptr
from .draws import _box_muller, _philox_block, _uniform, fast_math
from . import host_tables
from .launch import Launch
from .noise import _round_nearest

# Pass 2: elements per program (4 per thread: one 128-bit access of each float32 tensor, and few enough live
# values that 16 warps fit an SM). Pass 1: SENS_SUB elements per iteration, up to SENS_ITERS iterations.
BLOCK_SIZE = 1024
NUM_WARPS = 8
SENS_SUB = 2048
SENS_ITERS = 16
SENS_CHUNK = SENS_SUB * SENS_ITERS
# Partial sums read per iteration in pass 2 (a tensor has ceil(numel / SENS_CHUNK) of them).
PARTIAL_BLOCK = 256

# Columns of the per-tensor table (tl.constexpr so the kernels can read them as globals). Integer columns:
# addresses; the local element count; the philox stream k; this step's key seed_t; flags; the tensor's partial
# sums (first, count); the shard's first element in the unsharded tensor; its slot in the reduced-sum vector and
# the unsharded element count (FLAG_SHARED_MEAN rows); capturable steps only: the address of the float32 step
# count and the optimizer's seed. Float columns (float64 bits): F_CLR is lr / (1 - beta1**t); capturable steps
# only: lr and beta1. In a capturable step F_SEED and F_CLR are written on the device (_capturable_scalars_kernel).
F_PARAM, F_GRAD, F_EXP_AVG, F_EXP_INF, F_SENS = (tl.constexpr(i) for i in range(0, 5))
F_NUMEL, F_STREAM, F_SEED, F_FLAGS, F_PSTART, F_NPART = (tl.constexpr(i) for i in range(5, 11))
F_OFFSET, F_MEAN_SLOT, F_TOTAL_NUMEL, F_STEP, F_BASE_SEED = (tl.constexpr(i) for i in range(11, 16))
F_CLR, F_DECAY, F_WD, F_ONE_MINUS_BETA1, F_BETA2, F_EPS = (tl.constexpr(i) for i in range(16, 22))
F_SBETA, F_ONE_MINUS_SBETA, F_LAMBDA, F_GAMMA, F_PROB, F_NOISE_EPS = (tl.constexpr(i) for i in range(22, 28))
F_LR, F_BETA1 = tl.constexpr(28), tl.constexpr(29)
META_FIELDS = 30
FLAG_NOISE = tl.constexpr(1)
FLAG_L2 = tl.constexpr(2)
FLAG_DRAW = tl.constexpr(4)
FLAG_SHARED_MEAN = tl.constexpr(8)  # s_bar = (the ranks' sum, from the collective) / the unsharded element count

# splitmix64 (reference.pats.step_seed)
GOLDEN64 = tl.constexpr(0x9E3779B97F4A7C15)
SPLITMIX_A = tl.constexpr(0xBF58476D1CE4E5B9)
SPLITMIX_B = tl.constexpr(0x94D049BB133111EB)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _f64(row, field):
    # A float hyperparameter stored as the bit pattern of a float64 in the int64 table.
    return tl.load(row + field).to(tl.float64, bitcast=True)


@triton.jit
def _f32(row, field):
    return _f64(row, field).to(tl.float32)


@triton.jit
def _partial_sum(partial_ptr, row, PBLOCK: tl.constexpr):
    # The sum of a tensor's pass-1 partial sums, added in a fixed order (a few hundred at most, from L2).
    pstart = tl.load(row + F_PSTART)
    npart = tl.load(row + F_NPART)
    total = tl.zeros([PBLOCK], dtype=tl.float32)
    for i in range(0, npart, PBLOCK):
        idx = i + tl.arange(0, PBLOCK)
        total += tl.load(partial_ptr + pstart + idx, mask=idx < npart, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _step_seed(seed, t):
    # reference.pats.step_seed: splitmix64((seed + t * golden) mod 2**64) >> 2, in uint64 (wrapping) arithmetic.
    x = seed.to(tl.uint64) + t.to(tl.uint64) * GOLDEN64
    x = (x ^ (x >> 30)) * SPLITMIX_A
    x = (x ^ (x >> 27)) * SPLITMIX_B
    x = x ^ (x >> 31)
    return (x >> 2).to(tl.int64)


@triton.jit
def _power(base, t):
    # reference.pats.power: base ** t (t >= 0) by binary exponentiation, the same float64 products in the same
    # order as the host's, so the bias correction is the host's bit for bit. At most 24 trips (t < 2**24).
    result = base * 0.0 + 1.0
    while t > 0:
        result = tl.where((t & 1) != 0, result * base, result)
        base = base * base
        t = t >> 1
    return result


@triton.jit
def _capturable_scalars_kernel(meta_ptr, META: tl.constexpr):
    # One program per row: this step's key and bias-corrected step size from the tensor's step count t on the
    # device (already advanced to this step), written into the table for the passes that follow.
    row = meta_ptr + tl.program_id(0).to(tl.int64) * META
    t = tl.load(tensor_ptr(row, F_STEP, tl.float32)).to(tl.int64)
    tl.store(row + F_SEED, _step_seed(tl.load(row + F_BASE_SEED), t))
    clr = _f64(row, F_LR) / (1.0 - _power(_f64(row, F_BETA1), t))
    tl.store(row + F_CLR, clr.to(tl.int64, bitcast=True))


@triton.jit
def _sensitivity_kernel(meta_ptr, chunks_ptr, partial_ptr, PARAM_DTYPE: tl.constexpr,
                        META: tl.constexpr, SUB: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr):
    c, k, j, row = chunk_of_program(meta_ptr, chunks_ptr, META)
    p_ptr = tensor_ptr(row, F_PARAM, PARAM_DTYPE)
    g_ptr = tensor_ptr(row, F_GRAD, PARAM_DTYPE)
    s_ptr = tensor_ptr(row, F_SENS, tl.float32)
    numel = tl.load(row + F_NUMEL)
    beta = _f32(row, F_SBETA)
    one_minus_beta = _f32(row, F_ONE_MINUS_SBETA)

    # The chunk's full sub-blocks unmasked (128-bit accesses when the host found every tensor 16-byte aligned),
    # then the partial last one of a tensor's last chunk, masked.
    start = j * (SUB * ITERS)
    n_full = tl.minimum((numel - start) // SUB, ITERS)
    acc = tl.zeros([SUB], dtype=tl.float32)
    for it in range(0, n_full):
        offs = start + it * SUB + tl.arange(0, SUB).to(tl.int64)
        pp, gp, sp = p_ptr + offs, g_ptr + offs, s_ptr + offs
        if ALIGNED:  # multiple_of must sit where the pointers are computed, not in a helper function
            pp = tl.multiple_of(pp, 16)
            gp = tl.multiple_of(gp, 16)
            sp = tl.multiple_of(sp, 16)
        s = _sensitivity_ema(tl.load(pp), tl.load(gp), tl.load(sp), beta, one_minus_beta)
        tl.store(sp, s)
        acc += s
    if n_full < ITERS:
        offs = start + n_full * SUB + tl.arange(0, SUB).to(tl.int64)
        mask = offs < numel
        s = _sensitivity_ema(tl.load(p_ptr + offs, mask=mask, other=0.0), tl.load(g_ptr + offs, mask=mask, other=0.0),
                             tl.load(s_ptr + offs, mask=mask, other=0.0), beta, one_minus_beta)
        tl.store(s_ptr + offs, s, mask=mask)
        acc += tl.where(mask, s, 0.0)
    tl.store(partial_ptr + c, tl.sum(acc, axis=0))


@triton.jit
def _sensitivity_ema(theta, g, s, beta, one_minus_beta):
    return beta * s + one_minus_beta * tl.abs(theta.to(tl.float32) * g.to(tl.float32))


@triton.jit
def _update_tile(counters, pp, gp, mp, up, sp, mask, other, row, flags, s_bar,
                 PARAM_DTYPE: tl.constexpr, FAST: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    # One Adamax step of a tile (mask / other: None for a program's full tile); counters: the elements' indices
    # in the unsharded tensor, which key their noise.
    theta = tl.load(pp, mask=mask, other=other).to(tl.float32)
    g = tl.load(gp, mask=mask, other=other).to(tl.float32)
    m = tl.load(mp, mask=mask, other=other)
    u = tl.load(up, mask=mask, other=other)

    if (flags & FLAG_L2) != 0:
        g = g + _f32(row, F_WD) * theta
    m = m + _f32(row, F_ONE_MINUS_BETA1) * (g - m)
    u = tl.maximum(_f32(row, F_BETA2) * u, tl.abs(g) + _f32(row, F_EPS))
    theta = theta * _f32(row, F_DECAY)
    theta = theta + (-_f32(row, F_CLR)) * (m / u)

    if (flags & FLAG_DRAW) != 0:
        s = tl.load(sp, mask=mask, other=other)
        ratio = s_bar / (s + _f32(row, F_NOISE_EPS))
        r = _f32(row, F_LAMBDA) * tl.maximum(ratio - _f32(row, F_GAMMA), 0.0)
        # element-indexed philox: word 0, 1 -> Box-Muller (cosine), word 2 -> Bernoulli(p)
        w0, w1, w2, _ = _philox_block(tl.load(row + F_SEED), counters, tl.load(row + F_STREAM).to(tl.uint32), 0)
        normal, _ = _box_muller(w0, w1, FAST)
        keep = _uniform(w2) < _f32(row, F_PROB)
        theta = theta + tl.where(keep, tl.sqrt(r) * normal, 0.0)

    tl.store(pp, _round_nearest(theta, PARAM_DTYPE, BF16_BY_BITS), mask=mask)
    tl.store(mp, m, mask=mask)
    tl.store(up, u, mask=mask)


@triton.jit
def _local_sums_kernel(meta_ptr, partial_ptr, sums_ptr, META: tl.constexpr, PBLOCK: tl.constexpr):
    # One program per noise row: a sharded row's sum of s~ over its local elements, into its slot (float64) of the
    # vector the caller adds across ranks. Rows whose mean is their own are left to pass 2.
    row = meta_ptr + tl.program_id(0).to(tl.int64) * META
    if (tl.load(row + F_FLAGS) & FLAG_SHARED_MEAN) != 0:
        tl.store(sums_ptr + tl.load(row + F_MEAN_SLOT), _partial_sum(partial_ptr, row, PBLOCK).to(tl.float64))


@triton.jit
def _update_kernel(meta_ptr, chunks_ptr, partial_ptr, sums_ptr, PARAM_DTYPE: tl.constexpr, META: tl.constexpr,
                   BLOCK: tl.constexpr, PBLOCK: tl.constexpr, FAST: tl.constexpr, ALIGNED: tl.constexpr,
                   BF16_BY_BITS: tl.constexpr):
    c, k, j, row = chunk_of_program(meta_ptr, chunks_ptr, META)
    p_ptr = tensor_ptr(row, F_PARAM, PARAM_DTYPE)
    g_ptr = tensor_ptr(row, F_GRAD, PARAM_DTYPE)
    m_ptr = tensor_ptr(row, F_EXP_AVG, tl.float32)
    u_ptr = tensor_ptr(row, F_EXP_INF, tl.float32)
    s_ptr = tensor_ptr(row, F_SENS, tl.float32)  # 0 (never read) for a tensor without noise
    numel = tl.load(row + F_NUMEL)
    flags = tl.load(row + F_FLAGS)

    # s_bar: the tensor's partial sums of s~ from pass 1, added in a fixed order; for a shard, the ranks' sum
    # (reduced by the caller between the launches) over the unsharded element count
    s_bar = 0.0
    if (flags & FLAG_DRAW) != 0:
        if (flags & FLAG_SHARED_MEAN) != 0:
            s_bar = (tl.load(sums_ptr + tl.load(row + F_MEAN_SLOT))
                     / tl.load(row + F_TOTAL_NUMEL).to(tl.float64)).to(tl.float32)
        else:
            s_bar = _partial_sum(partial_ptr, row, PBLOCK) / numel.to(tl.float32)

    lanes = tl.arange(0, BLOCK).to(tl.int64)
    offs = j * BLOCK + lanes
    counters = (tl.load(row + F_OFFSET) + j * BLOCK) + lanes
    pp, gp, mp, up, sp = p_ptr + offs, g_ptr + offs, m_ptr + offs, u_ptr + offs, s_ptr + offs
    if (j + 1) * BLOCK <= numel:  # a full tile: no mask, 128-bit accesses when every tensor is 16-byte aligned
        if ALIGNED:  # multiple_of must sit where the pointers are computed, not in a helper function
            pp = tl.multiple_of(pp, 16)
            gp = tl.multiple_of(gp, 16)
            mp = tl.multiple_of(mp, 16)
            up = tl.multiple_of(up, 16)
            sp = tl.multiple_of(sp, 16)
        _update_tile(counters, pp, gp, mp, up, sp, None, None, row, flags, s_bar, PARAM_DTYPE, FAST, BF16_BY_BITS)
    else:  # the last tile of a tensor
        _update_tile(counters, pp, gp, mp, up, sp, offs < numel, 0.0, row, flags, s_bar, PARAM_DTYPE, FAST,
                     BF16_BY_BITS)


def _chunk_table(numels: Sequence[int], noise: Sequence[bool], device) -> Tuple[torch.Tensor, int, int, List[int]]:
    """Chunk tables for the rows (noise rows first): pass-1 chunks, then pass-2 chunks, one int32 tensor.

    Returns ``(table, n_pass1, n_pass2, partial_starts)``.
    """
    pass1: List[Tuple[int, int]] = []
    pass2: List[Tuple[int, int]] = []
    starts: List[int] = []
    for row, (n, has_noise) in enumerate(zip(numels, noise)):
        starts.append(len(pass1))
        if has_noise:
            pass1.extend((row, j) for j in range(cdiv(n, SENS_CHUNK)))
        pass2.extend((row, j) for j in range(cdiv(n, BLOCK_SIZE)))
    table = torch.tensor(pass1 + pass2, dtype=torch.int32).reshape(-1, 2)
    return table.to(device), len(pass1), len(pass2), starts


def _meta_table(jobs: Sequence[PatsJob], partial_starts: Sequence[int], capturable: bool) -> torch.Tensor:
    """The int64 per-tensor table: integer columns as they are, float columns as float64 bit patterns.

    Built through flat ``array`` buffers (a tenth of ``torch.tensor``'s host time on a list of rows)."""
    ints, floats = array.array("q"), array.array("d")
    per_scalars = {}  # key, flags and float row per distinct StepScalars (a param group at one step)
    for (param, grad, exp_avg, exp_inf, sens, sc, stream, offset, mean_slot, total_numel, step), pstart in zip(
            jobs, partial_starts):  # unpacked: a NamedTuple's attribute reads cost host time per tensor
        cached = per_scalars.get(id(sc))
        if cached is None:
            flags = ((FLAG_NOISE.value if sc.noise else 0) | (FLAG_L2.value if sc.l2 else 0)
                     | (FLAG_DRAW.value if sc.draw else 0))
            # capturable: nothing step-dependent (the device writes seed_t and clr), so the table is the same
            # at every step
            cached = per_scalars[id(sc)] = (0 if capturable else sc.seed_t, flags, (
                0.0 if capturable else sc.clr, sc.decay, sc.weight_decay, 1.0 - sc.beta1, sc.beta2, sc.eps,
                sc.sensitivity_beta, 1.0 - sc.sensitivity_beta, sc.noise_lambda, sc.gamma, sc.noise_prob,
                sc.noise_eps, sc.lr, sc.beta1))
        key, flags, float_row = cached
        numel = param.numel()
        shared = mean_slot >= 0
        ints.extend((param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_inf.data_ptr(),
                     sens.data_ptr() if sc.noise else 0, numel, stream, key,
                     flags | (FLAG_SHARED_MEAN.value if shared else 0), pstart,
                     -(-numel // SENS_CHUNK) if sc.noise else 0, offset, mean_slot if shared else 0,
                     total_numel if shared else numel, step.data_ptr() if capturable else 0, sc.seed))
        floats.extend(float_row)
    n = len(jobs)
    table = torch.zeros((n, META_FIELDS), dtype=torch.int64)
    table[:, :F_CLR.value] = torch.frombuffer(ints, dtype=torch.int64).view(n, F_CLR.value)
    table[:, F_CLR.value:] = torch.frombuffer(floats, dtype=torch.float64).view(n, -1).view(
        torch.int64)
    return table


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned and non_blocking: no host synchronisation per step (the caching host allocator keeps the pinned block
    # alive until the copy has run; host_tables holds it for a graph being captured).
    return host_tables.to_device(table, device) if device.type == "cuda" else table


WARM_UP = ("run one eager step with capturable=True before capturing (the warm-up torch.cuda.graph asks for), "
           "with the parameters, gradients and state the captured step will use (docs/pats.md, 'CUDA graphs')")


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _CapturableTables:
    """The device copies of capturable steps' tables, which hold nothing step-dependent: per launch slot (device
    and dtype), the last one is reused while the table is unchanged (no copy per step). A table that changes while
    a CUDA graph is being captured (gradients allocated in the graph's pool, say) is copied from a pinned buffer
    set aside at the last eager step and kept for the launcher's lifetime: every replay copies from it again.

    A device table a capture used is kept for the launcher's lifetime too (``_captured``), even after a later
    step replaces it as the last one: the graph reads it on every replay (freed, its memory would be handed to
    other tensors, or to another graph of the same memory pool)."""

    def __init__(self):
        self._last: Dict[tuple, Tuple[bytes, torch.Tensor]] = {}  # slot -> (host bytes, device table)
        self._spare: Dict[tuple, torch.Tensor] = {}                # (slot, nbytes) -> pinned buffer for a capture
        self._held: List[torch.Tensor] = []                        # pinned buffers that captured graphs copy from
        self._captured: Dict[int, torch.Tensor] = {}               # id -> device table a captured graph reads

    def upload(self, table: torch.Tensor, device: torch.device, slot: tuple) -> torch.Tensor:
        on_device = self._upload(table, device, slot)
        if capturing(device):
            self._captured[id(on_device)] = on_device
        return on_device

    def _upload(self, table: torch.Tensor, device: torch.device, slot: tuple) -> torch.Tensor:
        key = table.numpy().tobytes()
        last = self._last.get(slot)
        if last is not None and last[0] == key:
            return last[1]
        if device.type != "cuda":
            on_device = table
        elif capturing(device):
            staging = self._spare.pop((slot, len(key)), None)
            if staging is None:
                raise RuntimeError(f"PATSAdamax: a new step layout is being captured: {WARM_UP}")
            staging.copy_(table)
            self._held.append(staging)
            on_device = torch.empty(table.shape, dtype=table.dtype, device=device)
            on_device.copy_(staging, non_blocking=True)
        else:
            on_device = _to_device(table, device)
            if (slot, len(key)) not in self._spare:
                self._spare[(slot, len(key))] = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        self._last[slot] = (key, on_device)
        return on_device


def _check_sizes(jobs: Sequence[PatsJob]) -> None:
    """A RuntimeError naming the first job whose gradient or state tensor has another element count than its
    parameter: the kernels index all of them by the parameter's count, so a mismatch would read and write past
    the end of the smaller tensors. Host numbers only."""
    for i, job in enumerate(jobs):
        numel = job[0].numel()
        for name, t in zip(("grad", "exp_avg", "exp_inf", "sensitivity"), job[1:5]):
            if t is not None and t.numel() != numel:
                raise RuntimeError(f"PatsLauncher: jobs[{i}] has a parameter of {numel} elements but its {name} has "
                                   f"{t.numel()}; every tensor of a job must have the parameter's size")


class PatsLauncher:
    """Launches the fused step; caches the chunk tables (they depend only on the tensors' sizes) and, for
    capturable steps, the device table."""

    def __init__(self, max_cache: int = 8):
        self._chunks: Dict[tuple, tuple] = {}
        self._max_cache = max_cache
        self._tables = _CapturableTables()
        # chunk tables a captured graph reads: kept when the cache above evicts them (the graph reads them on every
        # replay), for the launcher's lifetime
        self._captured_chunks: Dict[int, tuple] = {}

    def _chunks_for(self, device, numels, noise):
        key = (str(device), tuple(numels), tuple(noise))
        hit = self._chunks.get(key)
        if hit is None:
            if capturing(device):
                raise RuntimeError(f"PATSAdamax: a new set of tensor sizes is being captured: {WARM_UP}")
            if len(self._chunks) >= self._max_cache:
                self._chunks.clear()
            hit = self._chunks[key] = _chunk_table(numels, noise, device)
        elif capturing(device):
            self._captured_chunks[id(hit[0])] = hit
        return hit

    def launches(self, jobs: Sequence[tuple], sums: Optional[torch.Tensor] = None) -> List[Launch]:
        """The launches :meth:`step` runs for ``jobs`` (also built from ``meta`` tensors by ``specialisations``):
        the capturable scalars (when the jobs carry step counts), pass 1 (when a tensor has noise), then pass 2.

        With jobs that have a ``mean_slot`` (sharded noise tensors), ``sums`` (float64, one slot per such tensor
        of every rank's list, zeros) is needed and a launch between the passes writes each of these tensors'
        local sum of s~ into its slot; pass 2 then reads the slot as the sum over all ranks. The caller runs
        every launch but the last, adds ``sums`` across the ranks in place, then runs the last.
        """
        jobs = [j if type(j) is PatsJob else PatsJob(*j) for j in jobs if j[0].numel() > 0]
        if not jobs:
            return []
        _check_sizes(jobs)  # before anything is launched
        jobs.sort(key=lambda j: not j[5].noise)  # noise rows first: pass 1's chunks are a prefix
        device = jobs[0][0].device
        dtype = jobs[0][0].dtype
        numels = [j[0].numel() for j in jobs]
        noise = [bool(j[5].noise) for j in jobs]
        chunks, n_pass1, n_pass2, starts = self._chunks_for(device, numels, noise)

        steps = [j[10] is not None for j in jobs]  # PatsJob.step (indexed: attribute reads cost host time)
        capturable = steps[0]
        if not all(s == capturable for s in steps):
            raise ValueError("jobs: either every job carries its step count (capturable) or none does")
        shared = any(j[8] >= 0 for j in jobs)  # PatsJob.mean_slot
        if shared and sums is None:
            raise ValueError("sums: jobs with a mean_slot (sharded tensors) need the vector of their sums")
        table = _meta_table(jobs, starts, capturable)
        if capturable:
            meta = self._tables.upload(table, device, (str(device), dtype))
        else:
            meta = _to_device(table, device)
        partial = torch.empty(max(n_pass1, 1), dtype=torch.float32, device=device)
        tl_dtype = _TL_DTYPES[dtype]
        aligned = all(t.data_ptr() % 16 == 0 for job in jobs for t in job[:5] if t is not None)
        launches = []
        if capturable:
            launches.append(Launch(_capturable_scalars_kernel, (len(jobs),), (meta,), dict(META=META_FIELDS), 1))
        if n_pass1:
            launches.append(Launch(_sensitivity_kernel, (n_pass1,), (meta, chunks, partial),
                                   dict(PARAM_DTYPE=tl_dtype, META=META_FIELDS, SUB=SENS_SUB, ITERS=SENS_ITERS,
                                        ALIGNED=aligned), NUM_WARPS))
        if shared:
            launches.append(Launch(_local_sums_kernel, (sum(noise),), (meta, partial, sums),
                                   dict(META=META_FIELDS, PBLOCK=PARTIAL_BLOCK), 1))
        launches.append(Launch(_update_kernel, (n_pass2,), (meta, chunks[n_pass1:], partial,
                                                            sums if shared else partial),
                               dict(PARAM_DTYPE=tl_dtype, META=META_FIELDS, BLOCK=BLOCK_SIZE, PBLOCK=PARTIAL_BLOCK,
                                    FAST=fast_math(), ALIGNED=aligned, BF16_BY_BITS=interpreter_enabled()),
                               NUM_WARPS))
        return launches

    def step(self, jobs: Sequence[tuple]) -> None:
        """One step for ``jobs`` (:class:`PatsJob`, or tuples ``(param, grad, exp_avg, exp_inf,
        sensitivity_or_None, scalars, stream)``), none of them sharded.

        Every param must be contiguous, of one device and one dtype (float32, float16 or bfloat16); grads
        contiguous with the param's dtype; state contiguous float32. ``scalars`` is a
        :class:`fusednoise.reference.pats.StepScalars`.
        """
        for launch in self.launches(jobs):
            launch.run()
