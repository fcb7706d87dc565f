"""Test setup: without a GPU, every Triton kernel runs under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The device the kernel tests run on: CUDA when there is one, else CPU tensors under the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE
