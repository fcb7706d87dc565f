"""``fusednoise report``: the tables and the plot of a folder of ``fusednoise finetune`` runs.

Everything is read back from the run JSONs (``OUTPUT/runs/*.json``), so a folder filled by several commands, or
by older versions (schema ``fusednoise.finetune/1``), gives one report. What a reader needs to judge a difference
is in the table itself:

* each row is a task, a recipe with its non-default method settings, and the shared training settings
  (:func:`fusednoise.experiments.finetune.row_key`); its seeds give mean ± sample std;
* the class-majority baseline (what a model that ignores its input scores) as the first row of each task;
* each recipe's difference to its *control*: the same recipe with ``pats`` replaced by ``adamax`` (PATS is Adamax
  plus noise, so its noise is measured against Adamax at the same learning rate), else ``vanilla``;
* a statement of the one optimiser setting every recipe shared (no paper's; only the noise hyperparameters are
  the papers');
* per-step time from the steady state of training (the first steps of a process are slow for reasons that have
  nothing to do with the method), and the schedule warnings a run recorded (a run too short to train).

What could mislead is said, not hidden: a file that is not a run this version reads (truncated, another schema,
a field missing) is named and left out, never stopping the report; a row and seed in two files counts once (the
newest, both files named under both tables); Δ pairs seeds, and says ``n`` when the row and its control ran
different seeds; a ms/step timed on another host or device, on a loaded machine or while a calibration matmul
ran slow is marked † (:func:`timing_notes`). results.md and curves.png are written atomically.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .runs import (METHODS, SCHEMA, SCHEMAS, _setting, check_name, identity_key, parse_recipe, row_key,
                       run_file_name, write_atomically)
from .glue import TASKS, GlueTask, get_task

WARNING_MARK = "⚠"
# ms/step not comparable with the unmarked rows: a run older than the step timer (wall time over steps), or timed
# under other conditions (another host or device, a loaded machine, a slower calibration matmul).
LEGACY_TIME_MARK = "†"
DUPLICATE_MARK = "Duplicate run:"
# A run whose calibration matmul took this many times the quickest one of its table ran on a busier machine.
SLOW_CALIBRATION = 1.5
_MARKERS = "osD^vP*Xp<>h"


def _plural(count, word: str) -> str:
    """``1 seed``, ``3 seeds``, ``1 epoch``, ``2.5 epochs``."""
    return f"{count:g} {word}" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------------------------- loading
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_problem(data) -> Optional[str]:
    """Why ``data`` (a parsed JSON file) is not a run this version can report, or None: the checks cover every
    field the tables and the plot read, so a run that passes them cannot stop a report."""
    if not isinstance(data, dict):
        return f"holds a JSON {type(data).__name__}, not an object: not a run file"
    if "schema" not in data:
        return "has no 'schema': not a fusednoise finetune run file"
    if data["schema"] not in SCHEMAS:
        return f"has schema {data['schema']!r}, which this version does not read (it reads {', '.join(SCHEMAS)})"
    config = data.get("config")
    if not isinstance(config, dict):
        return "has no 'config' object"
    try:
        task = get_task(config["task"])
        if list(parse_recipe(config["methods"])) != list(config["methods"]):
            return f"config's methods {config['methods']!r} are not a recipe in order"
        row_key(config), identity_key(config)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return f"config cannot be read ({type(error).__name__}: {error})"
    if not isinstance(data.get("seed"), int) or data["seed"] != config.get("seed"):
        return f"'seed' {data.get('seed')!r} is not the config's seed {config.get('seed')!r}"
    for field, metrics in (("metrics", task.metrics), ("best_epoch", (task.main_metric,))):
        found = data.get(field)
        if not isinstance(found, dict):
            return f"has no {field!r} object"
        missing = [m for m in metrics if not _number(found.get(m))]
        if missing:
            return f"{field!r} has no number for {', '.join(missing)}"
    epochs = data.get("per_epoch")
    if not isinstance(epochs, list) or not all(isinstance(row, dict) and _number(row.get("epoch")) for row in epochs):
        return "'per_epoch' is not a list of epochs"
    for field in ("train_examples", "dev_examples", "wall_time_s", "peak_memory_mb"):
        if not _number(data.get(field)):
            return f"has no number {field!r}"
    for field in ("device", "peak_memory_kind"):
        if not isinstance(data.get(field), str):
            return f"has no text {field!r}"
    if not _number(config.get("epochs")) or not _number(config.get("optimizer_lr")):
        return "config has no number 'epochs' or 'optimizer_lr'"
    step = data.get("step_time_s")
    if step is not None and not (isinstance(step, dict) and _number(step.get("median"))):
        return "'step_time_s' has no number 'median'"
    timing = data.get("timing")
    if timing is not None and not isinstance(timing, dict):
        return "'timing' is not an object"
    return None


def read_run(path: Union[str, Path]) -> Tuple[Optional[dict], Optional[str]]:
    """``(run, None)``, or ``(None, why)`` for a file that is not a run this version reads (unreadable, truncated,
    not JSON, another schema, a field missing). The run gets ``_file``, its file name; a config recorded with
    ``device="auto"`` (runs before the device was resolved) gets the device the run names."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot be read ({error})"
    except json.JSONDecodeError as error:
        return None, f"is not valid JSON, truncated? ({error})"
    problem = run_problem(data)
    if problem:
        return None, problem
    if data["config"].get("device") == "auto" and data["device"].split(":")[0] in ("cpu", "cuda"):
        data["config"] = dict(data["config"], device=data["device"].split(":")[0])
    data["_file"] = path.name
    return data, None


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def load_runs(output: Union[str, Path], warn: Callable[[str], None] = _warn) -> List[dict]:
    """Every run JSON of ``OUTPUT/runs``, sorted by file name. A file that is not a run this version reads
    (:func:`read_run`: truncated, a JSON list, no ``metrics``, an unknown schema, ...) is left out, and
    ``warn`` is called with its name and why (by default a ``UserWarning``): one bad file never stops a report."""
    runs = []
    for path in sorted((Path(output) / "runs").glob("*.json")):
        run, problem = read_run(path)
        if problem:
            warn(f"{path}: {problem}; left out")
        else:
            runs.append(run)
    return runs


def rename_runs(output: Union[str, Path], warn: Callable[[str], None] = _warn) -> List[Tuple[Path, Path]]:
    """Give every run file of ``OUTPUT/runs`` the name its config gives today
    (:func:`fusednoise.experiments.finetune.run_file_name`: the whole configuration, as a digest), for folders written by
    older versions. Returns the ``(old, new)`` pairs; refuses (``FileExistsError``, nothing renamed) if two files
    would take one name (two files of one run) or a new name is taken by another file. Files that are not runs
    (:func:`read_run`) are named through ``warn`` and left as they are."""
    folder = Path(output) / "runs"
    moves = []
    for path in sorted(folder.glob("*.json")):
        run, problem = read_run(path)
        if problem:
            warn(f"{path}: {problem}; not renamed")
            continue
        target = check_name(folder / run_file_name(run["config"]))
        if target != path:
            moves.append((path, target))
    sources = {}
    for path, target in moves:
        sources.setdefault(target, []).append(path.name)
    moving = {path for path, _ in moves}
    clashes = sorted(f"{target.name} (from {', '.join(names)})" for target, names in sources.items()
                     if len(names) > 1 or (target.exists() and target not in moving))
    if clashes:
        raise FileExistsError(f"renaming the runs in {folder} would overwrite {'; '.join(clashes)}: nothing renamed")
    staged = []
    for path, target in moves:  # two steps, so that two files may swap names
        handle, name = tempfile.mkstemp(dir=folder, prefix=".renaming-", suffix=".tmp")
        os.close(handle)
        os.replace(path, name)
        staged.append((name, target))
    for name, target in staged:
        os.replace(name, target)
    return moves


# --------------------------------------------------------------------------------------------- grouping
def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _recipe_order(methods: Sequence[str]) -> tuple:
    return tuple(list(METHODS).index(m) if m in METHODS else 99 for m in methods)


def _file(run: dict) -> str:
    return run.get("_file") or f"a run finished {run.get('finished_at', 'at an unknown time')}"


def _one_run_per_seed(key: tuple, group: Sequence[dict], duplicates: List[Tuple[str, str]]) -> List[dict]:
    """One run per seed of a row, sorted by seed. Two files with one row and seed (the same run twice, or runs
    that differ only outside the row, e.g. in ``data_dir``) would count one seed twice: the newest
    (``finished_at``; the first file name on a tie) is kept, and ``duplicates`` gets ``(task, what)``."""
    by_seed: Dict[int, List[dict]] = {}
    for run in group:
        by_seed.setdefault(run["seed"], []).append(run)
    kept = []
    for seed in sorted(by_seed):
        same = by_seed[seed]
        chosen = max(same, key=lambda r: str(r.get("finished_at") or ""))
        kept.append(chosen)
        if len(same) > 1:
            others = ", ".join(_file(r) for r in same if r is not chosen)
            duplicates.append((key[0], f"{key[1]} seed {seed} is in {len(same)} files: the tables use "
                                       f"{_file(chosen)} (the newest) and leave out {others}"))
    return kept


def _groups(runs: Sequence[dict], duplicates: Optional[List[Tuple[str, str]]] = None) -> Dict[tuple, List[dict]]:
    """Runs by :func:`~fusednoise.experiments.finetune.row_key`, in task order, then recipe order, then label; one run per
    seed (:func:`_one_run_per_seed`, which adds to ``duplicates``)."""
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault(row_key(run["config"]), []).append(run)
    order = {name: i for i, name in enumerate(TASKS)}

    def sort_key(item):
        (task, label, settings), group = item
        return order.get(task, 99), _recipe_order(group[0]["config"]["methods"]), label, str(settings)

    duplicates = [] if duplicates is None else duplicates
    return {key: _one_run_per_seed(key, group, duplicates)
            for key, group in sorted(groups.items(), key=sort_key)}


def _rows_by_task(runs: Sequence[dict]) -> List[Tuple[GlueTask, List[tuple], List[str]]]:
    """The groups of :func:`_groups` split by task: ``[(task, [(key, runs), ...], duplicate notes), ...]``."""
    by_task: Dict[str, List[tuple]] = {}
    duplicates: List[Tuple[str, str]] = []
    for key, group in _groups(runs, duplicates).items():
        by_task.setdefault(key[0], []).append((key, group))
    return [(get_task(name), rows, [what for task, what in duplicates if task == name])
            for name, rows in by_task.items()]


def control_config(config: dict) -> Optional[dict]:
    """The config of a recipe's control: ``pats`` replaced by ``adamax`` (the same optimizer and learning rate
    without the noise), else ``vanilla``; None for ``vanilla`` itself."""
    methods = list(config["methods"])
    if "pats" in methods:
        methods = [("adamax" if m == "pats" else m) for m in methods]
    elif methods == ["vanilla"]:
        return None
    else:
        methods = ["vanilla"]
    return dict(config, methods=list(parse_recipe(methods)))


def _controls(rows: Sequence[tuple]) -> Dict[tuple, Tuple[str, Optional[List[dict]]]]:
    """Row key -> (the control's label, its runs or None when the folder has none)."""
    present = dict(rows)
    out = {}
    for key, group in rows:
        control = control_config(group[0]["config"])
        if control is not None:
            control_key = row_key(control)
            out[key] = (control_key[1], present.get(control_key))
    return out


def _main(run: dict, task: GlueTask) -> float:
    return 100 * run["metrics"][task.main_metric]


# --------------------------------------------------------------------------------------------- table cells
def _ms_per_step(group: Sequence[dict]) -> Tuple[str, bool]:
    """Median steady-state ms per optimizer step over the seeds, and whether it is the legacy measure: runs older
    than the step timer give their wall time over their steps (evaluation and process warm-up included)."""
    steady = [r["step_time_s"]["median"] for r in group if r.get("step_time_s")]
    if len(steady) == len(group):
        return f"{1e3 * statistics.median(steady):.0f}", False
    whole = [r["wall_time_s"] / max(1, r.get("optimizer_steps") or 1) for r in group]
    return f"{1e3 * statistics.median(whole):.0f}", True


def _most_common(values: Sequence) -> object:
    counts: Dict[object, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))  # the first of the most common


def _calibrations(run: dict) -> List[float]:
    """The calibration matmul's times a run recorded (at its start and its end)."""
    timing = run.get("timing") or {}
    return [timing[k] for k in ("calibration_ms_start", "calibration_ms_end") if _number(timing.get(k))]


def timing_notes(rows: Sequence[tuple]) -> Dict[tuple, List[str]]:
    """Row key -> why its ms/step is not comparable with the other rows of its table (empty: comparable as far as
    the runs recorded). A row is set apart when a run of it was timed on another device or host than most runs
    of the table, on a loaded machine (1-minute load average above its CPU count, at the run's start or end), or
    while the calibration matmul (:func:`fusednoise.experiments.finetune.calibration_ms`) took more than
    :data:`SLOW_CALIBRATION` times its quickest on that host; or when it recorded no timing conditions while
    other rows did. Runs older than ``fusednoise.finetune/3`` recorded only the device."""
    runs = [r for _, group in rows for r in group]
    device = _most_common([r["device"] for r in runs])
    hosts = [r["timing"]["host"] for r in runs if (r.get("timing") or {}).get("host")]
    host = _most_common(hosts) if hosts else None
    fastest: Dict[tuple, float] = {}
    for run in runs:
        where = ((run.get("timing") or {}).get("host"), run["device"])
        for value in _calibrations(run):
            fastest[where] = min(fastest.get(where, value), value)
    notes = {}
    for key, group in rows:
        why: List[str] = []
        for run in group:
            timing = run.get("timing") or {}
            seed = f"seed {run['seed']}"
            if run["device"] != device:
                why.append(f"{seed} timed on {run['device']}, most runs here on {device}")
            if not timing:
                if hosts:
                    why.append(f"{seed} recorded no timing conditions (an older run)")
                continue
            if host is not None and timing.get("host") != host:
                why.append(f"{seed} timed on host {timing.get('host')}, most runs here on {host}")
            loads = [load[0] for load in (timing.get("load_average_start"), timing.get("load_average_end"))
                     if isinstance(load, list) and load and _number(load[0])]
            cpus = timing.get("cpu_count")
            if loads and _number(cpus) and max(loads) > cpus:
                why.append(f"{seed} timed on a loaded machine (load average {max(loads):g} on {cpus} CPUs)")
            value = max(_calibrations(run), default=None)
            quickest = fastest.get((timing.get("host"), run["device"]))
            if value is not None and quickest and value > SLOW_CALIBRATION * quickest:
                why.append(f"{seed}'s calibration matmul took {value:.3g} ms, {value / quickest:.1f}x the quickest "
                           f"here ({quickest:.3g} ms): a busier machine")
        if why:
            notes[key] = why
    return notes


def _baselines(rows: Sequence[tuple]) -> Dict[tuple, Tuple[dict, dict]]:
    """(train/dev data settings) -> (a run's majority baseline, that run): one per data subset of the task."""
    out = {}
    for _, group in rows:
        for run in group:
            if run.get("majority_baseline"):
                config = run["config"]
                data = (config.get("max_train_samples"), config.get("data_seed"), config.get("max_eval_samples"))
                out.setdefault(data, (run["majority_baseline"], run))
    return out


def settings_statement(runs: Sequence[dict]) -> str:
    """The training setting the rows shared, in words, and what it is not."""
    def values(name, subset):
        return sorted({_setting(r["config"], name) for r in subset}, key=lambda v: (str(type(v)), v))

    adamax = [r for r in runs if {"pats", "adamax"} & set(r["config"]["methods"])]
    adamw = [r for r in runs if r not in adamax]
    optimisers = []
    if adamw:
        optimisers.append("AdamW at lr " + " or ".join(f"{v:g}" for v in values("lr", adamw)))
    if adamax:
        rates = sorted({r["config"]["optimizer_lr"] for r in adamax})
        optimisers.append("Adamax at lr " + " or ".join(f"{v:g}" for v in rates) + " for recipes with pats or "
                          "adamax (pats-2022 Table 2's BERT-base rate unless --pats-lr says otherwise)")
    parts = []
    for name, say in (("batch_size", lambda v: f"batch {v}"), ("epochs", lambda v: _plural(v, "epoch")),
                      ("max_length", lambda v: f"max length {v}"),
                      ("warmup_ratio", lambda v: f"linear warm-up over the first {v:.0%} of steps, then linear decay"),
                      ("weight_decay", lambda v: f"weight decay {v:g}")):
        found = values(name, runs)
        parts.append(say(found[0]) if len(found) == 1 else f"{name} {' or '.join(str(v) for v in found)} (rows differ)")
    return ("Shared by every row: " + "; ".join(optimisers) + "; " + ", ".join(parts) + ". This one optimiser "
            "setting is used for every method and is no paper's (each paper tuned its optimiser, learning rate, "
            "batch and epochs for its own method): only the noise hyperparameters are the papers' defaults.")


# --------------------------------------------------------------------------------------------- tables
def _delta(group: Sequence[dict], control_runs: Sequence[dict], task: GlueTask) -> Tuple[str, bool]:
    """The main metric's difference to the control over the seeds both ran (paired by seed), and whether those
    are fewer than either row's seeds (the cell then says ``n=``)."""
    mine = {r["seed"]: _main(r, task) for r in group}
    theirs = {r["seed"]: _main(r, task) for r in control_runs}
    common = sorted(set(mine) & set(theirs))
    if not common:
        return "no common seed", False
    delta = statistics.fmean(mine[s] for s in common) - statistics.fmean(theirs[s] for s in common)
    partial = len(common) != len(mine) or len(common) != len(theirs)
    return f"{delta:+.2f}" + (f" (n={len(common)})" if partial else ""), partial


def summary_table(runs: Sequence[dict]) -> str:
    """Markdown, per task: the majority baseline, then one row per (recipe, settings) with the mean ± sample std
    over seeds of the final-epoch dev metrics (x100), the difference to the row's control over the seeds both
    ran, the best seed's main metric (the papers' "max"), the best epoch's, steady-state ms per step (marked
    where not comparable with the other rows: :func:`timing_notes`) and peak memory. A row and seed in two files
    counts once, and the table says which file it used."""
    if not runs:
        return "_no runs yet_\n"
    lines = []
    legacy_time = other_time = partial_delta = False
    for task, rows, duplicates in _rows_by_task(runs):
        main = task.main_metric
        controls = _controls(rows)
        apart = timing_notes(rows)
        lines.append(f"### {task.folder}: dev {', '.join(task.metrics)} (x100), final epoch, mean ± std over seeds\n")
        lines.append(f"| recipe | seeds | {' | '.join(task.metrics)} | Δ {main} | vs | max {main} | "
                     f"best-epoch {main} | train/dev n | epochs | lr | ms/step | peak MB |")
        lines.append("|" + " --- |" * (len(task.metrics) + 11))
        for baseline, run in _baselines(rows).values():
            cells = " | ".join(f"{100 * baseline['metrics'][m]:.2f}" for m in task.metrics)
            lines.append(f"| majority baseline: {baseline['prediction']} | — | {cells} | | | | | "
                         f"{run['train_examples']}/{run['dev_examples']} | | | | |")
        notes: Dict[str, List[str]] = {}  # warning -> the rows that recorded it
        for key, group in rows:
            label = key[1]
            cells = []
            for metric in task.metrics:
                mean, std = _mean_std([100 * r["metrics"][metric] for r in group])
                cells.append(f"{mean:.2f} ± {std:.2f}")
            delta, versus = "—", ""
            if key in controls:
                versus, control_runs = controls[key]
                if control_runs:
                    delta, partial = _delta(group, control_runs, task)
                    partial_delta |= partial
                else:
                    delta = "no run"
            warned = sorted({w for r in group for w in r.get("warnings") or ()})
            for warning in warned:
                notes.setdefault(warning, []).append(label)
            best_seed = max(_main(r, task) for r in group)
            best_mean, best_std = _mean_std([100 * r["best_epoch"][main] for r in group])
            config = group[0]["config"]
            step, legacy = _ms_per_step(group)
            legacy_time |= legacy
            other_time |= key in apart
            if legacy or key in apart:
                step += LEGACY_TIME_MARK
            seeds = ",".join(str(r["seed"]) for r in group)
            lines.append(f"| {label}{' ' + WARNING_MARK if warned else ''} | {seeds} | {' | '.join(cells)} | {delta} | "
                         f"{versus} | {best_seed:.2f} | {best_mean:.2f} ± {best_std:.2f} | "
                         f"{group[0]['train_examples']}/{group[0]['dev_examples']} | {config['epochs']:g} | "
                         f"{config['optimizer_lr']:g} | {step} | {max(r['peak_memory_mb'] for r in group):.0f} |")
        lines.append("")
        lines.append(settings_statement([r for _, group in rows for r in group]))
        lines.extend(f"\n{WARNING_MARK} {', '.join(labels)}: {warning}" for warning, labels in notes.items())
        lines.extend(f"\n{LEGACY_TIME_MARK} {key[1]}: {'; '.join(why)}" for key, why in apart.items())
        lines.extend(f"\n{DUPLICATE_MARK} {what}" for what in duplicates)
        lines.append("")
    devices = sorted({r["device"] for r in runs})
    models = sorted({r.get("model", str(r["config"].get("model"))) for r in runs})
    unrecorded = sum(not r.get("timing") for r in runs)
    lines.append(f"Device: {'; '.join(devices)}. Model: {'; '.join(models)}. ")
    lines.append("Metrics are fractions x100 on the dev set (all of it unless 'dev n' says less) after the last "
                 "epoch. Δ is the mean's difference to the row named in 'vs': adamax for recipes with pats (the "
                 "same optimiser and learning rate without PATS's noise), vanilla for the others"
                 + ("; where the two rows ran different seeds, Δ is over the n seeds both ran (paired by seed)"
                    if partial_delta else "")
                 + ". 'max' is the "
                 "best seed's; 'best-epoch' is the best dev score over epochs (optimistic: chosen on the dev set "
                 "itself). std is the sample standard deviation over seeds (0 for one seed). ms/step: median time "
                 "of an optimizer step (forward, backward, update) after the first tenth of the steps, median over "
                 "seeds"
                 + (f"; {LEGACY_TIME_MARK}: a run older than the step timer, whose wall time over its steps "
                    "includes evaluation and the process's warm-up (not comparable between rows)" if legacy_time
                    else "")
                 + (f"; {LEGACY_TIME_MARK} also marks rows timed under other conditions than the unmarked rows "
                    f"(the {LEGACY_TIME_MARK} lines under the table say which)" if other_time else "")
                 + ". Peak MB: " + "; ".join(sorted({r["peak_memory_kind"] for r in runs})) + "."
                 + (f" {unrecorded} of the {len(runs)} runs were written before runs recorded their timing "
                    f"conditions ({SCHEMA}: host, load average, a calibration matmul): rows of those runs may have "
                    "been timed on differently loaded machines, so their ms/step compare only roughly."
                    if unrecorded else ""))
    return "\n".join(lines) + "\n"


def per_seed_table(runs: Sequence[dict]) -> str:
    """Markdown: the final-epoch main metric (x100) of every seed, and the paired difference to the control run
    with the same seed. With few seeds the paired differences say more than two means: a gain that changes sign
    from seed to seed is not one."""
    if not runs:
        return "_no runs yet_\n"
    lines = []
    for task, rows, duplicates in _rows_by_task(runs):
        seeds = sorted({r["seed"] for _, group in rows for r in group})
        controls = _controls(rows)
        lines.append(f"### {task.folder}: dev {task.main_metric} (x100) per seed, final epoch\n")
        lines.append("| recipe | " + " | ".join(f"seed {s}" for s in seeds) + " | vs | paired Δ |")
        lines.append("|" + " --- |" * (len(seeds) + 3))
        for key, group in rows:
            by_seed = {r["seed"]: _main(r, task) for r in group}
            cells = [f"{by_seed[s]:.2f}" if s in by_seed else "" for s in seeds]
            versus, delta = "", "—"
            if key in controls:
                versus, control_runs = controls[key]
                control = {r["seed"]: _main(r, task) for r in control_runs or ()}
                paired = [f"{by_seed[s] - control[s]:+.2f}" for s in seeds if s in by_seed and s in control]
                delta = ", ".join(paired) or "no control run with these seeds"
            lines.append(f"| {key[1]} | {' | '.join(cells)} | {versus} | {delta} |")
        lines.extend(f"\n{DUPLICATE_MARK} {what}" for what in duplicates)
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- plot
def _curve(group: Sequence[dict], metric: str):
    """Epochs, and the mean, min and max over seeds of ``metric`` (x100) at each."""
    epochs = sorted({row["epoch"] for r in group for row in r["per_epoch"] if metric in row})
    means, lows, highs = [], [], []
    for epoch in epochs:
        values = [100 * row[metric] for r in group for row in r["per_epoch"] if row["epoch"] == epoch and metric in row]
        means.append(statistics.fmean(values))
        lows.append(min(values))
        highs.append(max(values))
    return epochs, means, lows, highs


def curves_figure(runs: Sequence[dict]):
    """The matplotlib figure of :func:`plot_curves` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by_task = _rows_by_task(runs)
    columns = max(1, len(by_task))
    figure, axes = plt.subplots(1, columns, figsize=(5.2 * columns, 4.2), squeeze=False)
    styles: Dict[str, int] = {}  # row name -> style index: one row looks the same in every panel
    for ax, (task, rows, _) in zip(axes[0], by_task):
        labels = [key[1] for key, _ in rows]
        spread = min(0.3, 0.06 * (len(rows) - 1))
        all_epochs = set()
        for index, (key, group) in enumerate(rows):
            epochs, means, lows, highs = _curve(group, task.main_metric)
            all_epochs.update(epochs)
            shift = (index / (len(rows) - 1) - 0.5) * spread if len(rows) > 1 else 0.0
            x = [epoch + shift for epoch in epochs]
            name = key[1]
            if labels.count(name) > 1:  # same recipe and settings, different shared settings: say which
                config = group[0]["config"]
                name += (f" (n={group[0]['train_examples']}, lr={config['optimizer_lr']:g}, "
                         f"{_plural(config['epochs'], 'epoch')})")
            style = styles.setdefault(name, len(styles))
            # 10 colours x 12 markers: the pair stays unique for 60 rows
            (line,) = ax.plot(x, means, color=f"C{style % 10}", marker=_MARKERS[style % len(_MARKERS)],
                              markersize=7, markerfacecolor="none", markeredgewidth=1.5, linewidth=1.2,
                              label=f"{name} ({_plural(len(group), 'seed')})")
            if len(group) > 1:
                ax.vlines(x, lows, highs, color=line.get_color(), alpha=0.35, linewidth=2)
        ticks = sorted(all_epochs)
        ax.set_xticks(ticks)
        ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
        ax.margins(y=0.12)  # markers at the extremes stay inside the frame
        train = sorted({group[0]["train_examples"] for _, group in rows})
        epochs_run = sorted({group[0]["config"]["epochs"] for _, group in rows})
        title = task.folder
        if len(train) == 1 and len(epochs_run) == 1:
            title += f": {train[0]} training examples, {_plural(epochs_run[0], 'epoch')}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {task.main_metric} (x100)")
        ax.grid(alpha=0.3)
        # one column: rows named with their settings are long, and two columns spill under the next panel
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    return figure


def plot_curves(runs: Sequence[dict], path: Union[str, Path]) -> Path:
    """Dev main metric per epoch, one panel per task, one line per row of the table (mean over seeds, a bar from
    the lowest to the highest seed). Methods that tie stay visible: each row has its own marker and is shifted a
    little along x; the x ticks are the integer epochs; the legend sits below the panel, outside the data; a row
    has the same colour and marker in every panel. Written atomically (never a truncated PNG)."""
    import matplotlib.pyplot as plt

    figure = curves_figure(runs)
    try:
        return write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)


def _not_reported(problems: Sequence[str]) -> str:
    if not problems:
        return ""
    return ("\n## Files left out\n\n" + "\n".join(f"* {problem}" for problem in problems) + "\n")


def write_report(output: Union[str, Path], warn: Callable[[str], None] = _warn) -> Tuple[Path, Path]:
    """``OUTPUT/results.md`` (the tables) and ``OUTPUT/curves.png`` (the plot) from every run JSON in OUTPUT,
    each written atomically. Files that are not runs are named through ``warn`` and at the end of results.md;
    duplicate runs (one row and seed in two files) through ``warn`` and under their table."""
    problems: List[str] = []
    runs = load_runs(output, warn=problems.append)
    for problem in problems:
        warn(problem)
    if not runs:
        raise FileNotFoundError(f"no run JSON in {Path(output) / 'runs'}: nothing to summarise")
    duplicates: List[Tuple[str, str]] = []
    _groups(runs, duplicates)
    for _, what in duplicates:
        warn(f"duplicate run: {what}")
    text = ("# fusednoise finetune results\n\n" + summary_table(runs) + "\n## Per seed\n\n" + per_seed_table(runs)
            + _not_reported([p.replace(str(Path(output)) + os.sep, "", 1) for p in problems]))
    table = write_atomically(Path(output) / "results.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plot = plot_curves(runs, Path(output) / "curves.png")
    return table, plot


__all__ = ["control_config", "curves_figure", "load_runs", "per_seed_table", "plot_curves", "read_run",
           "rename_runs", "run_problem", "settings_statement", "summary_table", "timing_notes", "write_report"]
