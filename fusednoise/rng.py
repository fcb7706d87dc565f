"""Random numbers shared by every method (SPEC section 0).

Every random draw in fusednoise is a pure function of ``(seed, counter)``: nothing lives on the device, no
mask or noise tensor is stored for backward, and the same call with the same seed gives the same bits.

* ``draw_seed`` takes a 62-bit seed from torch's **CPU** generator, so ``torch.manual_seed`` reproduces a run,
  activation checkpointing (which saves and restores the CPU RNG state) replays the same noise on recompute,
  and no GPU synchronisation is needed.
* ``philox4x32`` is philox-4x32-10 written in plain torch int64 arithmetic. It draws bitwise the same uint32
  words as Triton's ``tl.philox`` / ``tl.randint4x``, so the eager reference backend and the Triton kernels
  produce the same numbers for the same seed.

Counter layout (the documented rule that keeps streams apart)::

    c0, c1 = low and high 32 bits of the block index j      (64-bit element indexing, 32-bit philox)
    c2     = stream: a tensor's index in a multi-tensor op, 0 otherwise
    c3     = purpose: 0 for the noise itself, 1 for the stochastic-rounding bits

With ``stream = purpose = 0`` and ``j < 2**32`` the words are exactly ``tl.randint4x(seed, j)``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_BITS = 62

# Triton's uint_to_uniform_float scale for 32-bit words: the largest value with INT32_MAX * scale < 1.
UNIFORM_SCALE = 4.6566127342e-10
# Box-Muller guard used by tl.randn (keeps log() finite).
BOX_MULLER_MIN_U = 1.0e-7
TWO_PI = 6.283185307179586

PURPOSE_NOISE = 0
PURPOSE_ROUNDING = 1


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """Draw one seed in ``[0, 2**62)`` from torch's CPU generator (or ``generator``)."""
    return int(torch.randint(0, 2**SEED_BITS, (), generator=generator, dtype=torch.int64))


def check_seed(seed, name: str = "seed") -> int:
    """Validate a user-supplied seed: an int in ``[0, 2**62)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"{name} must be in [0, 2**{SEED_BITS}), got {seed}")
    return seed


def resolve_seed(seed: Optional[int], generator: Optional[torch.Generator] = None) -> int:
    """The caller's seed, validated, or a fresh one from the CPU generator."""
    return draw_seed(generator) if seed is None else check_seed(seed)


def _mulhilo32(a: int, b: torch.Tensor):
    """High and low 32-bit words of ``a * b`` for a constant ``a < 2**32`` and int64 ``b < 2**32``.

    The 64-bit product would overflow int64, so ``b`` is split into 16-bit halves (each partial product stays
    below 2**48).
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    part_lo = a * b_lo
    part_hi = a * b_hi
    low_sum = part_lo + ((part_hi & 0xFFFF) << 16)
    lo = low_sum & MASK32
    hi = (part_hi >> 16) + (low_sum >> 32)
    return hi, lo


def philox4x32(seed: int, c0, c1=0, c2=0, c3=0, rounds: int = PHILOX_ROUNDS):
    """philox-4x32-``rounds`` of counters ``(c0, c1, c2, c3)`` under the 64-bit key ``seed``.

    Counters are int64 tensors (or ints) holding uint32 values; they broadcast together. Returns four int64
    tensors holding the uint32 output words, equal bit for bit to ``tl.philox(seed, c0, c1, c2, c3)`` with
    uint32 counters. CPU counters go through numpy's uint64 arithmetic (about 4x faster than the int64 torch
    version, which needs the 16-bit split); other devices through torch.
    """
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    device = c0.device
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    if device.type == "cpu":
        return _philox4x32_numpy(seed, c0, c1, c2, c3, rounds)
    return _philox4x32_torch(seed, c0, c1, c2, c3, rounds)


def _philox4x32_torch(seed: int, c0, c1, c2, c3, rounds: int):
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _philox4x32_numpy(seed: int, c0, c1, c2, c3, rounds: int):
    # The same rounds as _philox4x32_torch; a uint64 product of two uint32 values never overflows, so the high
    # and low words are a shift and a mask.
    mask, shift = np.uint64(MASK32), np.uint64(32)
    round_a, round_b = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    c0, c1, c2, c3 = (c.numpy().astype(np.uint64) for c in (c0, c1, c2, c3))
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    for _ in range(rounds):
        product_b = round_b * c2
        product_a = round_a * c0
        c0, c1, c2, c3 = ((product_b >> shift) ^ c1 ^ np.uint64(k0), product_b & mask,
                          (product_a >> shift) ^ c3 ^ np.uint64(k1), product_a & mask)
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return tuple(torch.from_numpy(np.asarray(c, dtype=np.int64)) for c in (c0, c1, c2, c3))


def block_counters(index: torch.Tensor):
    """Split int64 indices into the (low, high) uint32 counter words used by every kernel."""
    return index & MASK32, index >> 32


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words: float32 in [0, 1)."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def box_muller(u1: torch.Tensor, u2: torch.Tensor):
    """Both outputs of the Box-Muller transform, as ``tl.randn`` computes the first (float32)."""
    u1 = torch.clamp(u1, min=BOX_MULLER_MIN_U)
    theta = u2 * torch.tensor(TWO_PI, dtype=torch.float32, device=u2.device)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)
