"""How large LNSR's lambda_r can be on a small model before it harms fine-tuning, per reduction and dropout mode, and
the warning ``fusednoise finetune`` gives above it (issue 22; ``docs/lnsr.md``, "Choosing lambda_r").

The sweep measured two modes on all-MiniLM-L6-v2 (6 layers, 384 wide, 22M parameters): the default (``mean``,
independent dropout) and ``token_mean`` with replayed dropout. In both, the collapse it found follows one quantity:
the norm of the penalty's gradient over the task loss's at the first step. At each mode's largest safe lambda_r
that ratio was about 0.02 (median over the four tasks and three seeds); on SST-2 the [CLS] vectors stayed near
their start up to a ratio of about 0.07 and converged from about 0.2, in both modes and with the ``sum``. The
ratio is linear in lambda_r and was measured at lambda_r = 1 for every mode
(``benchmarks/results/lnsr-dynamics/first-step.json``), so a mode the sweep did not run gets the lambda_r that gives
the default mode's ratio at its bound. The papers' lambda_r = 1 stays everybody's default: it is their setting,
tuned on BERT-large and RoBERTa-large, and nothing here measures a large model.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from .runs import FinetuneConfig, METHOD_SETTINGS

# The largest lambda_r that trained MiniLM like vanilla, per (reduction, dropout) the sweep ran. mean, independent:
# the [CLS] vectors moved as vanilla's (cosine at step 16: 0.688 and 0.703 against vanilla's 0.687; 0.746 at 0.1,
# 0.918 at 1) and CoLA kept vanilla's MCC within its seed spread (paired, seeds 0-2: +0.99 and -1.09 at 0.01 and
# 0.03, vanilla's std 2.46; -5.51 at 0.1, -7.26 at 0.3; MCC 0 on every seed at 1). token_mean, replay: CoLA kept
# vanilla's MCC at 0.01 (paired, seeds 0-2: +0.15) and the [CLS] cosine at step 16 stayed at its start (0.714);
# at 0.03 CoLA lost 5.91 (two of three seeds at MCC 0) and the cosine rose to 0.766.
MEASURED_WEIGHTS: Dict[Tuple[str, str], float] = {("mean", "independent"): 0.03, ("token_mean", "replay"): 0.01}
# The default mode's bound (what ``--help`` quotes).
LNSR_SMALL_MODEL_WEIGHT = MEASURED_WEIGHTS[("mean", "independent")]

# The first step's penalty-gradient norm over the task loss's at lambda_r = 1, from the freshly loaded MiniLM:
# median over RTE, MRPC, CoLA and STS-B x seeds 0-2 (benchmarks/results/lnsr-dynamics/first-step.json).
FIRST_STEP_GRAD_RATIOS: Dict[Tuple[str, str], float] = {
    ("mean", "independent"): 0.741, ("mean", "replay"): 0.00622,
    ("token_mean", "independent"): 285.0, ("token_mean", "replay"): 2.39,
    ("sum", "independent"): 9190.0, ("sum", "replay"): 70.1,
}


def small_model_weight(reduction: str, dropout: str) -> Tuple[float, bool]:
    """``(bound, measured)``: the largest lambda_r advised on a MiniLM-sized model for this mode, and whether the
    sweep measured it (else it is the lambda_r whose first-step gradient ratio equals the default mode's at its
    bound, to one significant figure)."""
    if (reduction, dropout) in MEASURED_WEIGHTS:
        return MEASURED_WEIGHTS[(reduction, dropout)], True
    anchor = ("mean", "independent")
    scaled = MEASURED_WEIGHTS[anchor] * FIRST_STEP_GRAD_RATIOS[anchor] / FIRST_STEP_GRAD_RATIOS[(reduction, dropout)]
    return float(f"{scaled:.1g}"), False


def check_lnsr_weight(config: FinetuneConfig) -> List[str]:
    """A warning when a recipe with LNSR uses a lambda_r above :func:`small_model_weight` for its reduction and
    dropout mode; the setting itself is left as given."""
    if not any("lnsr_weight" in METHOD_SETTINGS[method] for method in config.methods):  # no method of it uses it
        return []
    bound, measured = small_model_weight(config.lnsr_reduction, config.lnsr_dropout)
    if config.lnsr_weight <= bound:
        return []
    mode = f"--lnsr-reduction {config.lnsr_reduction} --lnsr-dropout {config.lnsr_dropout}"
    model = "all-MiniLM-L6-v2 (6 layers, 22M parameters)"
    how = (f"on {model}, the largest lambda_r at which this mode trained like vanilla" if measured else
           f"this mode was not swept; on {model} that lambda_r gives its penalty the first-step gradient (relative "
           f"to the task loss's) that the default mode has at its measured bound, {LNSR_SMALL_MODEL_WEIGHT:g}")
    return [f"--lnsr-weight {config.lnsr_weight:g} with {mode} is above {bound:g}: {how}. Above those bounds LNSR "
            f"pulled that model's layer outputs together; at 1 (the papers' value, tuned on BERT-large) it learned "
            f"nothing on CoLA and lost 27 to 62 Pearson points on STS-B (docs/lnsr.md, 'Choosing lambda_r'). On a "
            f"model of that size, pass --lnsr-weight {bound:g}"]


__all__ = ["FIRST_STEP_GRAD_RATIOS", "LNSR_SMALL_MODEL_WEIGHT", "MEASURED_WEIGHTS", "check_lnsr_weight",
           "small_model_weight"]
