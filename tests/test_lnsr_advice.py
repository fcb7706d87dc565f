"""The CLI's advice on LNSR's lambda_r (issue 22): a run with LNSR above the largest lambda_r measured (or, for a mode
the sweep did not run, scaled by the first-step gradient ratio) to train a small model like vanilla is warned
about, in the run's JSON and as a UserWarning; the setting is left as given."""
import json
import statistics
from pathlib import Path

import pytest

from fusednoise.experiments.finetune import check_lnsr_weight, FinetuneConfig, LNSR_SMALL_MODEL_WEIGHT
from fusednoise.experiments.lnsr_lambda import FIRST_STEP_GRAD_RATIOS, small_model_weight

FIRST_STEP = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lnsr-dynamics" / "first-step.json"


def _config(methods, weight, reduction="mean", dropout="independent"):
    return FinetuneConfig(task="cola", methods=methods, lnsr_weight=weight, lnsr_reduction=reduction,
                          lnsr_dropout=dropout)


def test_the_measured_bound_is_the_sweeps():
    # docs/lnsr.md: lambda_r 0.01 and 0.03 kept vanilla's [CLS] geometry and CoLA MCC on MiniLM; 0.1 did not.
    assert LNSR_SMALL_MODEL_WEIGHT == 0.03
    assert small_model_weight("mean", "independent") == (0.03, True)
    # token_mean with replayed dropout: CoLA kept vanilla's MCC at 0.01 and ended at MCC 0 at 0.03.
    assert small_model_weight("token_mean", "replay") == (0.01, True)


def test_the_gradient_ratios_are_the_committed_measurements():
    records = json.loads(FIRST_STEP.read_text(encoding="utf-8"))["records"]
    medians = {}
    for mode in FIRST_STEP_GRAD_RATIOS:
        ratios = [r["grad_ratio"] for r in records if (r["reduction"], r["dropout"]) == mode]
        assert len(ratios) == 12  # 4 tasks x 3 seeds
        medians[mode] = float(f"{statistics.median(ratios):.3g}")
    assert medians == FIRST_STEP_GRAD_RATIOS


@pytest.mark.parametrize("reduction, dropout", [("sum", "replay"), ("token_mean", "independent"),
                                                ("sum", "independent"), ("mean", "replay")])
def test_an_unmeasured_mode_gets_the_weight_of_equal_first_step_gradient_ratio(reduction, dropout):
    bound, measured = small_model_weight(reduction, dropout)
    expected = 0.03 * FIRST_STEP_GRAD_RATIOS[("mean", "independent")] / FIRST_STEP_GRAD_RATIOS[(reduction, dropout)]
    assert not measured and bound == pytest.approx(expected, rel=0.5)  # one significant figure
    assert f"{bound:.1g}" == f"{expected:.1g}"


@pytest.mark.parametrize("methods", [("lnsr",), ("lnsr-manifold",), ("hype-n", "lnsr")])
@pytest.mark.parametrize("weight", [1.0, 0.3, 0.1, 0.031])
def test_lnsr_above_the_bound_is_warned_about(methods, weight):
    (message,) = check_lnsr_weight(_config(methods, weight))
    assert f"--lnsr-weight {weight:g}" in message and "--lnsr-weight 0.03" in message
    assert "docs/lnsr.md" in message


@pytest.mark.parametrize("weight", [0.03, 0.01, 0.0])
def test_lnsr_at_or_below_the_bound_is_not(weight):
    assert check_lnsr_weight(_config(("lnsr",), weight)) == []


def test_the_measured_token_mean_bound_is_the_one_its_message_gives():
    assert check_lnsr_weight(_config(("lnsr",), 0.01, "token_mean", "replay")) == []
    (message,) = check_lnsr_weight(_config(("lnsr",), 0.03, "token_mean", "replay"))
    assert "--lnsr-weight 0.01" in message and "trained like vanilla" in message


def test_the_sum_is_warned_about_where_the_mean_is_not():
    # The sum over tokens and hidden units: its first-step gradient ratio is ~95x the mean's (with independent
    # dropout), and its [CLS] vectors converged at lambda_r = 0.01 (docs/lnsr.md).
    assert check_lnsr_weight(_config(("lnsr",), 0.01, "mean", "independent")) == []
    (message,) = check_lnsr_weight(_config(("lnsr",), 0.01, "sum", "replay"))
    assert "--lnsr-reduction sum --lnsr-dropout replay" in message and "--lnsr-weight 0.0003" in message


@pytest.mark.parametrize("methods", [("vanilla",), ("hype-n",), ("noisytune",)])
def test_recipes_without_lnsr_are_not_warned_about(methods):
    # lnsr_weight is LNSR's setting: another recipe ignores it whatever its value.
    assert check_lnsr_weight(_config(methods, 1.0)) == []
