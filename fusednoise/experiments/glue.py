"""GLUE data and metrics for ``fusednoise finetune``: the small tasks the noise papers report on.

Data comes either from a folder in GLUE's original TSV layout (``TASK/train.tsv``, ``TASK/dev.tsv``, as written
by the GLUE download script) or, without a folder, from the Hugging Face hub (``nyu-mll/glue``). Both are loaded
with ``datasets`` and normalised to the hub's schema, so the rest of the code sees one format:

========  ===============  ========================  ==================================  =========================
task      folder           text columns              label                               metrics (dev set)
========  ===============  ========================  ==================================  =========================
cola      ``CoLA``         ``sentence``              0 unacceptable, 1 acceptable        Matthews correlation
sst2      ``SST-2``        ``sentence``              0 negative, 1 positive              accuracy
mrpc      ``MRPC``         ``sentence1, sentence2``  0 not equivalent, 1 equivalent      F1 (of class 1), accuracy
rte       ``RTE``          ``sentence1, sentence2``  0 entailment, 1 not_entailment      accuracy
stsb      ``STS-B``        ``sentence1, sentence2``  similarity score in [0, 5] (float)  Pearson, Spearman
========  ===============  ========================  ==================================  =========================

RTE's string labels map as the hub maps them (``entailment`` -> 0). STS-B is a regression task (one output,
mean-squared-error loss). The TSV files differ in layout: CoLA has no header row (source, label, original mark,
sentence), MRPC's header starts with a byte-order mark and names its columns ``Quality``, ``#1 String`` and
``#2 String``, STS-B has ten columns. Sentences contain unbalanced double quotes, so the files are read with
``quoting=csv.QUOTE_NONE`` and with NA detection off (a sentence reading "null" or "NA" stays a string).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """What one GLUE task needs: where its files are, how to read them, how to score it."""

    name: str                      # the command's name for it (and the hub's config name)
    folder: str                    # its folder in GLUE's TSV layout
    text_columns: Tuple[str, ...]  # normalised column names of the input text
    num_labels: int                # 1 for regression
    metrics: Tuple[str, ...]       # names in the dict :func:`compute_metrics` returns, the main one first
    tsv_columns: Dict[str, str]    # normalised name -> column in the TSV file
    tsv_options: Dict[str, object]  # extra options of ``load_dataset("csv", ...)`` for this task's files
    label_names: Tuple[str, ...] = ()  # string labels in the TSV, in the order of their integer ids

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


TASKS: Dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", ("sentence",), 2, ("matthews_correlation",),
                     {"sentence": "sentence", "label": "label"},
                     {"header": None, "column_names": ["source", "label", "original_label", "sentence"]}),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), 2, ("accuracy",),
                     {"sentence": "sentence", "label": "label"}, {}),
    "mrpc": GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("f1", "accuracy"),
                     {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
                     {"encoding": "utf-8-sig"}),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, ("accuracy",),
                    {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, {},
                    label_names=("entailment", "not_entailment")),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"),
                     {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, {}),
}

# Names people also write: the folder names, with or without the dash.
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb", "sst": "sst2"}


def get_task(task: Union[str, GlueTask]) -> GlueTask:
    """The :class:`GlueTask` for a name such as ``"rte"``, ``"RTE"``, ``"STS-B"`` or ``"stsb"``."""
    if isinstance(task, GlueTask):
        return task
    if not isinstance(task, str):
        raise TypeError(f"task must be a GLUE task name, got {type(task).__name__}")
    key = _ALIASES.get(task.lower(), task.lower())
    if key not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[key]


# --------------------------------------------------------------------------------------------- loading
class _quiet_datasets:
    """Turn off ``datasets``' per-map progress bars for a block (the command shows its own)."""

    def __enter__(self):
        import datasets

        self.enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        if self.enabled:
            datasets.enable_progress_bars()


def _features(task: GlueTask):
    import datasets

    columns = {column: datasets.Value("string") for column in task.text_columns}
    columns["label"] = datasets.Value("float32" if task.is_regression else "int64")
    return datasets.Features(columns)


def _read_tsv(task: GlueTask, data_dir: Union[str, Path]):
    import datasets

    folder = Path(data_dir).expanduser() / task.folder
    files = {"train": folder / "train.tsv", "validation": folder / "dev.tsv"}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir must hold GLUE's TSV layout ({task.folder}/train.tsv and "
                                f"{task.folder}/dev.tsv); missing: {', '.join(missing)}")
    raw = datasets.load_dataset(
        "csv", data_files={split: str(path) for split, path in files.items()}, delimiter="\t",
        quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, **task.tsv_options)
    for split, dataset in raw.items():
        absent = [column for column in task.tsv_columns.values() if column not in dataset.column_names]
        if absent:
            raise ValueError(f"{files[split]} has no column(s) {absent} (found {dataset.column_names}): "
                             f"is it GLUE's {task.folder} file?")
    keep = set(task.tsv_columns.values())
    return raw.remove_columns([c for c in raw["train"].column_names if c not in keep])


def _normalise_tsv(task: GlueTask, raw):
    """TSV columns -> the hub's names and label types (RTE's strings -> ids as the hub numbers them)."""
    def convert(example):
        out = {column: str(example[task.tsv_columns[column]]) for column in task.text_columns}
        label = example[task.tsv_columns["label"]]
        if task.is_regression:
            out["label"] = float(label)
        elif task.label_names:
            if label not in task.label_names:
                raise ValueError(f"{task.folder}: unknown label {label!r}, expected one of {task.label_names}")
            out["label"] = task.label_names.index(label)
        else:
            out["label"] = int(label)
        return out

    return raw.map(convert, remove_columns=raw["train"].column_names, features=_features(task))


def _read_hub(task: GlueTask):
    import datasets

    try:
        raw = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as error:  # no network, no hub access, an offline machine: say what to do instead
        raise FileNotFoundError(
            f"could not load {HUB_DATASET} ({task.name}) from the Hugging Face hub ({type(error).__name__}: "
            f"{error}); pass data_dir (--data-dir) with GLUE's TSV files ({task.folder}/train.tsv, "
            f"{task.folder}/dev.tsv)") from error
    raw = datasets.DatasetDict({split: raw[split] for split in ("train", "validation")})
    extra = [c for c in raw["train"].column_names if c not in (*task.text_columns, "label")]
    return raw.remove_columns(extra).cast(_features(task))


def load_glue(task: Union[str, GlueTask], data_dir: Optional[Union[str, Path]] = None,
              max_train_samples: Optional[int] = None, data_seed: int = 0,
              max_eval_samples: Optional[int] = None):
    """The train and dev ("validation") splits of a GLUE task as a ``datasets.DatasetDict``.

    Args:
        task: ``cola``, ``sst2``, ``mrpc``, ``rte`` or ``stsb`` (folder names such as ``STS-B`` work too).
        data_dir: a folder in GLUE's TSV layout (``TASK/train.tsv``, ``TASK/dev.tsv``); ``None`` loads
            ``nyu-mll/glue`` from the Hugging Face hub.
        max_train_samples: keep this many training examples, drawn without replacement by a shuffle with
            ``data_seed`` (the low-resource setting of the HyPe paper is 1000). The dev set is never subsampled.
        data_seed: the seed of that draw, kept apart from the training seed so every method and every training
            seed sees the same subset.
        max_eval_samples: for quick checks only: evaluate on this many dev examples (drawn the same way).
            ``None`` (the default) keeps the whole dev set, as GLUE scores it.

    Returns:
        ``DatasetDict(train=..., validation=...)`` with the task's text columns and ``label`` (int class id, or
        float score for STS-B).
    """
    spec = get_task(task)
    if max_train_samples is not None:
        if isinstance(max_train_samples, bool) or not isinstance(max_train_samples, int) or max_train_samples < 1:
            raise ValueError(f"max_train_samples must be a positive int or None, got {max_train_samples!r}")
    if max_eval_samples is not None:
        if isinstance(max_eval_samples, bool) or not isinstance(max_eval_samples, int) or max_eval_samples < 1:
            raise ValueError(f"max_eval_samples must be a positive int or None, got {max_eval_samples!r}")
    if isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0:
        raise ValueError(f"data_seed must be an int >= 0, got {data_seed!r}")
    with _quiet_datasets():
        splits = _read_tsv(spec, data_dir) if data_dir is not None else _read_hub(spec)
        if max_train_samples is not None and max_train_samples < len(splits["train"]):
            # Subsample before converting: SST-2 has 67k rows.
            splits["train"] = splits["train"].shuffle(seed=data_seed).select(range(max_train_samples))
        if max_eval_samples is not None and max_eval_samples < len(splits["validation"]):
            splits["validation"] = splits["validation"].shuffle(seed=data_seed).select(range(max_eval_samples))
        if data_dir is not None:
            splits = _normalise_tsv(spec, splits)
    return splits


def tokenize(splits, tokenizer, task: Union[str, GlueTask], max_length: int = 128):
    """Tokenize every split (truncation to ``max_length``, no padding: the collator pads each batch)."""
    spec = get_task(task)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"max_length must be an int >= 8, got {max_length!r}")

    def encode(batch):
        texts = [batch[column] for column in spec.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    with _quiet_datasets():
        return splits.map(encode, batched=True, remove_columns=list(spec.text_columns))


# --------------------------------------------------------------------------------------------- metrics
def compute_metrics(task: Union[str, GlueTask], predictions: Sequence, labels: Sequence) -> Dict[str, float]:
    """GLUE's dev-set metrics for ``task``, as fractions (not percentages).

    ``predictions`` are class ids (or logits of shape ``(n, num_labels)``, reduced by argmax), or scores for
    STS-B (logits of shape ``(n, 1)`` are flattened). CoLA: Matthews correlation; MRPC: F1 of the positive class
    and accuracy; RTE, SST-2: accuracy; STS-B: Pearson and Spearman correlation. A metric that is undefined
    (a correlation with a constant prediction) is 0.0, as scikit-learn returns for Matthews correlation.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if spec.is_regression:
        predictions = predictions.reshape(len(predictions), -1)
        if predictions.shape[1] != 1:
            raise ValueError(f"predictions for {spec.name} must be one score per example, got shape "
                             f"{predictions.shape}")
        predictions = predictions[:, 0].astype(np.float64)
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    elif predictions.ndim != 1:
        raise ValueError(f"predictions must be class ids (n,) or logits (n, classes), got shape {predictions.shape}")
    if labels.ndim != 1 or len(labels) != len(predictions):
        raise ValueError(f"labels must be 1-d and as long as predictions ({len(predictions)}), got shape "
                         f"{labels.shape}")
    if len(labels) == 0:
        raise ValueError("predictions and labels must not be empty")

    if spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    if spec.name == "mrpc":
        return {"f1": float(f1_score(labels, predictions, zero_division=0.0)),
                "accuracy": float(accuracy_score(labels, predictions))}
    if spec.is_regression:
        constant = np.all(predictions == predictions[0]) or np.all(labels == labels[0])
        if constant:
            return {"pearson": 0.0, "spearmanr": 0.0}
        pearson = float(pearsonr(predictions, labels)[0])
        spearman = float(spearmanr(predictions, labels)[0])
        return {"pearson": 0.0 if math.isnan(pearson) else pearson,
                "spearmanr": 0.0 if math.isnan(spearman) else spearman}
    return {"accuracy": float(accuracy_score(labels, predictions))}


def majority_baseline(task: Union[str, GlueTask], splits) -> Dict[str, object]:
    """What a model that ignores its input scores on the dev set: always the training set's majority class (its
    smallest id on a tie), or for STS-B always the training set's mean score (correlation 0).

    ``splits``: the ``DatasetDict`` of :func:`load_glue` (the training subset a run used). Returns
    ``{"prediction": "...", "metrics": {...}}`` with :func:`compute_metrics`'s fractions."""
    spec = get_task(task)
    train = np.asarray(splits["train"]["label"])
    dev = np.asarray(splits["validation"]["label"])
    if spec.is_regression:
        value = float(train.mean())
        prediction, constant = f"always {value:.3f} (train mean)", np.full(len(dev), value)
    else:
        classes, counts = np.unique(train, return_counts=True)
        majority = int(classes[np.argmax(counts)])  # argmax keeps the first (smallest id) of tied counts
        prediction, constant = f"always class {majority} (train majority)", np.full(len(dev), majority)
    return {"prediction": prediction, "metrics": compute_metrics(spec, constant, dev)}


__all__ = ["GlueTask", "HUB_DATASET", "TASKS", "compute_metrics", "get_task", "load_glue", "majority_baseline",
           "tokenize"]
