"""The ``fusednoise`` command line: argument errors, the demo's defaults, ``report`` and ``check``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusednoise
from fusednoise import cli
from fusednoise.experiments import finetune
from fusednoise.cli import main

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="needs ../shared/data/glue")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["finetune"], "--task is required"),
    (["finetune", "--task", "rte", "--max-train-samples", "0"], "--max-train-samples must be an int >= 1"),
    (["finetune", "--task", "rte", "--method", "vanilla", "--method", "pats"], "--method: 'vanilla'"),
    (["finetune", "--task", "rte", "--method", "vanilla", "--method", "pats"],
     "to run them side by side, use --compare vanilla pats"),
    (["finetune", "--task", "rte", "--method", "hype-n", "--method", "hype-u"],
     "cannot be combined (one of ('hype-n', 'hype-u') per recipe). Repeated --method combines"),
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


@needs_glue
def test_a_run_that_would_train_nothing_is_refused_naming_the_flags(capsys):
    # 32 examples at batch 32 for one epoch: one optimizer step, which the warm-up runs at learning rate 0.
    argv = ["finetune", "--task", "rte", "--data-dir", str(GLUE_DIR), "--max-train-samples", "32", "--epochs", "1",
            "--batch-size", "32", "--output", "/nonexistent/never-written"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "make 1 optimizer step, and the warm-up runs the first at learning rate 0: nothing would train" in err
    assert "--max-train-samples, --epochs or a smaller --batch-size" in err and "--warmup-ratio 0" in err


def test_schedule_warnings_name_the_flags():
    config = finetune.FinetuneConfig(task="rte", epochs=1.0, batch_size=16, warmup_ratio=0.9)
    warnings = finetune.check_schedule(config, 64)  # 4 steps, warm-up ceil(3.6) = 4 of them
    assert len(warnings) == 2
    assert "all of them in the warm-up (--warmup-ratio 0.9): the learning rate never reaches 2e-05" in warnings[0]
    assert "3 of them at a nonzero learning rate: too few to train (fewer than 10)" in warnings[1]
    assert finetune.check_schedule(finetune.FinetuneConfig(task="rte", epochs=2.0, batch_size=16), 1000) == []
    assert len(finetune.check_schedule(finetune.FinetuneConfig(task="rte", epochs=1.0, warmup_ratio=0.0), 32)) == 1


def test_unknown_choices_are_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--task", "mnli"])
    assert info.value.code == 2 and "invalid choice: 'mnli'" in capsys.readouterr().err


def test_demo_defaults_are_small_and_finetune_defaults_are_the_papers():
    parser = cli._parser()
    demo = parser.parse_args(["demo"])
    assert (demo.task, demo.compare, demo.seeds, demo.max_train_samples, demo.epochs) == (
        ["rte"], ["vanilla", "hype-n", "pats", "adamax"], [0], 256, 2.0)
    plans = cli._configs(demo)
    assert [recipe for recipe in plans[0][1]] == [("vanilla",), ("hype-n",), ("pats",), ("adamax",)]
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
    assert base.hype_fused is False
    for flag, value in (("true", True), ("auto", "auto"), ("false", False)):
        fused = cli._configs(parser.parse_args(["finetune", "--task", "rte", "--method", "hype-n",
                                                "--hype-fused", flag]))
        assert fused[0][0].hype_fused == value and fused[0][0].trainer_kwargs()["hype"].fused == value


def test_python_m_fusednoise_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fusednoise", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0
    for command in ("finetune", "demo", "report", "check"):
        assert command in result.stdout


# Every fused op `fusednoise check` must cover, with the dtypes it runs them in.
CHECKED_OPS = {
    "add_noise_ (normal)": 3, "add_noise (uniform)": 3, "add_residual_noise": 3, "layerwise_diff_norm fwd": 3,
    "layerwise_diff_norm bwd": 3, "scaled_noise fwd": 3, "scaled_noise bwd": 3, "in_manifold_noise": 3,
    "noisytune.perturb_": 2, "PATSAdamax.step x3 params": 1, "PATSAdamax.step x3 state": 1,  # float32
    "PATSAdamax.step x1 params": 1, "PATSAdamax.step x1 state": 1,  # bfloat16
}
if hasattr(fusednoise, "add_neftune_noise"):
    CHECKED_OPS["add_neftune_noise"] = 3


@needs_glue
def test_check_covers_every_fused_op_and_times_hype_and_pats(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "fusednoise", "check", "--steps", "1", "--batch-size", "2",
                             "--max-length", "16", "--device", "cpu", "--data-dir", str(GLUE_DIR)],
                            capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    op_lines = [line.strip() for line in out.splitlines() if "max|fused-ref|" in line]
    assert op_lines and all(line.endswith(" ok") for line in op_lines), "\n".join(op_lines)
    for op, dtypes in CHECKED_OPS.items():  # the diff norm once per dtype and reduction it offers
        count = sum(line.startswith(op + " ") for line in op_lines)
        assert count >= dtypes and count % dtypes == 0, (op, count)
    assert "vanilla" in out and "HyPe-N" in out and "ms/step" in out
    assert "torch.optim.Adamax (foreach=False)" in out and "x Adamax)" in out


def test_check_reports_a_kernel_that_disagrees_with_its_reference(monkeypatch):
    from fusednoise import check

    original = check._both

    def off_by_a_little(run):
        fused, eager = original(run)
        return fused + 1e-3, eager  # add_noise returns one tensor

    monkeypatch.setattr(check, "_both", off_by_a_little)
    lines = check.check_ops("cpu", ["HyPe"], dtypes=[torch.float32])
    assert len(lines) == 3 and all(line.endswith("MISMATCH") for line in lines)
