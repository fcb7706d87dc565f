"""benchmarks/lnsr_lambda_table.py: the lambda_r tables of docs/lnsr.md (issue 22), on made-up runs."""
import json

from fusednoise.experiments.finetune import FinetuneConfig
from scripts import load_script


def _run(folder, name, seed, value, recipe="lnsr", task="rte", metric="accuracy", **settings):
    config = FinetuneConfig(task=task, methods=(recipe,), seed=seed, max_train_samples=100, **settings).to_dict()
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "runs" / name).write_text(json.dumps({"config": config, "metrics": {metric: value}}))


def test_paired_delta_and_scaled_first_step_ratios(tmp_path, capsys):
    shared, sweep = tmp_path / "shared", tmp_path / "sweep"
    for seed, accuracy in ((0, 0.60), (1, 0.50), (2, 0.70)):
        _run(shared, f"vanilla{seed}.json", seed, accuracy, recipe="vanilla")
    _run(sweep, "a.json", 0, 0.55, lnsr_weight=0.1)
    _run(sweep, "b.json", 1, 0.58, lnsr_weight=0.1)
    _run(sweep, "c.json", 1, 0.99, lnsr_weight=0.1, lr=3e-4)  # other training: no vanilla to pair with
    _run(sweep, "d.json", 0, 0.99, lnsr_weight=0.1, lnsr_scale=0.5)  # another experiment: not in the table
    (sweep / "runs" / "broken.json").write_text("{")
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"records": [
        {"task": "rte", "seed": s, "reduction": "mean", "dropout": "independent", "loss_ratio": r, "grad_ratio": 2 * r}
        for s, r in ((0, 0.2), (1, 0.3), (2, 0.4))]}))

    script = load_script("lnsr_lambda_table")
    assert script.main(["--runs", str(shared), str(sweep), "--first-step", str(first)]) == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith("| RTE")]
    # seed 0: 55 - 60 = -5, seed 1: 58 - 50 = +8; mean +1.5 over n = 2; ratios 0.1 x the medians 0.3 and 0.6
    assert "| RTE (accuracy) | mean, independent | 0.1 | 0,1 | 56.50 ± 2.12 | -5.00, +8.00 | +1.50 (n=2) | " \
           "0.03, 0.06 (λ × measured at 1) |" in rows
    assert any("| 1 | 99.00 ± 0.00 | no vanilla run |" in row for row in rows)
    assert "| RTE (accuracy) | vanilla | 0 | 0,1,2 | 60.00 ± 10.00 | — | — | |" in rows
    assert not any("0.5" in row.split("|")[3] for row in rows)  # the scale-0.5 run is left out
    assert "broken.json" in out.err
    summary = [line for line in out.out.splitlines() if line.startswith("| mean, independent")]
    assert summary == ["| mean, independent | 0.1 | +1.50 (n=2) |"]  # the lr 3e-4 run has no vanilla: no cell


def test_summary_has_one_column_per_task_and_a_dash_where_a_task_did_not_run(tmp_path, capsys):
    for task, metric, vanilla, lnsr in (("rte", "accuracy", 0.60, 0.50), ("cola", "matthews_correlation", 0.1, 0.3)):
        _run(tmp_path, f"{task}-vanilla.json", 0, vanilla, "vanilla", task, metric, lnsr_weight=0.03)
        _run(tmp_path, f"{task}-lnsr.json", 0, lnsr, "lnsr", task, metric, lnsr_weight=0.03)
    _run(tmp_path, "rte-lnsr1.json", 0, 0.7, lnsr_weight=1.0)

    script = load_script("lnsr_lambda_table")
    assert script.main(["--runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| LNSR reduction, dropout | lambda_r | CoLA (matthews_correlation) | RTE (accuracy) |" in lines
    # CoLA: 30 - 10 = +20; RTE: 50 - 60 = -10 at 0.03 and 70 - 60 = +10 at 1, where CoLA has no run
    assert "| mean, independent | 0.03 | +20.00 (n=1) | -10.00 (n=1) |" in lines
    assert "| mean, independent | 1 | — | +10.00 (n=1) |" in lines
