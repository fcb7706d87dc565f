"""One transformer layer, forward + backward: Hugging Face eager, fused norms, fused norms + HyPe, hook HyPe, and
(on CUDA) ``torch.compile`` of each; the bytes each variant moves in its residual adds, norms and noise
(``layer_bytes.py``, computed) stored beside the time.

    pytest benchmarks/test_bench_fused_layers.py --benchmark-json benchmarks/results/fused-layers-<device>.json

Layers: a LLaMA-7B-width decoder layer (hidden 4096, bf16, 8 x 2048 tokens) and a BERT-base layer (hidden 768,
32 x 128 tokens, bf16) on a GPU; tiny ones on CPU (a smoke test of the variants: ``--benchmark-disable``).
"fused + HyPe" is a middle layer in steady state: its output carries the next layer's noise, as in a model
patched by ``hype.apply(fused=True)``; "hook HyPe" adds the layer's own input noise through the hook, as
``hype.apply()`` does. Both use sigma = 1e-5 with seeds drawn per call.
"""
import pytest
import torch

from benchutil import DEVICE, HAS_CUDA, needs_cuda, synchronize, timed
from fusednoise import fused, hype
from layer_bytes import bytes_per_layer

SIGMA = 1e-5
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
VARIANTS = ("hf-eager", "fused", "fused-hype", "hook-hype")
SHAPES = {  # family: (batch, tokens, config kwargs)
    "llama": (8, 2048, dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                            num_key_value_heads=32)) if HAS_CUDA else
             (2, 16, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)),
    "bert": (32, 128, dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)) if HAS_CUDA else
            (2, 16, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)),
}


class _NoiseSettings:
    """What a NoiseSource reads from its HyPe handle."""
    sigma, distribution, rounding, seed = SIGMA, "normal", "nearest", None


def _layer(family: str):
    import transformers as hf

    batch, tokens, kwargs = SHAPES[family]
    torch.manual_seed(0)
    if family == "llama":
        config = hf.LlamaConfig(num_hidden_layers=1, **kwargs)
        config._attn_implementation = "sdpa"
        layer = hf.models.llama.modeling_llama.LlamaDecoderLayer(config, 0)
        rotary = hf.models.llama.modeling_llama.LlamaRotaryEmbedding(config).to(DEVICE)
    else:
        config = hf.BertConfig(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               **kwargs)
        config._attn_implementation = "sdpa"
        layer = hf.models.bert.modeling_bert.BertLayer(config)
        rotary = None
    layer = layer.to(DEVICE, DTYPE).train()
    x = torch.randn(batch, tokens, config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)
    kwargs = {}
    if rotary is not None:
        position_ids = torch.arange(tokens, device=DEVICE)[None].expand(batch, -1)
        kwargs = dict(position_embeddings=rotary(x, position_ids), position_ids=position_ids)
    return layer, x, kwargs, config.hidden_size, batch * tokens


def _apply_variant(layer, variant: str):
    """The patch / hooks of ``variant`` on ``layer``; returns what undoes them."""
    if variant == "hf-eager":
        return None
    if variant == "hook-hype":
        return hype.apply(layer, sigma=SIGMA, layers=[layer])
    sources = {}
    if variant == "fused-hype":
        sources[id(layer)] = fused.NoiseSource(_NoiseSettings(), 0, layer, layer)
    return fused.FusedNorms(layer, [layer], sources)


def _cases():
    cases = []
    for family in SHAPES:
        for variant in VARIANTS:
            for compiled in (False, True):
                marks = [needs_cuda] if compiled else []
                cases.append(pytest.param(family, variant, compiled, marks=marks,
                                          id=f"{family}-{variant}{'-compile' if compiled else ''}"))
    return cases


@pytest.mark.parametrize("family, variant, compiled", _cases())
def test_layer_forward_backward(benchmark, family, variant, compiled):
    benchmark.group = f"fused-layer {family}"
    layer, x, kwargs, hidden, tokens = _layer(family)
    patch = _apply_variant(layer, variant)
    run_layer = torch.compile(layer) if compiled else layer
    grad = torch.randn_like(x)

    def step():
        out = run_layer(x, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    try:
        step()  # warm-up: compiles the kernels / the graph
        synchronize()
        benchmark.pedantic(timed(step), rounds=10 if HAS_CUDA else 2, iterations=1,
                           warmup_rounds=2 if HAS_CUDA else 0)
    finally:
        if patch is not None:
            patch.remove()
    moved = bytes_per_layer("pre_ln" if family == "llama" else "post_ln", variant, tokens, hidden,
                            x.element_size())
    benchmark.extra_info.update(family=family, variant=variant, compiled=compiled, dtype=str(DTYPE),
                                tokens=tokens, hidden=hidden, norm_bytes_forward=moved["forward"],
                                norm_bytes_backward=moved["backward"],
                                device=torch.cuda.get_device_name() if HAS_CUDA else "cpu")
