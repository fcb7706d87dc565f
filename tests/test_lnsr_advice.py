"""The CLI's advice on LNSR's lambda_r (issue 22): a run with LNSR above the largest lambda_r measured to train a
small model like vanilla is warned about, in the run's JSON and as a UserWarning; the setting is left as given."""
import pytest

from fusednoise.experiments.finetune import check_lnsr_weight, FinetuneConfig, LNSR_SMALL_MODEL_WEIGHT


def _config(methods, weight):
    return FinetuneConfig(task="cola", methods=methods, lnsr_weight=weight)


def test_the_measured_bound_is_the_sweeps():
    # docs/lnsr.md: lambda_r 0.01 and 0.03 kept vanilla's [CLS] geometry and CoLA MCC on MiniLM; 0.1 did not.
    assert LNSR_SMALL_MODEL_WEIGHT == 0.03


@pytest.mark.parametrize("methods", [("lnsr",), ("lnsr-manifold",), ("hype-n", "lnsr")])
@pytest.mark.parametrize("weight", [1.0, 0.3, 0.1, 0.031])
def test_lnsr_above_the_bound_is_warned_about(methods, weight):
    (message,) = check_lnsr_weight(_config(methods, weight))
    assert f"--lnsr-weight {weight:g}" in message and "--lnsr-weight 0.03" in message
    assert "docs/lnsr.md" in message


@pytest.mark.parametrize("weight", [0.03, 0.01, 0.0])
def test_lnsr_at_or_below_the_bound_is_not(weight):
    assert check_lnsr_weight(_config(("lnsr",), weight)) == []


@pytest.mark.parametrize("methods", [("vanilla",), ("hype-n",), ("noisytune",)])
def test_recipes_without_lnsr_are_not_warned_about(methods):
    # lnsr_weight is LNSR's setting: another recipe ignores it whatever its value.
    assert check_lnsr_weight(_config(methods, 1.0)) == []
