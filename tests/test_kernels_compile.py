"""Every Triton kernel compiles for a real GPU target (sm_90), here on a CPU.

The rest of the CPU suite runs the kernels under Triton's interpreter, which accepts code the compiler rejects
(it found one: the philox-words kernel mixed an i64 scalar into uint32 counter words). This test runs the
compiler, from Triton IR to cubin with the ptxas Triton ships, in a subprocess without TRITON_INTERPRET.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

needs_nvidia_backend = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this Triton build has no NVIDIA backend (no bundled ptxas), so nothing can be compiled for a GPU")


@needs_nvidia_backend
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-m", "fusednoise.kernels.compile_check", "--arch", "90"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0 and not failures, result.stdout[-4000:] + result.stderr[-4000:]
    assert "rng.philox_words" in result.stdout and "pats.update[bf16]" in result.stdout
    assert "kernels compiled for sm_90" in result.stdout


def test_compile_check_refuses_to_run_under_the_interpreter():
    from fusednoise.backends import interpreter_enabled
    from fusednoise.kernels import compile_check

    if not interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is off in this process (a GPU run): the refusal cannot be observed here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is set"):
        compile_check.compile_all()
