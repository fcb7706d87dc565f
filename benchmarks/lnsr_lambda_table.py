"""LNSR's lambda_r on a small model: the tables of ``docs/lnsr.md`` "Choosing lambda_r" (issue 22).

    python benchmarks/lnsr_lambda_table.py \\
        --runs benchmarks/results/finetune-minilm-cpu-glue4 benchmarks/results/finetune-minilm-cpu-lnsr-lambda \\
        --first-step benchmarks/results/lnsr-dynamics/first-step.json \\
        --dynamics benchmarks/results/lnsr-dynamics/sst2-lr1e-4-weight*.json

Prints Markdown. ``--runs`` reads folders of ``fusednoise finetune`` runs (their ``runs/*.json``): a summary (one
row per LNSR (reduction, dropout) and lambda_r, one column per task: the mean paired difference to vanilla), then,
per task, per LNSR (reduction, dropout) and lambda_r, the final-epoch dev main metric (x100, mean ± sample std over
seeds) and its difference to vanilla's run of the same seed and the same shared settings (paired; seeds without a
vanilla run are not in the paired mean). ``--first-step`` adds the penalty / task-loss and gradient-norm ratios on
the first batch: measured at lambda_r = 1 by ``benchmarks/lnsr_dynamics.py --first-step``, and, since the penalty is
lambda_r times the per-layer terms and the first batch's terms do not depend on lambda_r, lambda_r times those at
other values (stated in the table). ``--dynamics`` reads ``lnsr_dynamics.py`` training runs (SST-2, 32 steps) and
gives the mean pairwise cosine of the last layer's [CLS] vectors at step 16 per lambda_r (the collapse measure).
Run files that cannot be read are named on stderr and left out.
"""
import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

from fusednoise.experiments.finetune import LEGACY_SETTINGS
from fusednoise.experiments.glue import TASKS, get_task

WIDTH = 116
# Settings that must be equal for a run to be paired with a vanilla run (the comparison's shared training).
SHARED = ("model", "max_train_samples", "data_seed", "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio",
          "max_length")
# LNSR settings other than the ones this table varies must keep these values (the papers' defaults).
FIXED = {"lnsr_scale": 0.05, "lnsr_inject_layer": 0}


def _read_runs(folders):
    runs = []
    for folder in folders:
        for path in sorted((Path(folder) / "runs").glob("*.json")):
            try:
                run = json.loads(path.read_text(encoding="utf-8"))
                run["config"], run["metrics"]  # noqa: B018 - a run file has both
            except (ValueError, KeyError, TypeError) as why:
                print(f"left out {path}: {type(why).__name__}: {why}", file=sys.stderr)
                continue
            run["_path"] = str(path)
            runs.append(run)
    return runs


def _mode(config):
    """``None`` for vanilla, ``(reduction, dropout, weight)`` for a plain LNSR run, else ``False``."""
    methods = list(config["methods"])
    if methods == ["vanilla"]:
        return None
    if methods != ["lnsr"] or any(config.get(name, value) != value for name, value in FIXED.items()):
        return False
    return (config.get("lnsr_reduction", LEGACY_SETTINGS["lnsr_reduction"]),
            config.get("lnsr_dropout", LEGACY_SETTINGS["lnsr_dropout"]), float(config.get("lnsr_weight", 1.0)))


def _first_step_ratios(path):
    """``{(task, reduction, dropout): (median loss ratio, median gradient ratio)}`` at lambda_r = 1."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))["records"]
    groups = {}
    for record in records:
        groups.setdefault((record["task"], record["reduction"], record["dropout"]), []).append(record)
    return {key: (statistics.median(r["loss_ratio"] for r in group), statistics.median(r["grad_ratio"] for r in group))
            for key, group in groups.items()}


def _by_task(runs):
    """``{task: {(shared settings, mode): {seed: run}}}``; vanilla's mode is ``None``."""
    by_task = {}
    for run in runs:
        config = run["config"]
        mode = _mode(config)
        if mode is False:
            continue
        shared = tuple((name, config.get(name)) for name in SHARED)
        seeds = by_task.setdefault(config["task"], {}).setdefault((shared, mode), {})
        if config["seed"] in seeds:
            print(f"left out {run['_path']}: the same run as {seeds[config['seed']]['_path']}", file=sys.stderr)
            continue
        seeds[config["seed"]] = run
    return by_task


def _task_order(by_task):
    order = list(TASKS)
    return sorted(by_task, key=lambda task: order.index(task) if task in order else len(order))


def _paired(seeds, vanilla, metric):
    """``{seed: LNSR's metric minus vanilla's}`` (x100) over the seeds both have."""
    return {seed: 100 * (run["metrics"][metric] - vanilla[seed]["metrics"][metric])
            for seed, run in seeds.items() if seed in vanilla}


def summary_table(by_task) -> str:
    """One row per (reduction, dropout, lambda_r), one column per task: the mean paired difference to vanilla."""
    tasks = _task_order(by_task)
    cells = {}
    for name in tasks:
        metric = get_task(name).main_metric
        groups = by_task[name]
        for (shared, mode), seeds in groups.items():
            paired = _paired(seeds, groups.get((shared, None), {}), metric) if mode is not None else {}
            if not paired:
                continue
            row = cells.setdefault(mode, {})
            if name in row:  # the same LNSR setting paired under two trainings: the table has one cell for it
                print(f"left out of the summary: {name} {mode} under {dict(shared)}", file=sys.stderr)
                continue
            row[name] = f"{statistics.fmean(paired.values()):+.2f} (n={len(paired)})"
    header = " | ".join(f"{get_task(name).folder} ({get_task(name).main_metric})" for name in tasks)
    lines = [f"| LNSR reduction, dropout | lambda_r | {header} |", "| --- | --- |" + " --- |" * len(tasks)]
    for (reduction, dropout, weight), row in sorted(cells.items()):
        lines.append(f"| {reduction}, {dropout} | {weight:g} | " + " | ".join(row.get(name, "—") for name in tasks)
                     + " |")
    lines.append("")
    lines.append(textwrap.fill(
        "Mean over seeds of the paired difference to vanilla (x100: each seed minus vanilla's run with that seed "
        "and the same training settings); n: the seeds paired.", WIDTH))
    return "\n".join(lines) + "\n"


def outcome_table(by_task, ratios) -> str:
    lines = ["| task (metric) | LNSR reduction, dropout | lambda_r | seeds | final dev metric | paired Δ vs vanilla "
             "(per seed) | mean paired Δ | first-step penalty/loss, grad ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in _task_order(by_task):
        task = get_task(name)
        metric = task.main_metric
        groups = by_task[name]
        for (shared, mode), seeds in sorted(((k, v) for k, v in groups.items() if k[1] is not None),
                                            key=lambda item: (str(item[0][0]), item[0][1])):
            vanilla = groups.get((shared, None), {})
            scores = {seed: 100 * run["metrics"][metric] for seed, run in seeds.items()}
            values = list(scores.values())
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            paired = _paired(seeds, vanilla, metric)
            reduction, dropout, weight = mode
            ratio = ratios.get((name, reduction, dropout))
            ratio_cell = "" if ratio is None else f"{weight * ratio[0]:.3g}, {weight * ratio[1]:.3g}"
            if ratio is not None and weight != 1.0:
                ratio_cell += " (λ × measured at 1)"
            paired_cells = (", ".join(f"{paired[s]:+.2f}" for s in sorted(paired)),
                            f"{statistics.fmean(paired.values()):+.2f} (n={len(paired)})") if paired else (
                "no vanilla run", "")
            lines.append(f"| {task.folder} ({metric}) | {reduction}, {dropout} | {weight:g} | "
                         f"{','.join(map(str, sorted(scores)))} | {statistics.fmean(values):.2f} ± {std:.2f} | "
                         f"{paired_cells[0]} | {paired_cells[1]} | {ratio_cell} |")
        for (shared, mode), seeds in groups.items():
            if mode is None:
                values = [100 * run["metrics"][metric] for run in seeds.values()]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                lines.append(f"| {task.folder} ({metric}) | vanilla | 0 | {','.join(map(str, sorted(seeds)))} | "
                             f"{statistics.fmean(values):.2f} ± {std:.2f} | — | — | |")
    lines.append("")
    lines.append(textwrap.fill(
        "Final-epoch dev main metric x100, mean ± sample std over the seeds listed; paired Δ: each seed minus "
        "vanilla's run with that seed and the same training settings. First-step ratios: the penalty over the task "
        "loss and the penalty's gradient norm over the task loss's, on the first batch of the fresh model (medians "
        "over seeds 0-2); at lambda_r other than 1 they are lambda_r times the measured ones (the penalty is linear "
        "in lambda_r and the first batch does not depend on it).", WIDTH))
    return "\n".join(lines) + "\n"


def collapse_table(paths) -> str:
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        config = result["config"]
        at16 = [h for h in result["history"] if h["step"] == 16 and "dev_cls_mean_cosine" in h]
        start = [h for h in result["history"] if h["step"] == 0]
        if not at16 or config.get("steps") != 32:
            print(f"left out {path}: no step-16 probe of a 32-step run", file=sys.stderr)
            continue
        # Runs recorded before --reduction and --independent-dropout existed ran the sum with replayed dropout.
        mode = "—" if config["weight"] == 0 else (f"{config.get('reduction', 'sum')}, "
                                                  f"{'independent' if config.get('independent_dropout') else 'replay'}")
        clip = config.get("max_grad_norm", 1.0)
        rows.append((mode, config["weight"], config["lr"], "none" if clip <= 0 else f"{clip:g}",
                     start[0]["dev_cls_mean_cosine"], at16[0]["dev_cls_mean_cosine"], at16[0]["dev_accuracy"],
                     Path(path).name))
    lines = ["| reduction, dropout | lambda_r | lr | clip | [CLS] cosine, step 0 | [CLS] cosine, step 16 "
             "| dev accuracy, step 16 | run |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, weight, lr, clip, start, cosine, accuracy, name in sorted(rows, key=lambda row: (row[0] != "—", row)):
        lines.append(f"| {mode} | {weight:g} | {lr:g} | {clip} | {start:.3f} | {cosine:.3f} | {100 * accuracy:.1f} "
                     f"| `{name}` |")
    lines.append("")
    lines.append(textwrap.fill(
        "SST-2, 1000 training examples, batch 32, AdamW over 32 steps (warm-up 3), 256 dev examples: the "
        "mean pairwise cosine similarity of the last layer's [CLS] vectors (near 1: every input maps to the same "
        "vector).", WIDTH))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=[], help="output folders of fusednoise finetune")
    parser.add_argument("--first-step", help="JSON of benchmarks/lnsr_dynamics.py --first-step")
    parser.add_argument("--dynamics", nargs="+", default=[], help="JSONs of benchmarks/lnsr_dynamics.py runs")
    args = parser.parse_args(argv)
    if not (args.runs or args.dynamics):
        parser.error("give --runs, --dynamics or both")
    if args.runs:
        ratios = _first_step_ratios(args.first_step) if args.first_step else {}
        by_task = _by_task(_read_runs(args.runs))
        print("### Mean paired difference to vanilla per lambda_r\n")
        print(summary_table(by_task))
        print("### Dev metric per lambda_r\n")
        print(outcome_table(by_task, ratios))
    if args.dynamics:
        print("### Collapse per lambda_r\n")
        print(collapse_table(args.dynamics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
