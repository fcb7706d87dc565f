"""Which implementation runs an op: the Triton kernels or the eager references.

* ``triton``: the kernels, on CUDA tensors; on CPU tensors too when ``TRITON_INTERPRET=1`` was set before
  triton was imported (Triton's interpreter: exact but slow, how CI without a GPU runs every kernel).
* ``reference``: the eager PyTorch versions in :mod:`fusednoise.reference` ("CPU reference mode").
* ``auto`` (default): triton for CUDA tensors when triton is installed, reference otherwise.

Choose with :func:`set_backend`, the context manager :func:`backend`, or the environment variable
``FUSEDNOISE_BACKEND``; the first two win over the variable.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("triton", "reference", "auto")
ENV_VAR = "FUSEDNOISE_BACKEND"

_override: Optional[str] = None


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Use ``name`` ("triton", "reference" or "auto") for every op; ``None`` goes back to the env variable."""
    global _override
    _override = None if name is None else _check_name(name, "backend name")


def get_backend() -> str:
    """The configured backend name (possibly "auto")."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with fusednoise.backend("reference"): ...`` runs the block on that backend, then restores the old one."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the triton package can be imported (it is not installed on macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve(tensor: torch.Tensor) -> str:
    """The backend that will run an op on ``tensor``: "triton" or "reference".

    A forced ``triton`` backend on a tensor it cannot run on is a clear error rather than a crash inside
    triton.
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "reference"
    runs_on_triton = tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())
    if not triton_available():
        raise RuntimeError("fusednoise backend 'triton' was requested but triton is not installed; "
                           "install it (pip install triton) or use set_backend('reference')")
    if not runs_on_triton:
        raise RuntimeError(
            f"fusednoise backend 'triton' cannot run on a {tensor.device.type} tensor: move the tensor to CUDA, "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU, "
            "or use set_backend('reference')")
    return "triton"


def eager_only(function):
    """Decorator: under ``torch.compile`` a call to ``function`` is a graph break (it runs eagerly between the
    compiled graphs), never traced. ``torch.compiler.disable``, applied on the first call: importing
    ``torch._dynamo`` when fusednoise is imported would cost seconds (torch's own ``_disable_dynamo``)."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(function) if lazy is not None else torch.compiler.disable(function)
