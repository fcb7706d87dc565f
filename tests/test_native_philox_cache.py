"""The C philox's build cache (issue 19, item 4): a library is loaded only after checking that it and its
directory belong to the current user, that nobody else can write them, and that it has the size and sha256
digest its build recorded; one that fails is rebuilt (incomplete or garbage) or refused (another user could
have planted it), and building outside the cache leaves nothing behind.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusednoise import native_philox, rng

pytestmark = [
    pytest.mark.skipif(native_philox._compiler() is None, reason="no C compiler: the numpy fallback runs"),
    pytest.mark.skipif(not hasattr(os, "getuid"), reason="ownership checks are POSIX"),
]

KAT = (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory for this test; the loaded library is forgotten before and after."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(native_philox.ENV_CACHE, str(directory))
    native_philox.reset()
    yield directory
    native_philox.reset()  # the next draw loads from the usual cache again (monkeypatch restores the variable)


def _library(directory):
    (found,) = [p for p in directory.iterdir() if p.suffix in (".so", ".dylib")]
    return found


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One build, as a first load makes it, copied into each test's cache (a build takes a second or more)."""
    compiler = native_philox._compiler()
    directory = tmp_path_factory.mktemp("template")
    library = directory / native_philox.library_name(compiler)
    native_philox._build(compiler, library)
    return library


def _built(directory, template):
    """The cached library and its build record in ``directory``, not loaded into this process: a file this
    process has mapped must not be cut short under it (that is the SIGBUS the tests below guard against)."""
    native_philox._private_dir(directory)
    for source in (template, Path(str(template) + ".sha256")):
        shutil.copy2(source, directory / source.name)
    return directory / template.name


def _record(library):
    return json.loads(Path(str(library) + ".sha256").read_text())


def _loads_the_c_library():
    native_philox.reset()
    assert native_philox.available(), native_philox.status()
    words = rng.philox4x32(0xFFFFFFFFFFFFFFFF, *[torch.tensor(0xFFFFFFFF)] * 4)
    assert tuple(int(w) for w in words) == KAT


def test_build_records_size_and_digest(cache):
    _loads_the_c_library()
    library = _library(cache)
    record = _record(library)
    data = library.read_bytes()
    assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in cache.iterdir()) == [library.name, library.name + ".sha256"]  # no temporaries
    assert library.stat().st_mode & 0o077 == 0


LOAD_SCRIPT = r"""
from fusednoise import native_philox
print(native_philox.status())
"""


def test_truncated_library_is_rebuilt_not_loaded(cache, template):
    """A truncated shared library crashed ctypes.CDLL (SIGBUS) in every process: the load runs in a
    subprocess, so a crash fails this test."""
    library = _built(cache, template)
    size = library.stat().st_size
    with open(library, "r+b") as handle:  # a copy cut off mid-write
        handle.truncate(size // 3)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().splitlines()[-1].startswith("C library"), result.stdout
    assert library.stat().st_size == size == _record(library)["size"]


def test_garbage_library_is_rebuilt(cache, template):
    library = _built(cache, template)
    library.write_bytes(b"not an ELF file" * 100)
    library.chmod(0o600)
    _loads_the_c_library()
    assert library.read_bytes()[:4] in (b"\x7fELF", b"\xcf\xfa\xed\xfe")  # rebuilt, not fallen back to numpy


def test_library_without_a_build_record_is_rebuilt(cache, template):
    library = _built(cache, template)
    record = Path(str(library) + ".sha256")
    record.unlink()
    _loads_the_c_library()
    assert record.is_file() and _record(library)["size"] == library.stat().st_size


def test_unusable_cache_path_builds_in_a_temporary_directory_it_removes(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(native_philox.ENV_CACHE, str(blocker / "cache"))  # cannot be created, even by root
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    try:
        for _ in range(2):
            _loads_the_c_library()
            assert list(scratch.iterdir()) == []
    finally:
        native_philox.reset()


OTHER_UID = 4242  # a user id nobody here has (the tests run as root, which may chown)


@pytest.mark.parametrize("case", ["library group/other-writable", "record group/other-writable",
                                  "library of another user", "record of another user",
                                  "directory group/other-writable", "directory of another user"])
def test_a_file_another_user_could_have_written_is_refused(cache, template, case):
    library = _built(cache, template)
    target = {"library": library, "record": Path(str(library) + ".sha256"), "directory": cache}[case.split()[0]]
    if "writable" in case:
        target.chmod(0o777 if target.is_dir() else 0o666)
        message = "writable by its group or by others"
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(target, OTHER_UID, -1)
        message = f"belongs to uid {OTHER_UID}"
    planted = library.read_bytes()
    mtime = library.stat().st_mtime_ns
    with pytest.warns(RuntimeWarning, match=message):
        _loads_the_c_library()  # built and loaded from a private temporary directory instead
    assert library.read_bytes() == planted and library.stat().st_mtime_ns == mtime  # not replaced
    if os.path.exists("/proc/self/maps"):  # and not mapped into this process
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            assert str(library) not in maps.read()
