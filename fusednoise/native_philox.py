"""philox-4x32-10 for CPU tensors in C: the integer half of CPU reference mode.

The eager references draw their random numbers from :func:`fusednoise.rng.philox4x32`. On CPU tensors the
words come from the small C library below when a C compiler is available: it is built once with the system
compiler (``$CC``, else ``cc``/``gcc``/``clang``), cached under ``~/.cache/fusednoise`` (``FUSEDNOISE_CACHE_DIR``
overrides), loaded with ctypes, and checked against a Random123 known-answer vector before first use. Without a
compiler (or with ``FUSEDNOISE_NATIVE=0``) :mod:`fusednoise.rng` falls back to numpy: the same words, slower.

The cache is checked before anything is loaded from it (loading a library runs its code, and a truncated one
crashes the process inside ``dlopen``): the build records the library's size and sha256 digest in
``<library>.sha256``, written after the library is complete (both by renames), and a library whose size or digest
differs, or that has no record, is rebuilt. A cache directory, library or record that is not the current user's or
that its group or others can write is refused with a RuntimeWarning: the library is then built in a private
temporary directory, loaded, and the directory removed at once (as when the cache directory cannot be created).

Only integer work is done here: the uint32 words and their exact conversion to Triton's uniform floats (an
int32-to-float32 conversion and one float32 multiply, both correctly rounded, so the floats are bitwise those of
:func:`fusednoise.rng.uint_to_uniform`). The float math that follows (Box-Muller, the methods' formulas) stays in
the references' eager torch code, so the results are bitwise those of the readable reference.

Speed, one thread of the 2-core development CPU (AVX-512, gcc -O3 -march=native): 4-5 ns per philox call for
the uniforms, against 67 ns for numpy's uint64 version and 220 ns for the int64 torch version. Why C and not
``torch.compile`` of the torch philox: inductor's code for the int64 arithmetic that philox needs without
unsigned types ran at 16-20 ns per call, took 3-11 s to compile per graph (this library: under 1 s, once per
machine), and the float stage compiled by inductor was no faster than eager and not bitwise equal to it.

ctypes releases the GIL during a call, so large draws are split over ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from .backends import eager_only

ENV_SWITCH = "FUSEDNOISE_NATIVE"       # "0" turns the C library off (the numpy fallback runs)
ENV_CACHE = "FUSEDNOISE_CACHE_DIR"

# Blocks per thread below which a draw is not split (thread hand-off costs ~20 us; a block ~5-8 ns).
PARALLEL_MIN_BLOCKS = 1 << 16

SOURCE = r"""
#include <stdint.h>

#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u

/* philox-4x32-10 of counter x under key (k0, k1), in place: Random123's and Triton's tl.philox. Every product
   is a uint32 x uint32 -> uint64 multiply, so nothing overflows and nothing is undefined. */
static inline void philox10(uint32_t x[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        uint64_t product_b = (uint64_t)ROUND_B * x[2];
        uint64_t product_a = (uint64_t)ROUND_A * x[0];
        uint32_t next0 = (uint32_t)(product_b >> 32) ^ x[1] ^ k0;
        uint32_t next2 = (uint32_t)(product_a >> 32) ^ x[3] ^ k1;
        x[1] = (uint32_t)product_b;
        x[3] = (uint32_t)product_a;
        x[0] = next0;
        x[2] = next2;
        k0 += KEY_A;
        k1 += KEY_B;
    }
}

/* Triton's uint_to_uniform_float: the word as int32, negatives folded onto ~x, times the largest scale with
   INT32_MAX * scale < 1. Both steps are correctly rounded, so the float is exact. */
static inline float to_uniform(uint32_t word) {
    int32_t folded = (int32_t)(word & 0x7FFFFFFFu);
    if (word & 0x80000000u) folded = (int32_t)(~word);
    return (float)folded * 4.6566127342e-10f;
}

/* The four words of counters (c0[i], c1[i], c2, c3), i < n: out[w * stride + i], as int64 holding uint32. */
void fusednoise_philox_words(uint64_t seed, int64_t n, const int64_t *restrict c0, const int64_t *restrict c1,
                             uint32_t c2, uint32_t c3, int64_t *restrict out, int64_t stride) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int64_t i = 0; i < n; i++) {
        uint32_t x[4] = {(uint32_t)c0[i], (uint32_t)c1[i], c2, c3};
        philox10(x, k0, k1);
        out[i] = x[0];
        out[stride + i] = x[1];
        out[2 * stride + i] = x[2];
        out[3 * stride + i] = x[3];
    }
}

/* The uniforms of the four words of blocks first .. first + n - 1 (counter = the block index's low and high
   32 bits, stream, purpose): out[4 * i + w], so element 4 * block + w of a tensor reads word w. */
void fusednoise_philox_uniforms(uint64_t seed, uint64_t first, int64_t n, uint32_t stream, uint32_t purpose,
                                float *restrict out) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int64_t i = 0; i < n; i++) {
        uint64_t block = first + (uint64_t)i;
        uint32_t x[4] = {(uint32_t)block, (uint32_t)(block >> 32), stream, purpose};
        philox10(x, k0, k1);
        out[4 * i] = to_uniform(x[0]);
        out[4 * i + 1] = to_uniform(x[1]);
        out[4 * i + 2] = to_uniform(x[2]);
        out[4 * i + 3] = to_uniform(x[3]);
    }
}

/* The blocks of first .. first + n - 1 whose word-2 uniform is below p (a Bernoulli(p) draw), in order: their
   index relative to first and the uniforms of their words 0 and 1. Returns how many. The words are drawn for
   a tile of blocks at a time (vectorised), then copied out without branches: every block is written at the
   next free slot, which only advances when the block is kept (slot <= block, so it stays in bounds). */
#define TILE 512
int64_t fusednoise_philox_select(uint64_t seed, uint64_t first, int64_t n, uint32_t stream, uint32_t purpose,
                                 float p, int64_t *restrict index, float *restrict u0, float *restrict u1) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float tile[3][TILE];
    int64_t kept = 0;
    for (int64_t start = 0; start < n; start += TILE) {
        int64_t count = n - start < TILE ? n - start : TILE;
        for (int64_t j = 0; j < count; j++) {
            uint64_t block = first + (uint64_t)(start + j);
            uint32_t x[4] = {(uint32_t)block, (uint32_t)(block >> 32), stream, purpose};
            philox10(x, k0, k1);
            tile[0][j] = to_uniform(x[0]);
            tile[1][j] = to_uniform(x[1]);
            tile[2][j] = to_uniform(x[2]);
        }
        for (int64_t j = 0; j < count; j++) {
            index[kept] = start + j;
            u0[kept] = tile[0][j];
            u1[kept] = tile[1][j];
            kept += tile[2][j] < p;
        }
    }
    return kept;
}
"""

# Random123's known-answer vector for philox4x32-10 (counter and key all ones): checked after loading.
_KAT_COUNTER = (0xFFFFFFFF,) * 4
_KAT_WORDS = (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)

_lock = threading.Lock()
_library = None            # the loaded ctypes library, once built
_status: Optional[str] = None   # why the library is not used ("" when it is); None before the first attempt
_pool: Optional[ThreadPoolExecutor] = None


# ------------------------------------------------------------------------------------------------ building
def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU: a shared cache directory keys the build by CPU model.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.join(os.path.expanduser("~"), ".cache"), "fusednoise")
    return Path(root)


class _Untrusted(Exception):
    """A cache path another user could have written (not ours, or group/other-writable): never loaded."""


class _Corrupt(Exception):
    """A cached library that is missing, incomplete or not what was built (size or digest): rebuilt."""


def _check_owner(info: os.stat_result, path: Path, what: str) -> None:
    """:class:`_Untrusted` unless ``path`` (its ``os.stat`` result ``info``) belongs to the current user and
    nobody else can write it: loading a library runs its code, so the file and its directory must be ours."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and info.st_uid != uid:
        raise _Untrusted(f"{what} {path} belongs to uid {info.st_uid}, not to the current user (uid {uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Untrusted(f"{what} {path} is writable by its group or by others (mode {stat.S_IMODE(info.st_mode):o})")


def _private_dir(path: Path) -> Path:
    """``path``, created (mode 0700) if missing, after checking that it is a directory only we can write."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise _Untrusted(f"the cache path {path} is not a directory")
    _check_owner(info, path, "the cache directory")
    return path


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a uniquely named temporary file in its directory and a rename."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into ``target`` and record its size and sha256 digest in ``<target>.sha256``.

    The library is compiled in a temporary directory next to ``target`` (removed afterwards) and renamed into
    place, so processes building at the same time never load a half-written file; the record is written (also by
    a rename) only once the library is complete, and a library without a matching record is never loaded."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
        source = Path(work) / "philox.c"
        source.write_text(SOURCE)
        output = Path(work) / target.name
        base = [compiler, "-O3", "-std=c99", "-shared", "-fPIC", str(source), "-o", str(output)]
        errors = []
        for extra in (["-march=native"], []):  # -march=native where the compiler has it (gcc, clang on x86)
            result = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                data = output.read_bytes()
                os.chmod(output, 0o600)
                os.replace(output, target)
                record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                _atomic_write(_sidecar(target), json.dumps(record).encode())
                return
            errors.append(f"{' '.join(extra) or 'plain'}: exit {result.returncode} {result.stderr.strip()[-400:]}")
        raise RuntimeError("C compiler failed: " + " | ".join(errors))


def _read_record(library: Path) -> dict:
    record_path = _sidecar(library)
    try:
        handle = os.open(record_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _Corrupt(f"{library} has no build record ({record_path.name})") from None
    except OSError as error:
        raise _Corrupt(f"cannot read the build record {record_path}: {error}") from None
    with os.fdopen(handle, "rb") as stream:
        _check_owner(os.fstat(stream.fileno()), record_path, "the build record")
        try:
            record = json.loads(stream.read(4096))
            return {"size": int(record["size"]), "sha256": str(record["sha256"])}
        except (ValueError, KeyError, TypeError) as error:
            raise _Corrupt(f"the build record {record_path} is unreadable ({error})") from None


def _open_verified(library: Path) -> int:
    """An open descriptor of ``library`` after checking, on that descriptor (so nothing can swap the file in
    between), that it is a regular file of ours that only we can write, with the size and sha256 digest its
    build recorded. :class:`_Corrupt` (rebuild it) or :class:`_Untrusted` (never load it) otherwise."""
    record = _read_record(library)
    try:
        handle = os.open(library, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _Corrupt(f"{library} is missing") from None
    except OSError as error:
        raise _Untrusted(f"cannot open {library} as a plain file ({error})") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise _Untrusted(f"{library} is not a regular file")
        _check_owner(info, library, "the cached library")
        if info.st_size != record["size"]:
            raise _Corrupt(f"{library} has {info.st_size} bytes, its build wrote {record['size']} (truncated?)")
        digest = hashlib.sha256()
        with os.fdopen(os.dup(handle), "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != record["sha256"]:
            raise _Corrupt(f"{library}'s sha256 digest is not the one its build recorded")
        return handle
    except BaseException:
        os.close(handle)
        raise


def _load_verified(library: Path):
    """The bound library at ``library``, verified first (:func:`_open_verified`). Loaded by its path (the
    dynamic loader knows a library by its name, and each cached build has its own); the directory is ours and
    only ours to write, so the file checked is the file loaded."""
    os.close(_open_verified(library))
    return _bind(library)


def _bind(path: Path):
    library = ctypes.CDLL(str(path))
    u64, i64, u32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32
    pointer = ctypes.c_void_p
    library.fusednoise_philox_words.argtypes = [u64, i64, pointer, pointer, u32, u32, pointer, i64]
    library.fusednoise_philox_words.restype = None
    library.fusednoise_philox_uniforms.argtypes = [u64, u64, i64, u32, u32, pointer]
    library.fusednoise_philox_uniforms.restype = None
    library.fusednoise_philox_select.argtypes = [u64, u64, i64, u32, u32, ctypes.c_float, pointer, pointer, pointer]
    library.fusednoise_philox_select.restype = i64
    return library


def _known_answer_ok(library) -> bool:
    counters = torch.tensor([_KAT_COUNTER[0]], dtype=torch.int64)
    out = torch.empty(4, dtype=torch.int64)
    library.fusednoise_philox_words(0xFFFFFFFFFFFFFFFF, 1, counters.data_ptr(), counters.data_ptr(),
                                    _KAT_COUNTER[2], _KAT_COUNTER[3], out.data_ptr(), 1)
    return tuple(out.tolist()) == _KAT_WORDS


def library_name(compiler: str) -> str:
    """The cached library's file name: a digest of the source, the compiler, the CPU and the platform."""
    key = hashlib.sha256("\0".join([SOURCE, compiler, _cpu_signature(), platform.platform()]).encode())
    return f"philox-{key.hexdigest()[:16]}{'.dylib' if platform.system() == 'Darwin' else '.so'}"


def _cached_library(compiler: str, name: str):
    """The library ``name`` from the cache directory, built (again) when it is missing or fails verification.

    A cache directory or file that another user could have written is refused with a warning, and so is a
    cache directory that cannot be created: the library is then built in a private temporary directory, loaded,
    and the directory removed at once (the loaded library stays mapped), so nothing is left behind."""
    try:
        directory = _private_dir(_cache_dir())
    except (OSError, _Untrusted) as error:
        if isinstance(error, _Untrusted):
            warnings.warn(f"fusednoise: not using the C philox cache: {error}; building it in a private "
                          "temporary directory instead", RuntimeWarning, stacklevel=4)
        return _build_private(compiler, name)
    target = directory / name
    try:
        return _load_verified(target)
    except _Untrusted as error:
        warnings.warn(f"fusednoise: refusing the cached C philox: {error}; building it in a private temporary "
                      "directory instead (delete the file if you did not put it there, and fusednoise rebuilds "
                      "it)", RuntimeWarning, stacklevel=4)
        return _build_private(compiler, name)
    except (_Corrupt, OSError):  # missing, incomplete, or not what its build wrote (or no longer loadable)
        pass
    try:
        _build(compiler, target)
        return _load_verified(target)
    except (OSError, _Corrupt):  # not writable now (a read-only file system, a full disk), or another process
        return _build_private(compiler, name)  # replaced the library between its build and its record


def _build_private(compiler: str, name: str):
    with tempfile.TemporaryDirectory(prefix="fusednoise-") as work:
        target = _private_dir(Path(work)) / name
        _build(compiler, target)
        return _load_verified(target)


def _load():
    """The library, building it on first use; None (with the reason in ``status()``) when it cannot be had."""
    global _library, _status
    if _status is not None:
        return _library
    with _lock:
        if _status is not None:
            return _library
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            _status = f"switched off ({ENV_SWITCH}=0)"
            return None
        compiler = _compiler()
        if compiler is None:
            _status = "no C compiler found (set CC, or install cc/gcc/clang)"
            return None
        try:
            library = _cached_library(compiler, library_name(compiler))
        except (OSError, RuntimeError, subprocess.SubprocessError, _Untrusted, _Corrupt) as error:
            _status = f"could not build or load the C philox ({error})"
            return None
        if not _known_answer_ok(library):
            _status = "the compiled C philox failed the Random123 known-answer test (miscompiled?)"
            return None
        _library, _status = library, ""
        return _library


def available() -> bool:
    """True when the C philox is built and loaded (building it now if needed)."""
    return _load() is not None


def status() -> str:
    """How CPU philox words are drawn: "C (...)" or the reason for the numpy fallback."""
    _load()
    return f"C library (built with {_compiler()})" if _library is not None else f"numpy fallback: {_status}"


def reset(enabled: Optional[bool] = None) -> None:
    """Forget the loaded library (tests): the next draw loads it again, or never when ``enabled`` is False."""
    global _library, _status
    with _lock:
        _library = None
        _status = None if enabled is not False else "switched off (native_philox.reset(False))"


# ------------------------------------------------------------------------------------------------ drawing
def _split(n: int):
    """Contiguous ``(start, count)`` ranges of ``range(n)``, one per worker thread for large ``n``."""
    if n <= 0:
        return []
    workers = max(1, min(torch.get_num_threads(), n // PARALLEL_MIN_BLOCKS))
    step = -(-n // workers)
    return [(start, min(step, n - start)) for start in range(0, n, step)]


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but not its threads: work submitted to it would never run.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run(calls):
    """Run the thunks, in parallel when there are several (ctypes drops the GIL during each call)."""
    global _pool
    if len(calls) <= 1:
        return [call() for call in calls]
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                           thread_name_prefix="fusednoise-philox")
    return [future.result() for future in [_pool.submit(call) for call in calls]]


@eager_only  # a foreign call: a graph break under torch.compile, never a trace
def words(library, seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: int, c3: int) -> torch.Tensor:
    """int64 ``(4, n)``: the words of counters ``(c0[i], c1[i], c2, c3)``; c0, c1 contiguous int64 CPU."""
    n = c0.numel()
    out = torch.empty(4, n, dtype=torch.int64)
    _run([lambda s=start, c=count: library.fusednoise_philox_words(
        seed, c, c0[s:].data_ptr(), c1[s:].data_ptr(), c2, c3, out[:, s:].data_ptr(), n) for start, count in _split(n)])
    return out


@eager_only  # a foreign call: a graph break under torch.compile, never a trace
def uniforms(library, seed: int, n_blocks: int, first_block: int, stream: int, purpose: int) -> torch.Tensor:
    """float32 ``(n_blocks, 4)``: the uniforms of the words of blocks ``first_block + i``."""
    out = torch.empty(n_blocks, 4, dtype=torch.float32)
    _run([lambda s=start, c=count: library.fusednoise_philox_uniforms(
        seed, first_block + s, c, stream, purpose, out[s:].data_ptr()) for start, count in _split(n_blocks)])
    return out


@eager_only  # a foreign call: a graph break under torch.compile, never a trace
def select(library, seed: int, n_blocks: int, first_block: int, stream: int, purpose: int, p: float):
    """``(index, u0, u1)`` of the blocks whose word-2 uniform is below ``p`` (see the C function)."""
    parts = []
    for start, count in _split(n_blocks):
        parts.append((start, torch.empty(count, dtype=torch.int64), torch.empty(count, dtype=torch.float32),
                      torch.empty(count, dtype=torch.float32)))
    kept = _run([lambda s=start, i=index, a=u0, b=u1: library.fusednoise_philox_select(
        seed, first_block + s, i.numel(), stream, purpose, p, i.data_ptr(), a.data_ptr(), b.data_ptr())
        for start, index, u0, u1 in parts])
    if len(parts) <= 1:
        if not parts:
            return torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0)
        _, index, u0, u1 = parts[0]
        return index[:kept[0]], u0[:kept[0]], u1[:kept[0]]
    return (torch.cat([index[:k] + start for (start, index, _, _), k in zip(parts, kept)]),
            torch.cat([u0[:k] for (_, _, u0, _), k in zip(parts, kept)]),
            torch.cat([u1[:k] for (_, _, _, u1), k in zip(parts, kept)]))
