"""fusednoise.rng: the torch philox must equal Triton's generator bit for bit, and seeds come from the CPU RNG."""
import sys

import pytest
import torch
import triton
import triton.language as tl

from devices import KERNEL_DEVICE
from fusednoise import native_philox, rng
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


# ---------------------------------------------------------------------------------- the CPU philox paths
@pytest.fixture
def numpy_fallback():
    """Force the numpy fallback (as on a machine without a C compiler), then restore the C library."""
    native_philox.reset(False)
    yield
    native_philox.reset()


def _counters(n, first=0):
    lo, hi = rng.block_counters(torch.arange(first, first + n))
    return lo, hi


def test_c_library_is_built_here():
    # Where there is a C compiler, the fast path must really be the one under test (a build failure is a bug).
    if native_philox._compiler() is None:
        pytest.skip("no C compiler on this machine: the numpy fallback runs everywhere (tested below)")
    assert native_philox.available(), native_philox.status()
    assert native_philox.status().startswith("C library")


@pytest.mark.parametrize("first", [0, 2**32 - 700, 2**40 + 3])
def test_c_numpy_and_torch_words_agree(first):
    seed = rng.draw_seed()
    lo, hi = _counters(1500, first)
    stream, purpose = torch.full_like(lo, 7), torch.ones_like(lo)
    c_words = rng.philox4x32(seed, lo, hi, 7, 1)
    numpy_words = rng._philox4x32_numpy(seed, lo, hi, stream, purpose, 10)
    torch_words = rng._philox4x32_torch(seed, lo, hi, stream, purpose, 10)
    for c, n, t in zip(c_words, numpy_words, torch_words):
        assert torch.equal(c, n) and torch.equal(c, t)


def test_c_words_broadcast_like_numpy():
    # c0 a column, c1 a row, c2/c3 scalars: the C path materialises the broadcast the same way.
    seed = rng.draw_seed()
    c0 = torch.randint(0, 2**32, (5, 1))
    c1 = torch.randint(0, 2**32, (1, 3))
    words = rng.philox4x32(seed, c0, c1, 2**32 - 1, 3)
    expected = rng._philox4x32_numpy(seed, *torch.broadcast_tensors(c0, c1, torch.tensor(2**32 - 1),
                                                                    torch.tensor(3)), 10)
    assert all(w.shape == (5, 3) and torch.equal(w, e) for w, e in zip(words, expected))


@pytest.mark.parametrize("first_block, stream, purpose", [(0, 0, 0), (2**32 - 900, 5, 1)])
def test_philox_uniforms_are_uint_to_uniform_of_the_words(first_block, stream, purpose):
    seed = rng.draw_seed()
    lo, hi = _counters(2000, first_block)
    words = rng._philox4x32_torch(seed, lo, hi, torch.full_like(lo, stream), torch.full_like(lo, purpose), 10)
    expected = torch.stack([rng.uint_to_uniform(w) for w in words], dim=1)
    assert torch.equal(rng.philox_uniforms(seed, 2000, first_block, stream, purpose), expected)
    native_philox.reset(False)
    try:
        assert torch.equal(rng.philox_uniforms(seed, 2000, first_block, stream, purpose), expected)
    finally:
        native_philox.reset()


@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_philox_select_keeps_the_bernoulli_rows(p):
    seed = rng.draw_seed()
    uniforms = rng.philox_uniforms(seed, 5000, 2**32 - 2500, 3, 0)
    keep = (uniforms[:, 2] < p).nonzero().squeeze(1)
    for forced_fallback in (False, True):
        native_philox.reset(False if forced_fallback else None)
        try:
            index, u0, u1 = rng.philox_select(seed, 5000, p, 2**32 - 2500, 3, 0)
        finally:
            native_philox.reset()
        assert torch.equal(index, keep) and torch.equal(u0, uniforms[keep, 0]) and torch.equal(u1, uniforms[keep, 1])
    if p == 0.2:
        assert abs(keep.numel() / 5000 - 0.2) < 0.03


def test_threaded_draws_equal_one_thread(monkeypatch):
    # Large draws are split over threads (ctypes releases the GIL): the pieces must join seamlessly.
    seed = rng.draw_seed()
    whole = (rng.philox_uniforms(seed, 1000, 77, 2, 1), rng.philox_select(seed, 1000, 0.3, 77, 2, 1),
             rng.philox4x32(seed, *_counters(1000, 77), 2, 1))
    monkeypatch.setattr(native_philox, "PARALLEL_MIN_BLOCKS", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert len(native_philox._split(1000)) == 4
        split = (rng.philox_uniforms(seed, 1000, 77, 2, 1), rng.philox_select(seed, 1000, 0.3, 77, 2, 1),
                 rng.philox4x32(seed, *_counters(1000, 77), 2, 1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole[0], split[0])
    assert all(torch.equal(a, b) for a, b in zip(whole[1], split[1]))
    assert all(torch.equal(a, b) for a, b in zip(whole[2], split[2]))


def test_known_answers_on_the_numpy_fallback(numpy_fallback):
    assert not native_philox.available() and "fallback" in native_philox.status()
    words = rng.philox4x32(0xFFFFFFFFFFFFFFFF, *[torch.tensor(M32)] * 4)
    assert tuple(int(w) for w in words) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


NO_COMPILER_SCRIPT = r"""
import hashlib, torch
from fusednoise import native_philox, rng
from fusednoise.reference import noise, pats
print(native_philox.status())
noise_bits = noise.standard_noise(4099, "normal", 12345, first_index=2**34).view(torch.int32)
index, normal = pats.kept_noise_draws(3000, 99, 2, 0.2)
print(hashlib.sha256(noise_bits.numpy().tobytes() + index.numpy().tobytes()
                     + normal.view(torch.int32).numpy().tobytes()).hexdigest())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in compilers are POSIX shell scripts")
@pytest.mark.parametrize("case", ["no compiler", "failing compiler", "switched off"])
def test_machine_without_a_working_compiler_falls_back_to_the_same_numbers(case, tmp_path):
    import hashlib
    import os
    import subprocess
    from pathlib import Path

    from fusednoise.reference import noise, pats

    env = dict(os.environ, FUSEDNOISE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parents[1]))
    if case == "no compiler":
        env.update(PATH="", CC="")
    elif case == "failing compiler":
        failing = tmp_path / "failing-cc"
        failing.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
        failing.chmod(0o755)
        env["CC"] = str(failing)
    else:
        env["FUSEDNOISE_NATIVE"] = "0"
    result = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    status, digest = result.stdout.strip().splitlines()[-2:]
    assert status.startswith("numpy fallback"), status
    noise_bits = noise.standard_noise(4099, "normal", 12345, first_index=2**34).view(torch.int32)
    index, normal = pats.kept_noise_draws(3000, 99, 2, 0.2)
    expected = hashlib.sha256(noise_bits.numpy().tobytes() + index.numpy().tobytes()
                              + normal.view(torch.int32).numpy().tobytes()).hexdigest()
    assert digest == expected  # the C path here, numpy there: bitwise the same noise


def test_draw_seed_is_torch_randint():
    # The per-thread buffer draws exactly what torch.randint(0, 2**62, ()) would.
    torch.manual_seed(77)
    drawn = [rng.draw_seed() for _ in range(4)]
    torch.manual_seed(77)
    assert drawn == [int(torch.randint(0, 2**62, (), dtype=torch.int64)) for _ in range(4)]


def test_box_muller_cos_is_the_first_output():
    u1, u2 = torch.rand(1000), torch.rand(1000)
    assert torch.equal(rng.box_muller_cos(u1, u2), rng.box_muller(u1, u2)[0])


def test_philox_paths_are_graph_breaks_under_compile(numpy_fallback):
    # Traced, numpy's uint64 philox becomes torch uint64 ops CPU torch lacks; it must run eagerly instead.
    compiled = torch.compile(lambda seed: rng.philox4x32(seed, torch.arange(64), 0, 3, 0)[0].float().sum(),
                             backend="eager")
    assert float(compiled(5)) == float(rng.philox4x32(5, torch.arange(64), 0, 3, 0)[0].float().sum())


@pytest.mark.skipif(sys.platform == "win32", reason="fork is a POSIX start method")
def test_threaded_draws_work_in_a_forked_child(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(native_philox, "PARALLEL_MIN_BLOCKS", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = rng.philox_uniforms(5, 1000)  # starts the thread pool in this process
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            drawn = pool.apply_async(_draw_in_child).get(timeout=120)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(drawn, expected)


def _draw_in_child():
    torch.set_num_threads(2)
    native_philox.PARALLEL_MIN_BLOCKS = 100
    return rng.philox_uniforms(5, 1000)
