"""Small causal LMs, a tokenizer and an instruction set that need nothing from the network: what the CPU tests and
``examples/sft_lora.py --tiny`` fine-tune with LoRA.

* :func:`tiny_causal_lm`: a randomly initialised LLaMA-, Mistral- or Qwen2-style model from a small config (the
  architectures are the real ``transformers`` classes; only the sizes are small).
* :func:`word_tokenizer`: a word-level tokenizer whose vocabulary is the words of the given texts.
* :func:`sst2_instructions`: GLUE's SST-2 sentences as a prompt -> completion set ("Review: ...\\nSentiment:" ->
  " positive" / " negative"), the format TRL's ``SFTTrainer`` trains on with the loss on the completion only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch

# family -> (config class, causal-LM class) in transformers
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
SST2_LABELS = (" negative", " positive")


def tiny_causal_lm(family: str = "llama", vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                   dtype: torch.dtype = torch.float32, seed: int = 0, pad_token_id: int = 0):
    """A random ``<Family>ForCausalLM`` with ``num_layers`` layers of width ``hidden_size`` (4 heads, 2 key/value
    heads: grouped-query attention as in the real models), in ``dtype``. Draws its weights from its own generator
    seeded with ``seed``; torch's global generators are left as they were."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 attention heads), got {hidden_size}")
    import transformers

    config_name, model_name = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=pad_token_id, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model.to(dtype)


def word_tokenizer(texts: Iterable[str], max_vocab: Optional[int] = None):
    """A ``PreTrainedTokenizerFast`` over the words (and punctuation marks) of ``texts``: ``<pad>`` = 0,
    ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3, then the words by frequency (at most ``max_vocab`` entries)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    options = {"special_tokens": list(SPECIAL_TOKENS)}
    if max_vocab is not None:
        options["vocab_size"] = max_vocab
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(**options))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def sst2_instructions(data_dir: Optional[Union[str, Path]] = None, max_examples: Optional[int] = 256,
                      seed: int = 0, split: str = "train"):
    """SST-2 as an instruction set: a ``datasets.Dataset`` with ``prompt`` ("Review: <sentence>\\nSentiment:") and
    ``completion`` (" positive" or " negative").

    ``data_dir``: GLUE's TSV folder (``SST-2/train.tsv``); ``None`` loads GLUE from the Hugging Face hub.
    ``max_examples`` training examples are drawn with ``seed`` (``None``: all of them); ``split`` is "train" or
    "validation".
    """
    from .glue import load_glue

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    splits = load_glue("sst2", data_dir, max_train_samples=max_examples, data_seed=seed,
                       max_eval_samples=max_examples)

    def to_instruction(example):
        return {"prompt": f"Review: {example['sentence'].strip()}\nSentiment:",
                "completion": SST2_LABELS[int(example["label"])]}

    data = splits[split]
    return data.map(to_instruction, remove_columns=data.column_names)


__all__ = ["FAMILIES", "SST2_LABELS", "sst2_instructions", "tiny_causal_lm", "word_tokenizer"]
