"""Backend selection: set_backend, the context manager, the environment variable, and clear errors."""
import pytest
import torch

import fusednoise
from fusednoise import backends


def test_default_is_auto_and_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert fusednoise.get_backend() == "auto"
    assert backends.resolve(torch.zeros(1)) == "reference"


def test_context_manager_restores_previous():
    fusednoise.set_backend("reference")
    try:
        with fusednoise.backend("triton"):
            assert fusednoise.get_backend() == "triton"
        assert fusednoise.get_backend() == "reference"
    finally:
        fusednoise.set_backend(None)


def test_context_manager_restores_after_error():
    with pytest.raises(KeyError):
        with fusednoise.backend("reference"):
            raise KeyError("boom")
    assert backends._override is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert fusednoise.get_backend() == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        fusednoise.get_backend()


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend"):
        fusednoise.set_backend("cuda")


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(8)
    before = x.clone()
    with fusednoise.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fusednoise.add_noise_(x, 0.1)
    assert torch.equal(x, before)


def test_forced_triton_on_cpu_with_interpreter_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fusednoise.backend("triton"):
        assert backends.resolve(torch.zeros(1)) == "triton"
