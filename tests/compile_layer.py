"""The CPU suite's compile layer: every distinct launch the suite makes is also compiled for sm_90 (and sm_80).

Under Triton's interpreter a kernel runs whatever its arguments' values; the JIT on a GPU specialises them (an
int equal to 1 becomes a constant, an int or pointer divisible by 16 another variant, an int over 32 bits an
i64) and compiles each variant on first use. A value that only the JIT treats differently therefore passes the
CPU suite and fails a user's first GPU step (issue 18: ``seed=1`` did not compile).

While the suite runs, an observer on ``fusednoise.kernels.launch.Launch.run`` records the JIT's specialisation
of each launch (``compile_check.launch_record``: the kernel, the signature, constexprs and attributes Triton's
own binder gives the real argument values, num_warps and the compile options) and sends each distinct record to
one worker process without ``TRITON_INTERPRET`` (``python -m fusednoise.kernels.compile_check --worker``),
which compiles it with the real compiler while the suite goes on (one core; the suite itself uses the other).
A folder of markers (``FUSEDNOISE_COMPILE_CACHE``, default ``~/.cache/fusednoise/compile-layer``) remembers
what compiled, keyed by the Triton version, the architecture, the kernel's source hash and the record, so a
rerun compiles only what changed. ``tests/test_compile_layer.py``'s last test, which ``conftest.py`` moves to
the end of the session, waits for the worker and fails listing every record that does not compile (and the
first test that launched it).

Records are distinct by what the JIT decides from the argument values (:func:`argument_key`): launches that
differ only in the kernel's declared constexprs (chosen for the interpreter: ``FAST=False``, ``BF16_BY_BITS=True``,
interpreter tile sizes) are compiled once, with the first one's; the GPU's own constexpr choices are compiled by
``fusednoise/kernels/specialisations.py`` (``tests/test_kernels_compile.py``). ``FUSEDNOISE_COMPILE_LAYER=0``
turns the layer off (its test then skips, saying so).
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("FUSEDNOISE_COMPILE_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "fusednoise", "compile-layer"))


class CompileLayer:
    def __init__(self, cache_dir: Optional[str] = CACHE):
        self.cache_dir = cache_dir
        self.ids: Dict[str, int] = {}          # record (JSON) -> id
        self.records: List[dict] = []
        self.first_test: List[str] = []        # the test that first made each record's launch
        self.unrecordable: List[str] = []      # launches whose specialisation could not be computed
        self.current_test = ""
        self.launches = 0
        self.timed_out = 0.0
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._process: Optional[subprocess.Popen] = None
        self._feeder: Optional[threading.Thread] = None
        self._out = tempfile.NamedTemporaryFile("w+", prefix="fusednoise-compile-layer-", suffix=".jsonl",
                                                delete=False)
        self._err = tempfile.NamedTemporaryFile("w+", prefix="fusednoise-compile-layer-", suffix=".log",
                                                delete=False)

    # ------------------------------------------------------------------ recording (inside Launch.run)
    def observe(self, launch) -> None:
        from fusednoise.kernels import compile_check

        if not hasattr(launch.kernel, "fn"):  # a test's stand-in for a kernel (recording launches), not Triton's
            return
        self.launches += 1
        try:
            record = compile_check.launch_record(launch)
        except Exception as error:  # noqa: BLE001 - reported by the final test, not raised inside a launch
            name = getattr(launch.kernel, "__name__", launch.kernel)
            self.unrecordable.append(f"{name} in {self.current_test}: {type(error).__name__}: {error}")
            return
        text = json.dumps(argument_key(launch, record), sort_keys=True)
        if text in self.ids:
            return
        self.ids[text] = len(self.records)
        self.records.append(record)
        self.first_test.append(self.current_test)
        self._start()
        self._queue.put(json.dumps({"id": self.ids[text], "record": record}))

    def _start(self) -> None:
        if self._process is not None:
            return
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "fusednoise.kernels.compile_check", "--worker"]
        if self.cache_dir:
            command += ["--cache", self.cache_dir]
        self._process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=self._out,
                                         stderr=self._err, text=True)
        # A thread feeds the worker, so a launch never waits on a full pipe.
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                self._process.stdin.close()
                return
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()

    # ------------------------------------------------------------------ the final test
    def finish(self, timeout: float) -> Dict[int, dict]:
        """Wait for the worker to compile everything recorded; its result per record id."""
        if self._process is None:
            return {}
        self._queue.put(None)
        self._feeder.join(timeout)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = timeout
            self._process.kill()
            self._process.wait()
        self._out.flush()
        results = {}
        for line in Path(self._out.name).read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                results[item["id"]] = item
        return results

    def worker_log(self) -> str:
        return Path(self._err.name).read_text()[-4000:]

    def close(self) -> None:
        """End the worker if the session ends before the final test (-x, an interrupt) and remove the files."""
        from fusednoise.kernels import launch

        if self.observe in launch.observers:
            launch.observers.remove(self.observe)
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for handle in (self._out, self._err):
            handle.close()
            Path(handle.name).unlink(missing_ok=True)

    def describe(self, index: int) -> str:
        record = self.records[index]
        specialised = {name: kind for name, kind in record["signature"].items() if kind != "constexpr"}
        return (f"{record['kernel']} {specialised} constexprs={record['constexprs']} attrs={record['attrs']} "
                f"options={record['options']} (first launched by {self.first_test[index] or 'collection'})")


def argument_key(launch, record: dict) -> dict:
    """What the JIT decides from a launch's argument values: the record less the values of the kernel's declared
    constexprs. Launches that differ only in those (the interpreter's tile sizes, ``FAST=False``) are compiled once,
    with the first one's constexprs: the compile layer is there for the argument values (1, multiples of 16, int64
    sizes, unaligned pointers), and the constexprs a GPU launch uses are compiled case by case by
    ``fusednoise/kernels/specialisations.py`` (``tests/test_kernels_compile.py``). Compiling every interpreter
    tile as well took about 5 CPU seconds a record on a cold cache, past the suite's budget."""
    from fusednoise.kernels import compile_check

    names = compile_check.jit_function(launch.kernel).arg_names
    declared = set(launch.constexprs)
    return dict(record, constexprs=[c for c in record["constexprs"] if names[c[0][0]] not in declared])


def start(config) -> CompileLayer:
    from fusednoise.kernels import launch

    layer = CompileLayer()
    config.fusednoise_compile_layer = layer
    launch.observers.append(layer.observe)
    return layer


def active(config) -> Optional[CompileLayer]:
    return getattr(config, "fusednoise_compile_layer", None)
