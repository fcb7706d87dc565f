"""Test setup: without a GPU, every Triton kernel runs under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
Test modules import HAS_CUDA / KERNEL_DEVICE from ``devices`` (not from this file: with ``pytest tests
benchmarks`` two files named conftest.py exist and ``import conftest`` would be ambiguous).
"""
import os

import pytest

from devices import HAS_CUDA, KERNEL_DEVICE

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


# ------------------------------------------------------------------------------------------------ compile layer
# Without a GPU, every launch the session makes is recorded and compiled for sm_90 (and sm_80) by a worker process
# (tests/compile_layer.py); the test that checks the result runs last. Only when that test is collected, and
# not with FUSEDNOISE_COMPILE_LAYER=0 (the test then skips, saying so).
COMPILE_LAYER_TEST = "test_compile_layer.py::test_every_launch_of_the_session_compiles_for_sm90_and_sm80"


def pytest_collection_modifyitems(config, items):
    last = [item for item in items if item.nodeid.endswith(COMPILE_LAYER_TEST)]
    if not last:
        return
    for item in last:
        items.remove(item)
        items.append(item)
    if not HAS_CUDA and os.environ.get("FUSEDNOISE_COMPILE_LAYER", "1") != "0":
        import compile_layer

        compile_layer.start(config)


def pytest_runtest_setup(item):
    layer = getattr(item.config, "fusednoise_compile_layer", None)
    if layer is not None:
        layer.current_test = item.nodeid


def pytest_terminal_summary(terminalreporter, config):
    layer = getattr(config, "fusednoise_compile_layer", None)
    if layer is not None and hasattr(layer, "waited"):  # the final test ran
        terminalreporter.write_line(
            f"compile layer: {layer.launches} launches, {len(layer.records)} distinct specialisations compiled for "
            f"sm_90, each kernel signature's first for sm_80 ({layer.compile_seconds:.0f} s in the worker, cache hits included); the last test "
            f"waited {layer.waited:.0f} s for it")


def pytest_unconfigure(config):
    layer = getattr(config, "fusednoise_compile_layer", None)
    if layer is not None:
        layer.close()
