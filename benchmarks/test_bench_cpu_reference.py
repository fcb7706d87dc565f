"""CPU reference mode's price on a MiniLM-sized BERT: a PATS step against torch's Adamax, and HyPe-N's overhead
on a training step.

    pytest benchmarks/test_bench_cpu_reference.py --benchmark-json benchmarks/results/cpu-reference-<cpu>.json

Issue 14's targets, measured here rather than asserted: a PATS step with noise at most 3x
``torch.optim.Adamax(foreach=False)`` on the same 22.7M parameters (random weights from the MiniLM config,
gradients set; the paper's param groups: noise on the 10.6M encoder-layer weights), and HyPe-N adding at most 3%
to a training step at batch 16 x 128 (issue 9). The PATS case also stores the Adamax time it measured in the
same process (``adamax_ms``) and the ratio (``ratio_to_adamax``); the HyPe case the vanilla step's time and
the overhead. The random numbers are the C philox (``fusednoise.native_philox``) when a compiler was found,
else numpy (``extra_info["philox"]`` says which).

These are CPU cases (skipped with a GPU, where the kernels run instead).
"""
import contextlib
import statistics
import time

import pytest
import torch

from benchutil import bench_training_step, bert_classifier, classification_step, cpu_only
from fusednoise import native_philox

pytestmark = cpu_only


@pytest.fixture(scope="module")
def minilm_with_grads():
    torch.manual_seed(0)
    model = bert_classifier("minilm")
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
    return model


def _median_ms(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@pytest.mark.parametrize("case", ["pats", "pats-lambda0", "adamax", "adamax-foreach"])
def test_pats_step_vs_adamax_minilm(benchmark, minilm_with_grads, case):
    from fusednoise.optim import PATSAdamax, pats_param_groups

    benchmark.group = "cpu-reference optimizer step minilm (22.7M)"
    model = minilm_with_grads
    params = list(model.parameters())
    if case.startswith("pats"):
        opt = PATSAdamax(pats_param_groups(model), lr=1e-4, noise_lambda=0.0 if case == "pats-lambda0" else 2e-6,
                         seed=0)
    else:
        opt = torch.optim.Adamax(params, lr=1e-4, foreach=case == "adamax-foreach")
    opt.step()
    benchmark.pedantic(opt.step, rounds=5, iterations=1, warmup_rounds=1)
    info = dict(case=case, parameters=sum(p.numel() for p in params), philox=native_philox.status())
    if case == "pats":
        adamax = torch.optim.Adamax(params, lr=1e-4, foreach=False)
        info["adamax_ms"] = round(_median_ms(adamax.step), 1)
        info["pats_ms"] = round(_median_ms(opt.step), 1)
        info["ratio_to_adamax"] = round(info["pats_ms"] / info["adamax_ms"], 2)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("method", ["vanilla", "hype-n"])
def test_hype_overhead_minilm_training_step(benchmark, method):
    """Forward + backward + AdamW at batch 16 x 128 (fusednoise check's setting), random MiniLM weights."""
    from fusednoise import hype

    benchmark.group = "cpu-reference train-step minilm 16x128"
    torch.manual_seed(0)
    model = bert_classifier("minilm")
    step = classification_step(model, torch.optim.AdamW(model.parameters(), lr=2e-5), batch=16, seq=128)
    with hype.apply(model, sigma=1e-5) if method == "hype-n" else contextlib.nullcontext():
        bench_training_step(benchmark, step, method=method, batch=16, seq=128, philox=native_philox.status())
