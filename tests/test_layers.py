"""fusednoise.layers: the layer finder and the hidden-dropout finders on tiny randomly initialised Hugging Face
models of every supported family (no download).

This file also holds the tiny-model factory that tests/test_hype.py and tests/test_lnsr.py import.
"""
from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch
import transformers as hf
from torch import nn

from fusednoise.layers import (configured_hidden_dropout, find_layer_stacks, find_layers,
                               hidden_dropout_attributes, hidden_dropout_modules)

VOCAB = 100
SEQ = 8
BATCH = 2


def _bert_like(config_cls, hidden_dropout, attention_dropout, **extra):
    return config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=hidden_dropout,
                      attention_probs_dropout_prob=attention_dropout, **extra)


def _llama_like(config_cls, hidden_dropout, attention_dropout):
    # These families have no hidden-state dropout at all, only a float attention dropout.
    return config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=attention_dropout)


@dataclass
class Arch:
    config: Callable  # (hidden_dropout, attention_dropout) -> config
    base: type
    task: type
    stacks: Callable  # base model -> the layer stacks it must have, in forward order
    decoder: bool = False  # takes use_cache
    encoder_decoder: bool = False


ARCHS: Dict[str, Arch] = {
    "bert": Arch(lambda h, a: _bert_like(hf.BertConfig, h, a), hf.BertModel, hf.BertForSequenceClassification,
                 lambda m: [m.encoder.layer]),
    "roberta": Arch(lambda h, a: _bert_like(hf.RobertaConfig, h, a), hf.RobertaModel,
                    hf.RobertaForSequenceClassification, lambda m: [m.encoder.layer]),
    # Set up like deberta-v3 (relative attention with position buckets, no absolute positions).
    "deberta-v2": Arch(lambda h, a: _bert_like(hf.DebertaV2Config, h, a, relative_attention=True,
                                               pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                               position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True),
                       hf.DebertaV2Model, hf.DebertaV2ForSequenceClassification, lambda m: [m.encoder.layer]),
    "electra": Arch(lambda h, a: _bert_like(hf.ElectraConfig, h, a, embedding_size=16), hf.ElectraModel,
                    hf.ElectraForSequenceClassification, lambda m: [m.encoder.layer]),
    # ALBERT's default sharing: one group holding one layer, called at each of the 2 depths.
    "albert": Arch(lambda h, a: _bert_like(hf.AlbertConfig, h, a, embedding_size=16, num_hidden_groups=1,
                                           inner_group_num=1, classifier_dropout_prob=h),
                   hf.AlbertModel, hf.AlbertForSequenceClassification,
                   lambda m: [g.albert_layers for g in m.encoder.albert_layer_groups]),
    # XLNet has one dropout rate for everything.
    "xlnet": Arch(lambda h, a: hf.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64,
                                              dropout=h),
                  hf.XLNetModel, hf.XLNetForSequenceClassification, lambda m: [m.layer]),
    "gpt2": Arch(lambda h, a: hf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                            resid_pdrop=h, embd_pdrop=h, attn_pdrop=a, bos_token_id=0,
                                            eos_token_id=0),
                 hf.GPT2Model, hf.GPT2LMHeadModel, lambda m: [m.h], decoder=True),
    "llama": Arch(lambda h, a: _llama_like(hf.LlamaConfig, h, a), hf.LlamaModel, hf.LlamaForCausalLM,
                  lambda m: [m.layers], decoder=True),
    "mistral": Arch(lambda h, a: _llama_like(hf.MistralConfig, h, a), hf.MistralModel, hf.MistralForCausalLM,
                    lambda m: [m.layers], decoder=True),
    "qwen2": Arch(lambda h, a: _llama_like(hf.Qwen2Config, h, a), hf.Qwen2Model, hf.Qwen2ForCausalLM,
                  lambda m: [m.layers], decoder=True),
    # T5 has one dropout rate for everything (its attention keeps dropout as a float).
    "t5": Arch(lambda h, a: hf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        dropout_rate=h, decoder_start_token_id=0),
               hf.T5Model, hf.T5ForConditionalGeneration, lambda m: [m.encoder.block, m.decoder.block],
               decoder=True, encoder_decoder=True),
}
ARCH_NAMES = sorted(ARCHS)
LAYERS_PER_STACK = 2


def build_model(name: str, task: bool = True, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                seed: int = 0) -> nn.Module:
    """A tiny randomly initialised model of family ``name`` (2 layers, hidden 32), in training mode."""
    arch = ARCHS[name]
    torch.manual_seed(seed)
    model = (arch.task if task else arch.base)(arch.config(hidden_dropout, attention_dropout))
    return model.train()


def model_inputs(name: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=generator)
    inputs = {"input_ids": ids}
    if ARCHS[name].encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (BATCH, SEQ), generator=generator)
    if ARCHS[name].decoder:
        inputs["use_cache"] = False
    return inputs


def main_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def expected_stacks(name: str, model: nn.Module):
    return ARCHS[name].stacks(model.base_model)


# --------------------------------------------------------------------------------------------- find_layer_stacks
@pytest.mark.parametrize("task", [False, True], ids=["base", "task"])
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_finds_the_layer_stacks_in_forward_order(name, task):
    model = build_model(name, task=task)
    stacks = find_layer_stacks(model)
    expected = expected_stacks(name, model)
    assert [id(s) for s in stacks] == [id(s) for s in expected]
    layers = find_layers(model)
    assert layers == [layer for stack in expected for layer in stack]
    if name == "albert":
        assert len(layers) == 1  # one shared layer module for both depths
    else:
        assert len(layers) == LAYERS_PER_STACK * len(expected)
    assert len(stacks) == (2 if ARCHS[name].encoder_decoder else 1)


def test_albert_with_several_groups_gives_one_stack_per_group():
    config = _bert_like(hf.AlbertConfig, 0.0, 0.0, embedding_size=16, num_hidden_groups=2, inner_group_num=2)
    config.num_hidden_layers = 4
    model = hf.AlbertModel(config)
    stacks = find_layer_stacks(model)
    assert [id(s) for s in stacks] == [id(g.albert_layers) for g in model.encoder.albert_layer_groups]
    assert len(find_layers(model)) == 4


def test_albert_shared_layer_is_called_at_every_depth():
    model = build_model("albert")
    (layer,) = find_layers(model)
    calls = []
    hook = layer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        model(**model_inputs("albert"))
    finally:
        hook.remove()
    assert len(calls) == model.config.num_hidden_layers == 2


def test_finds_stack_inside_a_wrapper():
    inner = build_model("llama")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = inner

    assert find_layers(Wrapper()) == list(inner.model.layers)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _OtherBlock(_Block):
    pass


def test_generic_fallback_takes_the_largest_list_of_same_class_blocks():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])  # leaves: not blocks
            self.mixed = nn.ModuleList([_Block(), _OtherBlock(), _Block(), _Block()])  # two classes
            self.small = nn.ModuleList([_Block() for _ in range(2)])
            self.stages = nn.ModuleList([_Block() for _ in range(3)])

    model = Custom()
    assert find_layer_stacks(model) == [model.stages]


def test_known_name_wins_and_nested_lists_are_part_of_their_stack():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([_Block(), _Block(), _Block()])  # sublayers, like T5's block[i].layer

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.extras = nn.ModuleList([_Block() for _ in range(6)])  # larger, but not a stack name
            self.layers = nn.ModuleList([Layer(), Layer()])

    model = Model()
    assert find_layer_stacks(model) == [model.layers]


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4)],
                         ids=["Sequential", "Linear"])
def test_unknown_model_raises_naming_the_class_and_layers_argument(model):
    with pytest.raises(ValueError, match=type(model).__name__) as info:
        find_layer_stacks(model)
    assert "layers=" in str(info.value)
    with pytest.raises(ValueError, match=type(model).__name__):
        find_layers(model)


@pytest.mark.parametrize("function", [find_layer_stacks, find_layers, hidden_dropout_modules])
def test_non_module_raises_type_error(function):
    with pytest.raises(TypeError, match="model"):
        function("bert-base-uncased")


# --------------------------------------------------------------------------------------------- dropout finder
def _names(model, modules):
    return sorted(name for name, module in model.named_modules() if any(module is m for m in modules))


def test_hidden_dropout_bert_keeps_attention_probability_dropout_out():
    model = build_model("bert", hidden_dropout=0.1, attention_dropout=0.1)
    names = _names(model, hidden_dropout_modules(model))
    assert names == sorted(["bert.embeddings.dropout", "dropout"]
                           + [f"bert.encoder.layer.{i}.{part}.dropout" for i in range(2)
                              for part in ("attention.output", "output")])


@pytest.mark.parametrize("name, excluded, included", [
    ("gpt2", "transformer.h.0.attn.attn_dropout", "transformer.h.0.attn.resid_dropout"),
    ("albert", "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.attention_dropout",
     "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.output_dropout"),
    # pos_dropout (on the relative position embeddings) follows hidden_dropout_prob: it is turned off too.
    ("deberta-v2", "deberta.encoder.layer.0.attention.self.dropout",
     "deberta.encoder.layer.0.attention.self.pos_dropout"),
    ("xlnet", None, "transformer.layer.0.rel_attn.dropout"),  # XLNet's one dropout serves both
    ("t5", None, "encoder.block.0.layer.1.DenseReluDense.dropout"),
])
def test_hidden_dropout_names(name, excluded, included):
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.1)
    names = _names(model, hidden_dropout_modules(model))
    all_dropouts = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    if excluded is not None:
        assert excluded in all_dropouts and excluded not in names
    assert included in names


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_models_without_dropout_modules_give_an_empty_list(name):
    assert hidden_dropout_modules(build_model(name, attention_dropout=0.1)) == []


def _train_outputs_for_seeds(model, name, seeds=(0, 1)):
    outputs = []
    for seed in seeds:
        torch.manual_seed(seed)
        outputs.append(main_output(model(**model_inputs(name))))
    return outputs


# LLaMA, Mistral and Qwen2 have no hidden dropout; T5's attention reuses dropout_rate (as a float), so its
# attention dropout cannot be switched off separately.
@pytest.mark.parametrize("name", [n for n in ARCH_NAMES if n not in ("llama", "mistral", "qwen2", "t5")])
def test_zeroing_the_found_modules_removes_all_hidden_dropout(name):
    # Hidden dropout on, attention dropout off: with every found module at p=0 the training forward is
    # deterministic, so nothing acting on hidden states was missed.
    model = build_model(name, hidden_dropout=0.1, attention_dropout=0.0)
    first, second = _train_outputs_for_seeds(model, name)
    assert not torch.equal(first, second)
    for module in hidden_dropout_modules(model):
        module.p = 0.0
    first, second = _train_outputs_for_seeds(model, name)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["bert", "roberta", "deberta-v2", "electra", "albert", "gpt2", "llama"])
def test_attention_dropout_is_not_in_the_list(name):
    model = build_model(name, hidden_dropout=0.0, attention_dropout=0.1)
    for module in hidden_dropout_modules(model):
        module.p = 0.0
    first, second = _train_outputs_for_seeds(model, name)
    assert not torch.equal(first, second)


# --------------------------------------------------------------------------------------------- float dropout
def _fairseq_style(name: str, hidden_dropout: float, attention_dropout: float = 0.0) -> nn.Module:
    """BART and OPT keep their hidden dropout as float attributes used with F.dropout (no nn.Dropout module)."""
    torch.manual_seed(0)
    if name == "bart":
        config = hf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=64, dropout=hidden_dropout,
                               activation_dropout=hidden_dropout, attention_dropout=attention_dropout,
                               classifier_dropout=0.0)
        return hf.BartForSequenceClassification(config).train()
    config = hf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                          max_position_embeddings=64, dropout=hidden_dropout, attention_dropout=attention_dropout,
                          word_embed_proj_dim=32)
    return hf.OPTForSequenceClassification(config).train()


def _fairseq_inputs():
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 2  # BART's classification head reads the eos token
    return {"input_ids": ids}


@pytest.mark.parametrize("name, expected", [
    ("bart", {"model.encoder.dropout", "model.decoder.dropout"}
     | {f"model.{part}.layers.{i}.{attr}" for part in ("encoder", "decoder") for i in range(2)
        for attr in ("dropout", "activation_dropout")}),
    ("opt", {"model.decoder.dropout", "model.decoder.layers.0.dropout", "model.decoder.layers.1.dropout"}),
])
def test_float_dropout_attributes_are_found_and_attention_dropout_is_not(name, expected):
    model = _fairseq_style(name, 0.1, attention_dropout=0.1)
    names = {n: m for n, m in model.named_modules()}
    found = {f"{next(n for n, m in names.items() if m is module)}.{attr}" for module, attr in
             hidden_dropout_attributes(model)}
    assert found == expected
    # The attention modules keep attention-probability dropout as a float named `dropout`: never listed.
    assert all("attn" not in item for item in found)
    assert hidden_dropout_modules(model) == [] or name == "bart"  # BART's head has a Dropout module
    assert configured_hidden_dropout(model) == 0.1


def test_models_with_module_dropout_have_no_float_attributes_to_find():
    for name in ("bert", "gpt2", "t5"):
        assert hidden_dropout_attributes(build_model(name, hidden_dropout=0.1)) == []
    assert configured_hidden_dropout(nn.Linear(2, 2)) is None
