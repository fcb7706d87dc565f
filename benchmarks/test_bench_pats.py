"""Benchmarks: one optimizer step on BERT-base (110M) and BERT-large (335M) parameter sets, and NoisyTune.

    pytest benchmarks/test_bench_pats.py                       # on a GPU: the real sizes
    pytest benchmarks/test_bench_pats.py --benchmark-json out.json

Cases (random weights from the configs, random gradients, float32, the paper's param groups):

* ``pats-fused``: :class:`fusednoise.optim.PATSAdamax` on the Triton backend (two launches per step);
* ``pats-fused-capturable``: the same with ``capturable=True`` (step counts on the GPU, a one-warp launch deriving
  each step's bias correction and noise key, no per-step table copy), run eagerly;
* ``pats-fused-graph``: that step captured in a CUDA graph once, then timed as ``graph.replay()``;
* ``pats-eager``: the same step written per tensor in plain torch (torch's own RNG), what one would write
  without fusednoise;
* ``adamax-foreach``: ``torch.optim.Adamax(foreach=True)`` (no noise: the floor for an Adamax step);
* ``adamw-fused``: ``torch.optim.AdamW(fused=True)``, the usual fine-tuning step;
* ``noisytune-fused`` / ``noisytune-eager``: :func:`fusednoise.noisytune.perturb_` vs the paper's loop.

Each records in ``extra_info`` the bytes the method must move (PATS: 48 per float32 element of a noise tensor
(pass 1 reads theta, g, s~ and writes s~; pass 2 reads theta, g, m, u, s~ and writes theta, m, u) and 28 per
element of the others; Adamax/AdamW: 28; NoisyTune: 12), the achieved bandwidth (bytes / median time), the
device's copy bandwidth measured here (``dst.copy_(src)`` on 1 GiB) and their ratio. The target for the fused
exact step is >= 0.85 of the copy roofline on a GPU; these are measurements, not timed assertions.

Without a GPU the full-size cases skip ("needs a CUDA GPU") and the CPU cases time the eager reference
against torch's Adamax on a tiny BERT, which checks that the suite runs; CPU timings are not the point.
Self-contained on purpose (no shared conftest).
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers

import fusednoise
from benchutil import measure_copy_bandwidth_gbps, record_bandwidth
from fusednoise.noisytune import perturb_
from fusednoise.optim import PATSAdamax, pats_param_groups

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

CONFIGS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 vocab_size=1000),
    "bert-base": dict(),  # BertConfig's defaults are BERT-base: 768 hidden, 12 layers, 30522 vocab
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PATS_KW = dict(lr=1e-4, sensitivity_beta=0.75, noise_lambda=2e-6, gamma=2e-3, noise_prob=0.2)


# ------------------------------------------------------------------------------------------------ helpers
def _param_set(size: str, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIGS[size]))
    gen = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, device=device, generator=gen)
    return model


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _record(benchmark, device, n_bytes, elements):
    # The copy-bandwidth roofline of the device the case ran on, measured once per session by benchutil.
    record_bandwidth(benchmark, n_bytes, measure_copy_bandwidth_gbps(device), elements=elements)


def _pats_bytes(groups):
    noisy = sum(p.numel() for g in groups if g["noise"] for p in g["params"])
    quiet = sum(p.numel() for g in groups if not g["noise"] for p in g["params"])
    return 48 * noisy + 28 * quiet, noisy + quiet


@torch.no_grad()
def _eager_pats_step(groups, state, step, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, beta=0.75, lam=2e-6,
                     gamma=2e-3, p=0.2, noise_eps=1e-8):
    """PATS-Adamax written per tensor in plain torch: what one writes without a fused kernel."""
    beta1, beta2 = betas
    clr = lr / (1 - beta1**step)
    for group in groups:
        for theta in group["params"]:
            g = theta.grad
            st = state.setdefault(theta, {})
            if not st:
                st["m"], st["u"] = torch.zeros_like(theta), torch.zeros_like(theta)
                if group["noise"]:
                    st["s"] = torch.zeros_like(theta)
            if group["noise"]:
                st["s"].mul_(beta).add_((theta * g).abs_(), alpha=1 - beta)
            st["m"].lerp_(g, 1 - beta1)
            torch.maximum(st["u"].mul_(beta2), g.abs().add_(eps), out=st["u"])
            theta.addcdiv_(st["m"], st["u"], value=-clr)
            if group["noise"]:
                s = st["s"]
                r = (s.mean() / (s + noise_eps) - gamma).clamp_(min=0).mul_(lam)
                noise = torch.randn_like(theta).mul_(r.sqrt_())
                theta.add_(noise.mul_(torch.rand_like(theta) < p))


def _noisytune_eager(model, lam=0.15):
    with torch.no_grad():
        for _, para in model.named_parameters():
            para.add_((torch.rand_like(para) - 0.5) * lam * torch.std(para))


def _captured(step):
    """``step`` captured in a CUDA graph after one eager warm-up step on a side stream (the gradients are static
    tensors): returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _run(benchmark, fn, device, rounds):
    def once():
        fn()
        _sync(device)

    benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=2 if device == "cuda" else 1)


# ------------------------------------------------------------------------------------------------ cases
@pytest.fixture(scope="module")
def param_sets():
    cache = {}

    def get(size, device):
        key = (size, device)
        if key not in cache:
            cache.clear()  # one size at a time on the device
            if device == "cuda":
                torch.cuda.empty_cache()
            cache[key] = _param_set(size, device)
        return cache[key]

    yield get
    cache.clear()


OPTIMIZERS = ["pats-fused", "pats-fused-capturable", "pats-fused-graph", "pats-eager", "adamax-foreach",
              "adamw-fused"]
GPU_SIZES = [pytest.param(s, marks=needs_cuda) for s in ("bert-base", "bert-large")]


def _optimizer_case(benchmark, param_sets, size, device, case, rounds):
    model = param_sets(size, device)
    groups = pats_param_groups(model)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if case in ("pats-fused", "pats-reference", "pats-fused-capturable", "pats-fused-graph"):
        opt = PATSAdamax(groups, seed=0, capturable=case in ("pats-fused-capturable", "pats-fused-graph"), **PATS_KW)
        backend = "reference" if case == "pats-reference" else "auto"

        def fn():
            with fusednoise.backend(backend):
                opt.step()

        if case == "pats-fused-graph":
            fn = _captured(fn)
        n_bytes, _ = _pats_bytes(groups)
    elif case == "pats-eager":
        state, counter = {}, [0]

        def fn():
            counter[0] += 1
            _eager_pats_step(groups, state, counter[0])

        n_bytes, _ = _pats_bytes(groups)
    elif case == "adamax-foreach":
        opt = torch.optim.Adamax(params, lr=1e-4, foreach=True)
        fn, n_bytes = opt.step, 28 * n
    elif case == "adamax":
        opt = torch.optim.Adamax(params, lr=1e-4, foreach=False)
        fn, n_bytes = opt.step, 28 * n
    elif case == "adamw-fused":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        fn, n_bytes = opt.step, 28 * n
    else:
        raise AssertionError(case)
    before = params[-1].detach().clone()
    _run(benchmark, fn, device, rounds)
    assert not torch.equal(params[-1], before)  # the step did update the parameters
    _record(benchmark, device, n_bytes, n)


@pytest.mark.parametrize("size", GPU_SIZES)
@pytest.mark.parametrize("case", OPTIMIZERS)
def test_optimizer_step_gpu(benchmark, param_sets, size, case):
    benchmark.group = f"optimizer-step-{size}"
    _optimizer_case(benchmark, param_sets, size, "cuda", case, rounds=20)


@pytest.mark.parametrize("case", ["pats-reference", "pats-eager", "adamax"])
def test_optimizer_step_cpu_tiny(benchmark, param_sets, case):
    benchmark.group = "optimizer-step-tiny-cpu"
    _optimizer_case(benchmark, param_sets, "tiny", "cpu", case, rounds=3)


def _noisytune_case(benchmark, param_sets, size, device, case, rounds):
    model = param_sets(size, device)
    n = sum(p.numel() for p in model.parameters())
    if case == "noisytune-eager":
        fn = lambda: _noisytune_eager(model)  # noqa: E731
    else:
        backend = "auto" if case == "noisytune-fused" else "reference"

        def fn():
            with fusednoise.backend(backend):
                report = perturb_(model, noise_lambda=0.15, seed=0)
            assert report.n_perturbed > 0

    _run(benchmark, fn, device, rounds)
    _record(benchmark, device, 12 * n, n)
    # perturbing repeatedly grows the weights' spread slowly; the sets are rebuilt per size anyway
    assert all(math.isfinite(p.detach().float().std().item()) for p in model.parameters() if p.numel() > 1)


@pytest.mark.parametrize("size", GPU_SIZES)
@pytest.mark.parametrize("case", ["noisytune-fused", "noisytune-eager"])
def test_noisytune_gpu(benchmark, param_sets, size, case):
    benchmark.group = f"noisytune-{size}"
    _noisytune_case(benchmark, param_sets, size, "cuda", case, rounds=10)


@pytest.mark.parametrize("case", ["noisytune-reference", "noisytune-eager"])
def test_noisytune_cpu_tiny(benchmark, param_sets, case):
    benchmark.group = "noisytune-tiny-cpu"
    _noisytune_case(benchmark, param_sets, "tiny", "cpu", case, rounds=3)
