"""A fine-tuning run's configuration and identity: the recipes and their methods' settings
(:class:`FinetuneConfig`), what a table row shares, and the file a run is written to.

Both :mod:`.finetune` (which writes runs) and :mod:`.report` (which reads them) import this module; neither imports
the other's internals, so the harness has no import cycle.

A run's identity is its whole configuration (:func:`run_identity`): it is written to
``OUTPUT/runs/TASK__RECIPE[__SETTINGS]__DIGEST__seedN.json``, where ``SETTINGS`` lists the recipe's method settings
that differ from their defaults and ``DIGEST`` is a short hash of everything that decides the run
(``stsb__hype-n__hype_sigma=0__5c3e0f9a1b__seed0.json``): two runs that differ in anything (epochs, learning rate,
a method setting, ...) never share a file, and the tables (:mod:`.report`) give different method or shared settings
separate rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

from ..lnsr import DEFAULT_REDUCTION, DEFAULT_REPLAY_RNG, REDUCTIONS
from .glue import get_task

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
    "hype-n": ("hype_sigma", "hype_layers", "hype_keep_dropout", "hype_fused"),
    "hype-u": ("hype_sigma", "hype_layers", "hype_keep_dropout", "hype_fused"),
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
# Settings added after run files were committed whose value in those files is also their default: in a run's
# identity only when they differ from it, so the committed files keep their digests. (hype_fused: the fused patch
# draws the hook path's noise; it changes a run only by the rounding of (a + b) + eps and the float32 sum order.)
IDENTITY_WHEN_SET: Dict[str, object] = {"hype_fused": False}
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
    hype_fused: Union[bool, str] = False  # hype.apply(fused=...): False (hooks), True or "auto"
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
        if not (self.hype_fused is True or self.hype_fused is False or self.hype_fused == "auto"):
            raise ValueError(f"hype_fused must be False, True or 'auto', got {self.hype_fused!r}")
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
        from ..integrations.trainer import HyPeConfig, LNSRConfig, NoisyTuneConfig, PATSConfig

        methods = set(self.methods)
        kwargs = {"hype": None, "lnsr": None, "noisytune": None, "pats": None}
        if methods & {"hype-n", "hype-u"}:
            kwargs["hype"] = HyPeConfig(sigma=self.hype_sigma,
                                        distribution="uniform" if "hype-u" in methods else "normal",
                                        layers=None if self.hype_layers == "all" else self.hype_layers,
                                        disable_dropout=not self.hype_keep_dropout, fused=self.hype_fused)
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
            from ..integrations.trainer import NEFTuneConfig

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
        value = _setting(config, name)
        if name not in IDENTITY_WHEN_SET or value != IDENTITY_WHEN_SET[name]:
            identity[name] = value
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


