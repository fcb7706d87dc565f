"""Find the transformer layer stack, and the hidden dropout, of a Hugging Face model (or any PyTorch model built
the same way).

HyPe, LNSR and PATS all act on "the layers" of a model: the repeated blocks whose inputs are the hidden states.
Hugging Face keeps them in an ``nn.ModuleList`` whose attribute name is one of a handful of conventions, whatever
the model family, and whether the model is the base model or a task model wrapping it:

=====================================  =========================================================
``encoder.layer``                      BERT, RoBERTa, DeBERTa(-v2), ELECTRA
``layer``                              XLNet (``transformer.layer``), DistilBERT
``h``                                  GPT-2, GPT-J, BLOOM, Falcon (``transformer.h``)
``layers``                             LLaMA, Mistral, Qwen2, OPT, BART (``model.layers``, ...)
``block``                              T5 (``encoder.block``, then ``decoder.block``)
``albert_layers``                      ALBERT (``encoder.albert_layer_groups[g].albert_layers``)
=====================================  =========================================================

The rule (no per-model table):

1. Every ``nn.ModuleList`` named ``layer``, ``layers``, ``h``, ``block``, ``blocks`` or ``albert_layers`` whose
   entries are all blocks of one class is a stack. Stacks are returned in module registration order, which is
   forward order for encoder-decoder models (the encoder is registered first). A list nested inside a stack
   already found is part of that stack's layers, not a stack (T5's ``block[i].layer`` holds a block's sublayers).
2. When no such list exists, the largest ``nn.ModuleList`` of at least two same-class blocks is the stack.
3. Otherwise :func:`find_layer_stacks` raises a ``ValueError``: pass the layers explicitly (``layers=``).

A "block" is a module with submodules of its own: a list of bare ``nn.Linear`` heads is never a stack.

ALBERT shares one layer across depth: ``albert_layer_groups`` holds ``num_hidden_groups`` groups (1 by default),
each with ``inner_group_num`` distinct layers (1 by default), and the encoder calls the groups
``num_hidden_layers`` times. The stacks found are the groups' ``albert_layers`` lists, so :func:`find_layers`
returns the *distinct* layer modules (1 for ``albert-base-v2``), and a hook on the shared layer fires once per
depth (12 times per forward for ``albert-base-v2``). For HyPe that is the paper's rule: noise enters the hidden
states at every depth. A subset of *depths* cannot be chosen by module for ALBERT.

Hidden dropout (what the HyPe paper turns off while HyPe is on) comes in two forms: ``nn.Dropout`` modules
(BERT, RoBERTa, GPT-2, T5, ...: :func:`hidden_dropout_modules`) and float probabilities kept as attributes and
passed to ``F.dropout`` at forward time (BART, OPT, mBART, Marian, Pegasus, ...: :func:`hidden_dropout_attributes`).

No import of ``transformers`` is needed: the rules read module names, classes and attributes only. This module
sits below the methods (HyPe and LNSR import it); :mod:`fusednoise.integrations.transformers` re-exports it under
its former name.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Tuple

from torch import nn

# Attribute names Hugging Face gives its layer stacks (see the table above).
STACK_NAMES = ("layer", "layers", "h", "block", "blocks", "albert_layers")

# Containers are not blocks: a ModuleList of ModuleLists (Funnel's ``blocks``) is not a stack of layers.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)

_DROPOUT_CLASSES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _is_block_stack(module: nn.Module, min_len: int) -> bool:
    """A ModuleList of at least ``min_len`` blocks, all of one class, each with submodules of its own."""
    if not isinstance(module, nn.ModuleList) or len(module) < min_len:
        return False
    classes = {type(child) for child in module}
    if len(classes) != 1:
        return False
    child = module[0]
    return not isinstance(child, _CONTAINERS) and next(child.children(), None) is not None


def _outermost(candidates: List[Tuple[str, nn.ModuleList]]) -> List[Tuple[str, nn.ModuleList]]:
    """Drop candidates nested inside an earlier one (``named_modules`` lists a parent before its children)."""
    kept: List[Tuple[str, nn.ModuleList]] = []
    for name, stack in candidates:
        if any(name.startswith(parent + ".") for parent, _ in kept):
            continue
        kept.append((name, stack))
    return kept


def find_layer_stacks(model: nn.Module) -> List[nn.ModuleList]:
    """The transformer layer stacks of ``model``, in forward order.

    One stack for most models; encoder then decoder for encoder-decoder models (T5, BART); one stack per layer
    group for ALBERT (usually one stack holding the single shared layer). Works on base models and task models
    alike (``BertModel`` or ``BertForSequenceClassification``), and on wrappers that keep the model as a
    submodule (PEFT, DDP). See the module docstring for the rule.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no layer stack was found (the message names the model class).
    """
    _check_model(model)
    # remove_duplicate=False would list a module shared under two names twice; the default (True) keeps the
    # first name, which is the one registration (and forward) order gives.
    named = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    known = [(name, module) for name, module in named
             if name.rsplit(".", 1)[-1] in STACK_NAMES and _is_block_stack(module, min_len=1)]
    stacks = _outermost(known)
    if not stacks:
        generic = _outermost([(name, module) for name, module in named if _is_block_stack(module, min_len=2)])
        if generic:
            # max() keeps the first of equal-length lists: the one registered (and run) first.
            stacks = [max(generic, key=lambda item: len(item[1]))]
    if not stacks:
        raise ValueError(
            f"could not find the transformer layer stack of {type(model).__name__}: no nn.ModuleList named "
            f"{', '.join(STACK_NAMES)} and no ModuleList of two or more same-class blocks. "
            "Pass the layers explicitly, e.g. layers=model.my_encoder.blocks (an nn.ModuleList or a list of modules)")
    return [stack for _, stack in stacks]


def find_layers(model: nn.Module) -> List[nn.Module]:
    """The layers of every stack of :func:`find_layer_stacks`, flattened in forward order.

    For ALBERT these are the distinct (shared) layer modules, not one entry per depth.
    """
    return [layer for stack in find_layer_stacks(model) for layer in stack]


def _is_attention_dropout(name: str) -> bool:
    """Whether a dropout module's qualified name marks it as attention-probability dropout.

    Hugging Face spells these ``attention.self.dropout`` / ``crossattention.self.dropout`` (BERT, RoBERTa,
    ELECTRA, DeBERTa-v2: a module named ``dropout`` under a self-attention module named ``self``),
    ``attn_dropout`` (GPT-2) and ``attention_dropout`` (ALBERT).
    """
    parts = name.split(".")
    leaf = parts[-1]
    if "attn" in leaf or "attention" in leaf:
        return True
    return leaf == "dropout" and len(parts) >= 2 and parts[-2] == "self"


def hidden_dropout_modules(model: nn.Module) -> List[nn.Module]:
    """The dropout modules of ``model`` that act on hidden states, in registration order.

    These are the ones the HyPe paper turns off when HyPe is on ("no dropout on hidden representations"):
    every ``nn.Dropout`` (and its 1d/2d/3d/alpha variants) except attention-probability dropout, told apart by
    name (see ``_is_attention_dropout``). That includes the embedding dropout, the dropouts on attention and
    feed-forward outputs inside each layer, the feed-forward inner dropout (T5), DeBERTa-v2's ``pos_dropout`` on
    the relative position embeddings and the task head's dropout: in short, what Hugging Face's
    ``hidden_dropout_prob`` (``resid_pdrop``/``embd_pdrop`` for GPT-2) controls, which is the knob the paper's
    setup turns to 0 (BERT-style heads follow it unless ``classifier_dropout`` is set).

    Caveats: XLNet's ``rel_attn.dropout`` is one module applied to both the attention probabilities and the
    attention output, so it is included. Attention dropout kept as a float rather than a module (LLaMA, Mistral,
    Qwen2's ``attention_dropout``; T5's attention, which reuses ``dropout_rate``) is not a module and is left as
    it is; LLaMA, Mistral and Qwen2 have no dropout module at all, so their list is empty. Hidden dropout kept as
    a float (BART, OPT) is found by :func:`hidden_dropout_attributes`.
    """
    _check_model(model)
    return [module for name, module in model.named_modules()
            if isinstance(module, _DROPOUT_CLASSES) and not _is_attention_dropout(name)]


def _is_attention_module(module: nn.Module) -> bool:
    """Attention modules keep their attention-probability dropout as a float named ``dropout`` (BART, OPT)."""
    return "attention" in type(module).__name__.lower()


def hidden_dropout_attributes(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """The hidden-state dropout probabilities kept as float attributes, as ``(module, attribute name)`` pairs in
    registration order.

    BART, OPT, mBART, Marian, Pegasus and other fairseq-style models keep ``self.dropout = config.dropout`` (and
    ``self.activation_dropout``) as floats and call ``F.dropout(h, p=self.dropout, training=self.training)``:
    there is no ``nn.Dropout`` module to switch off. Found here: a float attribute named ``dropout`` or ending in
    ``_dropout``, except attention-probability dropout (a name containing ``attn`` or ``attention``, or any such
    attribute of a module whose class name contains ``Attention``, as ``BartAttention.dropout``). ``layerdrop``
    (skipping whole layers) is not dropout on hidden states and is left alone. Models that read the probability
    from ``self.config`` at forward time (Falcon's ``hidden_dropout``) cannot be reached this way.
    """
    _check_model(model)
    found = []
    for _, module in model.named_modules():
        if isinstance(module, _DROPOUT_CLASSES) or _is_attention_module(module):
            continue
        for name, value in vars(module).items():
            if not (name == "dropout" or name.endswith("_dropout")) or "attn" in name or "attention" in name:
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= float(value) <= 1:
                found.append((module, name))
    return found


# Config fields that hold a hidden-state dropout probability in Hugging Face configurations.
_CONFIG_DROPOUT_FIELDS = ("hidden_dropout_prob", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
                          "dropout_rate", "activation_dropout")


def configured_hidden_dropout(model: nn.Module) -> Optional[float]:
    """The largest hidden-state dropout probability ``model.config`` declares (None without a config)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    values = [getattr(config, name, None) for name in _CONFIG_DROPOUT_FIELDS]
    values = [float(v) for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    return max(values) if values else None


__all__ = ["STACK_NAMES", "configured_hidden_dropout", "find_layer_stacks", "find_layers",
           "hidden_dropout_attributes", "hidden_dropout_modules"]
