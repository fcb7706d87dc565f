"""Random draws shared by the kernels: philox blocks, uniforms, Box-Muller (with a MUFU fast path), and the
spreading of per-block values over an element tile.

The words are those of ``fusednoise/rng.py`` bit for bit. Box-Muller has two spellings, chosen by the
constexpr ``FAST``:

* ``FAST=False`` (under the interpreter, where libdevice does not run): ``sqrt(-2 log u1)`` and
  ``cos/sin(2 pi u2)`` through ``tl.log/tl.cos/tl.sin``, libdevice's accurate sequences on a GPU. It is the
  formula of ``rng.box_muller``.
* ``FAST=True`` (every GPU launch): the same formula through the hardware approximations, one MUFU instruction
  each (``lg2.approx``, ``sin.approx``, ``cos.approx``) instead of about twenty instructions each. The
  difference to the reference is bounded in ``fusednoise/reference/noise.py`` (``FAST_NORMAL_ERROR``) and
  checked against a model of the approximations' documented error in ``tests/test_fast_math.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

# philox-4x32-10, the constants of tl.philox / fusednoise.rng
PHILOX_ROUNDS = tl.constexpr(10)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
MINUS_TWO_LN2 = tl.constexpr(-1.3862943611198906)  # -2 ln(u) = lg2(u) * (-2 ln 2)
TWO_LN2 = tl.constexpr(1.3862943611198906)         # = |lg2(u)| * 2 ln 2 for u <= 1
SQRT_TWO_LN2 = tl.constexpr(1.1774100225154747)    # sqrt(-2 ln u) = sqrt(|lg2(u)|) * sqrt(2 ln 2)
TWO_PI = tl.constexpr(6.283185307179586)
BOX_MULLER_MIN_U = tl.constexpr(1.0e-7)
# 16-bit draws (reference.noise, bfloat16/float16 outputs)
HALF_SCALE = tl.constexpr(1.52587890625e-05)                 # 2**-16
TWO_PI_OVER_65536 = tl.constexpr(6.283185307179586 / 65536)  # float32(2 pi) * 2**-16 exactly, once rounded
UNIFORM16_STEP = tl.constexpr(3.0517578125e-05)              # 2**-15
UNIFORM16_SHIFT = tl.constexpr(0.9999847412109375)           # 1 - 2**-16


@triton.jit
def _uniform(word):
    # tl.uint_to_uniform_float, spelled out so the reference in rng.py can be read against it.
    signed = word.to(tl.int32, bitcast=True)
    folded = tl.where(signed < 0, ~signed, signed)
    return folded.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _mulhilo(a: tl.constexpr, b):
    # High and low words of a * b through one 64-bit product (one IMAD.WIDE.U32; tl.philox's umulhi and mul
    # compile to IMAD.HI plus IMAD, three issue slots instead of two).
    product = b.to(tl.uint64) * a
    return (product >> 32).to(tl.uint32), product.to(tl.uint32)


@triton.jit
def _philox(seed, c0, c1, c2, c3):
    """philox-4x32-10 of uint32 counters under the 64-bit key ``seed``: the words of
    ``tl.philox(seed, c0, c1, c2, c3)`` (and of ``fusednoise.rng.philox4x32``) bit for bit."""
    key = seed.to(tl.uint64)
    for r in tl.static_range(PHILOX_ROUNDS):
        # The round keys are scalars (uniform registers): computed in 64 bits and truncated, no overflow.
        k0 = (((key & 0xFFFFFFFF) + r * PHILOX_KEY_A) & 0xFFFFFFFF).to(tl.uint32)
        k1 = (((key >> 32) + r * PHILOX_KEY_B) & 0xFFFFFFFF).to(tl.uint32)
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
    return c0, c1, c2, c3


@triton.jit
def _philox_block(seed, counter, stream, purpose):
    """The four words of philox(seed, counter_lo, counter_hi, stream, purpose) for int64 counters; ``stream``
    and ``purpose`` are uint32 values or Python ints."""
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    return _philox(seed, c_lo, c_hi, zero + stream, zero + purpose)


@triton.jit
def _offset_words(offset_ptr):
    """The counter words of the call's offset (``rng.offset_counter_words`` less the purpose), as uint32
    scalars: the low 32 bits of the int64 at ``offset_ptr`` for ``c2``, twice its high bits for ``c3``. Read once
    per program. On the host path the ops pass a constant 0 (the host path's words); on the offset path the
    call's ticket. One code path for both, so the kernel a capture launches is the one the eager warm-up already
    loaded (a capture cannot load a module)."""
    offset = tl.load(offset_ptr).to(tl.int64)
    return (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) * 2).to(tl.uint32)


@triton.jit
def _philox_draw(seed, counter, purpose: tl.constexpr, c2, c3):
    """The four words of block ``counter`` (int64) for a draw with ``purpose``:
    ``philox(seed, counter_lo, counter_hi, c2, c3 + purpose)`` with ``(c2, c3)`` from :func:`_offset_words`
    (with offset 0: ``_philox_block(seed, counter, 0, purpose)``). The two words stay scalars, so their part of
    the first round is computed once per program."""
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    return _philox(seed, c_lo, c_hi, c2, c3 + purpose)


@triton.jit
def _box_muller_primitives(u1, theta, FAST: tl.constexpr):
    """``(-2 ln u1, cos theta, sin theta)``, through the hardware approximations when ``FAST``: the only lines of
    Box-Muller that differ between the paths (a GPU runs only the FAST ones; ``tests/test_gpu_only_paths.py`` runs
    them on CPU with libdevice's three calls replaced by accurate stand-ins)."""
    if FAST:
        # lg2.approx can return a tiny positive value for u1 just below 1 (its error is absolute there): the
        # radius of such a u1 is below 6e-4 either way, so take |log2| (a free operand modifier of the multiply,
        # where a clamp at 0 is one more instruction) instead of the sqrt of a negative number.
        minus_two_log_u = tl.abs(libdevice.fast_log2f(u1)) * TWO_LN2
        return minus_two_log_u, libdevice.fast_cosf(theta), libdevice.fast_sinf(theta)
    return -2.0 * tl.log(u1), tl.cos(theta), tl.sin(theta)


@triton.jit
def _log2_cos_sin(u1, theta, FAST: tl.constexpr):
    """``(log2 u1, cos theta, sin theta)`` for the 16-bit Box-Muller, through the hardware approximations when
    ``FAST`` (the same three libdevice calls as :func:`_box_muller_primitives`, and the only lines that differ)."""
    if FAST:
        return libdevice.fast_log2f(u1), libdevice.fast_cosf(theta), libdevice.fast_sinf(theta)
    return tl.log2(u1), tl.cos(theta), tl.sin(theta)


@triton.jit
def _box_muller(word_r, word_t, FAST: tl.constexpr):
    """Both Box-Muller outputs (cos, sin) of two philox words, as ``rng.box_muller`` computes them. The
    uniforms, the pairing of cos and sin with the outputs and the scaling are one code for both paths; only
    :func:`_box_muller_primitives` differs."""
    u1 = tl.maximum(_uniform(word_r), BOX_MULLER_MIN_U)
    theta = TWO_PI * _uniform(word_t)
    minus_two_log_u, cos_theta, sin_theta = _box_muller_primitives(u1, theta, FAST)
    radius = tl.sqrt(minus_two_log_u)
    return radius * cos_theta, radius * sin_theta


@triton.jit
def _normal4(w0, w1, w2, w3, FAST: tl.constexpr):
    """The four N(0, 1) values of one philox block: Box-Muller of the word pairs (0, 1) and (2, 3)."""
    n0, n1 = _box_muller(w0, w1, FAST)
    n2, n3 = _box_muller(w2, w3, FAST)
    return n0, n1, n2, n3


@triton.jit
def _uniform16_pair(word):
    """The U(-1, 1) values of a word's low and high 16-bit halves ``b``: ``(2b + 1 - 65536) / 65536``, as
    ``b * 2**-15 - (1 - 2**-16)``: exact in float32, so one FMA gives the reference's value bitwise, contracted or
    not (the halves convert with one instruction each: I2F.U16 reads either half of the word)."""
    low = (word & 0xFFFF).to(tl.float32)
    high = (word >> 16).to(tl.float32)
    return tl.fma(low, UNIFORM16_STEP, -UNIFORM16_SHIFT), tl.fma(high, UNIFORM16_STEP, -UNIFORM16_SHIFT)


@triton.jit
def _box_muller16(word, sigma, FAST: tl.constexpr):
    """Both Box-Muller outputs (cos, sin) of one word's 16-bit halves times ``sigma``: ``u1 = (low16 + 1) / 2**16``
    (in [2**-16, 1]: no clamp) and ``theta = 2 pi high16 / 2**16``, as ``reference.noise`` draws them. The
    radius is scaled once for both outputs (one multiply per pair instead of one per value)."""
    u1 = tl.fma((word & 0xFFFF).to(tl.float32), HALF_SCALE, HALF_SCALE)  # exact: no rounding, FMA or not
    theta = (word >> 16).to(tl.float32) * TWO_PI_OVER_65536
    log2_u1, cos_theta, sin_theta = _log2_cos_sin(u1, theta, FAST)
    # sqrt(-2 ln u1) * sigma as sqrt(|log2 u1|) * (sqrt(2 ln 2) sigma): the constant factor is one per-program
    # scalar, and the abs a free operand modifier (lg2.approx may return a tiny positive value at u1 = 1).
    scaled_radius = tl.sqrt(tl.abs(log2_u1)) * (SQRT_TWO_LN2 * sigma)
    return scaled_radius * cos_theta, scaled_radius * sin_theta


@triton.jit
def _noise16(w0, w1, w2, w3, sigma, DISTRIBUTION: tl.constexpr, FAST: tl.constexpr):
    """The eight noise values ``sigma * unit`` of one philox block's 16-bit halves, in element order (value
    ``2k + h`` from half ``h`` of word ``k``): N(0, sigma**2) by Box-Muller of each word's halves
    (``DISTRIBUTION == 0``; ``sigma`` scales the radius), or U(-sigma, sigma) as ``unit * sigma`` (the
    reference's product, bitwise)."""
    if DISTRIBUTION == 0:
        n0, n1 = _box_muller16(w0, sigma, FAST)
        n2, n3 = _box_muller16(w1, sigma, FAST)
        n4, n5 = _box_muller16(w2, sigma, FAST)
        n6, n7 = _box_muller16(w3, sigma, FAST)
    else:
        u0, u1 = _uniform16_pair(w0)
        u2, u3 = _uniform16_pair(w1)
        u4, u5 = _uniform16_pair(w2)
        u6, u7 = _uniform16_pair(w3)
        n0, n1, n2, n3 = u0 * sigma, u1 * sigma, u2 * sigma, u3 * sigma
        n4, n5, n6, n7 = u4 * sigma, u5 * sigma, u6 * sigma, u7 * sigma
    return n0, n1, n2, n3, n4, n5, n6, n7


@triton.jit
def _pick4(col, v0, v1, v2, v3):
    # Spread four per-row vectors (R,) over the (R, 4) element tile: column w takes v_w.
    return tl.where(col == 0, v0[:, None],
                    tl.where(col == 1, v1[:, None], tl.where(col == 2, v2[:, None], v3[:, None])))


@triton.jit
def _pick8(col, v0, v1, v2, v3, v4, v5, v6, v7):
    # Spread eight per-row vectors (R,) over the (R, 8) element tile: column w takes v_w.
    return tl.where(col < 4, _pick4(col, v0, v1, v2, v3), _pick4(col - 4, v4, v5, v6, v7))


def fast_math() -> bool:
    """Whether the launches use the MUFU fast paths: on a GPU, not under the interpreter."""
    from ..backends import interpreter_enabled

    return not interpreter_enabled()
