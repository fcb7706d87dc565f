"""The two LNSR tables of ``docs/lnsr.md``: the penalty's size at the first step for each reduction x dropout mode,
and what each LNSR configuration that was run scored against vanilla and the class-majority baseline.

    python benchmarks/lnsr_reduction_table.py \\
        --first-step benchmarks/results/lnsr-dynamics/first-step.json \\
        --runs benchmarks/results/finetune-minilm-cpu-glue4

Prints Markdown. ``--first-step`` reads the JSON of ``benchmarks/lnsr_dynamics.py --first-step``: per mode and
task, the median over seeds of penalty / task loss and of the ratio of their gradient norms (lambda_r = 1, the
fresh model, the first batch). ``--runs`` reads a folder of ``fusednoise finetune`` runs: per task, the final-epoch
main metric (x100, mean ± sample std and the seeds) of vanilla and of every LNSR (reduction, dropout) that was run,
with the paired difference to vanilla's run of the same seed. Run files written before ``lnsr_reduction`` and
``lnsr_dropout`` existed ran the per-example sum with replayed dropout
(:data:`fusednoise.experiments.finetune.LEGACY_SETTINGS`). Other LNSR settings (weight, scale, layer) must be the defaults:
rows with others are left out, and say so.
"""
import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

from fusednoise.experiments.finetune import LEGACY_SETTINGS, method_settings, run_label, shared_settings
from fusednoise.experiments.glue import TASKS, get_task
from fusednoise.lnsr import REDUCTIONS
from fusednoise.experiments.report import load_runs

DROPOUTS = ("replay", "independent")
# The settings this table varies; any other non-default LNSR setting makes a run another experiment.
VARIED = ("lnsr_reduction", "lnsr_dropout")
WIDTH = 116  # the docs' line length


def _ordered_tasks(names):
    order = list(TASKS)
    return sorted(set(names), key=lambda name: order.index(name) if name in order else len(order))


def first_step_table(records) -> str:
    """Markdown: one row per reduction x dropout, one column per task, ``loss ratio / gradient ratio`` (medians
    over the seeds)."""
    tasks = _ordered_tasks(r["task"] for r in records)
    lines = ["| reduction, dropout | " + " | ".join(get_task(t).folder for t in tasks) + " |",
             "|" + " --- |" * (len(tasks) + 1)]
    for reduction in REDUCTIONS:
        for dropout in DROPOUTS:
            mode = [r for r in records if r["reduction"] == reduction and r["dropout"] == dropout]
            if not mode:
                continue
            cells = []
            for task in tasks:
                seeds = [r for r in mode if r["task"] == task]
                if not seeds:
                    cells.append("")
                    continue
                loss = statistics.median(r["loss_ratio"] for r in seeds)
                grad = statistics.median(r["grad_ratio"] for r in seeds)
                cells.append(f"{loss:.3g} / {grad:.3g}")
            lines.append(f"| {reduction}, {dropout} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in records})
    lines.append("")
    lines.append(textwrap.fill(f"Each cell: penalty / task loss, then the penalty's gradient norm / the task loss's, "
                               f"at lambda_r = 1 on the first batch of the fresh model; medians over seeds {seeds}.",
                               WIDTH))
    return "\n".join(lines) + "\n"


def lnsr_mode(config):
    """``(reduction, dropout)`` of an LNSR run, None for vanilla; ``ValueError`` for runs this table leaves out
    (other recipes, or LNSR with another non-default setting)."""
    if list(config["methods"]) == ["vanilla"]:
        return None
    if list(config["methods"]) != ["lnsr"]:
        raise ValueError("not an lnsr or vanilla run")
    other = set(method_settings(config)) - set(VARIED)
    if other:
        raise ValueError(f"other LNSR settings: {sorted(other)}")
    return tuple(config.get(name, LEGACY_SETTINGS[name]) for name in VARIED)


def outcome_table(runs) -> str:
    """Markdown: per task, the majority baseline, vanilla and every LNSR mode run (mean ± std, seeds, paired Δ)."""
    lines = ["| task (metric) | recipe | seeds | final dev metric | paired Δ vs vanilla |",
             "| --- | --- | --- | --- | --- |"]
    left_out = set()
    by_task, baselines = {}, {}
    for run in runs:
        config = run["config"]
        if run.get("majority_baseline"):  # recorded by newer runs of any recipe on the same data
            baselines.setdefault(config["task"], run["majority_baseline"])
        try:
            mode = lnsr_mode(config)
        except ValueError as why:
            if "lnsr" in config["methods"]:
                left_out.add(f"{config['task']} {run_label(config)} ({why.args[0]})")
            continue
        by_task.setdefault(config["task"], {}).setdefault((shared_settings(config), mode), []).append(run)
    order = [None] + [(reduction, dropout) for reduction in REDUCTIONS for dropout in DROPOUTS]
    for name in _ordered_tasks(by_task):
        task = get_task(name)
        rows = by_task[name]
        head = f"{task.folder} ({task.main_metric})"
        if name in baselines:
            baseline = baselines[name]
            lines.append(f"| {head} | majority baseline: {baseline['prediction']} | — | "
                         f"{100 * baseline['metrics'][task.main_metric]:.2f} | |")
        for (shared, mode), group in sorted(rows.items(), key=lambda item: (str(item[0][0]), order.index(item[0][1]))):
            scores = {r["seed"]: 100 * r["metrics"][task.main_metric] for r in group}
            vanilla = {r["seed"]: 100 * r["metrics"][task.main_metric] for r in rows.get((shared, None), ())}
            values = list(scores.values())
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            label = "vanilla" if mode is None else f"lnsr {mode[0]}, {mode[1]}"
            paired = "—" if mode is None else ", ".join(
                f"{scores[s] - vanilla[s]:+.2f}" for s in sorted(scores) if s in vanilla) or "no vanilla run"
            lines.append(f"| {head} | {label} | {','.join(map(str, sorted(scores)))} | "
                         f"{statistics.fmean(values):.2f} ± {std:.2f} | {paired} |")
    lines.append("")
    lines.append(textwrap.fill("Final-epoch dev main metric x100, mean ± sample std over the seeds listed; paired Δ: "
                               "each seed minus vanilla's run with that seed.", WIDTH))
    lines.extend(f"Left out: {why}." for why in sorted(left_out))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--first-step", help="JSON of benchmarks/lnsr_dynamics.py --first-step")
    parser.add_argument("--runs", help="an output folder of fusednoise finetune (its runs/*.json)")
    args = parser.parse_args(argv)
    if not (args.first_step or args.runs):
        parser.error("give --first-step, --runs or both")
    if args.first_step:
        print("## LNSR's penalty at the first step\n")
        print(first_step_table(json.loads(Path(args.first_step).read_text(encoding="utf-8"))["records"]))
    if args.runs:
        runs = load_runs(args.runs)
        if not runs:
            print(f"no runs in {Path(args.runs) / 'runs'}", file=sys.stderr)
            return 1
        print("## LNSR against vanilla\n")
        print(outcome_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
