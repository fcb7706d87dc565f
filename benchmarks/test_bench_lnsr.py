"""LNSR: the fused layer-wise diff norm (forward + backward) vs an eager Python loop vs ``torch.compile`` of that
loop, and a whole BERT training step: vanilla vs HyPe vs LNSR (fused, eager, batched 2B), time and peak memory.

    pytest benchmarks/test_bench_lnsr.py --benchmark-json benchmarks/results/lnsr-<device>.json

Bytes the diff norm must move, forward + backward: read clean and noisy (forward), read them again and write both
gradients (backward): ``6 * L * B * T * D * itemsize``. The row weights (B * T floats) are negligible.

Without a GPU the GPU shapes are skipped ("needs a CUDA GPU") and tiny CPU cases run; there "fused" is CPU reference
mode (the eager references), so those numbers only show that the suite runs, not kernel speed.
"""
import pytest
import torch

import fusednoise
from benchutil import (DEVICE, HAS_CUDA, bench_training_step, bert_classifier, cpu_only, needs_cuda, record_bandwidth,
                       shape_dtype_variant_cases, synchronize, timed)
from fusednoise import hype, lnsr

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (L, B, T, D): every layer output of BERT-base / BERT-large at batch 32, sequence 128.
GPU_SHAPES = {"bert-base": (12, 32, 128, 768), "bert-large": (24, 32, 128, 1024)}
CPU_SHAPES = {"tiny": (2, 2, 16, 64)}


def eager_diff_norm(clean, noisy, mask):
    """The loop LNSR implementations write: sub, pow, sum per layer, float32 accumulation."""
    keep = mask.to(torch.float32)[..., None]
    total = 0.0
    for c, n in zip(clean, noisy):
        total = total + ((c.float() - n.float()).pow(2) * keep).sum() / c.shape[0]
    return total


def fused_diff_norm(clean, noisy, mask):
    return lnsr.layerwise_diff_norm(clean, noisy, mask=mask, reduction="sum")  # the loop above: a sum per example


_compiled = {}


def compiled_diff_norm(clean, noisy, mask):
    key = len(clean)
    if key not in _compiled:
        _compiled[key] = torch.compile(eager_diff_norm)
    return _compiled[key](clean, noisy, mask)


VARIANTS = {"fused": fused_diff_norm, "eager": eager_diff_norm, "compile": compiled_diff_norm}


@pytest.mark.parametrize("shape_name, shape, dtype_name, variant",
                         shape_dtype_variant_cases(GPU_SHAPES, CPU_SHAPES, DTYPES, VARIANTS))
def test_diff_norm_forward_backward(benchmark, copy_bandwidth_gbps, shape_name, shape, dtype_name, variant):
    benchmark.group = f"lnsr-diff-norm {shape_name} {dtype_name}"
    L, B, T, D = shape
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    clean = [torch.randn(B, T, D, device=DEVICE).to(dtype).requires_grad_() for _ in range(L)]
    noisy = [(c.detach().float() + 0.05 * torch.randn_like(c, dtype=torch.float32)).to(dtype).requires_grad_()
             for c in clean]
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[: B // 2, T - T // 4:] = 0  # some padding, as real batches have
    fn = VARIANTS[variant]

    def step():
        loss = fn(clean, noisy, mask)
        return torch.autograd.grad(loss, clean + noisy)  # no .grad accumulation inside the timing

    grads = step()  # warm-up: compiles the kernels / the graph
    synchronize()
    # Every variant computes the same penalty and gradients.
    reference = torch.autograd.grad(eager_diff_norm(clean, noisy, mask), clean + noisy)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(grads[:2], reference[:2]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    benchmark.pedantic(timed(step), rounds=20 if HAS_CUDA else 3, iterations=5 if HAS_CUDA else 1,
                       warmup_rounds=2 if HAS_CUDA else 0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    record_bandwidth(benchmark, 6 * L * B * T * D * itemsize, copy_bandwidth_gbps,
                     shape=list(shape), dtype=dtype_name, variant=variant)


# --------------------------------------------------------------------------------------------- training step
METHODS = ("vanilla", "hype", "lnsr-fused", "lnsr-eager", "lnsr-batched")


@pytest.mark.parametrize("size, batch, seq", [
    pytest.param("bert-base", 32, 128, marks=needs_cuda, id="bert-base"),
    pytest.param("bert-tiny", 2, 32, marks=cpu_only, id="cpu-bert-tiny"),
])
@pytest.mark.parametrize("method", METHODS)
def test_bert_training_step(benchmark, size, batch, seq, method):
    """Forward + backward + AdamW step; LNSR adds the noisy pass and the penalty (standard noise, b = 0)."""
    benchmark.group = f"lnsr-train-step {size}"
    torch.manual_seed(0)
    model = bert_classifier(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=HAS_CUDA)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
    attention_mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    attention_mask[: batch // 2, seq - seq // 4:] = 0
    labels = torch.randint(0, 2, (batch,), device=DEVICE)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    handle = hype.apply(model, sigma=1e-5) if method == "hype" else None
    reg = lnsr.LNSR(model, batched=method == "lnsr-batched") if method.startswith("lnsr") else None
    backend = "reference" if method == "lnsr-eager" else fusednoise.get_backend()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=HAS_CUDA)

    def step():
        with fusednoise.backend(backend), autocast:
            if reg is None:
                loss = model(**inputs).loss
            else:
                outputs, penalty = reg(**inputs)
                loss = outputs.loss + penalty
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    bench_training_step(benchmark, step, method=method, batch=batch, seq=seq)
    if handle is not None:
        handle.remove()
