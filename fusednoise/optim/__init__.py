"""Optimizers: :class:`PATSAdamax` (PATS, sensitivity-aware noisy Adamax) and its param-group helper."""
from .pats import DEFAULT_NO_NOISE, PATSAdamax, pats_param_groups

__all__ = ["DEFAULT_NO_NOISE", "PATSAdamax", "pats_param_groups"]
