"""fusednoise.experiments.report: the tables and the plot of a folder of runs, from hand-made run JSONs (no training)."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from fusednoise.experiments import finetune, report
from scripts import load_script
from fusednoise.cli import main
from fusednoise.experiments.finetune import FinetuneConfig


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
    if schema == "fusednoise.finetune/1":  # written before the setting existed
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
    assert finetune.run_file("out", default).name == "stsb__hype-n__d1ca90efdc__seed2.json"  # a stable digest
    assert re.fullmatch(r"stsb__hype-n__hype_sigma=0__[0-9a-f]{10}__seed2\.json", finetune.run_file("out", control).name)
    assert control.label == "hype-n (hype_sigma=0)"
    two = FinetuneConfig(task="rte", methods=("lnsr", "pats"), lnsr_weight=0.2, pats_gamma=0.01, pats_lr=1e-4)
    assert (finetune.run_file("o", two).name
            == f"rte__lnsr+pats__lnsr_weight=0.2,pats_lr=0.0001,pats_gamma=0.01__{finetune.config_digest(two.to_dict())}"
               "__seed0.json")
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


# Every setting that decides what a run computes, with another value than FinetuneConfig's default.
OTHER_VALUES = dict(model="some/model", max_train_samples=500, max_eval_samples=100, data_seed=1, epochs=2.0,
                    batch_size=16, eval_batch_size=64, lr=1e-4, weight_decay=0.01, warmup_ratio=0.0, max_length=64,
                    device="cuda", data_dir="glue-tsv", hype_sigma=2e-5, hype_layers="lower", hype_keep_dropout=True,
                    hype_fused=True)


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_a_run_is_its_whole_configuration(name):
    """Two runs that differ in any one setting never share a file (today's main left the shared settings out)."""
    base = FinetuneConfig(task="rte", methods=("hype-n",), max_train_samples=1000)
    other = dataclasses.replace(base, **{name: OTHER_VALUES[name]})
    assert finetune.run_file("o", other) != finetune.run_file("o", base)
    assert finetune.identity_key(other.to_dict()) != finetune.identity_key(base.to_dict())


def test_a_setting_added_later_keeps_the_digests_of_runs_written_before_it():
    """hype_fused at its default (hooks, what every earlier run used) is not in the identity: the committed run
    files keep their names (this one was written before the setting existed)."""
    name = "cola__hype-n__260823b26f__seed0.json"
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "finetune-minilm-cpu-glue4" / "runs" / name
    config = json.loads(path.read_text())["config"]
    assert "hype_fused" not in config and finetune.run_file_name(config) == name
    assert finetune.run_file_name(dict(config, hype_fused=False)) == name
    fused = finetune.run_file_name(dict(config, hype_fused="auto"))
    assert fused.startswith("cola__hype-n__hype_fused=auto__") and fused != name


def test_identity_leaves_out_what_does_not_change_the_run():
    base = FinetuneConfig(task="rte", methods=("hype-n",), epochs=2)
    same = [dataclasses.replace(base, epochs=2.0),  # an int for a float setting is the same setting
            dataclasses.replace(base, lnsr_weight=0.2, pats_lr=1e-3)]  # settings of methods hype-n does not use
    for config in same:
        assert finetune.run_file("o", config) == finetune.run_file("o", base)
    adamax = FinetuneConfig(task="rte", methods=("adamax",))
    assert finetune.run_file("o", dataclasses.replace(adamax, pats_lr=3e-4, lr=1.0)) == finetune.run_file("o", adamax)
    seeds = [finetune.run_file("o", dataclasses.replace(base, seed=s)).name for s in (0, 1)]
    assert seeds[0].replace("seed0", "seed1") == seeds[1]  # the seeds of one configuration share the digest


def test_a_17_setting_run_has_a_short_name_and_a_long_one_is_refused_before_training(tmp_path, monkeypatch):
    many = FinetuneConfig(
        task="rte", methods=("hype-u", "lnsr-manifold", "noisytune", "pats", "neftune"), hype_sigma=1.5e-5,
        hype_layers="lower", hype_keep_dropout=True, lnsr_weight=0.3, lnsr_k=7, lnsr_mix_ratio=0.2,
        lnsr_reduction="token_mean", lnsr_dropout="replay", noisytune_lambda=0.1, noisytune_include_head=True,
        pats_lr=1.23456789e-4, pats_noise_lambda=3e-6, pats_gamma=3e-3, pats_beta=0.8, pats_prob=0.3,
        pats_noise_eps=1e-9, neftune_alpha=10.0)
    assert len(finetune.method_settings(many.to_dict())) == 17
    name = finetune.run_file(tmp_path, many).name  # today's main: 381 bytes, ENAMETOOLONG after training
    assert len(name.encode()) < 200 and ",+12__" in name and name.startswith("rte__hype-u+lnsr-manifold+")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / name).write_text("{}")  # the file system takes it

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(finetune, "run_one", no_training)
    monkeypatch.setattr(finetune, "preflight", no_training)
    huge = dataclasses.replace(many, seed=10 ** 250)  # a name no file system takes
    with pytest.raises(ValueError, match="run file name of 412 bytes is longer than the file system takes \\(255\\)"):
        finetune.run_all(huge, [huge.methods], [huge.seed], tmp_path, log=lambda m: None)


def test_two_sigmas_one_part_in_1e7_apart_never_share_a_file_or_a_row():
    """Today's main wrote both as ``hype_sigma=2e-05`` (``:g``): one file, one row."""
    one = FinetuneConfig(task="rte", methods=("hype-n",), hype_sigma=2e-5)
    other = dataclasses.replace(one, hype_sigma=2.0000002e-5)  # one part in 1e7 more
    assert finetune.run_file("o", one) != finetune.run_file("o", other)
    assert finetune.run_file("o", one).name.startswith("rte__hype-n__hype_sigma=2e-05__")
    assert other.label == "hype-n (hype_sigma=2.0000002e-05)" and one.label == "hype-n (hype_sigma=2e-05)"
    runs = [fake_run("rte", "hype-n", 0, 0.6, hype_sigma=2e-5), fake_run("rte", "hype-n", 0, 0.7, hype_sigma=other.hype_sigma)]
    table = report.summary_table(runs)
    assert "| hype-n (hype_sigma=2e-05) | 0 | 60.00 ± 0.00 |" in table
    assert "| hype-n (hype_sigma=2.0000002e-05) | 0 | 70.00 ± 0.00 |" in table


def fake_training(monkeypatch, value=0.6):
    """finetune.run_one writing a hand-made run (no training); returns the configs it was called with."""
    trained = []

    def run_one(config, output, progress=True, warn=True):
        trained.append(config)
        run = fake_run(config.task, config.recipe, config.seed, value, epochs=1)
        run["config"] = config.to_dict()
        path = finetune.run_file(output, config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run))
        return run

    monkeypatch.setattr(finetune, "run_one", run_one)
    monkeypatch.setattr(finetune, "preflight", lambda config: [])
    return trained


def test_runs_differing_in_epochs_keep_both_files_and_skip_existing_skips_only_the_same_run(tmp_path, monkeypatch):
    trained = fake_training(monkeypatch)
    log = []
    one = FinetuneConfig(task="rte", methods=("vanilla",), epochs=1.0, max_train_samples=100, device="cpu")
    finetune.run_all(one, [("vanilla",)], [0], tmp_path, log=log.append)
    finetune.run_all(dataclasses.replace(one, epochs=2.0), [("vanilla",)], [0], tmp_path, log=log.append)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2  # today's main: the second overwrote the first
    assert len(trained) == 2
    finetune.run_all(one, [("vanilla",)], [0], tmp_path, skip_existing=True, log=log.append)
    assert len(trained) == 2 and "done before" in log[-1]
    finetune.run_all(dataclasses.replace(one, lr=1e-4), [("vanilla",)], [0], tmp_path, skip_existing=True,
                     log=log.append)
    assert len(trained) == 3  # another learning rate: another run
    # A file of today's schema under an older name (a folder written before the digest) is found by its content.
    for path in (tmp_path / "runs").glob("*.json"):
        path.unlink()
    run = fake_run("rte", "vanilla", 0, 0.6, epochs=1)
    (tmp_path / "runs" / "rte__vanilla__seed0.json").write_text(json.dumps(run))
    start = FinetuneConfig(**{k: v for k, v in run["config"].items() if k in FinetuneConfig.__dataclass_fields__})
    finetune.run_all(start, [("vanilla",)], [0], tmp_path, skip_existing=True, log=log.append)
    assert len(trained) == 3 and "rte__vanilla__seed0.json), skipped" in log[-1]


def test_a_bad_file_does_not_stop_finetune(tmp_path, monkeypatch):
    trained = fake_training(monkeypatch)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "broken.json").write_text('{"schema": "fusednoise.finetune/2", "config": {"ta')
    log = []
    base = FinetuneConfig(task="rte", max_train_samples=100, device="cpu")
    finetune.run_all(base, [("vanilla",), ("hype-n",)], [0, 1], tmp_path, skip_existing=True, log=log.append)
    assert len(trained) == 4  # today's main: the report after the first run stopped the command
    assert any("broken.json: is not valid JSON" in line for line in log)
    assert "| hype-n | 0,1 |" in (tmp_path / "results.md").read_text()


def test_legacy_runs_load_and_their_times_are_marked(tmp_path):
    old = [fake_run("rte", r, 0, 0.8, schema="fusednoise.finetune/1") for r in ("vanilla", "noisytune")]
    new = [fake_run("rte", "noisytune", 0, 0.82, schema="fusednoise.finetune/2")]  # /2: named by method settings
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
    names = {finetune.run_file_name(run["config"]) for run in runs}
    assert sorted(b.name for _, b in moves) == sorted(names) and len(names) == 3
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(names)
    assert [n.rsplit("__", 2)[0] for n in sorted(names)] == [
        "rte__noisytune", "rte__noisytune__noisytune_include_head=True", "rte__vanilla"]
    assert report.summary_table(report.load_runs(tmp_path)) == table  # the same runs, the same table
    assert report.rename_runs(tmp_path) == []
    (tmp_path / "runs" / "copy.json").write_text(json.dumps(old[0]))  # a second file for one run: refused
    vanilla = next(name for name in names if name.startswith("rte__vanilla__"))
    with pytest.raises(FileExistsError, match=f"{vanilla} \\(from copy.json\\): nothing renamed"):
        report.rename_runs(tmp_path)
    assert (tmp_path / "runs" / "copy.json").is_file()


def test_bad_files_are_named_and_left_out(tmp_path, capsys):
    write_runs(tmp_path, [fake_run("rte", r, 0, v) for r, v in (("vanilla", 0.5), ("hype-n", 0.6))])
    runs = tmp_path / "runs"
    whole = json.dumps(fake_run("rte", "pats", 0, 0.7))
    (runs / "truncated.json").write_text(whole[:whole.index('"cpu: test"') + 4])  # cut inside a string
    (runs / "a-list.json").write_text("[1, 2]")
    no_metrics = fake_run("rte", "pats", 1, 0.7)
    del no_metrics["metrics"]
    (runs / "no-metrics.json").write_text(json.dumps(no_metrics))
    (runs / "future.json").write_text(json.dumps(dict(fake_run("rte", "pats", 2, 0.7), schema="fusednoise.finetune/99")))
    (runs / "not-a-run.json").write_text(json.dumps({"something": "else"}))
    with pytest.warns(UserWarning) as caught:
        assert len(report.load_runs(tmp_path)) == 2
    said = "\n".join(str(w.message) for w in caught)
    for reason in ("truncated.json: is not valid JSON, truncated? (Unterminated string",
                   "a-list.json: holds a JSON list, not an object", "no-metrics.json: has no 'metrics' object",
                   "future.json: has schema 'fusednoise.finetune/99', which this version does not read",
                   "not-a-run.json: has no 'schema'"):
        assert reason in said
    assert main(["report", "--output", str(tmp_path), "--rename-runs"]) == 0  # today's main: exit 1, a traceback
    err = capsys.readouterr().err
    assert err.count("fusednoise report: warning:") == 10  # five files, not renamed and left out
    assert "truncated.json: is not valid JSON" in err and "not renamed" in err
    table = (tmp_path / "results.md").read_text()
    assert "| hype-n | 0 | 60.00 ± 0.00 | +10.00 | vanilla |" in table
    assert "## Files left out\n\n* runs/a-list.json: holds a JSON list" in table


def test_results_and_plot_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure
    import os

    write_runs(tmp_path, [fake_run("rte", "vanilla", 0, 0.5)])
    report.write_report(tmp_path)
    png, md = (tmp_path / "curves.png").read_bytes(), (tmp_path / "results.md").read_text()
    # Another writer's temporary file under the name today's main used for results.md is not taken.
    theirs = tmp_path / f".results.md.{os.getpid()}.tmp"
    theirs.write_text("another command's table")

    def interrupted(self, fname, **kwargs):  # half a PNG, then the process is stopped
        with open(fname, "wb") as handle:
            handle.write(png[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    write_runs(tmp_path, [fake_run("rte", "vanilla", 1, 0.6)])
    with pytest.raises(KeyboardInterrupt):
        report.write_report(tmp_path)
    assert (tmp_path / "curves.png").read_bytes() == png  # today's main: a truncated PNG
    assert theirs.read_text() == "another command's table"
    assert (tmp_path / "results.md").read_text() != md and "0,1" in (tmp_path / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name, "curves.png", "results.md", "runs"]
    assert oct((tmp_path / "results.md").stat().st_mode & 0o777) != oct(0o600)  # a plain file's mode


def test_one_row_and_seed_in_two_files_counts_once_in_both_tables(tmp_path, capsys):
    first = dict(fake_run("rte", "vanilla", 1, 0.50), finished_at="2026-01-01T10:00:00+0000")
    again = dict(fake_run("rte", "vanilla", 1, 0.70), finished_at="2026-01-02T10:00:00+0000")
    write_runs(tmp_path, [fake_run("rte", "vanilla", 0, 0.60), first])
    (tmp_path / "runs" / "again.json").write_text(json.dumps(again))
    assert main(["report", "--output", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| vanilla | 0,1 | 65.00 ± 7.07 |" in table  # today's main: seeds 0,1,1
    assert "| vanilla | 60.00 | 70.00 |  |" in table  # the per-seed table uses the same (newest) run
    note = ("vanilla seed 1 is in 2 files: the tables use again.json (the newest) and leave out "
            "rte__vanilla__seed1.json")
    assert table.count(note) == 2 and note in capsys.readouterr().err


def test_delta_pairs_seeds_and_says_n_when_the_seed_sets_differ():
    runs = [fake_run("rte", "vanilla", s, v) for s, v in ((0, 0.50), (1, 0.60), (2, 0.90))]
    runs += [fake_run("rte", "hype-n", s, v) for s, v in ((0, 0.56), (1, 0.64))]
    table = report.summary_table(runs)
    paired = ((56 - 50) + (64 - 60)) / 2  # over seeds 0 and 1; today's main: 60 - 66.67 = -6.67
    assert f"| hype-n | 0,1 | 60.00 ± 5.66 | {paired:+.2f} (n=2) | vanilla |" in table
    assert "Δ is over the n seeds both ran (paired by seed)" in table
    same = report.summary_table(runs[:2] + runs[3:])
    assert "| hype-n | 0,1 | 60.00 ± 5.66 | +5.00 | vanilla |" in same and "(n=" not in same
    assert "| hype-n | 0 | 56.00 ± 0.00 | no common seed |" in report.summary_table(runs[1:2] + runs[3:4])


def timed(run, host="a", load=(0.9, 1.1), calibration=(2.0, 2.1), cpus=2):
    return dict(run, timing={"host": host, "device": run["device"], "cpu_count": cpus, "torch_threads": 1,
                             "load_average_start": [load[0], 1.0, 1.0], "load_average_end": [load[1], 1.0, 1.0],
                             "calibration_ms_start": calibration[0], "calibration_ms_end": calibration[1]})


def test_rows_timed_under_other_conditions_are_marked():
    runs = [timed(fake_run("rte", "vanilla", s, 0.5)) for s in (0, 1)]
    runs += [timed(fake_run("rte", "hype-n", 0, 0.5), load=(7.9, 6.0)),  # a loaded machine
             timed(fake_run("rte", "noisytune", 0, 0.5), calibration=(2.0, 4.0)),  # slowed during the run
             timed(fake_run("rte", "pats", 0, 0.5), host="b"),  # another host
             timed(fake_run("rte", "adamax", 0, 0.5), calibration=(2.5, 2.6))]  # within the noise: comparable
    table = report.summary_table(runs)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert [name for name, line in rows.items() if "| 250† |" in line] == ["hype-n", "noisytune", "pats"]
    assert "| 250 |" in rows["vanilla"] and "| 250 |" in rows["adamax"]
    assert "† hype-n: seed 0 timed on a loaded machine (load average 7.9 on 2 CPUs)" in table
    assert "† noisytune: seed 0's calibration matmul took 4 ms, 2.0x the quickest here (2 ms)" in table
    assert "† pats: seed 0 timed on host b, most runs here on a" in table
    assert "† also marks rows timed under other conditions" in table and "were written before" not in table
    # Runs older than the timing record: still loaded, marked next to recorded ones, and said
    runs.append(fake_run("rte", "hype-u", 0, 0.5))
    table = report.summary_table(runs)
    assert "† hype-u: seed 0 recorded no timing conditions (an older run)" in table
    assert "1 of the 7 runs were written before runs recorded their timing conditions" in table


def test_timing_conditions_are_recorded():
    conditions = finetune.timing_conditions("cpu")
    assert conditions["host"] and conditions["cpu_count"] >= 1 and conditions["torch_threads"] >= 1
    assert conditions["calibration_ms_start"] > 0 and len(conditions["load_average_start"]) == 3
    done = finetune.finish_timing_conditions(conditions, "cpu")
    assert done["calibration_ms_end"] > 0 and len(done["load_average_end"]) == 3


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


def test_lnsr_tables_of_the_docs():
    script = load_script("lnsr_reduction_table")
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
