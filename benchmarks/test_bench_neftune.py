"""NEFTune noise on a padded batch of embeddings: the fused op vs the eager mask-aware version vs torch.compile of
it, and transformers' built-in hook (padded-length scale, noise on the padding too: less work, other math).

    pytest benchmarks/test_bench_neftune.py --benchmark-json benchmarks/results/neftune-<device>.json

Bytes each variant must move: one read and one write of the embeddings, plus the (B, T) int64 mask. The eager
versions also write and read a noise tensor (the built-in: ``zeros_like``, ``uniform_``, then the add).
"""
import math

import pytest
import torch

import fusednoise
from benchutil import (DEVICE, HAS_CUDA, record_bandwidth, shape_dtype_variant_cases, synchronize, timed)

ALPHA = 5.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_SHAPES = {"llama-7b": (8, 2048, 4096), "sft-batch": (32, 512, 4096)}
CPU_SHAPES = {"small": (4, 64, 256)}


def eager_neftune(x, mask, alpha=ALPHA):
    """The method in plain torch: per-example length from the mask, padded positions untouched."""
    lengths = mask.sum(dim=1, keepdim=True).to(torch.float32)
    scale = torch.where(lengths > 0, alpha / torch.sqrt(lengths * x.shape[-1]), torch.zeros_like(lengths))
    noise = torch.empty_like(x, dtype=torch.float32).uniform_(-1, 1) * scale[:, :, None]
    return torch.where(mask[:, :, None] != 0, (x.to(torch.float32) + noise).to(x.dtype), x)


def builtin_neftune(x, mask, alpha=ALPHA):
    """transformers' neftune_post_forward_hook: the padded length T for every example, the mask unused."""
    magnitude = alpha / torch.sqrt(torch.tensor(x.size(1) * x.size(2)))
    return x + torch.zeros_like(x).uniform_(-magnitude, magnitude)


_compiled = None


def compiled_neftune(x, mask):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_neftune, fullgraph=True)
    return _compiled(x, mask)


def fused_neftune(x, mask):
    return fusednoise.add_neftune_noise(x, ALPHA, mask)


VARIANTS = {"fused": fused_neftune, "eager": eager_neftune, "compile": compiled_neftune, "builtin": builtin_neftune}


def padded_mask(batch, tokens):
    """Lengths spread over [T/4, T], as an instruction-tuning batch padded to its longest example."""
    lengths = torch.linspace(tokens // 4, tokens, batch).round().long()
    return (torch.arange(tokens)[None, :] < lengths[:, None]).long().to(DEVICE)


@pytest.mark.parametrize("shape_name, shape, dtype_name, variant",
                         shape_dtype_variant_cases(GPU_SHAPES, CPU_SHAPES, DTYPES, VARIANTS))
def test_neftune_noise(benchmark, copy_bandwidth_gbps, shape_name, shape, dtype_name, variant):
    benchmark.group = f"neftune {shape_name} {dtype_name}"
    x = torch.randn(shape, device=DEVICE).to(DTYPES[dtype_name])
    mask = padded_mask(shape[0], shape[1])
    fn = VARIANTS[variant]
    out = fn(x, mask)  # warm-up: compiles the kernel / the graph
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    if variant != "builtin":  # every mask-aware variant leaves the padding untouched
        assert torch.equal(out[mask == 0], x[mask == 0])
    synchronize()
    benchmark.pedantic(timed(lambda: fn(x, mask)), rounds=20 if HAS_CUDA else 3, iterations=5 if HAS_CUDA else 1,
                       warmup_rounds=2 if HAS_CUDA else 0)
    record_bandwidth(benchmark, 2 * x.numel() * x.element_size() + mask.numel() * mask.element_size(),
                     copy_bandwidth_gbps, shape=list(shape), dtype=dtype_name, variant=variant,
                     mean_length=float(mask.sum(dim=1).float().mean()), alpha=ALPHA,
                     noise_scale_first_example=ALPHA / math.sqrt(int(mask[0].sum()) * shape[2]))
