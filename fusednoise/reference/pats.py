"""Eager reference for PATS-Adamax: the executable spec of ``fusednoise/kernels/pats.py`` (SPEC section 4).

One tensor at a time, readable first. For a parameter tensor with ``N`` elements, gradient ``g`` and state
``m`` (``exp_avg``), ``u`` (``exp_inf``) and ``s~`` (``sensitivity``), step ``t`` (1-based)::

    s      = | theta * g |                              sensitivity (paper eq. 1), raw gradient, theta before the step
    s~     = beta * s~ + (1 - beta) * s                 EMA, no bias correction (paper eq. 2)
    s_bar  = sum(s~) / N                                per tensor (the paper's "current matrix", eq. 3)
    g'     = g + wd * theta            (only with decoupled_weight_decay=False: torch.optim.Adamax's L2 form)
    m      = lerp(m, g', 1 - beta1)                     = beta1 * m + (1 - beta1) * g'
    u      = max(beta2 * u, |g'| + eps)                 torch.optim.Adamax's form
    theta  = theta * (1 - lr * wd)     (only with decoupled_weight_decay=True, the default: AdamW's form)
    theta  = theta - (lr / (1 - beta1**t)) * m / u
    r      = lambda * max(s_bar / (s~ + noise_eps) - gamma, 0)          (eq. 4; variance of the noise)
    theta  = theta + sqrt(r) * n * z,   n ~ N(0, 1), z ~ Bernoulli(p)   (Algorithm 1, line 13)

Groups without noise skip the sensitivity and the noise lines and take exactly the Adamax step; with
``lambda = 0`` or ``p = 0`` the sensitivity EMA is kept but no noise is drawn.

Random numbers (SPEC section 0). Element ``i`` (row-major logical order) of the tensor with stream index ``k``
(its position in the optimizer's parameter list, counted across groups) at step ``t`` draws one philox-4x32-10
call::

    w0, w1, w2, w3 = philox(seed_t, c0 = i & 0xFFFFFFFF, c1 = i >> 32, c2 = k, c3 = 0)
    n = Box-Muller(uniform(w0), uniform(w1)), first (cosine) output, as tl.randn computes it
    z = uniform(w2) < p                                  (w3 is unused)

with the per-step key ``seed_t = step_seed(seed, t)`` (see :func:`step_seed`). The noise of element ``i`` of
tensor ``k`` at step ``t`` is therefore a function of ``(seed, t, k, i)`` only: it does not depend on which
other tensors share a launch, and a run resumed from a ``state_dict`` draws exactly what it would have drawn.

All arithmetic is float32 (float64 for float64 parameters); half-precision parameters keep float32 state and
are rounded to nearest when the new value is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import rng

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    """The splitmix64 finaliser: a bijection on 64-bit integers with good avalanche."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The philox key of step ``step`` for the optimizer seed ``seed``: a number in ``[0, 2**62)``.

    ``step_seed(seed, t) = splitmix64((seed + t * 0x9E3779B97F4A7C15) mod 2**64) >> 2``

    splitmix64 is a bijection, so two (seed, step) pairs share a key only if ``seed + t * golden`` collide
    modulo 2**64 or the dropped two bits do: never for the steps of one run (the golden-ratio constant is odd,
    so distinct t < 2**64 give distinct sums).
    """
    return _splitmix64((int(seed) + int(step) * _GOLDEN64) & _MASK64) >> 2


@dataclass(frozen=True)
class StepScalars:
    """Everything a tensor's step needs besides its tensors and its stream index, as the kernel and the
    reference both read it; shared by all tensors of one param group at one step.

    Built by :func:`step_scalars`; the derived numbers (``clr``, ``decay``, ``seed_t``) are computed once on the
    host in double precision and rounded to float32 where they are used.
    """

    noise: bool              # this tensor's group adds PATS noise (else: the plain Adamax step)
    draw: bool               # noise and noise_lambda > 0 and noise_prob > 0: the noise can be nonzero
    l2: bool                 # weight decay as L2 on the gradient (torch.optim.Adamax's form)
    seed_t: int              # philox key of this step, step_seed(seed, t)
    clr: float               # lr / (1 - beta1**t)
    decay: float             # 1 - lr * weight_decay for decoupled decay, else 1.0
    weight_decay: float      # the L2 coefficient when l2, else 0.0
    beta1: float
    beta2: float
    eps: float
    sensitivity_beta: float
    noise_lambda: float
    gamma: float
    noise_prob: float
    noise_eps: float


def step_scalars(*, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 decoupled_weight_decay: bool, noise: bool, sensitivity_beta: float, noise_lambda: float,
                 gamma: float, noise_prob: float, noise_eps: float, seed: int) -> StepScalars:
    """The per-tensor numbers of step ``step`` (1-based) from a group's hyperparameters."""
    lr = float(lr)
    weight_decay = float(weight_decay)
    decoupled = bool(decoupled_weight_decay) and weight_decay != 0.0
    l2 = (not decoupled_weight_decay) and weight_decay != 0.0
    return StepScalars(
        noise=bool(noise), draw=bool(noise) and noise_lambda > 0 and noise_prob > 0, l2=l2,
        seed_t=step_seed(seed, step),
        clr=lr / (1.0 - beta1 ** step), decay=(1.0 - lr * weight_decay) if decoupled else 1.0,
        weight_decay=weight_decay if l2 else 0.0, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        sensitivity_beta=float(sensitivity_beta), noise_lambda=float(noise_lambda), gamma=float(gamma),
        noise_prob=float(noise_prob), noise_eps=float(noise_eps))


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state (and of the arithmetic): float64 for float64 parameters, else float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def noise_draws(numel: int, seed_t: int, stream: int, device="cpu"):
    """``(n, uniform)`` for elements ``0 .. numel-1`` of tensor ``stream``: N(0, 1) and U[0, 1) in float32.

    ``n`` is the first Box-Muller output of words (0, 1), ``uniform`` the uniform of word 2; the element is
    perturbed when ``uniform < p``.
    """
    uniforms = rng.philox_uniforms(seed_t, numel, 0, stream, rng.PURPOSE_NOISE, device)
    return rng.box_muller_cos(uniforms[:, 0], uniforms[:, 1]), uniforms[:, 2]


def kept_noise_draws(numel: int, seed_t: int, stream: int, p: float, device="cpu"):
    """``(index, n)``: the elements perturbed at this step (``uniform < p``), increasing, and their N(0, 1) draw.

    The same numbers as :func:`noise_draws` at those elements; the normals of the others (``1 - p`` of them,
    multiplied by zero in the formula) are never computed.
    """
    index, u0, u1 = rng.philox_select(seed_t, numel, p, 0, stream, rng.PURPOSE_NOISE, device)
    return index, rng.box_muller_cos(u0, u1)


def noise_variance(sensitivity: torch.Tensor, mean: torch.Tensor, noise_lambda: float, gamma: float,
                   noise_eps: float) -> torch.Tensor:
    """``r = lambda * max(s_bar / (s~ + noise_eps) - gamma, 0)``: the variance of each element's noise (eq. 4)."""
    ratio = mean / (sensitivity + noise_eps)
    return ratio.sub_(gamma).clamp_(min=0.0).mul_(noise_lambda)  # noise_lambda * max(ratio - gamma, 0), in place


def pats_adamax_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_inf: torch.Tensor,
                      sensitivity: Optional[torch.Tensor], sc: StepScalars, stream: int) -> None:
    """One PATS-Adamax step of one tensor, in place on ``param`` and the state tensors.

    ``exp_avg``, ``exp_inf`` and ``sensitivity`` have ``param``'s shape and :func:`state_dtype`;
    ``sensitivity`` may be None when ``sc.noise`` is False. ``stream`` is the tensor's index ``k``.
    """
    with torch.no_grad():
        acc = state_dtype(param.dtype)
        # A view of param when it is contiguous in the state dtype (updated in place), else a copy written back.
        theta = param.detach().reshape(-1).to(acc)
        g = grad.reshape(-1).to(acc)
        m = exp_avg.view(-1)
        u = exp_inf.view(-1)

        if sc.noise:
            s_ema = sensitivity.view(-1)
            s_ema.mul_(sc.sensitivity_beta).add_(torch.mul(theta, g).abs_(), alpha=1.0 - sc.sensitivity_beta)
            mean = s_ema.sum() / theta.numel()

        if sc.l2:
            g = g + sc.weight_decay * theta
        m.lerp_(g, 1.0 - sc.beta1)
        torch.maximum(u.mul_(sc.beta2), g.abs().add_(sc.eps), out=u)
        if sc.decay != 1.0:
            theta.mul_(sc.decay)
        theta.addcdiv_(m, u, value=-sc.clr)

        if sc.draw:  # with lambda = 0 or p = 0 the noise is 0: skip drawing it (the step is exactly Adamax's)
            # theta += sqrt(r) * n * z, added where z = 1 only (elsewhere the term is 0)
            index, normal = kept_noise_draws(theta.numel(), sc.seed_t, stream, sc.noise_prob, theta.device)
            r = noise_variance(s_ema[index], mean, sc.noise_lambda, sc.gamma, sc.noise_eps)
            theta.index_add_(0, index, r.sqrt_().mul_(normal.to(acc)))  # sqrt(r) * n

        if theta.data_ptr() != param.data_ptr():
            param.copy_(theta.view(param.shape))
