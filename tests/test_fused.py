"""Fused norm patches (``fusednoise.fuse_norms``, ``hype.apply(fused=...)``) on tiny random models of every
family they know: the patched layers compute what the unpatched ones do (this is the test that catches a
``transformers`` release whose layer forward changed structure), and fused HyPe adds the hook path's noise."""
import types
import warnings

import pytest
import torch
from torch import nn

import fusednoise
from fusednoise import hype
import test_layers
from test_layers import main_output

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "bert", "roberta", "electra"]
PRE_LN = ("llama", "mistral", "qwen2", "gemma")
# Gemma's (1 + w) RMSNorm is fused exactly in float32 only (add_rms_norm's unit_offset): bf16 Gemma is refused
CASES = [(name, dtype) for dtype in (torch.float32, torch.bfloat16) for name in FAMILIES
         if not (name == "gemma" and dtype != torch.float32)]


def build_model(name):
    """test_layers' tiny models, and a tiny Gemma (test_layers' LLaMA config; head_dim 8, not Gemma's 256)."""
    if name != "gemma":
        return test_layers.build_model(name)
    import transformers

    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=test_layers.VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    return transformers.GemmaForCausalLM(config).train()


def model_inputs(name):
    return test_layers.model_inputs("llama" if name == "gemma" else name)  # a decoder's inputs


def run(model, name, seed=0, call=None):
    """Output and parameter gradients of one training step's loss (``call``: what runs the model, default it)."""
    torch.manual_seed(seed)
    output = main_output((call if call is not None else model)(**model_inputs(name)))
    output.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return output.detach(), grads


def assert_same_step(a, b, dtype):
    (out_a, grads_a), (out_b, grads_b) = a, b
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = out_a.abs().max()
    assert bool(((out_a.float() - out_b.float()).abs() <= rtol * scale).all()), float((out_a - out_b).abs().max())
    assert grads_a.keys() == grads_b.keys()
    # Relative to the largest gradient: a few parameters (attention key biases) have exactly-zero gradients in
    # theory and float noise in practice.
    scale = max(g.abs().max() for g in grads_a.values())
    for key in grads_a:
        difference = (grads_a[key].float() - grads_b[key].float()).abs().max()
        assert difference <= rtol * max(grads_a[key].abs().max(), 1e-3 * scale), (key, float(difference))


def build(name, dtype):
    """``build_model(name)`` in ``dtype``; in float32 with random norm weights and biases: the models start with
    LayerNorm / RMSNorm weights of 1 (Gemma's of 0, for 1 + w) and biases of 0, which a patch dropping them would
    not show. (In bfloat16 the eager layers round their smallest gradients, the LayerNorm biases', a few percent
    away from the fused ops' float32 sums once the weights are random: beyond the tolerance, not a bug.)"""
    model = build_model(name)
    if dtype == torch.float32:
        with torch.no_grad():
            for module in model.modules():
                if "Norm" in type(module).__name__:
                    for parameter in module.parameters(recurse=False):
                        parameter.add_(0.2 * torch.randn_like(parameter))
    return model.to(dtype)


# ---------------------------------------------------------------------------------- fuse_norms
@pytest.mark.parametrize("name, dtype", CASES)
def test_fused_layers_compute_what_the_unpatched_layers_do(name, dtype):
    model = build(name, dtype)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    unpatched = run(model, name)
    with fusednoise.fuse_norms(model) as patch:
        assert len(patch.layers) == 2 and patch.modules
        assert list(model.state_dict()) == list(keys)  # no parameter or state_dict key changes
        patched = run(model, name)
    assert_same_step(unpatched, patched, dtype)
    assert all("forward" not in module.__dict__ for module in model.modules())  # remove() restores
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())


def test_fuse_norms_refuses_unknown_architectures_by_name():
    with pytest.raises(ValueError, match="GPT2Block"):
        fusednoise.fuse_norms(build_model("gpt2"))


def test_a_norm_whose_forward_another_library_replaced_is_refused_naming_it():
    # (Liger-Kernel's replacement is recognised by its attributes: tests/test_fused_liger.py)
    model = build_model("llama")
    norm = model.model.layers[1].post_attention_layernorm
    norm.forward = types.MethodType(lambda self, x: x * self.weight, norm)  # another library's instance patch
    with pytest.raises(ValueError, match="post_attention_layernorm is LlamaRMSNorm whose forward was replaced by"):
        fusednoise.fuse_norms(model)


def test_a_layer_with_another_norm_is_refused_by_name():
    # A model whose norms were replaced by a class the patches do not know is not patched.
    class OtherRMSNorm(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x * self.weight

    model = build_model("llama")
    model.model.layers[1].input_layernorm = OtherRMSNorm(model.model.layers[1].input_layernorm.weight)
    with pytest.raises(ValueError, match="OtherRMSNorm"):
        fusednoise.fuse_norms(model)
    with pytest.raises(ValueError, match="OtherRMSNorm"):
        hype.apply(model, fused=True)
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemma_in_half_precision_is_refused_saying_why(dtype):
    # GemmaRMSNorm: (x.float() * rstd * (1 + w.float())).type_as(x), one rounding; the op rounds x * rstd to the
    # model's dtype before the weight (LLaMA's order): about a quarter of bf16 outputs would be 1 ulp off.
    model = build("gemma", dtype)
    why = f"GemmaRMSNorm in {dtype}: Gemma multiplies by \\(1 \\+ w\\) in float32 and rounds once"
    for patch in (fusednoise.fuse_norms, lambda m: hype.apply(m, fused=True)):
        with pytest.raises(ValueError, match=why):
            patch(model)
    with pytest.warns(UserWarning, match="falling back to HyPe's hooks"):
        hype.apply(model, fused="auto").remove()
    assert all("forward" not in module.__dict__ and not module._forward_pre_hooks for module in model.modules())
    # cast after patching: the op refuses the half-precision hidden states, naming Gemma's arithmetic
    model = build("gemma", torch.float32)
    with fusednoise.fuse_norms(model):
        with pytest.raises(TypeError, match="Gemma's x \\* \\(1 \\+ w\\)"):
            model.to(dtype)(**model_inputs("gemma"))


def test_patching_twice_is_refused_and_the_first_patch_stays():
    model = build_model("bert")
    patch = fusednoise.fuse_norms(model)
    with pytest.raises(ValueError, match="already fused"):
        fusednoise.fuse_norms(model)
    assert "forward" in model.bert.encoder.layer[0].output.__dict__
    patch.remove()
    patch.remove()
    assert "forward" not in model.bert.encoder.layer[0].output.__dict__


def test_works_inside_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_model("llama"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, parameter in model.named_parameters():  # LoRA's B starts at 0: make the adapters matter
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    unpatched = run(model, "llama")
    with hype.apply(model, sigma=0.0, fused=True) as handle:
        assert len(handle.fused_layers) == 2
        patched = run(model, "llama")
    assert_same_step(unpatched, patched, torch.float32)
    assert any("lora" in key for key in patched[1])


# ---------------------------------------------------------------------------------- fused HyPe
@pytest.mark.parametrize("name, dtype", CASES)
def test_fused_hype_adds_the_hook_paths_noise(name, dtype):
    model = build(name, dtype)
    clean = run(model, name)
    with hype.apply(model, sigma=0.05, seed=5, rounding="stochastic") as handle:
        hooked = run(model, name)
        hook_calls = handle.state_dict()
    with hype.apply(model, sigma=0.05, seed=5, rounding="stochastic", fused=True) as handle:
        fused = run(model, name)
        assert handle.state_dict() == hook_calls  # the same per-layer call counters, so the same seeds
        layers = handle.layers
        # pre-LN: the first layer's input norm adds its noise; post-LN layers start with attention: a hook
        expected_hooked = [] if name in PRE_LN else layers[:1]
        assert handle.fused_layers == layers and handle.hooked_layers == expected_hooked
    assert not torch.equal(clean[0], hooked[0])
    assert_same_step(hooked, fused, dtype)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_fused_hype_with_drawn_seeds_matches_the_hook_path_and_is_off_in_eval(name):
    model = build_model(name)
    with hype.apply(model, sigma=0.05) as handle:
        hooked = run(model, name, seed=3)
    with hype.apply(model, sigma=0.05, fused="auto") as handle:
        fused = run(model, name, seed=3)
        model.eval()
        with torch.no_grad():
            evaluated = main_output(model(**model_inputs(name)))
        model.train()
    assert_same_step(hooked, fused, torch.float32)
    model.eval()
    with torch.no_grad():  # eval: no noise (the fused LayerNorm sums in another order: float32 ulps only)
        torch.testing.assert_close(evaluated, main_output(model(**model_inputs(name))), rtol=1e-6, atol=1e-7)


def test_fused_true_on_an_unknown_architecture_raises_and_auto_falls_back_to_hooks():
    model = build_model("gpt2")
    with pytest.raises(ValueError, match="GPT2Block"):
        hype.apply(model, fused=True)
    assert all(not layer._forward_pre_hooks for layer in model.transformer.h)
    with pytest.warns(UserWarning, match="falling back to HyPe's hooks"):
        handle = hype.apply(model, fused="auto")
    assert handle.fused_layers == [] and handle.hooked_layers == handle.layers
    handle.remove()
    with pytest.raises(ValueError, match="fused"):
        hype.apply(model, fused="yes")


def test_remove_restores_the_model_exactly():
    model = build_model("roberta")
    before = run(model, "roberta")
    handle = hype.apply(model, sigma=0.05, fused=True, layers="upper")
    assert handle.hooked_layers == [] and len(handle.fused_layers) == 2  # layer 1's noise comes from layer 0
    noisy = run(model, "roberta")
    handle.remove()
    assert not torch.equal(before[0], noisy[0])
    assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())
    assert_same_step(before, run(model, "roberta"), torch.float32)


def test_seed_with_gradient_checkpointing_is_refused():
    model = build_model("llama")
    model.gradient_checkpointing_enable()
    with hype.apply(model, sigma=0.05, seed=1, fused=True):
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            run(model, "llama")


def test_torch_compile_of_a_patched_model_equals_eager():
    model = build_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with hype.apply(model, sigma=0.05, fused=True):
            eager = [run(model, "llama", seed=seed) for seed in (4, 5)]
            compiled_model = torch.compile(model, backend="aot_eager")
            compiled = [run(model, "llama", seed=seed, call=compiled_model) for seed in (4, 5)]
    # Two steps: a seed drawn in traced Python would be baked into the graph and repeat on the second.
    for eager_step, compiled_step in zip(eager, compiled):
        assert_same_step(eager_step, compiled_step, torch.float32)


def test_the_triton_kernels_inside_a_patched_model():
    for name in ("llama", "bert"):
        model = build_model(name)
        with hype.apply(model, sigma=0.05, seed=2, fused=True) as handle:
            start = handle.state_dict()
            with fusednoise.backend("triton"):
                kernel = run(model, name)
            handle.load_state_dict(start)  # the same calls again: the same seeds
            with fusednoise.backend("reference"):
                reference = run(model, name)
        assert_same_step(reference, kernel, torch.float32)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_autocast_and_mixed_dtypes_take_the_eager_arithmetic(name):
    # Under autocast the matmuls return bf16 beside a float32 residual stream: the patch must compute what the
    # unpatched layers do there too. (On CUDA autocast also runs LayerNorm in float32, which the patch leaves to
    # the eager LayerNorm; CPU autocast does not, so that branch is not exercised here.)
    dtype = torch.float32
    model = build(name, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unpatched = run(model, name)
        with fusednoise.fuse_norms(model):
            patched = run(model, name)
    assert unpatched[0].dtype == patched[0].dtype
    assert_same_step(unpatched, patched, dtype)
