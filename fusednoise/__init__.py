"""fusednoise: fused noise-based fine-tuning regularisers (HyPe, LNSR, NoisyTune, PATS, NEFTune) for PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import backend, get_backend, set_backend
from .ops import add_noise, add_noise_, add_residual_noise
from .ops_lnsr import layerwise_diff_norm
from .ops_neftune import add_neftune_noise
from .ops_norms import add_layer_norm, add_rms_norm
from .fused import fuse_norms
from . import hype, lnsr, neftune, noisytune, optim, rng

__all__ = [
    "__version__", "add_noise", "add_noise_", "add_residual_noise", "backend", "get_backend", "layerwise_diff_norm",
    "set_backend", "hype", "lnsr", "noisytune", "optim", "rng",
    "add_neftune_noise", "neftune", "add_layer_norm", "add_rms_norm", "fuse_norms",
]
