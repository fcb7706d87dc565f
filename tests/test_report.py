"""fusednoise.report: the tables and the plot of a folder of runs, from hand-made run JSONs (no training)."""
import dataclasses
import json

import pytest

from fusednoise import finetune, report
from fusednoise.cli import main
from fusednoise.finetune import FinetuneConfig


def fake_run(task, recipe, seed, value, epochs=2, schema=finetune.SCHEMA, baseline=0.5, steps=0.25,
             warnings=(), **settings):
    spec = finetune.get_task(task)
    metric = spec.main_metric
    config = FinetuneConfig(task=task, methods=tuple(recipe.split("+")), seed=seed, max_train_samples=100,
                            epochs=float(epochs), **settings)
    run = {"schema": schema, "config": config.to_dict(), "task": task, "recipe": recipe, "seed": seed,
           "metrics": {m: value for m in spec.metrics}, "best_epoch": {"epoch": 1, metric: value + 0.01},
           "per_epoch": [{"epoch": e + 1, metric: value - 0.01 * (epochs - e - 1)} for e in range(epochs)],
           "train_examples": 100, "dev_examples": 277, "wall_time_s": 10.0, "optimizer_steps": 20,
           "peak_memory_mb": 100.0, "peak_memory_kind": "test", "device": "cpu: test", "model": "m"}
    if schema != finetune.SCHEMA:  # written before the setting existed
        del run["config"]["noisytune_include_head"]
    else:
        run.update(majority_baseline={"prediction": "always class 1 (train majority)",
                                      "metrics": {m: baseline for m in spec.metrics}},
                   step_time_s={"median": steps, "mean": steps, "steps_timed": 18, "steps_skipped": 2},
                   warnings=list(warnings), label=config.label)
    return run


def write_runs(folder, runs):
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        config = run["config"]
        name = f"{config['task']}__{config['recipe']}__seed{config['seed']}.json"  # the /1 naming
        (folder / "runs" / name).write_text(json.dumps(run))


def test_summary_table_by_hand():
    runs = [fake_run("rte", "vanilla", 0, 0.50), fake_run("rte", "vanilla", 1, 0.60),
            fake_run("rte", "hype-n", 0, 0.56), fake_run("rte", "hype-n", 1, 0.58)]
    table = report.summary_table(runs)
    # the class-majority baseline first, then vanilla: mean 55, sample std sqrt(50) = 7.07; hype-n: mean 57, std
    # sqrt(2) = 1.41, +2.00 over vanilla; 250 ms per step
    assert "| majority baseline: always class 1 (train majority) | — | 50.00 |" in table
    assert ("| vanilla | 0,1 | 55.00 ± 7.07 | — |  | 60.00 | 56.00 ± 7.07 | 100/277 | 2 | 2e-05 | 250 | 100 |"
            in table)
    assert "| hype-n | 0,1 | 57.00 ± 1.41 | +2.00 | vanilla | 58.00 |" in table
    assert table.index("majority baseline") < table.index("| vanilla |") < table.index("| hype-n |")
    assert "Shared by every row: AdamW at lr 2e-05; batch 32, 2 epochs, max length 128" in table
    assert "only the noise hyperparameters are the papers' defaults" in table


def test_pats_is_compared_with_adamax_at_the_same_learning_rate():
    runs = [fake_run("cola", "vanilla", s, 0.30 + 0.01 * s) for s in (0, 1)]
    runs += [fake_run("cola", "adamax", s, 0.10 + 0.01 * s) for s in (0, 1)]
    runs += [fake_run("cola", "pats", s, 0.12 + 0.03 * s) for s in (0, 1)]
    runs += [fake_run("cola", "hype-n+pats", 0, 0.2), fake_run("cola", "pats", 0, 0.4, pats_lr=3e-4)]
    table = report.summary_table(runs)
    assert "| pats | 0,1 | 13.50 ± 2.12 | +3.00 | adamax |" in table
    assert "| adamax | 0,1 | 10.50 ± 0.71 | -20.00 | vanilla |" in table
    assert "| hype-n+pats | 0 | 20.00 ± 0.00 | no run | hype-n+adamax |" in table
    # another learning rate is another row, and needs its own adamax run
    assert "| pats (pats_lr=0.0003) | 0 | 40.00 ± 0.00 | no run | adamax (pats_lr=0.0003) |" in table
    assert "Adamax at lr 0.0001 or 0.0003 for recipes with pats or adamax" in table
    seeds = report.per_seed_table(runs)
    assert "| recipe | seed 0 | seed 1 | vs | paired Δ |" in seeds
    assert "| pats | 12.00 | 15.00 | adamax | +2.00, +4.00 |" in seeds
    assert "| hype-n+pats | 20.00 |  | hype-n+adamax | no control run with these seeds |" in seeds


def test_method_settings_name_the_file_and_the_row():
    default = FinetuneConfig(task="stsb", methods=("hype-n",), seed=2)
    control = dataclasses.replace(default, hype_sigma=0.0, lnsr_weight=0.2)  # lnsr_weight: not a HyPe setting
    assert finetune.run_file("out", default).name == "stsb__hype-n__seed2.json"
    assert finetune.run_file("out", control).name == "stsb__hype-n__hype_sigma=0__seed2.json"
    assert control.label == "hype-n (hype_sigma=0)"
    two = FinetuneConfig(task="rte", methods=("lnsr", "pats"), lnsr_weight=0.2, pats_gamma=0.01, pats_lr=1e-4)
    assert (finetune.run_file("o", two).name
            == "rte__lnsr+pats__lnsr_weight=0.2,pats_lr=0.0001,pats_gamma=0.01__seed0.json")
    # pats_lr equal to the task's default rate is the default
    assert FinetuneConfig(task="rte", methods=("adamax",), pats_lr=3e-4).label == "adamax"
    # A run file older than a setting: the value it ran with (NoisyTune perturbed the task head then).
    legacy = FinetuneConfig(task="rte", methods=("noisytune",)).to_dict()
    del legacy["noisytune_include_head"]
    assert finetune.run_label(legacy) == "noisytune (noisytune_include_head=True)"
    assert finetune.row_key(legacy) != finetune.row_key(FinetuneConfig(task="rte", methods=("noisytune",)).to_dict())
    runs = [fake_run("stsb", "hype-n", 0, 0.7), fake_run("stsb", "hype-n", 0, 0.6, hype_sigma=0.0),
            fake_run("stsb", "vanilla", 0, 0.5)]
    table = report.summary_table(runs)
    assert "| hype-n | 0 | 70.00 ± 0.00 | 70.00 ± 0.00 | +20.00 | vanilla |" in table
    assert "| hype-n (hype_sigma=0) | 0 | 60.00 ± 0.00 | 60.00 ± 0.00 | +10.00 | vanilla |" in table


def test_legacy_runs_load_and_their_times_are_marked(tmp_path):
    old = [fake_run("rte", r, 0, 0.8, schema="fusednoise.finetune/1") for r in ("vanilla", "noisytune")]
    new = [fake_run("rte", "noisytune", 0, 0.82)]
    write_runs(tmp_path, old)
    (tmp_path / "runs" / "rte__noisytune__seed0__new.json").write_text(json.dumps(new[0]))
    runs = report.load_runs(tmp_path)
    assert len(runs) == 3
    table = report.summary_table(runs)
    assert "| vanilla | 0 | 80.00 ± 0.00 | — |  | 80.00 | 81.00 ± 0.00 | 100/277 | 2 | 2e-05 | 500† |" in table
    assert "| noisytune | 0 | 82.00 ± 0.00 | +2.00 | vanilla |" in table
    assert "| noisytune (noisytune_include_head=True) | 0 | 80.00 ± 0.00 | +0.00 | vanilla |" in table
    assert "†: a run older than the step timer" in table
    moves = report.rename_runs(tmp_path)
    assert [(a.name, b.name) for a, b in moves] == [
        ("rte__noisytune__seed0.json", "rte__noisytune__noisytune_include_head=True__seed0.json"),
        ("rte__noisytune__seed0__new.json", "rte__noisytune__seed0.json")]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        ["rte__noisytune__noisytune_include_head=True__seed0.json", "rte__noisytune__seed0.json",
         "rte__vanilla__seed0.json"])
    assert report.rename_runs(tmp_path) == []
    (tmp_path / "runs" / "copy.json").write_text(json.dumps(old[0]))  # a second file for one name: refused
    with pytest.raises(FileExistsError, match="rte__vanilla__seed0.json: nothing renamed"):
        report.rename_runs(tmp_path)


def test_schedule_warnings_are_marked_in_the_table():
    message = "4 optimizer steps, 3 of them at a nonzero learning rate: too few to train"
    runs = [fake_run("rte", recipe, 0, 0.5, warnings=[message]) for recipe in ("vanilla", "pats")]
    table = report.summary_table(runs)
    assert "| vanilla ⚠ | 0 |" in table and "| pats ⚠ | 0 |" in table
    assert f"⚠ vanilla, pats: {message}" in table


def test_one_epoch_plot_has_integer_ticks_visible_ties_and_the_legend_outside():
    import matplotlib.pyplot as plt

    runs = [fake_run("rte", r, 0, 0.55, epochs=1) for r in ("vanilla", "hype-n", "noisytune")]  # three-way tie
    runs.append(fake_run("mrpc", "vanilla", 0, 0.8, epochs=3))
    runs.append(fake_run("mrpc", "vanilla", 1, 0.82, epochs=3))
    figure = report.curves_figure(runs)
    try:
        mrpc, rte = figure.axes  # in GLUE task order
        assert list(rte.get_xticks()) == [1] and list(mrpc.get_xticks()) == [1, 2, 3]
        assert rte.get_title() == "RTE: 100 training examples, 1 epoch"
        assert mrpc.get_title() == "MRPC: 100 training examples, 3 epochs"
        lines = rte.get_lines()
        assert len({line.get_marker() for line in lines}) == 3
        assert len({float(line.get_xdata()[0]) for line in lines}) == 3  # tied points side by side, not on top
        assert [t.get_text() for t in rte.get_legend().get_texts()] == [
            "vanilla (1 seed)", "hype-n (1 seed)", "noisytune (1 seed)"]
        assert [t.get_text() for t in mrpc.get_legend().get_texts()] == ["vanilla (2 seeds)"]
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        for ax in (rte, mrpc):  # the legend lies below the panel
            assert ax.get_legend().get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
    finally:
        plt.close(figure)


def test_plot_styles_follow_the_row_and_legends_do_not_overlap():
    import matplotlib.pyplot as plt

    long = dict(lnsr_reduction="token_mean", lnsr_dropout="replay")  # a long row name
    runs = [fake_run("rte", "vanilla", 0, 0.5), fake_run("rte", "lnsr", 0, 0.5, **long),
            fake_run("mrpc", "hype-n", 0, 0.8), fake_run("mrpc", "lnsr", 0, 0.8, **long),
            fake_run("mrpc", "vanilla", 0, 0.8)]
    figure = report.curves_figure(runs)
    try:
        mrpc, rte = figure.axes

        def styles(ax):
            return {line.get_label().rsplit(" (", 1)[0]: (line.get_color(), line.get_marker())
                    for line in ax.get_lines()}
        in_rte, in_mrpc = styles(rte), styles(mrpc)
        for name in ("vanilla", "lnsr (lnsr_reduction=token_mean, lnsr_dropout=replay)"):
            assert in_rte[name] == in_mrpc[name]  # one row, one look, in every panel
        assert len(set(in_mrpc.values())) == 3
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        left, right = (ax.get_legend().get_window_extent(renderer) for ax in (mrpc, rte))
        assert left.x1 < right.x0  # the long names stay under their own panel
    finally:
        plt.close(figure)


def test_report_command_rewrites_table_and_plot(tmp_path, capsys):
    write_runs(tmp_path, [fake_run("cola", r, s, v) for r, s, v in
                          (("vanilla", 0, 0.3), ("vanilla", 1, 0.4), ("pats", 0, 0.45), ("adamax", 0, 0.4))])
    (tmp_path / "runs" / "not-a-run.json").write_text(json.dumps({"something": "else"}))
    assert main(["report", "--output", str(tmp_path), "--rename-runs"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| vanilla | 0,1 | 35.00 ± 7.07 | — |" in table
    assert "| pats | 0 | 45.00 ± 0.00 | +5.00 | adamax |" in table
    assert "## Per seed" in table
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    assert main(["report", "--output", str(tmp_path / "nothing")]) == 2


def _lnsr_table_script():
    """benchmarks/lnsr_reduction_table.py (docs/lnsr.md's tables), loaded as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lnsr_reduction_table.py"
    spec = importlib.util.spec_from_file_location("lnsr_reduction_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lnsr_tables_of_the_docs():
    script = _lnsr_table_script()
    runs = [fake_run("rte", "vanilla", s, v, schema="fusednoise.finetune/1") for s, v in ((0, 0.55), (1, 0.57))]
    legacy = fake_run("rte", "lnsr", 0, 0.5, schema="fusednoise.finetune/1")  # before reduction= existed: sum
    for name in ("lnsr_reduction", "lnsr_dropout"):
        del legacy["config"][name]
    runs += [legacy,
             fake_run("rte", "lnsr", 1, 0.54, baseline=0.527, lnsr_reduction="token_mean", lnsr_dropout="replay"),
             fake_run("rte", "lnsr", 0, 0.52),  # today's default: mean, independent
             fake_run("rte", "lnsr", 1, 0.56, lnsr_reduction="mean", lnsr_dropout="independent"),
             fake_run("rte", "lnsr", 0, 0.9, lnsr_weight=0.2),  # another experiment: left out, and said
             fake_run("rte", "pats", 0, 0.9)]  # not LNSR: not in this table
    table = script.outcome_table(runs)
    rows = [line for line in table.splitlines() if line.startswith("| RTE")]
    assert rows == ["| RTE (accuracy) | majority baseline: always class 1 (train majority) | — | 52.70 | |",
                    "| RTE (accuracy) | vanilla | 0,1 | 56.00 ± 1.41 | — |",
                    "| RTE (accuracy) | lnsr sum, replay | 0 | 50.00 ± 0.00 | -5.00 |",
                    "| RTE (accuracy) | lnsr token_mean, replay | 1 | 54.00 ± 0.00 | -3.00 |",
                    "| RTE (accuracy) | lnsr mean, independent | 0,1 | 54.00 ± 2.83 | -3.00, -1.00 |"]
    assert "Left out: rte lnsr (lnsr_weight=0.2) (other LNSR settings: ['lnsr_weight'])." in table

    records = [{"task": t, "seed": s, "reduction": r, "dropout": d, "loss_ratio": x * (s + 1), "grad_ratio": 2 * x}
               for t in ("rte", "stsb") for s in (0, 1, 2) for r, d, x in (("sum", "replay", 60.0),
                                                                            ("mean", "independent", 0.3))]
    first = script.first_step_table(records)
    assert "| reduction, dropout | RTE | STS-B |" in first
    assert "| sum, replay | 120 / 120 | 120 / 120 |" in first  # the median over seeds of 60, 120, 180
    assert "| mean, independent | 0.6 / 0.6 | 0.6 / 0.6 |" in first
    assert "token_mean" not in first  # modes not measured get no row
