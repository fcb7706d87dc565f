"""CPU reference mode's price on a MiniLM-sized BERT: a PATS step against torch's Adamax, and HyPe-N's overhead
on a training step.

    pytest benchmarks/test_bench_cpu_reference.py --benchmark-json benchmarks/results/cpu-reference-<cpu>.json

Issue 14's targets, measured here rather than asserted: a PATS step with noise at most 3x
``torch.optim.Adamax(foreach=False)`` on the same 22.7M parameters (random weights from the MiniLM config,
gradients set; the paper's param groups: noise on the 10.6M encoder-layer weights), and HyPe-N adding at most 3%
to a training step at batch 16 x 128 (issue 9). The PATS case also stores the Adamax time it measured in the
same process (``adamax_ms``) and the ratio (``ratio_to_adamax``); the HyPe case the vanilla step's time, the
overhead, and the CPU time spent inside the noise op per step (``noise_cpu_fraction`` of a vanilla step). The
random numbers are the C philox (``fusednoise.native_philox``) when a compiler was found, else numpy
(``extra_info["philox"]`` says which).

These are CPU cases (skipped with a GPU, where the kernels run instead). On a shared machine wall time is at the
mercy of the other load (an OpenMP region waits for its threads to be scheduled); CPU time on one thread is not:

    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_cpu_reference.py --benchmark-timer time.process_time

(the in-test Adamax comparison then uses process time too).
"""
import contextlib
import statistics
import time
from unittest import mock

import pytest
import torch

from benchutil import bench_training_step, bert_classifier, classification_step, cpu_only
from fusednoise import native_philox, ops

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
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
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
    """Forward + backward + AdamW at batch 16 x 128 (fusednoise check's setting), random MiniLM weights. The
    hype-n case also times vanilla and HyPe steps alternately on the same model (``vanilla_ms``, ``hype_ms``,
    ``overhead``): two separate cases differ by more than the overhead on a busy machine."""
    from fusednoise import hype

    benchmark.group = "cpu-reference train-step minilm 16x128"
    torch.manual_seed(0)
    model = bert_classifier("minilm")
    step = classification_step(model, torch.optim.AdamW(model.parameters(), lr=2e-5), batch=16, seq=128)
    with hype.apply(model, sigma=1e-5) if method == "hype-n" else contextlib.nullcontext():
        bench_training_step(benchmark, step, method=method, batch=16, seq=128, philox=native_philox.status())
    if method == "hype-n":
        times = {"vanilla": [], "hype": []}
        for _ in range(3):
            times["vanilla"].append(_median_ms(step, repeats=1))
            with hype.apply(model, sigma=1e-5):
                times["hype"].append(_median_ms(step, repeats=1))
        vanilla, noisy = statistics.median(times["vanilla"]), statistics.median(times["hype"])
        # The time spent inside the noise op itself, summed over a step's layer calls: the overhead without the
        # step-to-step noise of a shared machine.
        inside = []
        original = ops.add_noise

        def timed_add_noise(*args, **kwargs):
            start = time.process_time()
            out = original(*args, **kwargs)
            inside.append(time.process_time() - start)
            return out

        with hype.apply(model, sigma=1e-5), mock.patch.object(ops, "add_noise", timed_add_noise):
            step()
        benchmark.extra_info.update(vanilla_ms=round(vanilla, 1), hype_ms=round(noisy, 1),
                                    overhead=round(noisy / vanilla - 1, 4), noise_calls=len(inside),
                                    noise_cpu_ms_per_step=round(sum(inside) * 1e3, 1),
                                    noise_cpu_fraction=round(sum(inside) * 1e3 / vanilla, 4))
