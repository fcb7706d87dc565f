"""LNSR on tiny randomly initialised Hugging Face models of every supported family (reference backend on CPU;
one test runs the Triton kernels inside a model, under the interpreter when there is no GPU)."""
import pytest
import torch
import transformers as hf
from torch import nn

import fusednoise
from fusednoise import hype, lnsr, ops_lnsr, rng
from fusednoise.layers import find_layers
from test_layers import ARCH_NAMES, ARCHS, BATCH, SEQ, build_model, main_output, model_inputs


def _batch(name, seed=0):
    inputs = model_inputs(name, seed)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -3:] = 0  # padding at the end of the first example
    inputs["attention_mask"] = mask
    if name in ("gpt2", "llama", "mistral", "qwen2"):
        inputs["labels"] = inputs["input_ids"]
    elif ARCHS[name].encoder_decoder:
        inputs["labels"] = inputs["decoder_input_ids"]
    else:
        inputs["labels"] = torch.tensor([0, 1])
    return inputs


def _layer_at(model, name, depth):
    layers = find_layers(model)
    return layers[0] if name == "albert" else layers[depth]


def _grad_norm(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def _hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), "forward" in m.__dict__) for m in model.modules()]


# --------------------------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("inject_layer", [0, 1])
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_penalty_is_positive_and_reaches_every_layer_from_the_injection_point(name, inject_layer):
    model = build_model(name)
    reg = lnsr.LNSR(model, inject_layer=inject_layer)
    hooks_before = _hook_counts(model)
    torch.manual_seed(0)
    outputs, penalty = reg(**_batch(name))
    assert _hook_counts(model) == hooks_before  # nothing left on the model
    assert penalty.dim() == 0 and penalty.dtype == torch.float32
    assert penalty.item() > 0
    assert reg.last_terms.shape == (reg.depth - inject_layer,) and (reg.last_terms > 0).all()
    torch.testing.assert_close(reg.last_terms.sum(), penalty.detach())
    penalty.backward()
    for depth in range(reg.depth):
        # From b on through both passes; below b through the clean x_b the noisy pass starts from.
        assert _grad_norm(_layer_at(model, name, depth)) > 0, f"no gradient reached layer {depth}"
    model.zero_grad()
    outputs, penalty = reg(**_batch(name))
    (outputs.loss + penalty).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_scale_zero_gives_exactly_zero_even_with_dropout(name):
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.1)
    depth = lnsr.LNSR(model).depth
    for inject_layer in sorted({0, 1, depth - 1}):  # T5: also inside the decoder (depth 3 of 4)
        torch.manual_seed(1)
        _, penalty = lnsr.LNSR(model, scale=0.0, inject_layer=inject_layer, replay_rng=True)(**_batch(name))
        # The noisy pass replays the clean pass's dropout: only the (zero) injected noise could differ.
        assert penalty.item() == 0.0, inject_layer


@pytest.mark.parametrize("name", ["bert", "llama", "t5"])
def test_without_replay_dropout_differs_between_the_passes(name):
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(1)
    _, penalty = lnsr.LNSR(model, scale=0.0, replay_rng=False)(**_batch(name))
    assert penalty.item() > 0


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_eval_mode_is_untouched(name):
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.1).eval()
    reg = lnsr.LNSR(model)
    hooks_before = _hook_counts(model)
    torch.manual_seed(3)
    expected = main_output(model(**_batch(name)))
    state_after = torch.get_rng_state()
    torch.manual_seed(3)
    outputs, penalty = reg(**_batch(name))
    assert torch.equal(main_output(outputs), expected)
    assert penalty.item() == 0.0 and not penalty.requires_grad
    assert torch.equal(torch.get_rng_state(), state_after)
    assert _hook_counts(model) == hooks_before


# --------------------------------------------------------------------------------------------- what runs twice
def _deep_model(name, layers=4, dropout=0.0):
    config = ARCHS[name].config(dropout, dropout)
    if name == "t5":
        config.num_layers = config.num_decoder_layers = layers // 2
    else:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    return ARCHS[name].task(config).train()


def _count_executions(layers):
    """Count real executions of each layer (a child module runs only when the layer's forward does)."""
    counts, batches, handles = [0] * len(layers), [[] for _ in layers], []
    for i, layer in enumerate(layers):
        child = next(m for m in layer.modules() if m is not layer and not isinstance(m, nn.ModuleList))

        def hook(module, args, kwargs, output, i=i):
            counts[i] += 1
            hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            batches[i].append(hidden.shape[0])
        handles.append(child.register_forward_hook(hook, with_kwargs=True))
    return counts, batches, handles


@pytest.mark.parametrize("batched", [False, True], ids=["two-passes", "batched"])
@pytest.mark.parametrize("name", ["bert", "llama", "t5", "gpt2"])
def test_layers_below_the_injection_point_run_once(name, batched):
    if batched and name not in lnsr.BATCHED_MODEL_TYPES:
        with pytest.raises(ValueError, match="batched=True supports the model types"):
            lnsr.LNSR(_deep_model(name), inject_layer=2, batched=True)
        return
    model = _deep_model(name)
    layers = find_layers(model)
    assert len(layers) == 4
    counts, batches, handles = _count_executions(layers)
    try:
        _, penalty = lnsr.LNSR(model, inject_layer=2, batched=batched)(**_batch(name))
    finally:
        for handle in handles:
            handle.remove()
    assert penalty.item() > 0
    if batched:
        assert counts == [1, 1, 1, 1]
        assert [b[0] for b in batches] == [BATCH, BATCH, 2 * BATCH, 2 * BATCH]
    else:
        assert counts == [1, 1, 2, 2]


# --------------------------------------------------------------------------------------------- the numbers
def _fixed_seed_noise(monkeypatch, seed=1234):
    monkeypatch.setattr(lnsr, "scaled_noise", lambda x, scale, seed=None: ops_lnsr.scaled_noise(x, scale, seed=1234))


def _reduced(sq, mask, reduction):
    """Per-example reduction of the squared differences (B, T, D), averaged over the batch, written out."""
    keep = mask.float()
    per_example = (sq.sum(-1) * keep).sum(-1)
    if reduction == "token_mean":
        per_example = per_example / keep.sum(-1)
    elif reduction == "mean":
        per_example = per_example / (keep.sum(-1) * sq.shape[-1])
    return per_example.mean()


def _hand_written(model, layers, batch, inject_layer, weights, reduction, replay, noise):
    """LNSR by hand: a clean and a noisy ``model(**batch)`` with every layer's output recorded; the noisy run's
    layer ``inject_layer`` gets ``noise(x_b)`` of the clean run's input ``x_b`` of that layer (what comes before
    is the clean pass's). ``replay``: the noisy run starts from the clean run's generator state and the generator
    then continues from where LNSR's seed draw left it (``torch.set_rng_state``); otherwise the two runs draw one
    after the other, as two plain calls of the model do."""
    class Stop(Exception):
        pass

    def record(depth, output, outs, stop):
        outs[depth] = output[0] if isinstance(output, tuple) else output
        if stop and depth == len(layers) - 1:
            raise Stop  # the noisy run needs nothing after the last layer (the task head's dropout is not drawn)

    x_b = []

    def run(noisy):
        outs, handles = {}, []
        for depth, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(
                lambda m, a, o, depth=depth: record(depth, o, outs, noisy)))
        if noisy:
            handles.append(layers[inject_layer].register_forward_pre_hook(lambda m, a: (noise(x_b[0]),) + a[1:]))
        else:
            handles.append(layers[inject_layer].register_forward_pre_hook(lambda m, a: x_b.append(a[0])))
        try:
            model(**batch)
        except Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return outs

    start = torch.get_rng_state()
    clean = run(False)
    rng.draw_seed()  # LNSR draws its noise seed here (the noise below uses a fixed one)
    after = torch.get_rng_state()
    if replay:
        torch.set_rng_state(start)
    noisy = run(True)
    if replay:
        torch.set_rng_state(after)
    total = 0.0
    for r in range(inject_layer, len(layers)):
        diff = clean[r] - noisy[r]
        if diff.shape[0] != BATCH:  # XLNet: (T, B, D)
            diff = diff.transpose(0, 1)
        total = total + weights[r - inject_layer] * _reduced(diff ** 2, batch["attention_mask"], reduction)
    return total


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _assert_same_grads(fused_grads, model):
    reached = 0
    for fused, (pname, p) in zip(fused_grads, model.named_parameters()):
        if fused is None or p.grad is None:  # the task head is not part of the penalty
            assert fused is None and p.grad is None, (pname, fused is None, p.grad is None)
            continue
        reached += 1
        # float32 sums in another order, of clean- and noisy-pass contributions that nearly cancel: an absolute
        # tolerance relative to the tensor's largest gradient (a wrong dropout mask changes it by O(1)).
        atol = 5e-5 * float(p.grad.abs().max()) + 1e-7
        torch.testing.assert_close(fused, p.grad, rtol=1e-4, atol=atol, msg=lambda m: f"{pname}: {m}")
    assert reached > 0


# Independent dropout from b > 0: LNSR does not run the layers below b again (nor draw their dropout), which a
# plain second call of the model would, so the hand-written version covers it at b = 0 only.
@pytest.mark.parametrize("reduction", lnsr.REDUCTIONS)
@pytest.mark.parametrize("name, inject_layer, replay", [
    ("bert", 0, True), ("bert", 2, True), ("llama", 1, True), ("xlnet", 0, True), ("bert", 0, False),
    ("xlnet", 0, False)], ids=["bert-0-replayed", "bert-2-replayed", "llama-1-replayed", "xlnet-0-replayed",
                               "bert-0-independent", "xlnet-0-independent"])
def test_penalty_and_gradients_match_a_hand_written_lnsr_on_a_model_with_dropout(monkeypatch, name, inject_layer,
                                                                                reduction, replay):
    _fixed_seed_noise(monkeypatch)
    model = _deep_model(name, layers=3, dropout=0.2)
    layers = find_layers(model)
    batch = _batch(name)
    weights = [1.0, 0.6, 0.2][inject_layer:]
    reg = lnsr.LNSR(model, inject_layer=inject_layer, weights=weights, reduction=reduction, replay_rng=replay)
    torch.manual_seed(11)
    _, penalty = reg(**batch)
    penalty.backward()
    fused_grads, state_after = _grads(model), torch.get_rng_state()
    model.zero_grad()

    torch.manual_seed(11)
    expected = _hand_written(model, layers, batch, inject_layer, weights, reduction, replay,
                             lambda x: ops_lnsr.scaled_noise(x, 0.05, seed=1234))
    assert torch.equal(torch.get_rng_state(), state_after)  # the generator ends where LNSR left it
    torch.testing.assert_close(penalty, expected.float(), rtol=1e-5, atol=0)
    expected.backward()
    _assert_same_grads(fused_grads, model)
    # The dropout is real: drawn the other way, the hand-written penalty is another number.
    torch.manual_seed(11)
    other = _hand_written(model, layers, batch, inject_layer, weights, reduction, not replay,
                          lambda x: ops_lnsr.scaled_noise(x, 0.05, seed=1234))
    assert abs(other.item() - expected.item()) > 1e-3 * expected.item()


def test_padded_tokens_do_not_count():
    model = build_model("bert")
    batch = _batch("bert")
    torch.manual_seed(0)
    _, masked = lnsr.LNSR(model, reduction="sum")(**batch)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    torch.manual_seed(0)
    _, unmasked = lnsr.LNSR(model, reduction="sum")(**batch)
    assert 0 < masked.item() < unmasked.item()


@pytest.mark.parametrize("name", ["bert", "albert", "gpt2", "llama"])
def test_batched_mode_matches_two_passes(name):
    model = build_model(name)
    results = []
    for batched in (False, True):
        model.zero_grad()
        torch.manual_seed(5)
        outputs, penalty = lnsr.LNSR(model, batched=batched)(**_batch(name))
        (outputs.loss + penalty).backward()
        results.append((outputs.loss.detach(), penalty.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, pen_a, grads_a), (loss_b, pen_b, grads_b) = results
    assert pen_a.item() > 0
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pen_a, pen_b, rtol=1e-5, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fresh_noise_every_call_and_manual_seed_reproduces():
    model = build_model("bert")
    reg = lnsr.LNSR(model)
    torch.manual_seed(7)
    first = reg(**_batch("bert"))[1]
    second = reg(**_batch("bert"))[1]
    torch.manual_seed(7)
    again = reg(**_batch("bert"))[1]
    assert first.item() != second.item()
    assert torch.equal(first, again)


def test_triton_kernels_inside_the_model_match_the_reference():
    model = build_model("bert")
    results = []
    for backend in ("triton", "reference"):
        model.zero_grad()
        torch.manual_seed(2)
        with fusednoise.backend(backend):
            outputs, penalty = lnsr.LNSR(model)(**_batch("bert"))
            (outputs.loss + penalty).backward()
        results.append((penalty.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_gradient_checkpointing_gives_the_same_penalty_and_gradients():
    model = build_model("bert")
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        torch.manual_seed(4)
        reg = lnsr.LNSR(model)
        if checkpointing and lnsr._hooks_run_inside_checkpoint(find_layers(model)[0]):
            # transformers versions that checkpoint a layer's __call__ run hooks inside the checkpoint.
            with pytest.raises(RuntimeError, match="gradient checkpointing"):
                reg(**_batch("bert"))
            return
        outputs, penalty = reg(**_batch("bert"))
        (outputs.loss + penalty).backward()
        results.append((penalty.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- HyPe, in-manifold
@pytest.mark.parametrize("name", ["bert", "llama", "t5"])
def test_composes_with_hype(name):
    model = build_model(name)
    hooks_before = _hook_counts(model)
    with hype.apply(model, sigma=1e-3):
        torch.manual_seed(0)
        outputs, penalty = lnsr.LNSR(model)(**_batch(name))
        (outputs.loss + penalty).backward()
        assert penalty.item() > 0
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        # Both passes see the same HyPe noise from layer b on: with no LNSR noise the penalty is exactly 0.
        _, zero = lnsr.LNSR(model, scale=0.0, replay_rng=True)(**_batch(name))
        assert zero.item() == 0.0
        # ... and without replay the HyPe noise differs between the passes.
        _, hype_only = lnsr.LNSR(model, scale=0.0, replay_rng=False)(**_batch(name))
        assert hype_only.item() > 0
    assert _hook_counts(model) == hooks_before


@pytest.mark.parametrize("noise", ["standard", "in_manifold"])
def test_replayed_noisy_pass_replays_the_offsets_of_the_offset_path(noise):
    """On the offset path (CUDA graphs; rng.graph_safe() here) the HyPe calls of the noisy pass draw with the clean
    pass's offsets again, so replay_rng still gives a penalty of exactly 0 with scale=0, and the calls after the
    LNSR call continue from the clean pass's offsets."""
    model = build_model("bert")
    with hype.apply(model, sigma=1e-3), rng.graph_safe():
        rng.set_offset(40, "cpu")
        torch.manual_seed(0)
        _, zero = lnsr.LNSR(model, scale=0.0, mix_ratio=0.0, noise=noise, replay_rng=True)(**_batch("bert"))
        assert zero.item() == 0.0
        layers = len(find_layers(model))
        assert rng.get_offset("cpu") == 40 + layers  # one ticket per HyPe layer of the clean pass, replayed after
        _, independent = lnsr.LNSR(model, scale=0.0, mix_ratio=0.0, noise=noise, replay_rng=False)(**_batch("bert"))
        assert independent.item() > 0


@pytest.mark.parametrize("name", ["bert", "xlnet", "t5", "llama", "albert"])
def test_in_manifold_lnsr(name):
    model = build_model(name)
    reg = lnsr.LNSR(model, noise="in_manifold", k=5, mix_ratio=0.15)
    torch.manual_seed(0)
    outputs, penalty = reg(**_batch(name))
    assert penalty.item() > 0
    (outputs.loss + penalty).backward()
    assert _grad_norm(find_layers(model)[-1]) > 0
    weight = model.get_input_embeddings().weight
    assert ops_lnsr.neighbor_table(weight, 5) is ops_lnsr.neighbor_table(weight, 5)  # computed once
    reg.refresh_neighbors()
    _, zero = lnsr.LNSR(model, noise="in_manifold", k=5, mix_ratio=0.0)(**_batch(name))
    assert zero.item() == 0.0


def _fixed_seed_manifold_noise(monkeypatch, seed=4321):
    monkeypatch.setattr(lnsr, "in_manifold_noise", lambda x, ids, weight, k, mix_ratio, seed=None, neighbors=None:
                        ops_lnsr.in_manifold_noise(x, ids, weight, k, mix_ratio, seed=4321, neighbors=neighbors))


def test_in_manifold_noise_goes_into_the_word_embeddings_before_the_layernorm():
    # With the embedding LayerNorm's weight at 0 its output is its bias whatever its input: noise added before it
    # cannot reach the encoder (penalty exactly 0), noise added after it (standard noise) does.
    model = build_model("bert", hidden_dropout=0.1, attention_dropout=0.1)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.zero_()
        model.bert.embeddings.LayerNorm.bias.normal_()  # a nonzero output, for standard noise to scale with
    torch.manual_seed(0)
    _, manifold = lnsr.LNSR(model, noise="in_manifold", k=5, mix_ratio=0.2, replay_rng=True)(**_batch("bert"))
    assert manifold.item() == 0.0
    torch.manual_seed(0)
    _, standard = lnsr.LNSR(model, replay_rng=True)(**_batch("bert"))
    assert standard.item() > 0


@pytest.mark.parametrize("reduction", ["sum", "token_mean"])
def test_in_manifold_penalty_equals_a_noisy_run_from_noisy_word_embeddings(monkeypatch, reduction):
    # By hand: the noisy run is the model called on inputs_embeds = word embeddings + eps (BERT then adds the
    # position and token-type embeddings and applies its LayerNorm and dropout, as for input_ids).
    _fixed_seed_manifold_noise(monkeypatch)
    model = _deep_model("bert", layers=3, dropout=0.1)
    layers = find_layers(model)
    batch = _batch("bert")
    reg = lnsr.LNSR(model, noise="in_manifold", k=5, mix_ratio=0.2, reduction=reduction, replay_rng=True)
    torch.manual_seed(3)
    _, penalty = reg(**batch)
    penalty.backward()
    fused_grads = _grads(model)
    model.zero_grad()

    def run(**inputs):
        outs, handles = {}, []
        for depth, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(
                lambda m, a, o, depth=depth: outs.__setitem__(depth, o[0] if isinstance(o, tuple) else o)))
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return outs

    torch.manual_seed(3)
    start = torch.get_rng_state()
    clean = run(**batch)
    embedding = model.get_input_embeddings()
    noisy_embeds = ops_lnsr.in_manifold_noise(embedding(batch["input_ids"]), batch["input_ids"], embedding.weight,
                                              k=5, mix_ratio=0.2, seed=4321)
    torch.set_rng_state(start)  # replayed dropout
    inputs = {key: value for key, value in batch.items() if key != "input_ids"}
    noisy = run(inputs_embeds=noisy_embeds, **inputs)
    expected = sum(_reduced((clean[r] - noisy[r]) ** 2, batch["attention_mask"], reduction) for r in range(3))
    assert expected.item() > 0
    torch.testing.assert_close(penalty, expected.float(), rtol=1e-5, atol=0)
    expected.backward()
    _assert_same_grads(fused_grads, model)


def test_in_manifold_lnsr_needs_two_passes():
    with pytest.raises(ValueError, match="use batched=False"):
        lnsr.LNSR(build_model("bert"), noise="in_manifold", batched=True)


# --------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[1.0]), r"weights must have one entry per penalised layer: 2 \(layers 0 to 1\), got 1"),
    (dict(weights=[1.0, "a"]), r"weights\[1\] must be a real number"),
    (dict(inject_layer=2), r"inject_layer must be in \[0, 1\]"),
    (dict(inject_layer=True), "inject_layer must be an int"),
    (dict(scale=-1.0), "scale must be a finite number >= 0"),
    (dict(noise="adversarial"), "noise must be one of"),
    (dict(k=0), "k must be a positive int"),
    (dict(noise="in_manifold", k=500), r"k must be in \[1, 99\]"),
    (dict(noise="in_manifold", inject_layer=1), "needs inject_layer=0"),
    (dict(batched=True, replay_rng=True), "replay_rng=True needs two passes"),
    (dict(batched="yes"), "batched must be a bool"),
    (dict(reduction="max"), "reduction must be one of"),
    (dict(replay_rng="yes"), "replay_rng must be a bool or None"),
    (dict(layers=nn.Linear(2, 2)), "layers must be an nn.ModuleList or a list of modules"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lnsr.LNSR(build_model("bert"), **kwargs)


def test_model_specific_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lnsr.LNSR("bert")
    with pytest.raises(ValueError, match="batched=True supports the model types"):
        lnsr.LNSR(build_model("t5"), batched=True)
    model = build_model("bert")
    batch = _batch("bert")
    batch["attention_mask"] = torch.ones(BATCH, SEQ, 1, dtype=torch.long).squeeze(-1)[:, :SEQ - 1]
    hooks_before = _hook_counts(model)
    with pytest.raises(Exception):
        lnsr.LNSR(model)(**batch)  # the model itself rejects the mask; the hooks must still come off
    assert _hook_counts(model) == hooks_before
    reg = lnsr.LNSR(model, noise="in_manifold", k=3)
    inputs = _batch("bert")
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(ValueError, match="needs the token ids"):
        reg(inputs_embeds=embeds, **inputs)


def test_a_layer_list_that_does_not_match_the_model_is_reported():
    model = build_model("bert")
    layers = find_layers(model)
    reg = lnsr.LNSR(model, layers=layers + [layers[0]])  # claims 3 depths; the model calls 2
    with pytest.raises(RuntimeError, match="expected 3 layer calls"):
        reg(**_batch("bert"))


def test_deeper_albert_counts_depths_not_modules():
    config = ARCHS["albert"].config(0.0, 0.0)
    config.num_hidden_layers, config.num_hidden_groups, config.inner_group_num = 4, 2, 2
    torch.manual_seed(0)
    model = hf.AlbertForSequenceClassification(config).train()
    reg = lnsr.LNSR(model, inject_layer=3, weights=[1.0] * 5)
    assert reg.depth == 8
    _, penalty = reg(**_batch("albert"))
    assert penalty.item() > 0 and reg.last_terms.shape == (5,)


def test_weights_set_after_a_call_apply_at_the_next_call():
    """The weights are cached per device as a tensor: an assignment must reach the next call (issue 19)."""
    model = build_model("bert")
    reg = lnsr.LNSR(model, weights=1.0)
    batch = _batch("bert")
    torch.manual_seed(3)
    _, base = reg(**batch)
    base_terms = reg.last_terms.clone()
    assert base.item() > 0 and list(reg.weights) == [1.0, 1.0]
    reg.weights = [0.0] * reg.depth
    torch.manual_seed(3)
    _, penalty = reg(**batch)
    assert penalty.item() == 0.0 and not reg.last_terms.any()
    reg.weights = [0.5, 2.0]
    torch.manual_seed(3)
    _, penalty = reg(**batch)
    torch.testing.assert_close(reg.last_terms, base_terms * torch.tensor([0.5, 2.0]), rtol=1e-6, atol=0)
    reg.weights = 3.0
    assert list(reg.weights) == [3.0, 3.0]
    torch.manual_seed(3)
    _, penalty = reg(**batch)
    torch.testing.assert_close(penalty, 3.0 * base, rtol=1e-6, atol=0)
    with pytest.raises(TypeError):  # a tuple: changed by assignment only, which is checked
        reg.weights[0] = 0.0
    with pytest.raises(ValueError, match="weights must have one entry per penalised layer"):
        reg.weights = [1.0]
    assert list(reg.weights) == [3.0, 3.0]
    reg.weights = None
    torch.manual_seed(3)
    _, penalty = reg(**batch)
    torch.testing.assert_close(penalty, base, rtol=1e-6, atol=0)


def test_encoder_decoder_layers_get_their_own_weights():
    """T5 (2 encoder + 2 decoder blocks): the penalty is fused per group of one shape and mask (the encoder,
    the decoder), and each group must take its own slice of the weights, not the encoder's."""
    model = build_model("t5")
    batch = _batch("t5")
    batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
    batch["decoder_attention_mask"][1, -2:] = 0
    reg = lnsr.LNSR(model)
    assert reg.depth == 4 and reg.encoder_decoder
    torch.manual_seed(4)
    reg(**batch)
    unweighted = reg.last_terms.clone()
    assert (unweighted > 0).all()
    weights = torch.tensor([0.0, 0.25, 1.5, 4.0])  # a zero for an encoder layer, distinct everywhere
    reg.weights = weights.tolist()
    torch.manual_seed(4)
    _, penalty = reg(**batch)
    torch.testing.assert_close(reg.last_terms, weights * unweighted, rtol=1e-6, atol=0)
    torch.testing.assert_close(penalty, (weights * unweighted).sum(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------- Trainer and CLI
def test_cli_flags_reach_the_trainer_config():
    from fusednoise import cli
    from fusednoise.integrations.trainer import LNSRConfig

    args = cli._parser().parse_args(["finetune", "--task", "rte", "--method", "lnsr", "--lnsr-reduction", "mean",
                                     "--lnsr-dropout", "independent"])
    (base, _), = cli._configs(args)
    config = base.trainer_kwargs()["lnsr"]
    assert (config.reduction, config.replay_rng) == ("mean", False)
    args = cli._parser().parse_args(["finetune", "--task", "rte", "--method", "lnsr"])
    (base, _), = cli._configs(args)
    defaults = LNSRConfig()
    assert (base.trainer_kwargs()["lnsr"].reduction, base.trainer_kwargs()["lnsr"].replay_rng) == (
        lnsr.DEFAULT_REDUCTION, lnsr.DEFAULT_REPLAY_RNG) == (defaults.reduction, defaults.replay_rng)
    reg = lnsr.LNSR(build_model("bert"))
    assert (reg.reduction, reg.replay_rng) == (lnsr.DEFAULT_REDUCTION, lnsr.DEFAULT_REPLAY_RNG)


@pytest.mark.parametrize("argv, message", [
    (["--lnsr-reduction", "max"], "--lnsr-reduction: invalid choice"),
    (["--lnsr-dropout", "none"], "--lnsr-dropout: invalid choice"),
])
def test_cli_rejects_bad_lnsr_options(capsys, argv, message):
    from fusednoise import cli

    with pytest.raises(SystemExit):
        cli.main(["finetune", "--task", "rte"] + argv)
    assert message in capsys.readouterr().err


def test_finetune_config_checks_and_warning_names_the_cli_flags(monkeypatch):
    import warnings

    from fusednoise.experiments import finetune
    from fusednoise.integrations import trainer

    with pytest.raises(ValueError, match="lnsr_reduction must be one of"):
        finetune.FinetuneConfig(lnsr_reduction="max")
    with pytest.raises(ValueError, match="lnsr_dropout must be one of"):
        finetune.FinetuneConfig(lnsr_dropout="off")
    # run_one hands the Trainer the CLI's advice; stop it there rather than train.
    seen = {}

    class Stop(Exception):
        pass

    def train(self, *args, **kwargs):
        seen["advice"] = self.lnsr_advice
        raise Stop

    monkeypatch.setattr(trainer.FusedNoiseTrainer, "train", train)
    monkeypatch.setattr(finetune, "_data", lambda config: _tiny_glue())
    with pytest.raises(Stop):
        finetune.run_one(finetune.FinetuneConfig(methods=("lnsr",), device="cpu"), "unused")
    assert seen["advice"] == finetune.LNSR_ADVICE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer._warn_if_penalty_dominates(50.0, 1.0, seen["advice"])
        trainer._warn_if_penalty_dominates(50.0, 1.0)
    assert "--lnsr-weight" in str(caught[0].message) and "--lnsr-reduction" in str(caught[0].message)
    assert "LNSRConfig(weights=...)" in str(caught[1].message)  # outside fusednoise finetune: the Python names


def _tiny_glue():
    import datasets

    pairs = {"sentence1": ["a cat sat", "dogs bark"] * 2, "sentence2": ["a cat is sitting", "it rains"] * 2,
             "label": [0, 1] * 2}
    return datasets.DatasetDict(train=datasets.Dataset.from_dict(pairs),
                                validation=datasets.Dataset.from_dict(pairs))
