"""Shared helpers for the pytest-benchmark suites (``from benchutil import ...``).

Every suite times fused vs eager vs ``torch.compile``d eager on the same inputs in one run and stores the
achieved bandwidth (bytes each variant must move / median time) next to the device's measured copy bandwidth
in ``benchmark.extra_info``, so the JSON written by ``--benchmark-json`` carries the roofline comparison.

On CUDA every timed call ends with a synchronise. Without a GPU the suites run small CPU cases (CPU reference
mode) and skip the GPU shapes with the reason "needs a CUDA GPU".
"""
import functools
import os
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Kernels on CPU tensors only run under Triton's interpreter; it must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (timings only count from a GPU)")


cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU reference-mode case: the GPU shapes run instead")


def shape_dtype_variant_cases(gpu_shapes: dict, cpu_shapes: dict, dtype_names, variants):
    """``pytest.param(shape_name, shape, dtype_name, variant)`` for every GPU shape x dtype x variant (skipped
    without CUDA) and every small CPU shape x variant in fp32 (skipped with CUDA). On CPU "fused" means the
    reference backend: the price of CPU reference mode, not a kernel timing."""
    cases = []
    for shape_name, shape in gpu_shapes.items():
        for dtype_name in dtype_names:
            for variant in variants:
                cases.append(pytest.param(shape_name, shape, dtype_name, variant, marks=needs_cuda,
                                          id=f"{shape_name}-{dtype_name}-{variant}"))
    for shape_name, shape in cpu_shapes.items():
        for variant in variants:
            cases.append(pytest.param(shape_name, shape, "fp32", variant, marks=cpu_only,
                                      id=f"cpu-{shape_name}-fp32-{variant}"))
    return cases


def synchronize():
    if HAS_CUDA:
        torch.cuda.synchronize()


def timed(fn):
    """Wrap ``fn`` so each benchmarked call waits for the device to finish."""
    def call():
        result = fn()
        synchronize()
        return result
    return call


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else "cpu"


@functools.lru_cache(maxsize=None)
def measure_copy_bandwidth_gbps(device: str = DEVICE) -> float:
    """Measured copy bandwidth of ``device`` in GB/s (read + write bytes / time): the roofline."""
    on_cuda = device.startswith("cuda")
    numel = (256 if on_cuda else 16) * 2**20
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize()
    repeats = 20 if on_cuda else 5
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def record_bandwidth(benchmark, bytes_moved: int, copy_gbps: float, **info):
    """Store bytes, achieved GB/s and the fraction of the copy roofline in the benchmark's JSON."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = device_name()
    benchmark.extra_info["bytes_moved"] = int(bytes_moved)
    benchmark.extra_info["copy_GBps"] = round(copy_gbps, 1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        seconds = stats.stats.median
        achieved = bytes_moved / seconds / 1e9
        benchmark.extra_info["achieved_GBps"] = round(achieved, 1)
        benchmark.extra_info["fraction_of_copy"] = round(achieved / copy_gbps, 3)


# Whole-model training steps: BERT-base on a GPU, a tiny BERT in CPU reference mode (random weights from a config).
BERT_SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    # all-MiniLM-L6-v2's shape (22.7M parameters with BERT's vocabulary): fusednoise check's model
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def bert_classifier(size: str):
    """A ``BertForSequenceClassification`` of ``size`` (a key of ``BERT_SIZES``) on ``DEVICE``, in train mode."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**BERT_SIZES[size])
    config._attn_implementation = "sdpa"
    return BertForSequenceClassification(config).to(DEVICE).train()


def classification_step(model, optimizer, batch: int, seq: int):
    """One forward + backward + ``optimizer`` step of a sequence classifier on fixed random token ids, as a
    closure returning the loss (float32, detached)."""
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
    labels = torch.randint(0, 2, (batch,), device=DEVICE)

    def step():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    return step


def bench_training_step(benchmark, step, **info):
    """Time ``step`` (one optimizer step; called once first, untimed, to build caches and optimizer state) and
    store ``info``, the device and, on CUDA, the peak memory of the timed steps in the benchmark's JSON."""
    first = step()
    if isinstance(first, torch.Tensor):
        assert torch.isfinite(first).all(), "the first training step produced a non-finite loss"
    synchronize()
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed(step), rounds=10 if HAS_CUDA else 2, iterations=1, warmup_rounds=1 if HAS_CUDA else 0)
    benchmark.extra_info.update(info, device=device_name())
    if HAS_CUDA:
        benchmark.extra_info["peak_memory_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
