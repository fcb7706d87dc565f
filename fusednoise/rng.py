"""Random numbers shared by every method (SPEC section 0).

Every random draw in fusednoise is a pure function of ``(seed, counter)``: no mask or noise tensor is stored for
backward, and the same call with the same seed gives the same bits. Nothing lives on the device except, for CUDA
graphs, one offset counter per device (below).

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

On CPU tensors the words come from a small C library (:mod:`fusednoise.native_philox`, built once with the
system compiler), else from numpy; on other devices from the torch version. All three give the same words.
:func:`philox_uniforms` and :func:`philox_select` are the shapes the references draw in (every block of a
range, or the blocks a Bernoulli word keeps), so CPU reference mode skips the int64 counter tensors.

Device-side offsets (CUDA graphs)
---------------------------------
A captured CUDA graph runs the host code once, at capture: a seed drawn then is baked into the graph, and every
replay would add the same noise. So while the current CUDA stream is capturing (or inside :func:`graph_safe`),
the noise ops of HyPe, NEFTune and LNSR take the *offset path*: each call takes a **ticket**, the value of a
per-device int64 counter (:func:`offset_state`) copied into a fresh one-element tensor, and advances the counter
by one, both on the device (one tiny kernel, a node of the graph), so every call in every replay reads another
offset. The seed is still drawn on the host (once, at capture). The rule, for a call with host seed ``seed`` and
offset ``o`` (see :func:`offset_counter_words`)::

    key = seed,   counter = (j_lo, j_hi, o mod 2**32, purpose + 2 * (o >> 32))

The offset takes the stream word ``c2`` (0 on the host path of these ops) and the bits of ``c3`` above the
purpose bit, so distinct offsets never share a counter, and offset 0 draws exactly the host path's words. The
kernels read the offset once per program; outside the offset path they read a constant 0 (one code path, so a
capture launches the kernels its eager warm-up loaded): no ticket, no extra launch, the same words on CPU and
GPU. Which offset a call reads is decided in :mod:`fusednoise.graph_offsets`. PATS and NoisyTune use the stream
word for their tensors' indices and are not covered by this rule.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from . import native_philox
from .backends import eager_only

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


_seed_buffers = threading.local()


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """Draw one seed in ``[0, 2**62)`` from torch's CPU generator (or ``generator``).

    The value is ``torch.randint(0, 2**62, ())``'s; drawn into a per-thread 0-dim buffer, which costs half as
    much host time as allocating the tensor (this runs once per noise op call).
    """
    if generator is not None:
        return int(torch.randint(0, 2**SEED_BITS, (), generator=generator, dtype=torch.int64))
    buffer = getattr(_seed_buffers, "buffer", None)
    if buffer is None:
        buffer = _seed_buffers.buffer = torch.empty((), dtype=torch.int64)
    return buffer.random_(0, 2**SEED_BITS).item()


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
    uint32 counters. CPU counters go through the C library when it is available (10 rounds, ``c2`` and ``c3``
    one value each, the usual case), else numpy's uint64 arithmetic (about 4x faster than the int64 torch
    version, which needs the 16-bit split); other devices through torch.
    """
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    device = c0.device
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c1, c2, c3))
    if device.type == "cpu" and rounds == PHILOX_ROUNDS and c2.numel() == 1 and c3.numel() == 1:
        library = native_philox._load()
        if library is not None:
            c0, c1 = torch.broadcast_tensors(c0, c1)
            shape = torch.broadcast_shapes(c0.shape, c2.shape, c3.shape)
            c0, c1 = (c.expand(shape).contiguous().view(-1) for c in (c0, c1))
            words = native_philox.words(library, seed, c0, c1, int(c2) & MASK32, int(c3) & MASK32)
            return tuple(word.view(shape) for word in words)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    if device.type == "cpu":
        return _philox4x32_numpy(seed, c0, c1, c2, c3, rounds)
    return _philox4x32_torch(seed, c0, c1, c2, c3, rounds)


def philox_uniforms(seed: int, n_blocks: int, first_block: int = 0, stream: int = 0, purpose: int = 0,
                    device="cpu") -> torch.Tensor:
    """float32 ``(n_blocks, 4)``: row ``i`` holds :func:`uint_to_uniform` of the four words of block
    ``first_block + i`` (counter: its low and high 32 bits, ``stream``, ``purpose``).

    The same numbers as ``uint_to_uniform`` of :func:`philox4x32`'s words, drawn without counter tensors on
    CPU when the C library is available.
    """
    device = torch.device(device)
    if device.type == "cpu":
        library = native_philox._load()
        if library is not None:
            return native_philox.uniforms(library, seed, n_blocks, first_block, stream & MASK32, purpose & MASK32)
    lo, hi = block_counters(torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device))
    words = philox4x32(seed, lo, hi, stream, purpose)
    return torch.stack([uint_to_uniform(word) for word in words], dim=1)


def philox_select(seed: int, n_blocks: int, p: float, first_block: int = 0, stream: int = 0, purpose: int = 0,
                  device="cpu"):
    """The blocks of ``first_block .. first_block + n_blocks - 1`` whose word-2 uniform is below ``p`` (a
    Bernoulli(p) draw, compared in float32): ``(index, u0, u1)`` with their index relative to ``first_block``
    (int64, increasing) and the uniforms of their words 0 and 1 (float32).

    Equal to taking the rows ``i`` of :func:`philox_uniforms` with ``u[i, 2] < p``; on CPU with the C library
    the kept rows are picked out as they are drawn, so nothing is stored for the others.
    """
    device = torch.device(device)
    if device.type == "cpu":
        library = native_philox._load()
        if library is not None:
            return native_philox.select(library, seed, n_blocks, first_block, stream & MASK32, purpose & MASK32,
                                        float(p))
    uniforms = philox_uniforms(seed, n_blocks, first_block, stream, purpose, device)
    index = (uniforms[:, 2] < p).nonzero().squeeze(1)
    kept = uniforms[index]
    return index, kept[:, 0], kept[:, 1]


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


@eager_only  # traced, numpy's uint64 arithmetic would become torch uint64 ops that CPU torch lacks
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
    """Triton's ``uint_to_uniform_float`` for uint32 words: float32 in [0, 1).

    The word read as int32 (``signed``), negative values folded onto ``-signed - 1``, times ``UNIFORM_SCALE``.
    Done in int32 (the int64 -> int32 conversion keeps the low 32 bits; ``signed ^ (signed >> 31)`` is the
    fold): a fraction of the int64 version's memory traffic.
    """
    signed = word.to(torch.int32)
    folded = signed ^ (signed >> 31)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def _radius_and_angle(u1: torch.Tensor, u2: torch.Tensor):
    # Written with in-place steps (the same float operations) so that a large draw allocates little.
    radius = torch.clamp(u1, min=BOX_MULLER_MIN_U).log_().mul_(-2.0).sqrt_()
    return radius, u2 * torch.tensor(TWO_PI, dtype=torch.float32, device=u2.device)


def box_muller(u1: torch.Tensor, u2: torch.Tensor):
    """Both outputs of the Box-Muller transform, as ``tl.randn`` computes the first (float32)::

        radius = sqrt(-2 * log(max(u1, 1e-7))),  theta = 2 * pi * u2,  (radius * cos(theta), radius * sin(theta))
    """
    radius, theta = _radius_and_angle(u1, u2)
    return torch.cos(theta).mul_(radius), theta.sin_().mul_(radius)


def box_muller_cos(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """The first Box-Muller output alone, ``radius * cos(theta)``: what ``tl.randn`` returns."""
    radius, theta = _radius_and_angle(u1, u2)
    return theta.cos_().mul_(radius)


# --------------------------------------------------------------------------------------------- device offsets
OFFSET_LIMIT = 2**63 - 1  # the counters are int64; c3 = purpose + 2 * (o >> 32) then stays below 2**32

_offset_states: Dict[torch.device, torch.Tensor] = {}
_forced = False          # inside graph_safe(): the offset path without capturing


def offset_counter_words(offset: Optional[int], purpose: int = PURPOSE_NOISE) -> Tuple[int, int]:
    """Counter words ``(c2, c3)`` of a draw with ``purpose`` for the ops whose host path uses stream 0:
    ``(0, purpose)`` on the host path (``offset=None``), ``(o mod 2**32, purpose + 2 * (o >> 32))`` on the
    offset path. Offset 0 gives the host path's words."""
    if offset is None:
        return 0, purpose
    if not 0 <= offset <= OFFSET_LIMIT:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    return offset & MASK32, purpose + 2 * (offset >> 32)


@contextlib.contextmanager
def graph_safe() -> Iterator[None]:
    """``with fusednoise.rng.graph_safe(): ...`` runs the noise ops of the block on the offset path without a
    CUDA graph being captured: each call takes a ticket from its device's counter, exactly as it would while
    capturing. Use it to draw eagerly what a captured call draws for the same seed and offset (set with
    :func:`set_offset`), or to test the path on a CPU. Capture switches the path on by itself."""
    global _forced
    previous = _forced
    _forced = True
    try:
        yield
    finally:
        _forced = previous


def offsets_forced() -> bool:
    """Whether a :func:`graph_safe` block is active."""
    return _forced


def _device_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _refuse_while_capturing(what: str, device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"fusednoise.rng: {what} is not allowed while a CUDA graph is being captured "
                           "(it would be recorded into the graph and replayed)")


def offset_state(device="cuda") -> torch.Tensor:
    """The int64 ``(1,)`` counter of ``device``: the offset the next offset-path call on it takes.

    Created (holding 0) on first use. A CUDA counter must exist before a graph is captured: the first noise op
    call on a CUDA tensor creates it, so the eager warm-up that ``torch.cuda.graph`` asks for (and that
    ``torch.compile(mode="reduce-overhead")`` runs) leaves one.
    """
    device = _device_key(device)
    state = _offset_states.get(device)
    if state is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fusednoise: no RNG offset counter exists yet on {device} and none can be created while a CUDA "
                "graph is being captured (it would live in the graph's memory pool and be reset on every replay). "
                "Run the captured code once eagerly before capturing (the warm-up torch.cuda.graph asks for: it also "
                "compiles and loads the kernels, which a capture cannot do).")
        state = _offset_states[device] = persistent_zero(device)
    return state


def persistent_zero(device) -> torch.Tensor:
    """A new int64 ``(1,)`` zero on ``device`` that outlives any CUDA graph: on CUDA allocated on a stream of its
    own, outside the private memory pool that ``torch.compile(mode="reduce-overhead")`` routes its warm-up's
    allocations to (a pool whose blocks it reuses), and in memory before this returns (one synchronisation,
    once per device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.zeros(1, dtype=torch.int64, device=device)
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        zero = torch.zeros(1, dtype=torch.int64, device=device)
    torch.cuda.synchronize(device)
    return zero


def get_offset(device="cuda") -> int:
    """The next offset of ``device``'s counter (synchronises with the device; not while capturing)."""
    device = _device_key(device)
    _refuse_while_capturing("get_offset", device)
    return int(offset_state(device).item())


def set_offset(offset: int, device="cuda") -> None:
    """Set the next offset of ``device``'s counter: a later offset-path call (captured or inside
    :func:`graph_safe`) then draws the words of offset ``offset`` (and the calls after it ``offset + 1``, ...).
    Not while capturing."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset <= OFFSET_LIMIT:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    device = _device_key(device)
    _refuse_while_capturing("set_offset", device)
    offset_state(device).fill_(offset)


def save_offsets(device="cuda") -> torch.Tensor:
    """A copy of ``device``'s counter, on the device (a graph node when capturing): with
    :func:`restore_offsets`, code that replays its random draws (a recompute, a second pass that must see the
    first pass's noise) makes the offset-path calls of the replay take the same offsets again."""
    return offset_state(device).clone()


def restore_offsets(saved: torch.Tensor) -> None:
    """Set the counter of ``saved``'s device back to the value :func:`save_offsets` copied (on the device)."""
    offset_state(saved.device).copy_(saved)


def take_offset_reference(state: torch.Tensor) -> torch.Tensor:
    """The ticket of one offset-path call, in torch ops (the eager reference of ``kernels/offsets.py``): the
    counter's value in a new ``(1,)`` tensor, and the counter advanced by one."""
    ticket = state.clone()
    state.add_(1)
    return ticket
