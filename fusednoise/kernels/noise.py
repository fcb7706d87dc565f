"""Triton kernel for the HyPe noise ops: ``out = (x [+ residual]) + sigma * eps`` in one pass.

One read of each input and one write of the output, no noise tensor: the noise is drawn in registers from
``philox(seed, block)`` (and the call's offset, read once per program: ``fusednoise/rng.py``, "Device-side
offsets"). The counter and word layout is documented in ``fusednoise/reference/noise.py``,
which this kernel must match: bitwise for the philox words (and so for uniform noise and the stochastic-rounding
bits); for normal noise within a few ulp under the interpreter and within
``reference.noise.fast_normal_error_bound`` on a GPU, where Box-Muller runs on the MUFU approximations.

Uniform launches compile with ``enable_fp_fusion=False``: contracted, ``x + unit * sigma`` would be one FMA
(one rounding), where the reference rounds the product first, and about 16% of float32 outputs at sigma 0.3
would differ from the reference's by an ulp (the one FMA they keep, of a 16-bit uniform, is exact:
``draws._uniform16_pair``). Normal launches keep the FMA (one instruction fewer per element; their comparison
with the reference has a tolerance anyway); their 16-bit draws scale the Box-Muller radius by sigma once per pair.

Each thread holds rows of 16 bytes, so loads and stores are 128 bits wide: 4 float32 values from one philox block
(32-bit draws), or 8 half-precision values from one block's 16-bit halves (16-bit draws: the resolution follows
the output's; the uniforms are built on the bits, no int-to-float conversion). Stochastic rounding takes 16 random
bits per element, one more philox call per 8 elements with the same counter and purpose 1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .draws import _normal4, _offset_words, _philox_draw, _pick4, _pick8, _uniform, _noise16, fast_math
from .launch import FP_FUSION, NO_FP_FUSION, Launch
from .offsets import host_offset

DIST_NORMAL = 0
DIST_UNIFORM = 1
# Elements per program: large blocks keep the interpreter (about 9 ms per program) usable in CI and give a
# GPU enough independent work per program to hide memory latency.
BLOCK_SIZE = 4096
NUM_WARPS = 8
# Contiguous elements per thread: 16 bytes (one 128-bit load and store), so 8 half-precision values or 4 float32
# values, one philox block either way.
VEC_HALF = 8
VEC_FLOAT = 4
F16_SMALLEST_NORMAL = tl.constexpr(6.103515625e-05)  # 2**-14: below it float16's step is 2**-24 whatever the exponent


@triton.jit
def _round_nearest(value, OUT_DTYPE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    # Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding to nearest even, so under the
    # interpreter the rounding is done on the bits (what the GPU's cvt.rn.bf16.f32 does in hardware).
    if BF16_BY_BITS and OUT_DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(OUT_DTYPE)


@triton.jit
def _stochastic_round(value, r16, OUT_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr, ONE_COMPARE: tl.constexpr):
    # reference.noise.stochastic_round: add 16 random bits (13 for float16) below the kept mantissa bits of the
    # float32 pattern and truncate, so the magnitude rounds up with probability equal to the dropped fraction.
    # Non-finite values pass through; float16 values below 2**-14 are dithered by value (their step is fixed).
    bits = value.to(tl.uint32, bitcast=True)
    finite = tl.abs(value) < float("inf")
    if OUT_DTYPE == tl.bfloat16:
        dithered = tl.where(finite, bits + r16, bits)
        result = (dithered >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        normal = (bits + (r16 >> 3)).to(tl.float32, bitcast=True)
        signed_step = ((bits & 0x80000000) | 0x2B800000).to(tl.float32, bitcast=True)  # +-2**-40: u * 2**-24
        # (Not an explicit tl.fma, though the product u * 2**-40 is exact: uniform launches must compile with no
        # fma.rn.f32 at all, tests/test_kernels_compile.py; normal launches contract it into one.)
        tiny = value + r16.to(tl.float32) * signed_step
        if ONE_COMPARE:
            # One unsigned compare picks the values dithered by value: the exponent and mantissa bits shifted to
            # the top plus one exponent step wrap inf and NaN (exponent 255) below 2**25, under the bound of
            # |value| < 2**-14; inf plus a finite dither stays inf, NaN stays NaN: no separate pass-through select
            # (one instruction per element fewer; the same bits). Not in the RMSNorm forward, where the extra live
            # value made the 5120-wide rows spill.
            by_value = ((bits << 1) + 0x01000000) < 0x72000000
            dithered = tl.where(by_value, tiny, normal)
        else:
            dithered = tl.where(tl.abs(value) < F16_SMALLEST_NORMAL, tiny, normal)
            dithered = tl.where(finite, dithered, value)
        if INTERPRETED:  # the interpreter's round-toward-zero conversion overflows instead of saturating at 65504
            dithered = tl.where(tl.abs(dithered) < float("inf"),
                                tl.minimum(tl.maximum(dithered, -65504.0), 65504.0), dithered)
        result = dithered.to(tl.float16, fp_downcast_rounding="rtz")
        if INTERPRETED:  # and it truncates NaN patterns (a value near the float32 maximum dithers to one) to inf
            result = tl.where(dithered != dithered, float("nan"), result)
    return result


@triton.jit
def _units(w0, w1, w2, w3, DISTRIBUTION: tl.constexpr, FAST: tl.constexpr):
    # The four unit-scale values of one philox block: N(0, 1) by Box-Muller of the word pairs, or U(-1, 1).
    if DISTRIBUTION == 0:
        return _normal4(w0, w1, w2, w3, FAST)
    return 2.0 * _uniform(w0) - 1.0, 2.0 * _uniform(w1) - 1.0, 2.0 * _uniform(w2) - 1.0, 2.0 * _uniform(w3) - 1.0


# Per-call values: not specialised by the JIT, typed by annotation (compile_check.PER_CALL_ARGUMENTS).
@triton.jit(do_not_specialize=["seed", "first_block"])
def noise_kernel(x_ptr, residual_ptr, out_ptr, offset_ptr, numel, sigma, seed: tl.uint64, first_block: tl.int64,
                 HAS_RESIDUAL: tl.constexpr, DISTRIBUTION: tl.constexpr, STOCHASTIC: tl.constexpr,
                 FAST: tl.constexpr, INTERPRETED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // VEC
    # int64 from the start: tensors over 2**31 elements must index correctly. Row r holds elements VEC*r ..
    # VEC*r + VEC-1, philox block r (both draws): the counter is the element's block index in the whole tensor;
    # first_block shifts it when this launch covers a later slice (and lets a test reach counters past 2**32).
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    col = tl.arange(0, VEC)[None, :]
    offsets = row[:, None] * VEC + col
    in_bounds = offsets < numel
    # The counter words of the call's offset (rng.offset_counter_words; 0 on the host path), one load per program.
    c2, c3 = _offset_words(offset_ptr)
    if VEC == 8:
        # 16-bit draws: one block per row of 8, element 8j + 2k + h from half h of word k.
        w0, w1, w2, w3 = _philox_draw(seed, row + first_block, 0, c2, c3)
        e0, e1, e2, e3, e4, e5, e6, e7 = _noise16(w0, w1, w2, w3, sigma, DISTRIBUTION, FAST)
        eps = _pick8(col, e0, e1, e2, e3, e4, e5, e6, e7)
    else:
        w0, w1, w2, w3 = _philox_draw(seed, row + first_block, 0, c2, c3)
        n0, n1, n2, n3 = _units(w0, w1, w2, w3, DISTRIBUTION, FAST)
        eps = _pick4(col, n0, n1, n2, n3) * sigma

    total = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = total + tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    total = total + eps

    if STOCHASTIC:
        # One purpose-1 block per row of 8 (VEC == 8): element 8q + m takes 16-bit half m % 2 of word m // 2
        # of block q, the row's noise block.
        r0, r1, r2, r3 = _philox_draw(seed, row + first_block, 1, c2, c3)
        r16 = _pick8(col, (r0 << 16) >> 16, r0 >> 16, (r1 << 16) >> 16, r1 >> 16, (r2 << 16) >> 16, r2 >> 16,
                     (r3 << 16) >> 16, r3 >> 16)
        result = _stochastic_round(total, r16, out_ptr.dtype.element_ty, INTERPRETED, True)
    else:
        result = _round_nearest(total, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + offsets, result, mask=in_bounds)


def _check_first_index(first_index: int, dtype) -> int:
    """The elements per philox block for ``dtype`` (8 for half precision, 4 for float32), after checking that
    ``first_index`` starts a block."""
    step = VEC_HALF if dtype.itemsize == 2 else VEC_FLOAT
    if first_index % step:
        raise ValueError(f"first_index must be a multiple of {step} for {dtype} (one philox block per {step} "
                         f"elements), got {first_index}")
    return step


def noise_launch(x, residual, out, sigma: float, distribution: str, seed: int, stochastic: bool,
                 first_index: int = 0, offset=None) -> Launch:
    """The launch :func:`launch_noise` runs (also built from ``meta`` tensors by ``specialisations``)."""
    numel = x.numel()
    half = out.dtype.itemsize == 2
    step = _check_first_index(first_index, out.dtype)
    return Launch(
        noise_kernel, (triton.cdiv(numel, BLOCK_SIZE),),
        (x, residual if residual is not None else x, out, offset if offset is not None else host_offset(x), numel,
         float(sigma), seed, first_index // step),
        dict(HAS_RESIDUAL=residual is not None,
             DISTRIBUTION=DIST_NORMAL if distribution == "normal" else DIST_UNIFORM,
             STOCHASTIC=bool(stochastic) and half, FAST=fast_math(), INTERPRETED=interpreter_enabled(),
             VEC=VEC_HALF if half else VEC_FLOAT, BLOCK=BLOCK_SIZE),
        NUM_WARPS, dict(NO_FP_FUSION if distribution == "uniform" else FP_FUSION))


def launch_noise(x, residual, out, sigma: float, distribution: str, seed: int, stochastic: bool,
                 first_index: int = 0, offset=None) -> None:
    """Run the kernel over contiguous ``x`` (and ``residual``) into contiguous ``out`` (which may be ``x``).

    ``first_index`` is the flat index of ``x``'s first element in the tensor whose noise is being drawn: 0
    unless a caller processes a big tensor in slices; a multiple of 4 for float32, of 8 for bfloat16 and float16
    (whose philox blocks cover 8 elements). ``offset``: the int64 ``(1,)`` tensor on x's device holding the
    call's offset (the offset path's ticket, ``fusednoise/rng.py``; the ops pass a constant 0 on the host path);
    None allocates a 0.
    """
    _check_first_index(first_index, out.dtype)
    if x.numel() == 0:
        return
    noise_launch(x, residual, out, sigma, distribution, seed, stochastic, first_index, offset).run()
