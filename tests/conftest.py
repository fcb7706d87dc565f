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
