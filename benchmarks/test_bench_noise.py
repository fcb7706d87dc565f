"""HyPe noise: fused in-place kernel vs eager ``x.add_(torch.randn_like(x) * sigma)`` vs torch.compile of it,
and a whole BERT training step with and without HyPe.

    pytest benchmarks/test_bench_noise.py --benchmark-json benchmarks/results/noise-<device>.json

Bytes moved by the in-place noise: one read and one write of x. The eager version moves more (it writes and
reads a noise tensor and a scaled copy); the roofline for all three is the copy bandwidth for 2 * x.nbytes.
"""
import pytest
import torch

import fusednoise
from benchutil import (DEVICE, HAS_CUDA, bench_training_step, bert_classifier, cpu_only, needs_cuda, record_bandwidth,
                       shape_dtype_variant_cases, synchronize, timed)

SIGMA = 1e-5
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_SHAPES = {"bert-large": (32, 128, 1024), "llm": (8, 2048, 4096)}
CPU_SHAPES = {"small": (4, 64, 256)}


def eager_noise_(x, sigma=SIGMA):
    return x.add_(torch.randn_like(x) * sigma)


_compiled_noise = None


def compiled_noise_(x):
    global _compiled_noise
    if _compiled_noise is None:
        _compiled_noise = torch.compile(eager_noise_, fullgraph=True)
    return _compiled_noise(x)


def fused_noise_(x):
    return fusednoise.add_noise_(x, SIGMA)


VARIANTS = {"fused": fused_noise_, "eager": eager_noise_, "compile": compiled_noise_}


@pytest.mark.parametrize("shape_name, shape, dtype_name, variant",
                         shape_dtype_variant_cases(GPU_SHAPES, CPU_SHAPES, DTYPES, VARIANTS))
def test_hype_noise(benchmark, copy_bandwidth_gbps, shape_name, shape, dtype_name, variant):
    benchmark.group = f"hype-noise {shape_name} {dtype_name}"
    x = torch.randn(shape, device=DEVICE).to(DTYPES[dtype_name])
    fn = VARIANTS[variant]
    fn(x)  # warm-up: compiles the kernel / the graph
    synchronize()
    benchmark.pedantic(timed(lambda: fn(x)), rounds=20 if HAS_CUDA else 3, iterations=5 if HAS_CUDA else 1,
                       warmup_rounds=2 if HAS_CUDA else 0)
    record_bandwidth(benchmark, 2 * x.numel() * x.element_size(), copy_bandwidth_gbps,
                     shape=list(shape), dtype=dtype_name, variant=variant)


@pytest.mark.parametrize("size, batch, seq", [
    pytest.param("bert-base", 32, 128, marks=needs_cuda, id="bert-base"),
    pytest.param("bert-tiny", 4, 64, id="cpu-bert-tiny", marks=cpu_only),
])
@pytest.mark.parametrize("method", ["vanilla", "hype-n"])
def test_bert_training_step(benchmark, size, batch, seq, method):
    """A full forward + backward + AdamW step, with and without HyPe hooks (random weights from a config)."""
    from fusednoise import hype

    benchmark.group = f"train-step {size}"
    torch.manual_seed(0)
    model = bert_classifier(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=HAS_CUDA)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
    labels = torch.randint(0, 2, (batch,), device=DEVICE)
    handle = hype.apply(model, sigma=SIGMA) if method == "hype-n" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=HAS_CUDA)

    def step():
        with autocast:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bench_training_step(benchmark, step, method=method, batch=batch, seq=seq)
    if handle is not None:
        handle.remove()
