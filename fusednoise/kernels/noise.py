"""Triton kernel for the HyPe noise ops: ``out = (x [+ residual]) + sigma * eps`` in one pass.

One read of each input and one write of the output, no noise tensor: the noise is drawn in registers from
``philox(seed, block)``. The counter and word layout is documented in ``fusednoise/reference/noise.py``,
which this kernel must match (bitwise for the philox words, within a few ulp for the floats).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..backends import interpreter_enabled
from .launch import Launch

DIST_NORMAL = 0
DIST_UNIFORM = 1
# Elements per program: large blocks keep the interpreter (about 9 ms per program) usable in CI and give a
# GPU enough independent work per program to hide memory latency.
BLOCK_SIZE = 4096
NUM_WARPS = 8


@triton.jit
def _uniform(word):
    # tl.uint_to_uniform_float, spelled out so the reference in rng.py can be read against it.
    signed = word.to(tl.int32, bitcast=True)
    folded = tl.where(signed < 0, ~signed, signed)
    return folded.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _pick4(col, v0, v1, v2, v3):
    # Spread four per-block vectors (R,) over the (R, 4) element tile: column w takes v_w.
    return tl.where(col == 0, v0[:, None],
                    tl.where(col == 1, v1[:, None], tl.where(col == 2, v2[:, None], v3[:, None])))


@triton.jit
def _stochastic_round(value, uniform, OUT_DTYPE: tl.constexpr):
    # Same rule as reference.noise.stochastic_round: choose between value rounded toward zero (lo) and the next
    # magnitude (up) with probability proportional to closeness, on the 16-bit patterns.
    # Any rounding of value works here (the interpreter truncates bf16): lo is fixed up below.
    nearest = value.to(OUT_DTYPE)
    bits = nearest.to(tl.int16, bitcast=True)
    rounded_away = tl.abs(nearest.to(tl.float32)) > tl.abs(value)
    lo_bits = tl.where(rounded_away, bits - 1, bits)
    up_bits = lo_bits + 1
    lo_mag = tl.abs(lo_bits.to(OUT_DTYPE, bitcast=True).to(tl.float32))
    up_mag = tl.abs(up_bits.to(OUT_DTYPE, bitcast=True).to(tl.float32))
    take_up = uniform * (up_mag - lo_mag) < tl.abs(value) - lo_mag
    return tl.where(take_up, up_bits, lo_bits).to(OUT_DTYPE, bitcast=True)


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
def noise_kernel(x_ptr, residual_ptr, out_ptr, numel, sigma, seed, first_block,
                 HAS_RESIDUAL: tl.constexpr, DISTRIBUTION: tl.constexpr, STOCHASTIC: tl.constexpr,
                 BF16_BY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 4
    # int64 from the start: tensors over 2**31 elements must index correctly.
    block_id = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    col = tl.arange(0, 4)[None, :]
    offsets = block_id[:, None] * 4 + col
    in_bounds = offsets < numel

    # The philox counter is the element's block index in the whole tensor; first_block shifts it when this
    # launch covers a later slice (and lets a test reach counters past 2**32 on a small tensor).
    counter = block_id + first_block
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    w0, w1, w2, w3 = tl.philox(seed, c_lo, c_hi, zero, zero)
    u0 = _uniform(w0)
    u1 = _uniform(w1)
    u2 = _uniform(w2)
    u3 = _uniform(w3)
    if DISTRIBUTION == 0:
        # Box-Muller on both pairs, both outputs of each (tl.randn keeps only the cosine).
        r01 = tl.sqrt(-2.0 * tl.log(tl.maximum(u0, 1.0e-7)))
        t01 = 6.283185307179586 * u1
        r23 = tl.sqrt(-2.0 * tl.log(tl.maximum(u2, 1.0e-7)))
        t23 = 6.283185307179586 * u3
        unit = _pick4(col, r01 * tl.cos(t01), r01 * tl.sin(t01), r23 * tl.cos(t23), r23 * tl.sin(t23))
    else:
        unit = _pick4(col, 2.0 * u0 - 1.0, 2.0 * u1 - 1.0, 2.0 * u2 - 1.0, 2.0 * u3 - 1.0)

    total = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = total + tl.load(residual_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    total = total + unit * sigma

    if STOCHASTIC:
        one = zero + 1
        r0, r1, r2, r3 = tl.philox(seed, c_lo, c_hi, zero, one)
        rounding = _pick4(col, _uniform(r0), _uniform(r1), _uniform(r2), _uniform(r3))
        result = _stochastic_round(total, rounding, out_ptr.dtype.element_ty)
    else:
        result = _round_nearest(total, out_ptr.dtype.element_ty, BF16_BY_BITS)
    tl.store(out_ptr + offsets, result, mask=in_bounds)


def noise_launch(x, residual, out, sigma: float, distribution: str, seed: int, stochastic: bool,
                 first_index: int = 0) -> Launch:
    """The launch :func:`launch_noise` runs (also built from ``meta`` tensors by ``specialisations``)."""
    numel = x.numel()
    return Launch(
        noise_kernel, (triton.cdiv(numel, BLOCK_SIZE),),
        (x, residual if residual is not None else x, out, numel, float(sigma), seed, first_index // 4),
        dict(HAS_RESIDUAL=residual is not None,
             DISTRIBUTION=DIST_NORMAL if distribution == "normal" else DIST_UNIFORM,
             STOCHASTIC=bool(stochastic) and out.dtype.itemsize == 2,
             BF16_BY_BITS=interpreter_enabled(), BLOCK=BLOCK_SIZE),
        NUM_WARPS)


def launch_noise(x, residual, out, sigma: float, distribution: str, seed: int, stochastic: bool,
                 first_index: int = 0) -> None:
    """Run the kernel over contiguous ``x`` (and ``residual``) into contiguous ``out`` (which may be ``x``).

    ``first_index`` (a multiple of 4) is the flat index of ``x``'s first element in the tensor whose noise
    is being drawn: 0 unless a caller processes a big tensor in slices.
    """
    if first_index % 4:
        raise ValueError(f"first_index must be a multiple of 4, got {first_index}")
    if x.numel() == 0:
        return
    noise_launch(x, residual, out, sigma, distribution, seed, stochastic, first_index).run()
