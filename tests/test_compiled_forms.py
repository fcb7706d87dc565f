"""What the real compiler makes of two kernels (issue 18, "to settle"): read from the Triton IR and PTX that
Triton 3.x emits for sm_90, in a subprocess without TRITON_INTERPRET (the interpreter computes in numpy and
shows neither). The CPU compile layer of issue 18 compiles every launch; these two read what it does not check.

* ``kernels/rng.py``: the philox-words kernel's row offsets ``2 n``, ``3 n`` are int64 (``n`` arrives as i32 when
  it fits: in i32 they wrap from n = 2**30 and n = 715,827,883 on).
* The division and square-root forms the float32 code compiles to are the ones whose error README.md states
  ("What only a GPU runs"): ``div.full.f32`` (2 ulp) and ``sqrt.approx.ftz.f32`` (relative 2**-22, arguments
  below 2**-126 flushed to 0); a new form (an ``.approx`` division, say) fails here until the bound is restated.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, re, torch
from fusednoise.kernels import rng as rng_kernels
from fusednoise.kernels.compile_check import compile_launch
from fusednoise.kernels.specialisations import cases

n = 715_827_883  # 3 * n > 2**31 - 1, n itself an i32
out = torch.empty(4, n, dtype=torch.int64, device="meta")
ttir = compile_launch(rng_kernels.philox_words_launch(out, 12345, n, 0, 3, 0)).asm["ttir"]
i32_products = [l.strip() for l in ttir.splitlines() if "arith.muli" in l and l.split(":")[-1].split()[0] == "i32"]
forms = {}
for case in cases():
    if case.name in ("pats.update[fp32]", "lnsr.scaled_noise.backward[fp32,D=1024]"):
        ptx = compile_launch(case.launch).asm["ptx"]
        forms[case.name] = sorted(set(re.findall(r"\b((?:div|sqrt|rcp|rsqrt)\.[a-z0-9.]+)", ptx)))
print("RESULT" + json.dumps(dict(i32_products=i32_products, forms=forms)))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", SCRIPT], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


needs_nvidia_backend = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this Triton build has no NVIDIA backend (no bundled ptxas), so nothing can be compiled for a GPU")


@needs_nvidia_backend
def test_philox_words_row_offsets_are_int64(compiled):
    assert compiled["i32_products"] == []


@needs_nvidia_backend
def test_float32_division_and_sqrt_compile_to_the_documented_forms(compiled):
    documented = {"div.full.f32", "sqrt.approx.ftz.f32", "div.rn.f64"}
    for name, forms in compiled["forms"].items():
        assert set(forms) <= documented, (name, forms)
    assert "div.full.f32" in compiled["forms"]["pats.update[fp32]"]  # the check reads real PTX
