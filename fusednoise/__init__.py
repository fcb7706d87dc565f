"""fusednoise: fused noise-based fine-tuning regularisers (HyPe, LNSR, NoisyTune, PATS) for PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import backend, get_backend, set_backend
from .ops import add_noise, add_noise_, add_residual_noise
from . import hype, noisytune, optim, rng

__all__ = [
    "__version__", "add_noise", "add_noise_", "add_residual_noise", "backend", "get_backend", "set_backend",
    "hype", "noisytune", "optim", "rng",
]
