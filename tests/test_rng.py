"""fusednoise.rng: the torch philox must equal Triton's generator bit for bit, and seeds come from the CPU RNG."""
import pytest
import torch
import triton
import triton.language as tl

from devices import KERNEL_DEVICE
from fusednoise import rng
from fusednoise.kernels.rng import philox_words

M32 = 0xFFFFFFFF


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of philox4x32-10 published with Random123 (kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    seed = key[0] | (key[1] << 32)
    words = rng.philox4x32(seed, *[torch.tensor(c) for c in counter])
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _randint4x_kernel(out_ptr, seed, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    w0, w1, w2, w3 = tl.randint4x(seed, offsets)
    tl.store(out_ptr + offsets, w0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + BLOCK + offsets, w1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 2 * BLOCK + offsets, w2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 3 * BLOCK + offsets, w3.to(tl.int64) & 0xFFFFFFFF)


def test_philox_equals_triton_randint4x():
    seed = rng.draw_seed()
    out = torch.empty(4, 1024, dtype=torch.int64, device=KERNEL_DEVICE)
    _randint4x_kernel[(1,)](out, seed, BLOCK=1024)
    expected = torch.stack(rng.philox4x32(seed, torch.arange(1024)))
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("first_counter", [0, 2**32 - 100, 2**40 + 12345])
@pytest.mark.parametrize("stream, purpose", [(0, 0), (7, 1)])
def test_philox_words_kernel_bitwise(first_counter, stream, purpose):
    seed = rng.draw_seed()
    n = 1500
    kernel_words = philox_words(seed, n, first_counter, stream, purpose, device=KERNEL_DEVICE).cpu()
    lo, hi = rng.block_counters(torch.arange(first_counter, first_counter + n))
    reference_words = torch.stack(rng.philox4x32(seed, lo, hi, stream, purpose))
    assert torch.equal(kernel_words, reference_words)


def test_numpy_and_torch_philox_agree():
    # CPU counters take the numpy path; other devices the int64 torch path: both must give the same words.
    seed = rng.draw_seed()
    counters = [torch.randint(0, 2**32, (777,)) for _ in range(4)]
    numpy_words = rng._philox4x32_numpy(seed, *counters, rounds=10)
    torch_words = rng._philox4x32_torch(seed, *counters, rounds=10)
    for numpy_word, torch_word in zip(numpy_words, torch_words):
        assert torch.equal(numpy_word, torch_word)


def test_streams_and_purposes_differ():
    counters = torch.arange(256)
    base = torch.stack(rng.philox4x32(99, counters))
    assert not torch.equal(base, torch.stack(rng.philox4x32(99, counters, 0, 1)))
    assert not torch.equal(base, torch.stack(rng.philox4x32(99, counters, 0, 0, 1)))
    assert not torch.equal(base, torch.stack(rng.philox4x32(100, counters)))


def test_draw_seed_follows_manual_seed():
    torch.manual_seed(1234)
    first = [rng.draw_seed() for _ in range(3)]
    torch.manual_seed(1234)
    assert [rng.draw_seed() for _ in range(3)] == first
    assert len(set(first)) == 3
    assert all(0 <= s < 2**62 for s in first)


def test_draw_seed_uses_given_generator():
    gen = torch.Generator().manual_seed(5)
    a = rng.draw_seed(gen)
    assert a == rng.draw_seed(torch.Generator().manual_seed(5))


def test_uniform_range_and_extremes():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])
    uniform = rng.uint_to_uniform(words)
    assert uniform.dtype == torch.float32
    assert bool((uniform >= 0).all()) and bool((uniform < 1).all())
    assert uniform[2] == uniform[3]  # INT32_MAX and its bitwise complement fold onto the same value


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2**62, ValueError), (1.5, TypeError), (True, TypeError)])
def test_check_seed_rejects(bad, error):
    with pytest.raises(error, match="seed"):
        rng.check_seed(bad)
