"""``fusednoise report``: the tables and the plot of a folder of ``fusednoise finetune`` runs.

Everything is read back from the run JSONs (``OUTPUT/runs/*.json``), so a folder filled by several commands, or
by older versions (schema ``fusednoise.finetune/1``), gives one report. What a reader needs to judge a difference
is in the table itself:

* each row is a task, a recipe with its non-default method settings, and the shared training settings
  (:func:`fusednoise.finetune.row_key`); its seeds give mean ± sample std;
* the class-majority baseline (what a model that ignores its input scores) as the first row of each task;
* each recipe's difference to its *control*: the same recipe with ``pats`` replaced by ``adamax`` (PATS is Adamax
  plus noise, so its noise is measured against Adamax at the same learning rate), else ``vanilla``;
* a statement of the one optimiser setting every recipe shared (no paper's; only the noise hyperparameters are
  the papers');
* per-step time from the steady state of training (the first steps of a process are slow for reasons that have
  nothing to do with the method), and the schedule warnings a run recorded (a run too short to train).
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .finetune import METHODS, SCHEMAS, _setting, parse_recipe, row_key, run_file_name
from .glue import TASKS, GlueTask, get_task

WARNING_MARK = "⚠"
LEGACY_TIME_MARK = "†"
_MARKERS = "osD^vP*Xp<>h"


def _plural(count, word: str) -> str:
    """``1 seed``, ``3 seeds``, ``1 epoch``, ``2.5 epochs``."""
    return f"{count:g} {word}" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------------------------- loading
def load_runs(output: Union[str, Path]) -> List[dict]:
    """Every run JSON of ``OUTPUT/runs`` (other JSON files there are ignored), sorted by file name."""
    runs = []
    for path in sorted((Path(output) / "runs").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") in SCHEMAS:
            runs.append(data)
    return runs


def rename_runs(output: Union[str, Path]) -> List[Tuple[Path, Path]]:
    """Give every run file of ``OUTPUT/runs`` the name its config gives today
    (:func:`fusednoise.finetune.run_file_name`), for folders written before method settings were part of the
    name. Returns the ``(old, new)`` pairs; refuses (``FileExistsError``, nothing renamed) if two files would
    take one name or a new name is taken by another file."""
    folder = Path(output) / "runs"
    moves = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") in SCHEMAS:
            target = folder / run_file_name(data["config"])
            if target != path:
                moves.append((path, target))
    targets = [target for _, target in moves]
    moving = {path for path, _ in moves}
    clashes = sorted({t.name for t in targets if targets.count(t) > 1 or (t.exists() and t not in moving)})
    if clashes:
        raise FileExistsError(f"renaming the runs in {folder} would overwrite {', '.join(clashes)}: nothing renamed")
    for path, target in moves:
        os.replace(path, target.with_suffix(".json.renaming"))
    for _, target in moves:
        os.replace(target.with_suffix(".json.renaming"), target)
    return moves


# --------------------------------------------------------------------------------------------- grouping
def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _recipe_order(methods: Sequence[str]) -> tuple:
    return tuple(list(METHODS).index(m) if m in METHODS else 99 for m in methods)


def _groups(runs: Sequence[dict]) -> Dict[tuple, List[dict]]:
    """Runs by :func:`~fusednoise.finetune.row_key`, in task order, then recipe order, then label."""
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault(row_key(run["config"]), []).append(run)
    order = {name: i for i, name in enumerate(TASKS)}

    def sort_key(item):
        (task, label, settings), group = item
        return order.get(task, 99), _recipe_order(group[0]["config"]["methods"]), label, str(settings)

    return {key: sorted(group, key=lambda r: r["seed"]) for key, group in sorted(groups.items(), key=sort_key)}


def _rows_by_task(runs: Sequence[dict]) -> List[Tuple[GlueTask, List[tuple]]]:
    """The groups of :func:`_groups` split by task: ``[(task, [(key, runs), ...]), ...]``."""
    by_task: Dict[str, List[tuple]] = {}
    for key, group in _groups(runs).items():
        by_task.setdefault(key[0], []).append((key, group))
    return [(get_task(name), rows) for name, rows in by_task.items()]


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
def _ms_per_step(group: Sequence[dict]) -> str:
    """Median steady-state ms per optimizer step over the seeds; runs older than the step timer show their wall
    time over their steps (evaluation and process warm-up included), marked."""
    steady = [r["step_time_s"]["median"] for r in group if r.get("step_time_s")]
    if len(steady) == len(group):
        return f"{1e3 * statistics.median(steady):.0f}"
    whole = [r["wall_time_s"] / max(1, r.get("optimizer_steps") or 1) for r in group]
    return f"{1e3 * statistics.median(whole):.0f}{LEGACY_TIME_MARK}"


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
def summary_table(runs: Sequence[dict]) -> str:
    """Markdown, per task: the majority baseline, then one row per (recipe, settings) with the mean ± sample std
    over seeds of the final-epoch dev metrics (x100), the difference to the row's control, the best seed's main
    metric (the papers' "max"), the best epoch's, steady-state ms per step and peak memory."""
    if not runs:
        return "_no runs yet_\n"
    lines = []
    legacy_time = False
    for task, rows in _rows_by_task(runs):
        main = task.main_metric
        controls = _controls(rows)
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
                    mean = statistics.fmean(_main(r, task) for r in group)
                    delta = f"{mean - statistics.fmean(_main(r, task) for r in control_runs):+.2f}"
                else:
                    delta = "no run"
            warned = sorted({w for r in group for w in r.get("warnings") or ()})
            for warning in warned:
                notes.setdefault(warning, []).append(label)
            best_seed = max(_main(r, task) for r in group)
            best_mean, best_std = _mean_std([100 * r["best_epoch"][main] for r in group])
            config = group[0]["config"]
            step = _ms_per_step(group)
            legacy_time |= step.endswith(LEGACY_TIME_MARK)
            seeds = ",".join(str(r["seed"]) for r in group)
            lines.append(f"| {label}{' ' + WARNING_MARK if warned else ''} | {seeds} | {' | '.join(cells)} | {delta} | "
                         f"{versus} | {best_seed:.2f} | {best_mean:.2f} ± {best_std:.2f} | "
                         f"{group[0]['train_examples']}/{group[0]['dev_examples']} | {config['epochs']:g} | "
                         f"{config['optimizer_lr']:g} | {step} | {max(r['peak_memory_mb'] for r in group):.0f} |")
        lines.append("")
        lines.append(settings_statement([r for _, group in rows for r in group]))
        lines.extend(f"\n{WARNING_MARK} {', '.join(labels)}: {warning}" for warning, labels in notes.items())
        lines.append("")
    devices = sorted({r["device"] for r in runs})
    models = sorted({r.get("model", str(r["config"].get("model"))) for r in runs})
    lines.append(f"Device: {'; '.join(devices)}. Model: {'; '.join(models)}. ")
    lines.append("Metrics are fractions x100 on the dev set (all of it unless 'dev n' says less) after the last "
                 "epoch. Δ is the mean's difference to the row named in 'vs': adamax for recipes with pats (the "
                 "same optimiser and learning rate without PATS's noise), vanilla for the others. 'max' is the "
                 "best seed's; 'best-epoch' is the best dev score over epochs (optimistic: chosen on the dev set "
                 "itself). std is the sample standard deviation over seeds (0 for one seed). ms/step: median time "
                 "of an optimizer step (forward, backward, update) after the first tenth of the steps, median over "
                 "seeds"
                 + (f"; {LEGACY_TIME_MARK}: a run older than the step timer, whose wall time over its steps "
                    "includes evaluation and the process's warm-up (not comparable between rows)" if legacy_time
                    else "")
                 + ". Peak MB: " + "; ".join(sorted({r["peak_memory_kind"] for r in runs})) + ".")
    return "\n".join(lines) + "\n"


def per_seed_table(runs: Sequence[dict]) -> str:
    """Markdown: the final-epoch main metric (x100) of every seed, and the paired difference to the control run
    with the same seed. With few seeds the paired differences say more than two means: a gain that changes sign
    from seed to seed is not one."""
    if not runs:
        return "_no runs yet_\n"
    lines = []
    for task, rows in _rows_by_task(runs):
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
    for ax, (task, rows) in zip(axes[0], by_task):
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
    has the same colour and marker in every panel."""
    import matplotlib.pyplot as plt

    figure = curves_figure(runs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def write_report(output: Union[str, Path]) -> Tuple[Path, Path]:
    """``OUTPUT/results.md`` (the tables) and ``OUTPUT/curves.png`` (the plot) from every run JSON in OUTPUT."""
    runs = load_runs(output)
    if not runs:
        raise FileNotFoundError(f"no run JSON in {Path(output) / 'runs'}: nothing to summarise")
    table = Path(output) / "results.md"
    tmp = table.with_name(f".results.md.{os.getpid()}.tmp")  # two commands may share one folder
    tmp.write_text("# fusednoise finetune results\n\n" + summary_table(runs) + "\n## Per seed\n\n"
                   + per_seed_table(runs), encoding="utf-8")
    os.replace(tmp, table)
    plot = plot_curves(runs, Path(output) / "curves.png")
    return table, plot


__all__ = ["control_config", "curves_figure", "load_runs", "per_seed_table", "plot_curves", "rename_runs",
           "settings_statement", "summary_table", "write_report"]
