"""Hugging Face integration, by its former name: the layer-stack and hidden-dropout finders
(:mod:`fusednoise.layers`, where they live now, below the methods that use them) and the Trainer integration
(:mod:`fusednoise.integrations.trainer`: ``FusedNoiseTrainer``, the callbacks and configs), imported on first
use so that importing the finders does not import ``transformers``.
"""
from __future__ import annotations

from ..layers import (STACK_NAMES, configured_hidden_dropout, find_layer_stacks, find_layers,  # noqa: F401
                      hidden_dropout_attributes, hidden_dropout_modules)

# The Trainer integration lives in .trainer, which imports transformers; these names are re-exported lazily so
# that `from fusednoise.integrations.transformers import FusedNoiseTrainer` works without making an import of
# the finders pay for transformers.
_TRAINER_NAMES = ("FusedNoiseMixin", "FusedNoiseTrainer", "HyPeCallback", "HyPeConfig", "LNSRConfig",
                  "NoisyTuneCallback", "NoisyTuneConfig", "PATSConfig", "pats_optimizer", "warmup_steps_for",
                  "NEFTuneCallback", "NEFTuneConfig")


def __getattr__(name: str):
    if not name.startswith("_"):
        from . import trainer

        if name in trainer.__all__:
            return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_TRAINER_NAMES))


__all__ = ["STACK_NAMES", "configured_hidden_dropout", "find_layer_stacks", "find_layers", "hidden_dropout_attributes",
           "hidden_dropout_modules", *_TRAINER_NAMES]
