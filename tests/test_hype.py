"""HyPe on tiny randomly initialised Hugging Face models of every supported family (reference backend on CPU;
one test runs the Triton kernel inside a model, under the interpreter when there is no GPU)."""
import math
import warnings

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import fusednoise
from devices import KERNEL_DEVICE
from fusednoise import hype
from fusednoise.layers import find_layer_stacks, find_layers, hidden_dropout_attributes, hidden_dropout_modules
from test_layers import ARCH_NAMES, ARCHS, _fairseq_inputs, _fairseq_style, build_model, main_output, model_inputs

LLAMA_LIKE = ("llama", "mistral", "qwen2")


def _hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def _forward(model, name, seed=0):
    torch.manual_seed(seed)
    return main_output(model(**model_inputs(name)))


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class _Probe:
    """Records, per layer call, the hidden states before HyPe's hook (``clean``) and those the layer gets."""

    def __init__(self, layers):
        self.clean, self.seen, self.handles = {}, {}, []
        for index, layer in enumerate(layers):
            self.clean[index], self.seen[index] = [], []
            self.handles.append(layer.register_forward_pre_hook(self._record(self.clean[index]), with_kwargs=True,
                                                                prepend=True))
            self.handles.append(layer.register_forward_pre_hook(self._record(self.seen[index]), with_kwargs=True))

    @staticmethod
    def _record(store):
        def hook(module, args, kwargs):
            store.append(_hidden(args, kwargs).detach().clone())
        return hook

    def noise(self, index, call=0):
        return self.seen[index][call] - self.clean[index][call]

    def noisy_layers(self):
        return [i for i in self.clean if any(not torch.equal(c, s) for c, s in zip(self.clean[i], self.seen[i]))]

    def remove(self):
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------------------------- train / eval
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_training_outputs_change_and_eval_outputs_are_bitwise_unchanged(name):
    model = build_model(name)  # dropout 0: the model alone is deterministic
    plain_train = _forward(model, name)
    model.eval()
    plain_eval = _forward(model, name)
    with hype.apply(model, disable_dropout=True):  # the paper's defaults: sigma 1e-5, normal
        assert torch.equal(_forward(model, name, seed=0), plain_eval)
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # eval draws nothing
        model.train()
        hype_train = _forward(model, name)
    difference = (hype_train - plain_train).abs().max().item()
    assert 0 < difference < 1e-2


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_remove_restores_the_model_exactly(name):
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.1)
    hooks_before = _hook_counts(model)
    dropout_before = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    reference = _forward(model, name, seed=3)

    handle = hype.apply(model, sigma=1e-3, disable_dropout=True)
    assert handle.active
    noisy = _forward(model, name, seed=3)
    assert not torch.equal(noisy, reference)
    handle.remove()
    handle.remove()  # harmless
    assert not handle.active
    assert _hook_counts(model) == hooks_before
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == dropout_before
    assert torch.equal(_forward(model, name, seed=3), reference)

    with hype.apply(model, sigma=1e-3, distribution="uniform", layers="all"):
        assert not torch.equal(_forward(model, name, seed=3), reference)
    assert _hook_counts(model) == hooks_before
    assert torch.equal(_forward(model, name, seed=3), reference)


def test_context_manager_removes_on_error():
    model = build_model("bert")
    hooks_before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hype.apply(model, disable_dropout=True):
            raise RuntimeError("boom")
    assert _hook_counts(model) == hooks_before


# --------------------------------------------------------------------------------------------- layer selection
def _expected_noisy(name, model, spec):
    layers = find_layers(model)
    index = {id(layer): i for i, layer in enumerate(layers)}
    if spec in ("all", None):
        return list(range(len(layers)))
    if spec in ("lower", "upper"):
        chosen = []
        for stack in find_layer_stacks(model):
            half = len(stack) // 2
            chosen += [index[id(layer)] for layer in (stack[:half] if spec == "lower" else stack[half:])]
        return sorted(chosen)
    if spec == "last stack":
        return sorted(index[id(layer)] for layer in find_layer_stacks(model)[-1])
    if spec == "modules":
        return sorted({0, len(layers) - 1})
    return sorted({i % len(layers) for i in spec})


def _layers_argument(model, spec):
    if spec == "last stack":
        return find_layer_stacks(model)[-1]
    if spec == "modules":
        layers = find_layers(model)
        return [layers[-1]] if len(layers) == 1 else [layers[-1], layers[0]]
    return spec


@pytest.mark.parametrize("spec", [None, "lower", "upper", [0], [-1], "last stack", "modules"],
                         ids=["default", "lower", "upper", "first", "last", "modulelist", "modules"])
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_layers_selects_exactly_those_layers(name, spec):
    model = build_model(name)
    layers = find_layers(model)
    if name == "albert" and spec in ("lower", "upper"):
        with pytest.raises(ValueError, match="ALBERT"):
            hype.apply(model, layers=spec)
        return
    handle = hype.apply(model, sigma=1e-3, layers=_layers_argument(model, spec))
    probe = _Probe(layers)
    try:
        model(**model_inputs(name))
    finally:
        probe.remove()
        handle.remove()
    assert probe.noisy_layers() == _expected_noisy(name, model, spec)
    # Calls per layer: one per depth (ALBERT's shared layer runs at both depths).
    calls = model.config.num_hidden_layers if name == "albert" else 1
    assert all(len(seen) == calls for seen in probe.seen.values())
    if name == "albert":
        # Each depth gets its own noise.
        assert not torch.equal(probe.noise(0, 0), probe.noise(0, 1))


def test_lower_and_upper_split_a_deeper_stack_per_stack():
    config = ARCHS["t5"].config(0.0, 0.0)
    config.num_layers = config.num_decoder_layers = 5
    model = ARCHS["t5"].task(config).train()
    handle = hype.apply(model, layers="lower")
    encoder, decoder = find_layer_stacks(model)
    assert handle.layers == [encoder[0], encoder[1], decoder[0], decoder[1]]
    handle.remove()
    with hype.apply(model, layers="upper") as handle:
        assert handle.layers == list(encoder[2:]) + list(decoder[2:])


# --------------------------------------------------------------------------------------------- noise
def test_noise_statistics_follow_sigma_and_distribution():
    model = build_model("bert")
    sigma = 1e-2
    noise = {}
    for distribution in ("normal", "uniform"):
        handle = hype.apply(model, sigma=sigma, distribution=distribution, seed=7)
        probe = _Probe(find_layers(model))
        model(**model_inputs("bert"))
        probe.remove()
        handle.remove()
        noise[distribution] = torch.cat([probe.noise(i).flatten() for i in probe.seen])
    uniform, normal = noise["uniform"], noise["normal"]
    assert uniform.abs().max() <= sigma * (1 + 1e-5)
    assert abs(uniform.std().item() - sigma / math.sqrt(3)) < 0.1 * sigma / math.sqrt(3)
    assert abs(normal.std().item() - sigma) < 0.1 * sigma
    assert normal.abs().max() > sigma  # unbounded, unlike the uniform
    assert abs(normal.mean().item()) < 0.1 * sigma and abs(uniform.mean().item()) < 0.1 * sigma


def test_each_layer_and_each_step_gets_fresh_noise():
    model = build_model("llama")
    with hype.apply(model, sigma=1e-3):
        probe = _Probe(find_layers(model))
        model(**model_inputs("llama"))
        model(**model_inputs("llama"))
        probe.remove()
    assert not torch.equal(probe.noise(0, 0), probe.noise(1, 0))
    assert not torch.equal(probe.noise(0, 0), probe.noise(0, 1))


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_torch_manual_seed_reproduces_a_run(name):
    model = build_model(name)
    with hype.apply(model, sigma=1e-3):
        first, again = _forward(model, name, seed=5), _forward(model, name, seed=5)
        other = _forward(model, name, seed=6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_explicit_seed_is_independent_of_torch_rng(name):
    model = build_model(name)
    outputs = []
    for torch_seed in (0, 1):
        with hype.apply(model, sigma=1e-3, seed=1234):
            outputs.append((_forward(model, name, seed=torch_seed), _forward(model, name, seed=torch_seed)))
    (first_step, second_step), (first_again, second_again) = outputs
    assert torch.equal(first_step, first_again) and torch.equal(second_step, second_again)
    assert not torch.equal(first_step, second_step)  # the call counter moves on every step
    with hype.apply(model, sigma=1e-3, seed=1235):
        assert not torch.equal(_forward(model, name), first_step)


def test_state_dict_continues_the_noise_sequence_of_an_explicit_seed():
    model = build_model("bert")
    with hype.apply(model, sigma=1e-3, seed=99) as handle:
        steps = [_forward(model, "bert") for _ in range(3)]
        state = handle.state_dict()
    assert state == {"seed": 99, "calls": [3, 3]}
    with hype.apply(model, sigma=1e-3, seed=99) as resumed:
        assert torch.equal(_forward(model, "bert"), steps[0])  # a fresh handle replays from call 0 ...
        resumed.load_state_dict({"seed": 99, "calls": [2, 2]})
        assert torch.equal(_forward(model, "bert"), steps[2])  # ... a loaded one continues where it stopped
        for bad, error, match in (({"seed": 98, "calls": [2, 2]}, ValueError, "seed=98"),
                                  ({"seed": 99, "calls": [2]}, ValueError, "1 layers"),
                                  ({"seed": 99, "calls": [2, -1]}, ValueError, "ints >= 0"),
                                  ([2, 2], TypeError, "state_dict")):
            with pytest.raises(error, match=match):
                resumed.load_state_dict(bad)
        assert resumed.state_dict()["calls"] == [3, 3]


def test_derive_seed_rule():
    seeds = {hype.derive_seed(42, layer, call) for layer in range(24) for call in range(100)}
    assert len(seeds) == 2400
    assert all(0 <= s < 2**62 for s in seeds)
    assert hype.derive_seed(42, 3, 5) == hype.derive_seed(42, 3, 5) != hype.derive_seed(43, 3, 5)


def test_stochastic_rounding_reaches_the_op_in_bf16():
    model = build_model("bert").to(torch.bfloat16)
    noise = {}
    for rounding in ("nearest", "stochastic"):
        with hype.apply(model, sigma=1e-3, rounding=rounding, seed=11):
            probe = _Probe(find_layers(model))
            model(**model_inputs("bert"))
            probe.remove()
        noise[rounding] = probe.noise(1)
        assert probe.seen[1][0].dtype == torch.bfloat16
        assert noise[rounding].abs().max() > 0
    assert not torch.equal(noise["nearest"], noise["stochastic"])


def test_hidden_states_passed_by_keyword_get_noise():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, hidden_states, scale=1.0):
            return self.proj(hidden_states) * scale

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(hidden_states=x, scale=1.0)
            return x

    model = Model()
    x = torch.randn(3, 4)
    clean = model(x)
    with hype.apply(model, sigma=1e-2):
        noisy = model(x)
    assert not torch.equal(clean, noisy)


def test_caller_tensor_is_not_modified():
    # HyPe adds out of place: the embedding output the caller passes in (here the user's inputs_embeds) is
    # left as it was, so it can be reused (a second pass, a recorded hidden state, a checkpoint's recompute).
    model = build_model("llama")
    embeds = model.get_input_embeddings()(model_inputs("llama")["input_ids"]).detach()
    kept = embeds.clone()
    with hype.apply(model, sigma=1e-2):
        model(inputs_embeds=embeds, use_cache=False)
    assert torch.equal(embeds, kept)


# --------------------------------------------------------------------------------------------- checkpointing
def _gradients(model, name, seed):
    model.zero_grad(set_to_none=True)
    loss = _forward(model, name, seed=seed).float().square().mean()
    loss.backward()
    # ".inner" is the checkpoint wrapper below: the same parameter under a longer name.
    return {n.replace(".inner.", "."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative_difference(left, right):
    """The largest difference between two gradient dicts, relative to each tensor's largest gradient."""
    assert left.keys() == right.keys()
    return max(((left[n] - right[n]).abs().max() / right[n].abs().max().clamp_min(1e-30)).item() for n in left)


# Recomputing a layer may round differently (T5 differs by ~1e-6 relative under checkpointing alone, without
# HyPe); noise that was not replayed moves the gradients by about sigma relative, far more.
RECOMPUTE_RTOL = 1e-5
SIGMA = 1e-3


def _enable_hf_checkpointing(model):
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("seed", [None, 99], ids=["cpu-rng", "explicit-seed"])
@pytest.mark.parametrize("name", [n for n in ARCH_NAMES if ARCHS[n].task.supports_gradient_checkpointing])
def test_hf_gradient_checkpointing_gives_the_same_gradients(name, seed):
    model = build_model(name)
    with hype.apply(model, sigma=SIGMA, seed=seed):
        plain = _gradients(model, name, seed=4)
    clean = _gradients(model, name, seed=4)
    _enable_hf_checkpointing(model)
    layers = find_layers(model)
    assert all(layer.gradient_checkpointing for layer in layers)
    # transformers 5.17 checkpoints a layer's __call__, hooks included (the recompute reruns HyPe's hook);
    # 5.24 checkpoints forward and keeps hooks outside.
    hooks_inside = type(layers[0]).__call__ is not nn.Module.__call__
    with hype.apply(model, sigma=SIGMA, seed=seed):
        if hooks_inside and seed is not None:
            with pytest.raises(RuntimeError, match="seed=None"):
                _gradients(model, name, seed=4)
            return
        checkpointed = _gradients(model, name, seed=4)
    assert _relative_difference(checkpointed, plain) < RECOMPUTE_RTOL
    assert _relative_difference(plain, clean) > 10 * RECOMPUTE_RTOL  # the noise does reach the gradients


class _Checkpointed(nn.Module):
    """Runs a whole layer call, its hooks included, under torch.utils.checkpoint (so HyPe's hook runs again
    on the recompute, as in transformers versions that checkpoint a layer's __call__)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_hooks_inside_a_checkpoint_replay_the_same_noise(name):
    model = build_model(name)
    handle = hype.apply(model, sigma=SIGMA)
    plain = _gradients(model, name, seed=8)
    recomputes = []
    for stack in find_layer_stacks(model):
        for i in range(len(stack)):
            stack[i].register_forward_pre_hook(lambda module, args: recomputes.append(1))
            stack[i] = _Checkpointed(stack[i])
    checkpointed = _gradients(model, name, seed=8)
    handle.remove()
    assert len(recomputes) == 2 * 2 * (2 if ARCHS[name].encoder_decoder else 1)  # each layer ran twice
    assert _relative_difference(checkpointed, plain) < RECOMPUTE_RTOL


def test_explicit_seed_refuses_hooks_inside_an_old_style_checkpoint():
    class OldStyleLayer(nn.Module):
        gradient_checkpointing = True  # and __call__ overridden, as transformers < 5.2x had it

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

        def forward(self, hidden_states):
            return self.proj(hidden_states)

    model = nn.Sequential(OldStyleLayer(), OldStyleLayer())
    with hype.apply(model, layers=list(model), seed=3):
        with pytest.raises(RuntimeError, match="seed=None"):
            model(torch.randn(2, 4))
    with hype.apply(model, layers=list(model)):
        model(torch.randn(2, 4))


# --------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_disable_dropout_zeroes_hidden_dropout_and_remove_restores_it(name):
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.2)
    hidden = hidden_dropout_modules(model)
    others = [m for m in model.modules() if isinstance(m, nn.Dropout) and all(m is not h for h in hidden)]
    with hype.apply(model, disable_dropout=True) as handle:
        assert handle.dropout_modules == hidden
        assert all(m.p == 0.0 for m in hidden)
        assert all(m.p == 0.2 for m in others)
    assert all(m.p == 0.1 for m in hidden) and hidden


@pytest.mark.parametrize("name", ["bart", "opt"])
def test_disable_dropout_turns_off_float_attribute_dropout(name):
    model = _fairseq_style(name, hidden_dropout=0.3, attention_dropout=0.2)
    inputs = _fairseq_inputs()

    def two_draws():
        outputs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            outputs.append(model(**inputs).logits)
        return outputs

    attention = {m: m.dropout for m in model.modules() if "Attention" in type(m).__name__}
    with hype.apply(model, sigma=0.0, disable_dropout=True) as handle:
        assert handle.dropout_attributes and all(getattr(m, a) == 0.0 for m, a in handle.dropout_attributes)
        assert all(m.dropout == p == 0.2 for m, p in attention.items())  # attention dropout stays
        for m in attention:
            m.dropout = 0.0  # to see that nothing random is left on the hidden states
        first, second = two_draws()
        assert torch.equal(first, second)
    for m in attention:
        m.dropout = 0.2
    assert all(getattr(m, a) == 0.3 for m, a in hidden_dropout_attributes(model))
    first, second = two_draws()
    assert not torch.equal(first, second)  # restored: dropout draws again


def test_disable_dropout_warns_when_the_configured_hidden_dropout_cannot_be_found():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return nn.functional.dropout(self.linear(x), p=0.1, training=self.training)  # no attribute to set

    class Model(nn.Module):
        def __init__(self, dropout):
            super().__init__()
            self.config = type("Config", (), {"hidden_dropout_prob": dropout})()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.warns(UserWarning, match="hidden dropout stays on"):
        hype.apply(Model(0.1), disable_dropout=True).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hype.apply(Model(0.0), disable_dropout=True).remove()      # nothing configured: nothing to say
        hype.apply(Model(0.1), disable_dropout=False).remove()     # not asked to turn dropout off


def test_two_handles_restore_dropout_in_any_order():
    model = build_model("bert", hidden_dropout=0.1)
    layers = find_layers(model)
    first = hype.apply(model, layers=[0], disable_dropout=True)
    second = hype.apply(model, layers=[1], disable_dropout=True)
    first.remove()
    assert all(m.p == 0.0 for m in hidden_dropout_modules(model))  # the second handle still wants them off
    second.remove()
    assert all(m.p == 0.1 for m in hidden_dropout_modules(model))
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, error, match", [
    ({"sigma": -1e-5}, ValueError, "sigma"),
    ({"sigma": float("nan")}, ValueError, "sigma"),
    ({"sigma": float("inf")}, ValueError, "sigma"),
    ({"sigma": "1e-5"}, TypeError, "sigma"),
    ({"sigma": True}, TypeError, "sigma"),
    ({"distribution": "gaussian"}, ValueError, "distribution"),
    ({"rounding": "up"}, ValueError, "rounding"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"disable_dropout": "yes"}, TypeError, "disable_dropout"),
    ({"layers": [2]}, ValueError, "layers index 2 is out of range"),
    ({"layers": [-3]}, ValueError, "out of range"),
    ({"layers": [0, -2]}, ValueError, "layers contains the same layer twice"),
    ({"layers": "middle"}, ValueError, "layers must be one of"),
    ({"layers": []}, ValueError, "layers must not be empty"),
    ({"layers": [0.5]}, TypeError, "layers"),
    ({"layers": [0, "upper"]}, TypeError, "layers"),
    ({"layers": 1}, TypeError, "layers"),
    ({"layers": nn.Linear(2, 2)}, TypeError, "layers"),
    ({"layers": [nn.Linear(2, 2)]}, ValueError, "not a submodule"),
], ids=lambda value: str(value) if not isinstance(value, dict) else None)
def test_bad_arguments_raise_and_change_nothing(kwargs, error, match):
    model = build_model("bert", hidden_dropout=0.1)
    hooks_before = _hook_counts(model)
    kwargs = {"disable_dropout": True, **kwargs}
    with pytest.raises(error, match=match):
        hype.apply(model, **kwargs)
    assert _hook_counts(model) == hooks_before
    assert all(m.p == 0.1 for m in hidden_dropout_modules(model))


def test_non_module_and_unknown_model_raise():
    with pytest.raises(TypeError, match="model"):
        hype.apply("bert-base-uncased")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential.*layers="):
        hype.apply(model)
    assert _hook_counts(model) == [(0, 0)] * 3
    with hype.apply(model, layers=[model[0]]):  # with layers= it works on any model
        assert len(model[0]._forward_pre_hooks) == 1


def test_applying_twice_to_the_same_layer_is_refused():
    model = build_model("bert")
    handle = hype.apply(model)
    with pytest.raises(ValueError, match="already applied"):
        hype.apply(model, layers="upper")
    assert [len(layer._forward_pre_hooks) for layer in find_layers(model)] == [1, 1]
    handle.remove()
    hype.apply(model, layers="upper").remove()


# --------------------------------------------------------------------------------------------- triton kernel
def test_triton_kernel_inside_a_model(monkeypatch):
    from fusednoise.kernels import noise as kernels

    launches = []
    launch_noise = kernels.launch_noise
    monkeypatch.setattr(kernels, "launch_noise", lambda *args: launches.append(1) or launch_noise(*args))
    model = build_model("bert").to(KERNEL_DEVICE)
    inputs = {k: v.to(KERNEL_DEVICE) for k, v in model_inputs("bert").items()}
    clean = main_output(model(**inputs))
    outputs = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend), hype.apply(model, sigma=1e-2, seed=21):
            outputs[backend] = main_output(model(**inputs))
    assert len(launches) == len(find_layers(model))
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-4, atol=1e-5)
    assert (outputs["triton"] - clean).abs().max() > 1e-4
