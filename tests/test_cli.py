"""The ``fusednoise`` command line: argument errors, the demo's defaults, ``report`` and ``check``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusednoise import cli, finetune
from fusednoise.cli import main

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="needs ../shared/data/glue")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["finetune"], "--task is required"),
    (["finetune", "--task", "rte", "--max-train-samples", "0"], "--max-train-samples must be an int >= 1"),
    (["finetune", "--task", "rte", "--method", "vanilla", "--method", "pats"], "--method: 'vanilla'"),
    (["finetune", "--task", "rte", "--method", "hype-n", "--compare", "pats"], "--method (one recipe"),
    (["finetune", "--task", "rte", "--compare", "hype-n+hype-u"], "--compare: 'hype-n' and 'hype-u'"),
    (["finetune", "--task", "rte", "--compare", "pats", "pats"], "--compare names a recipe twice"),
    (["finetune", "--task", "rte", "--lnsr-scale", "-1"], "--lnsr-scale must be a finite number >= 0"),
    (["finetune", "--task", "rte", "--seeds", "1", "1"], "--seeds must be distinct"),
    (["finetune", "--task", "rte", "--pats-prob", "2"], "--pats-prob must be in [0, 1]"),
    (["finetune", "--task", "rte", "--data-dir", "/no/such/folder"], "--data-dir '/no/such/folder' is not a folder"),
    (["demo", "--epochs", "0"], "--epochs must be a finite number > 0"),
    (["report", "--output", "/no/such/folder"], "no run JSON"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_unknown_choices_are_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--task", "mnli"])
    assert info.value.code == 2 and "invalid choice: 'mnli'" in capsys.readouterr().err


def test_demo_defaults_are_small_and_finetune_defaults_are_the_papers():
    parser = cli._parser()
    demo = parser.parse_args(["demo"])
    assert (demo.task, demo.compare, demo.seeds, demo.max_train_samples, demo.epochs) == (
        ["rte"], ["vanilla", "hype-n", "pats"], [0], 256, 2.0)
    plans = cli._configs(demo)
    assert [recipe for recipe in plans[0][1]] == [("vanilla",), ("hype-n",), ("pats",)]
    full = parser.parse_args(["finetune", "--task", "rte", "cola", "--compare", "all", "--seeds", "0", "1", "2"])
    plans = cli._configs(full)
    assert [base.task for base, _ in plans] == ["rte", "cola"]
    assert [r for r in plans[0][1]] == [(m,) for m in finetune.METHODS]
    base = plans[0][0]
    assert (base.hype_sigma, base.lnsr_scale, base.lnsr_weight, base.noisytune_lambda) == (1e-5, 0.05, 1.0, 0.15)
    assert (base.pats_noise_lambda, base.pats_gamma, base.pats_beta, base.pats_prob) == (2e-6, 2e-3, 0.75, 0.2)
    assert (base.lr, base.warmup_ratio, base.max_length, base.max_train_samples) == (2e-5, 0.1, 128, None)
    combined = cli._configs(parser.parse_args(["finetune", "--task", "mrpc", "--method", "noisytune",
                                               "--method", "hype-u", "--hype-sigma", "1e-6"]))
    assert combined[0][1] == [("hype-u", "noisytune")] and combined[0][0].hype_sigma == 1e-6


def test_report_rewrites_table_and_plot(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for recipe, seed, value in (("vanilla", 0, 0.30), ("vanilla", 1, 0.40), ("pats", 0, 0.45), ("pats", 1, 0.45)):
        config = finetune.FinetuneConfig(task="cola", methods=(recipe,), seed=seed)
        run = {"schema": "fusednoise.finetune/1", "config": config.to_dict(), "task": "cola", "recipe": recipe,
               "seed": seed, "metrics": {"matthews_correlation": value},
               "best_epoch": {"epoch": 1, "matthews_correlation": value},
               "per_epoch": [{"epoch": 1, "matthews_correlation": value}], "train_examples": 8551,
               "dev_examples": 1043, "wall_time_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "t",
               "device": "cpu: t", "model": "m"}
        (runs / f"cola__{recipe}__seed{seed}.json").write_text(json.dumps(run))
    (runs / "not-a-run.json").write_text(json.dumps({"something": "else"}))
    assert main(["report", "--output", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| vanilla | 0,1 | 35.00 ± 7.07 | — |" in table
    # PATS runs at its own learning rate (Adamax 1e-4 on CoLA) and is compared with vanilla all the same.
    assert "| pats | 0,1 | 45.00 ± 0.00 | +10.00 |" in table and "| 0.0001 |" in table
    assert "## Per seed" in table and "| recipe | seed 0 | seed 1 | paired Δ vs vanilla |" in table
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_python_m_fusednoise_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fusednoise", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0
    for command in ("finetune", "demo", "report", "check"):
        assert command in result.stdout


@needs_glue
def test_check_runs_the_op_checks_and_times_hype(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "fusednoise", "check", "--steps", "1", "--batch-size", "2",
                             "--max-length", "16", "--device", "cpu", "--data-dir", str(GLUE_DIR)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "MISMATCH" not in out
    assert ("  ok" in out) or ("only the reference backend" in out)
    assert "vanilla" in out and "HyPe-N" in out and "ms/step" in out
