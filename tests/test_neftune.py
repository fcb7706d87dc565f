"""NEFTune on a model (fusednoise.neftune.apply), against transformers' built-in hook, and in the Trainer, the
finetune recipe and the CLI."""
import math

import pytest
import scipy.stats
import torch
from torch import nn

import fusednoise
from fusednoise import neftune
from fusednoise.experiments.llm import tiny_causal_lm

try:  # transformers >= 5.x keeps the hook here; older releases in trainer_utils
    from transformers.integrations.neftune import neftune_post_forward_hook
except ImportError:  # pragma: no cover - depends on the installed transformers
    from transformers.trainer_utils import neftune_post_forward_hook

ALPHA = 5.0


def batch(lengths, tokens, vocab=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), tokens), generator=generator)
    mask = (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


class LayerInputs:
    """Records the hidden states entering layer 0 (the embedding output, for LLaMA-style models)."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.model.layers[0].register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())


@pytest.fixture
def model():
    return tiny_causal_lm("llama", seed=1).train()


# ---------------------------------------------------------------------------------- on a model
@pytest.mark.parametrize("positional", [False, True])
def test_training_noise_follows_each_examples_length(model, positional):
    lengths, T = [12, 5, 1], 12
    ids, mask = batch(lengths, T)
    clean = model.get_input_embeddings()(ids).detach()
    recorder = LayerInputs(model)
    with neftune.apply(model, alpha=ALPHA):
        model(ids, mask) if positional else model(input_ids=ids, attention_mask=mask)
    noise = (recorder.seen[0] - clean).double()
    D = clean.shape[-1]
    for b, length in enumerate(lengths):
        assert torch.equal(recorder.seen[0][b, length:], clean[b, length:])  # padding untouched
        bound = ALPHA / math.sqrt(length * D)
        assert bound * 0.95 < float(noise[b, :length].abs().max()) <= bound * (1 + 1e-6)


def test_eval_is_bitwise_unchanged_and_draws_nothing(model):
    ids, mask = batch([8, 3], 8)
    model.eval()
    plain = model(input_ids=ids, attention_mask=mask).logits
    with neftune.apply(model):
        state = torch.get_rng_state()
        with_neftune = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(plain, with_neftune)


def test_remove_restores_the_model_and_handles_nest_in_with(model):
    ids, mask = batch([8, 3], 8)
    plain = model(input_ids=ids, attention_mask=mask).logits
    handle = neftune.apply(model)
    assert handle.active and "alpha=5" in repr(handle)
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert not handle.active
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with neftune.apply(model):  # applying again after remove is allowed
        pass


def test_seed_reproduces_the_noise_whatever_else_draws(model):
    ids, mask = batch([6, 6], 6)
    runs = []
    for _ in range(2):
        recorder = LayerInputs(model)
        with neftune.apply(model, seed=1234):
            model(input_ids=ids, attention_mask=mask)
            torch.rand(7)  # other draws from torch's generator do not shift the noise
            model(input_ids=ids, attention_mask=mask)
        recorder.handle.remove()
        runs.append(recorder.seen)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # a fresh stream per call


def test_gradients_reach_the_embeddings_unchanged(model):
    ids, mask = batch([8, 3], 8)
    with neftune.apply(model):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_errors_name_the_argument_and_change_nothing(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        neftune.apply("model")
    with pytest.raises(ValueError, match="alpha"):
        neftune.apply(model, alpha=-1.0)
    with pytest.raises(ValueError, match="seed"):
        neftune.apply(model, seed=-1)
    with pytest.raises(ValueError, match="has no input embeddings"):
        neftune.apply(nn.Linear(3, 3))
    embeddings = model.get_input_embeddings()
    with neftune.apply(model):
        with pytest.raises(ValueError, match="already applied"):
            neftune.apply(model)
    embeddings.neftune_noise_alpha = 5.0  # what transformers' activate_neftune sets
    with pytest.raises(ValueError, match="built-in NEFTune"):
        neftune.apply(model)
    del embeddings.neftune_noise_alpha
    assert not embeddings._forward_hooks and not model._forward_pre_hooks


def test_a_mask_that_is_not_one_flag_per_token_is_refused(model):
    ids, mask = batch([8, 3], 8)
    with neftune.apply(model):
        with pytest.raises(ValueError, match="attention_mask as one flag per token"):
            model(input_ids=ids, attention_mask=mask[:, :5])


# ---------------------------------------------------------------------------------- packed batches
def packed_batch(kind, lengths):
    """One row packing sequences of ``lengths`` as a collator makes it (no attention mask)."""
    examples = [{"input_ids": list(range(4 + i, 4 + i + n))} for i, n in enumerate(lengths)]
    if kind == "trl":  # TRL's SFTTrainer(padding_free=True), and its packing's collator
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    from transformers import DataCollatorWithFlattening

    collated = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)
    if kind == "cu_seq_lens":  # the varlen kernels' boundaries alone: the model builds its own positions
        del collated["position_ids"]
    return collated


@pytest.mark.parametrize("kind", ["transformers", "trl", "cu_seq_lens"])
def test_packed_sequences_are_scaled_by_their_own_length(model, kind):
    from fusednoise.hype import derive_seed
    from fusednoise.reference.neftune import uniform_rows

    lengths = [3, 9, 5]
    inputs = {k: v for k, v in packed_batch(kind, lengths).items() if k in (
        "input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    assert "attention_mask" not in inputs
    clean = model.get_input_embeddings()(inputs["input_ids"]).detach()
    recorder = LayerInputs(model)
    with neftune.apply(model, alpha=ALPHA, seed=9):
        model(**inputs)
    noise = (recorder.seen[0] - clean)[0]
    T, D = noise.shape
    unit = uniform_rows(T, D, derive_seed(9, 0, 0))  # the first noisy call's U(-1, 1) draws
    start = 0
    for length in lengths:
        scale = ALPHA / math.sqrt(length * D)  # the paper's, per sequence (the built-in: ALPHA / sqrt(T * D))
        torch.testing.assert_close(noise[start:start + length], unit[start:start + length] * scale,
                                   rtol=1e-5, atol=1e-7)
        start += length


# ---------------------------------------------------------------------------------- against transformers
def builtin_noise(shape, alpha, seed):
    """transformers' NEFTune hook on an embedding whose output is zeros: its noise alone."""
    embedding = nn.Embedding(4, shape[-1])
    nn.init.zeros_(embedding.weight)
    embedding.neftune_noise_alpha = alpha
    embedding.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(seed)
    with torch.no_grad():
        return embedding(torch.zeros(shape[:-1], dtype=torch.long)).double()


def test_without_padding_agrees_in_distribution_with_transformers_builtin():
    shape = (8, 128, 256)  # 2**18 draws each
    ours = fusednoise.add_neftune_noise(torch.zeros(shape), ALPHA, seed=7).double()
    theirs = builtin_noise(shape, ALPHA, seed=7)
    expected_std = ALPHA / math.sqrt(shape[1] * shape[2]) / math.sqrt(3)
    n = ours.numel()
    tolerance = 5 * math.sqrt(0.8 / n)  # 5 standard errors of a uniform sample's std
    assert abs(float(ours.std()) / expected_std - 1) < tolerance
    assert abs(float(theirs.std()) / expected_std - 1) < tolerance
    assert scipy.stats.ks_2samp(ours.flatten().numpy(), theirs.flatten().numpy()).pvalue > 1e-4


def test_with_padding_each_example_gets_the_papers_scale_and_the_builtin_does_not():
    T, D = 128, 256
    lengths = [128, 32]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ours = fusednoise.add_neftune_noise(torch.zeros(2, T, D), ALPHA, mask, seed=3).double()
    theirs = builtin_noise((2, T, D), ALPHA, seed=3)
    short_ours, short_theirs = ours[1, :32], theirs[1, :32]
    # The built-in scales the 32-token example by the padded length 128: sqrt(128 / 32) = 2x less noise.
    ratio = float(short_ours.std() / short_theirs.std())
    assert abs(ratio - 2.0) < 0.05
    assert abs(float(short_ours.std()) - ALPHA / math.sqrt(32 * D) / math.sqrt(3)) < 0.02 * float(short_ours.std())
    assert bool((ours[1, 32:] == 0).all()) and bool((theirs[1, 32:] != 0).any())  # padding: ours untouched
    assert abs(float(ours[0].std() / theirs[0].std()) - 1) < 0.03  # the full-length example: the same scale


# ---------------------------------------------------------------------------------- Trainer, recipe, CLI
def _lm_dataset(n=16, tokens=10):
    from datasets import Dataset

    rows = []
    for i in range(n):
        length = 4 + i % (tokens - 3)
        ids, _ = batch([length], length, seed=i)
        rows.append({"input_ids": ids[0].tolist(), "labels": ids[0].tolist()})
    return Dataset.from_list(rows)


def _trainer(tmp_path, model, **kwargs):
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from fusednoise.integrations.trainer import FusedNoiseTrainer
    from fusednoise.experiments.llm import word_tokenizer

    tokenizer = word_tokenizer(["a b c"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                             neftune_noise_alpha=kwargs.pop("neftune_noise_alpha", None))
    return FusedNoiseTrainer(model=model, args=args, train_dataset=_lm_dataset(),
                             data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), **kwargs)


def test_trainer_applies_neftune_while_training_only(tmp_path):
    from fusednoise.integrations.trainer import NEFTuneConfig

    losses = {}
    for alpha in (0.0, 50.0):
        trainer = _trainer(tmp_path, tiny_causal_lm("llama", seed=2), neftune=NEFTuneConfig(alpha=alpha))
        trainer.train()
        losses[alpha] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        assert trainer.neftune_callback.handle is None  # removed at the end of training
        assert not trainer.model.get_input_embeddings()._forward_hooks
    assert losses[0.0] != losses[50.0]
    with pytest.raises(ValueError, match="neftune= and TrainingArguments.neftune_noise_alpha are both set"):
        _trainer(tmp_path, tiny_causal_lm("llama"), neftune=True, neftune_noise_alpha=5.0)


def test_finetune_recipe_and_cli_flag():
    from fusednoise import cli
    from fusednoise.experiments.finetune import FinetuneConfig, parse_recipe
    from fusednoise.integrations.trainer import NEFTuneConfig

    assert parse_recipe("neftune+hype-n") == ("hype-n", "neftune")
    assert FinetuneConfig(methods=("neftune",)).trainer_kwargs()["neftune"] == NEFTuneConfig(alpha=5.0)
    assert "neftune" not in FinetuneConfig(methods=("vanilla",)).trainer_kwargs()
    args = cli._parser().parse_args(["finetune", "--task", "rte", "--method", "neftune", "--neftune-alpha", "10"])
    base, recipes = cli._configs(args)[0]
    assert recipes == [("neftune",)] and base.neftune_alpha == 10.0
    with pytest.raises(ValueError, match="neftune_alpha"):
        FinetuneConfig(neftune_alpha=-1.0)
