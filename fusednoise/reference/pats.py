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

Sharded tensors (SPEC section 4c): ``i`` is the element's index in the *unsharded* tensor (a shard's elements
are ``offset .. offset + n - 1``), and ``s_bar`` is the unsharded tensor's mean, reduced across the shards
between the two halves of the step (:func:`sensitivity_ema_`, then :func:`adamax_update_` with the reduced mean).

The step's scalars ``clr = lr / (1 - beta1**t)`` and ``seed_t`` are pure functions of ``t``, computed by the
exact rules of :func:`power` (float64 products by binary exponentiation) and :func:`step_seed` (uint64
arithmetic): the capturable kernel (``PATSAdamax(capturable=True)``) derives them from the device step count by
the same operations, so a step captured in a CUDA graph draws and updates bit for bit as the eager one.

All arithmetic is float32 (float64 for float64 parameters); half-precision parameters keep float32 state and
are rounded to nearest when the new value is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .. import rng

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    """The splitmix64 finaliser: a bijection on 64-bit integers with good avalanche."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def power(base: float, exponent: int) -> float:
    """``base ** exponent`` for an integer ``exponent >= 0`` by binary exponentiation in float64: the products the
    capturable kernel forms in the same order (IEEE double multiplies, correctly rounded on host and device), so
    the bias correction derived on the device equals the host's bit for bit. Within a few float64 ulps of
    ``base ** exponent`` (at most 2 log2(exponent) roundings), far below the float32 it is used in."""
    result = 1.0
    base = float(base)
    exponent = int(exponent)
    while exponent > 0:
        if exponent & 1:
            result *= base
        base *= base
        exponent >>= 1
    return result


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
    clr: float               # lr / (1 - power(beta1, t))
    seed: int                # the optimizer's seed (the capturable kernel derives seed_t from it and t)
    lr: float                # the learning rate (the capturable kernel derives clr from it, beta1 and t)
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


class PatsJob(NamedTuple):
    """One tensor's part of a step. ``offset``: its first element's index in the unsharded tensor (a shard's);
    ``mean_slot`` (>= 0): its slot in the vector of sums that the caller reduces across ranks (sharded noise
    tensors), with ``total_numel`` the unsharded element count; ``step``: its float32 step count on the device,
    already advanced to this step (capturable steps; None otherwise)."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_inf: torch.Tensor
    sensitivity: Optional[torch.Tensor]
    scalars: StepScalars
    stream: int
    offset: int = 0
    mean_slot: int = -1
    total_numel: int = 0
    step: Optional[torch.Tensor] = None


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
        seed_t=step_seed(seed, step), clr=lr / (1.0 - power(beta1, step)), seed=int(seed), lr=lr,
        decay=(1.0 - lr * weight_decay) if decoupled else 1.0,
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


def kept_noise_draws(numel: int, seed_t: int, stream: int, p: float, device="cpu", first: int = 0):
    """``(index, n)``: the elements perturbed at this step (``uniform < p``), increasing, and their N(0, 1) draw.

    The elements are ``first .. first + numel - 1`` of the tensor (``first``: a shard's offset in the unsharded
    tensor), ``index`` counts from ``first``. The same numbers as :func:`noise_draws` at those elements; the
    normals of the others (``1 - p`` of them, multiplied by zero in the formula) are never computed.
    """
    index, u0, u1 = rng.philox_select(seed_t, numel, p, first, stream, rng.PURPOSE_NOISE, device)
    return index, rng.box_muller_cos(u0, u1)


def noise_variance(sensitivity: torch.Tensor, mean: torch.Tensor, noise_lambda: float, gamma: float,
                   noise_eps: float) -> torch.Tensor:
    """``r = lambda * max(s_bar / (s~ + noise_eps) - gamma, 0)``: the variance of each element's noise (eq. 4)."""
    ratio = mean / (sensitivity + noise_eps)
    return ratio.sub_(gamma).clamp_(min=0.0).mul_(noise_lambda)  # noise_lambda * max(ratio - gamma, 0), in place


def sensitivity_ema_(param: torch.Tensor, grad: torch.Tensor, sensitivity: torch.Tensor,
                     sc: StepScalars) -> torch.Tensor:
    """The first half of a noise tensor's step: ``s~ = beta * s~ + (1 - beta) * |theta * g|`` in place (theta
    before the step); returns ``sum(s~)`` (0-dim, :func:`state_dtype`), the numerator of ``s_bar``."""
    with torch.no_grad():
        acc = state_dtype(param.dtype)
        s_ema = sensitivity.view(-1)
        theta_g = torch.mul(param.detach().reshape(-1).to(acc), grad.reshape(-1).to(acc))
        s_ema.mul_(sc.sensitivity_beta).add_(theta_g.abs_(), alpha=1.0 - sc.sensitivity_beta)
        return s_ema.sum()


def adamax_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_inf: torch.Tensor,
                   sensitivity: Optional[torch.Tensor], sc: StepScalars, stream: int,
                   mean: Optional[torch.Tensor], offset: int = 0) -> None:
    """The second half of a step: the Adamax update and, when ``sc.draw``, the noise with the matrix's mean
    sensitivity ``mean`` (0-dim; unused without noise). ``offset``: the index of ``param``'s first element in
    the unsharded tensor (0 unless ``param`` is a shard), which keys the noise."""
    with torch.no_grad():
        acc = state_dtype(param.dtype)
        # A view of param when it is contiguous in the state dtype (updated in place), else a copy written back.
        theta = param.detach().reshape(-1).to(acc)
        g = grad.reshape(-1).to(acc)
        m = exp_avg.view(-1)
        u = exp_inf.view(-1)

        if sc.l2:
            g = g + sc.weight_decay * theta
        m.lerp_(g, 1.0 - sc.beta1)
        torch.maximum(u.mul_(sc.beta2), g.abs().add_(sc.eps), out=u)
        if sc.decay != 1.0:
            theta.mul_(sc.decay)
        theta.addcdiv_(m, u, value=-sc.clr)

        if sc.draw:  # with lambda = 0 or p = 0 the noise is 0: skip drawing it (the step is exactly Adamax's)
            # theta += sqrt(r) * n * z, added where z = 1 only (elsewhere the term is 0)
            index, normal = kept_noise_draws(theta.numel(), sc.seed_t, stream, sc.noise_prob, theta.device, offset)
            r = noise_variance(sensitivity.view(-1)[index], mean.to(acc), sc.noise_lambda, sc.gamma, sc.noise_eps)
            theta.index_add_(0, index, r.sqrt_().mul_(normal.to(acc)))  # sqrt(r) * n

        if theta.data_ptr() != param.data_ptr():
            param.copy_(theta.view(param.shape))


def pats_adamax_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_inf: torch.Tensor,
                      sensitivity: Optional[torch.Tensor], sc: StepScalars, stream: int) -> None:
    """One PATS-Adamax step of one (unsharded) tensor, in place on ``param`` and the state tensors.

    ``exp_avg``, ``exp_inf`` and ``sensitivity`` have ``param``'s shape and :func:`state_dtype`;
    ``sensitivity`` may be None when ``sc.noise`` is False. ``stream`` is the tensor's index ``k``.
    """
    mean = sensitivity_ema_(param, grad, sensitivity, sc) / param.numel() if sc.noise else None
    adamax_update_(param, grad, exp_avg, exp_inf, sensitivity, sc, stream, mean)
