"""PATS-Adamax (Zhang et al., 2022, "PATS: Sensitivity-aware Noisy Learning for Pretrained Language Models").

Adamax whose update adds, to every parameter of the encoder layers, Gaussian noise whose variance grows as the
parameter's sensitivity ``|theta * grad|`` (an exponential moving average of it) falls below its matrix's mean,
masked by a Bernoulli(p) draw. The exact formulas are in :mod:`fusednoise.reference.pats` (SPEC section 4); the
design and the defaults are explained in ``docs/pats.md``.

The step is fused: on the Triton backend all tensors of one device and dtype take two kernel launches per
step (pass 1: sensitivity EMA and per-chunk partial sums; pass 2: the Adamax update and the noise), whatever
their number. On the reference backend (the default for CPU tensors) each tensor takes the eager reference.

FSDP2 (DTensor parameters, SPEC section 4c): each rank steps its local shards; the mean sensitivities of all
sharded tensors are added across the ranks in one collective per step between the two halves of the step, and
every draw is keyed by the element's index in the unsharded tensor (:mod:`fusednoise.sharding`).
"""
from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from itertools import chain
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from .. import backends as _backends
from .. import rng
from .. import sharding
from ..validation import check_name_patterns, first_overlap
from ..reference import pats as _reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATE_TENSORS = ("exp_avg", "exp_inf", "sensitivity")

# Paper defaults (pats-2022, section 3 and Algorithm 1); see docs/pats.md for noise_eps.
DEFAULT_NOISE_EPS = 1e-8


# ----------------------------------------------------------------------------------------------- validation
def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_at_least(value, name: str, low: float) -> None:
    if _number(value, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_unit(value, name: str, closed: bool) -> None:
    v = _number(value, name)
    if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")


def _check_hyperparameters(group: Dict[str, Any]) -> None:
    """ValueError/TypeError naming the first bad hyperparameter of a (defaults-filled) group."""
    _check_at_least(group["lr"], "lr", 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    _check_unit(betas[0], "betas[0]", closed=False)
    _check_unit(betas[1], "betas[1]", closed=False)
    _check_at_least(group["eps"], "eps", 0.0)
    _check_at_least(group["weight_decay"], "weight_decay", 0.0)
    _check_unit(group["sensitivity_beta"], "sensitivity_beta", closed=False)
    _check_at_least(group["noise_lambda"], "noise_lambda", 0.0)
    _check_at_least(group["gamma"], "gamma", 0.0)
    _check_unit(group["noise_prob"], "noise_prob", closed=True)
    if _number(group["noise_eps"], "noise_eps") <= 0.0:
        raise ValueError(f"noise_eps must be > 0 (it bounds s_bar / (s~ + noise_eps)), got {group['noise_eps']}")
    for flag in ("noise", "decoupled_weight_decay", "capturable"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {type(group[flag]).__name__}")
    rng.check_seed(group["seed"], "seed")


def _is_fsdp1(p: torch.Tensor) -> bool:
    # FSDP1 marks the original parameters it flattens and its FlatParameters.
    return bool(getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False))


def _check_param(p: torch.Tensor, where: str) -> None:
    if _is_fsdp1(p):
        raise TypeError(f"PATSAdamax does not support FSDP1's flattened parameters: {where} is one, and its "
                        "shard boundaries cut across the original tensors; shard with FSDP2 "
                        "(torch.distributed.fsdp.fully_shard), see docs/pats.md, 'FSDP2'")
    if p.is_complex():
        raise TypeError(f"PATSAdamax does not support complex parameters: {where} is {p.dtype}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"PATSAdamax needs float32, float16, bfloat16 or float64 parameters: {where} is {p.dtype}")
    if p.layout != torch.strided:
        raise TypeError(f"PATSAdamax needs dense (strided) parameters: {where} has layout {p.layout}")
    sharding.layout_of(p, where)  # the TypeError of an unsupported DTensor placement


_STRIDED = torch.strided
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)


def _plain_param(p: torch.Tensor) -> bool:
    """The per-step fast path of :func:`_check_param`: True for a plain dense float tensor or Parameter that
    no FSDP wrapper has flattened or sharded (False means: run the full check)."""
    if not (type(p) in _PLAIN_TYPES and p.dtype in _SUPPORTED_SET and p.layout is _STRIDED):
        return False
    attributes = p.__dict__  # a failed getattr costs an exception; most parameters have no attributes at all
    return not (attributes and (attributes.get("_fsdp_flattened") or attributes.get("_is_flat_param")))


def _refuse_param(p: torch.Tensor, grad: torch.Tensor, where: str) -> None:
    """The full checks of a parameter and its gradient: the named TypeError, or nothing when they pass."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(f"PATSAdamax does not support sparse gradients: {where} has a {grad.layout} gradient")
    _check_param(p, where)
    if sharding.is_dtensor(p) != sharding.is_dtensor(grad):
        raise TypeError(f"{where}: the parameter and its gradient must both be DTensors or both plain tensors, "
                        f"got {type(p).__name__} and {type(grad).__name__}")


def _check_state_shapes(work: Sequence[tuple], state: Dict[Any, Dict[str, Any]], checked: Dict[int, tuple]) -> None:
    """A RuntimeError (the error type of torch's optimizers and the reference on a size mismatch) naming the
    first parameter whose gradient or state tensor has another shape than the parameter, before anything
    changes: a parameter resized since its state was created (``p.data`` swapped, as
    ``resize_token_embeddings`` does) would otherwise hand the kernels the new element count with the old
    state's pointers. Host shape comparisons only (no device sync); DTensors compare their global shapes.

    ``checked`` (``id(p)``: the parameter's shape and state tensors when they last matched) keeps the per-step
    cost to two shape reads and a few identity tests per parameter; a new shape or a replaced state tensor is
    checked again."""
    for _, p, grad, k, _ in work:
        shape = p.shape
        if grad.shape != shape:
            _refuse_shapes(p, grad, None, k)
        st = state.get(p)
        if not st:
            continue
        get = st.get
        seen = checked.get(id(p))
        if (seen is not None and seen[0] == shape and seen[1] is get("exp_avg") and seen[2] is get("exp_inf")
                and seen[3] is get("sensitivity")):
            continue
        _refuse_shapes(p, grad, st, k)
        checked[id(p)] = (shape, get("exp_avg"), get("exp_inf"), get("sensitivity"))


def _refuse_shapes(p: torch.Tensor, grad: torch.Tensor, st: Optional[Dict[str, Any]], k: int) -> None:
    """The full check of :func:`_check_state_shapes` for one parameter: the named RuntimeError, or nothing."""
    shape = p.shape
    if grad.shape != shape:
        raise RuntimeError(f"PATSAdamax: parameter {k} has shape {tuple(shape)} but its gradient has shape "
                           f"{tuple(grad.shape)}; was the parameter resized after backward?")
    for name in STATE_TENSORS:
        t = (st or {}).get(name)
        if isinstance(t, torch.Tensor) and t.shape != shape:
            raise RuntimeError(
                f"PATSAdamax: parameter {k} has shape {tuple(shape)} but its state {name!r} has shape "
                f"{tuple(t.shape)}: the parameter was resized (its .data replaced, e.g. by "
                "resize_token_embeddings) after its optimizer state was created. Build a new optimizer, or "
                "drop this parameter's state (del optimizer.state[p]) to restart its moments")


def _group_scalars(group: Dict[str, Any], step: int) -> "_reference.StepScalars":
    """The step scalars of ``group`` at step ``step`` (1-based)."""
    beta1, beta2 = group["betas"]
    return _reference.step_scalars(
        step=step, lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
        weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
        noise=group["noise"], sensitivity_beta=group["sensitivity_beta"], noise_lambda=group["noise_lambda"],
        gamma=group["gamma"], noise_prob=group["noise_prob"], noise_eps=group["noise_eps"], seed=group["seed"])


def _check_one_device(params: Sequence[torch.Tensor], where: str) -> None:
    devices = {p.device for p in params}
    if len(devices) > 1:
        first = params[0].device
        other = next(i for i, p in enumerate(params) if p.device != first)
        raise ValueError(f"all parameters of one param group must be on one device: {where} has params[0] on "
                         f"{first} and params[{other}] on {params[other].device}")


class _StepCounts:
    """Every parameter's ``state["step"]`` as a 0-dim view into one float32 tensor (indexed by the parameter's
    position ``k``), so a step reads all counts with one op and advances them with one op.

    The tensor lives on the CPU, like torch's step counts, or, for capturable steps, on the parameters' device,
    where the kernels read it and a captured graph advances it. A tensor per parameter is what torch's optimizers
    keep and what checkpoints hold; reading and advancing 200 separate tensors costs more host time than the rest
    of a fused step. A state whose ``"step"`` is not the linked view (a parameter's first step, a loaded
    checkpoint, a value set by hand) is linked again, keeping its value.
    """

    # Tests set this to run the capturable form of :meth:`advance` (one slice per run of positions, what a GPU
    # runs) on CPU counts, so that the GPU's branch is tested by the CPU suite.
    SLICES_ON_CPU = False

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self.by_slices = device.type != "cpu" or self.SLICES_ON_CPU
        self.storage = torch.zeros(0, dtype=torch.float32, device=device)
        self.views: Sequence[torch.Tensor] = ()
        self._index_cache: Dict[tuple, torch.Tensor] = {}

    def link(self, states: Sequence[Dict[str, Any]], ks: Sequence[int], frozen: bool = False) -> None:
        """Make the ``"step"`` of ``states`` (those of parameters ``ks``) the views of their slots, keeping their
        values; ``frozen`` (a CUDA graph is being captured): a RuntimeError instead, as nothing may move then."""
        needed = max(ks) + 1
        if needed > self.storage.numel():
            if frozen:
                raise RuntimeError(f"PATSAdamax: a parameter's first step is being captured: {_warm_up_hint()}")
            grown = torch.zeros(max(needed, 2 * self.storage.numel()), dtype=torch.float32, device=self.device)
            grown[:self.storage.numel()] = self.storage
            self.storage, self.views = grown, grown.unbind()
            self._index_cache.clear()
        views = self.views
        for state, k in zip(states, ks):
            if state["step"] is not views[k]:
                if frozen:
                    raise RuntimeError(f"PATSAdamax: a step count set since the last step is being captured: "
                                       f"{_warm_up_hint()}")
                step = state["step"]
                views[k].copy_(step) if isinstance(step, torch.Tensor) else views[k].fill_(float(step))
                state["step"] = views[k]

    def read(self, states: Sequence[Dict[str, Any]], ks: Sequence[int]) -> List[float]:
        """The step counts of ``states`` (those of parameters ``ks``), linking any that are not linked yet."""
        self.link(states, ks)
        counts = self.storage.tolist()
        return [counts[k] for k in ks]

    def advance(self, ks: Sequence[int]) -> None:
        """Add 1 to the counts of parameters ``ks`` (in place: the states hold views of the storage). On a GPU
        one slice per run of consecutive ``ks`` (usually one): no index tensor to copy to the device, so a
        captured graph can hold it."""
        if self.by_slices:
            for first, stop in consecutive_runs(ks):
                self.storage[first:stop].add_(1.0)
            return
        key = tuple(ks)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 16:
                self._index_cache.clear()
            index = self._index_cache[key] = torch.tensor(ks, dtype=torch.int64)
        self.storage.index_add_(0, index, torch.ones((), dtype=torch.float32).expand(len(ks)))


def consecutive_runs(ks: Sequence[int]) -> List[tuple]:
    """``[(first, stop), ...]``: the runs of consecutive values of the increasing ``ks`` as half-open ranges
    (``[0, 1, 2, 5, 7, 8]`` gives ``[(0, 3), (5, 6), (7, 9)]``)."""
    runs = []
    start = 0
    for i in range(1, len(ks) + 1):
        if i == len(ks) or ks[i] != ks[i - 1] + 1:
            runs.append((ks[start], ks[i - 1] + 1))
            start = i
    return runs


def _warm_up_hint() -> str:
    from ..kernels.pats import WARM_UP  # only reached while capturing, which only the kernels can

    return WARM_UP


def _capturing(devices: Iterable[torch.device]) -> bool:
    """Whether work on one of ``devices`` is being captured into a CUDA graph now."""
    return any(d.type == "cuda" for d in devices) and torch.cuda.is_current_stream_capturing()


def _state_tensor(value: torch.Tensor, p: torch.Tensor, layout: Optional["sharding.ShardLayout"]) -> torch.Tensor:
    """``value`` as the state tensor of ``p``: its device, the state dtype, contiguous, a fresh copy; for a
    sharded ``p`` a DTensor placed as ``p`` (a plain ``value`` of ``p``'s unsharded shape, from an unsharded
    checkpoint, is cut to the rank's shard)."""
    value = value.detach().to(device=p.device, dtype=_reference.state_dtype(p.dtype), copy=True).contiguous()
    if layout is not None and not sharding.is_dtensor(value):
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"state tensor of shape {tuple(value.shape)} for a parameter of shape "
                             f"{tuple(p.shape)}")
        return sharding.shard_of(value, p, layout)
    return value


# ----------------------------------------------------------------------------------------------- optimizer
class PATSAdamax(torch.optim.Optimizer):
    r"""Adamax with PATS' sensitivity-aware parameter noise, fused into one step for all tensors.

    For each parameter tensor (paper Algorithm 1; SPEC section 4)::

        s~    = beta * s~ + (1 - beta) * |theta * g|            sensitivity EMA (theta before the step)
        m     = beta1 * m + (1 - beta1) * g;   u = max(beta2 * u, |g| + eps)
        theta = theta - lr / (1 - beta1^t) * m / u + q * z,
        q ~ N(0, r),  r = noise_lambda * max(mean(s~) / (s~ + noise_eps) - gamma, 0),  z ~ Bernoulli(noise_prob)

    Args:
        params: tensors or param-group dicts (float32, float16, bfloat16 or float64; see
            :func:`pats_param_groups` for the paper's groups). A group may set any argument below but
            ``capturable``, and ``noise`` (bool, default True): groups with ``noise=False`` take exactly the
            Adamax step, with no sensitivity state. FSDP2 parameters (DTensors) are stepped on their local shards
            (see below).
        lr: step size (default 2e-5; the paper's Table 2 uses 1e-4 to 3e-4 for BERT-base, 1e-5 to 1e-4 for
            RoBERTa-large, with 10% linear warm-up).
        betas: Adamax's ``(beta1, beta2)``, each in [0, 1) (paper: 0.9, 0.999).
        eps: Adamax's epsilon, added to ``|g|`` in the infinity norm as torch.optim.Adamax does (1e-8).
        weight_decay: weight decay coefficient, >= 0 (default 0).
        sensitivity_beta: the sensitivity EMA's beta in [0, 1) (paper: 0.75).
        noise_lambda: the basic noise variance lambda, >= 0 (paper: 2e-6). 0 gives exactly Adamax.
        gamma: the margin that zeroes the noise of highly sensitive parameters, >= 0 (paper: 2e-3).
        noise_prob: the Bernoulli probability p in [0, 1] that a parameter is perturbed (paper: 0.2).
        noise_eps: > 0, the epsilon in ``mean / (s~ + noise_eps)``; it caps the noise variance of an element
            with zero sensitivity at ``noise_lambda * mean(s~) / noise_eps``. Default 1e-8 (docs/pats.md:
            below the sensitivities of all but the least sensitive ~1% of BERT's weights, so it changes the
            paper's noise only where it would otherwise be unbounded).
        seed: philox seed in [0, 2**62) for the noise; ``None`` draws one from torch's CPU generator at
            construction (so ``torch.manual_seed`` reproduces a run). It is stored in every param group, so it
            travels with ``state_dict()``. Data-parallel replicas must share it (seed the CPU generator
            identically on every rank, or pass it).
        decoupled_weight_decay: True (default, SPEC section 4): AdamW's form, ``theta *= 1 - lr * weight_decay``
            before the update. False: torch.optim.Adamax's form, ``g += weight_decay * theta`` (then with
            ``noise_lambda=0`` the step equals ``torch.optim.Adamax`` with the same weight decay).
        noise: the default of the per-group ``noise`` flag.
        capturable: keep the step counts on the parameters' device and derive the bias correction and the
            step's noise key from them inside the kernel (like ``torch.optim.Adamax(capturable=True)``), so that
            a step captured in a CUDA graph advances on every replay. Default False: the counts are CPU tensors
            and those numbers are computed on the host, which a captured graph would freeze: capturing such a
            step raises a RuntimeError. Both give the same numbers (docs/pats.md, "CUDA graphs").

    The noise of element ``i`` of parameter ``k`` (its index in this optimizer's parameter list, counted over
    all groups) at its step ``t`` is a function of ``(seed, t, k, i)`` only: a run resumed from
    ``state_dict()`` continues bitwise as if never stopped, and the result does not depend on how tensors are
    grouped or launched. The mean sensitivity is a fixed-order reduction (no atomics), so replicas with equal
    gradients stay bitwise equal.

    FSDP2 (``fully_shard``; SPEC section 4c): a DTensor parameter is stepped on its local shard, its state
    tensors are DTensors placed like it (so ``torch.distributed.checkpoint`` saves and loads them sharded), its
    mean sensitivity is the unsharded tensor's (the local sums of all sharded tensors are added across the ranks
    in one collective per step, in rank order), and ``i`` above is the element's index in the unsharded tensor:
    the result does not depend on the number of ranks.

    State per parameter: ``step`` (a 0-dim float32 tensor, like torch's: on the CPU, or on the parameter's
    device when capturable; the optimizer keeps them as views of one tensor, so a step reads and advances all of
    them in one op), ``exp_avg`` and ``exp_inf`` (Adamax's), ``sensitivity`` (noise groups only) and ``stream``
    (the ``k`` above). State tensors are float32 (float64 for float64 parameters) even for float16/bfloat16
    parameters, whose new values are rounded to nearest.

    Every parameter must have memory of its own: two that share elements (one tensor listed twice, or overlapping
    views of one storage) raise a ValueError naming them, as one fused launch steps them at once.

    Parameters without a gradient are skipped (their step count does not advance). With
    ``torch.amp.GradScaler``, a step skipped for inf/NaN gradients leaves parameters and state untouched. A
    parameter resized after its state was created (``resize_token_embeddings`` replaces ``.data``), or a state
    loaded for another shape, makes ``step`` raise a RuntimeError naming it, before anything changes: delete
    its state (``del optimizer.state[p]``) to restart its moments, or build a new optimizer.
    """

    def __init__(self, params, lr: float = 2e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sensitivity_beta: float = 0.75, noise_lambda: float = 2e-6,
                 gamma: float = 2e-3, noise_prob: float = 0.2, noise_eps: float = DEFAULT_NOISE_EPS,
                 seed: Optional[int] = None, *, decoupled_weight_decay: bool = True, noise: bool = True,
                 capturable: bool = False):
        if seed is None:
            seed = rng.draw_seed()
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, sensitivity_beta=sensitivity_beta, noise_lambda=noise_lambda,
                        gamma=gamma, noise_prob=noise_prob, noise_eps=noise_eps, seed=seed,
                        decoupled_weight_decay=decoupled_weight_decay, noise=noise, capturable=capturable)
        _check_hyperparameters(defaults)
        self._launcher = None
        self._state_layouts: Dict[int, tuple] = {}  # id(param): the (dtype, device, noise) its state was checked for
        self._shard_layouts: Dict[int, tuple] = {}  # id(DTensor param): (its local shape, its ShardLayout)
        self._steps: Dict[torch.device, _StepCounts] = {}  # where the step counts live: CPU, or (capturable) GPUs
        self._shapes_checked: Dict[int, tuple] = {}  # id(param): see _check_state_shapes
        self._keys: Dict[int, int] = {}  # id(param): its k, for every parameter added through add_param_group
        self._flat_layouts: Dict[int, Any] = {}  # id(DeepSpeed flat partition): its FlatPartition (bind)
        self._known_lists: tuple = ()  # the param lists last checked to hold only tensors this optimizer knows
        super().__init__(params, defaults)

    # -------------------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group, after checking its hyperparameters and tensors (nothing is added on an error)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):
            params = list(params)
        if isinstance(params, list):
            param_group["params"] = params
            tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
            where = f"param group {len(self.param_groups)}"
            for i, p in enumerate(tensors):
                if isinstance(p, torch.Tensor):
                    _check_param(p, f"{where}, params[{i}]")
            _check_one_device([p for p in tensors if isinstance(p, torch.Tensor)], where)
            self._refuse_overlaps([p for p in tensors if isinstance(p, torch.Tensor)], where)
        _check_hyperparameters({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        if param_group.get("capturable", self.defaults["capturable"]) != self.defaults["capturable"]:
            raise ValueError("capturable is a setting of the whole optimizer (where the step counts live): a param "
                             f"group cannot set capturable={param_group['capturable']}")
        super().add_param_group(param_group)
        k = sum(len(group["params"]) for group in self.param_groups[:-1])
        for p in self.param_groups[-1]["params"]:
            self._keys.setdefault(id(p), k)
            k += 1

    # -------------------------------------------------------------------------------------- DeepSpeed ZeRO
    def parameter_keys(self) -> Dict[int, int]:
        """``id(parameter) -> k`` (its index in the parameter list this optimizer was built with, counted over
        all groups: the ``k`` of the noise keys) for the parameters given to it."""
        return dict(self._keys)

    def bind_flat_partitions(self, layouts: Dict[int, Any]) -> None:
        """Step the DeepSpeed flat partitions in ``layouts`` (``id(tensor) -> FlatPartition``) as slices of the
        parameters they hold; called by :func:`fusednoise.integrations.deepspeed.bind`."""
        self._flat_layouts = dict(layouts)
        self._known_lists = ()

    def _check_known_params(self) -> None:
        """A TypeError, before anything changes, when DeepSpeed is in use and a param group holds a tensor this
        optimizer was not given that no :func:`~fusednoise.integrations.deepspeed.bind` maps: DeepSpeed replaces
        each group's parameters by flat partitions that cut across tensors, on which per-tensor statistics would
        silently be per-partition ones. Checked again only when a group's parameter list is replaced. (Without
        DeepSpeed a tensor put in a group behind the optimizer's back is stepped as one tensor, as before.)"""
        lists = tuple(id(group["params"]) for group in self.param_groups)
        if lists == self._known_lists or "deepspeed" not in sys.modules:
            return
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) not in self._keys and id(p) not in self._flat_layouts:
                    from ..integrations.deepspeed import ALTERNATIVES

                    raise TypeError(
                        f"PATSAdamax: param group {gi}, params[{i}] (shape {tuple(p.shape)}) is a tensor this "
                        "optimizer was not given: DeepSpeed's ZeRO-1/2 (and its fp16/bf16 optimizers) replace each "
                        "group's parameters by one flat partition that cuts across the tensors, on which PATS's "
                        "per-tensor mean sensitivity and noise keys would be wrong. Under ZeRO-1/2 call "
                        "fusednoise.integrations.deepspeed.bind(engine) after deepspeed.initialize "
                        f"(FusedNoiseTrainer does); ZeRO-3 is not supported: use {ALTERNATIVES}")
        self._known_lists = lists

    def _refuse_overlaps(self, new: List[torch.Tensor], where: str) -> None:
        """ValueError when two parameters (of ``new`` and the groups already added) share memory: one fused launch
        steps all tensors of a device and dtype at once, so two views of one storage (or one tensor listed
        twice) would race on a GPU, and the reference would step their elements twice."""
        old = [p for group in self.param_groups for p in group["params"]]
        tensors = old + new
        pair = first_overlap([sharding.local(p) for p in tensors])
        if pair is not None:
            def name(i):
                return f"params[{i - len(old)}] of {where}" if i >= len(old) else "a parameter of an earlier group"
            i, j = pair
            what = "are one tensor" if tensors[i] is tensors[j] else "overlap in memory (views of one storage)"
            raise ValueError(f"PATSAdamax: {name(i)} and {name(j)} {what}; every parameter must have memory of its "
                             "own (one fused launch steps all tensors of a device and dtype at once)")

    # -------------------------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Like torch's, except that state tensors keep the state dtype (float32 for half parameters) instead
        of being cast to the parameter's dtype, are copied (never aliased with ``state_dict``'s), and are
        DTensors placed like their parameter for sharded parameters (a plain tensor of the unsharded shape is cut
        to the rank's shard). ``capturable`` stays this optimizer's. A ``torch.optim.Adamax`` checkpoint loads
        too (its groups get this optimizer's PATS defaults)."""
        saved_state = state_dict["state"]
        id_map = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        held: Dict[Any, Dict[str, torch.Tensor]] = {}
        stripped = {}
        for key, st in saved_state.items():
            st = dict(st)
            if key in id_map:
                held[key] = {name: st.pop(name) for name in STATE_TENSORS if isinstance(st.get(name), torch.Tensor)}
            stripped[key] = st
        layouts = {key: self._layout(p, f"parameter {key}") for key, p in id_map.items() if key in held}
        super().load_state_dict({**state_dict, "state": stripped})
        self._state_layouts.clear()
        self._shapes_checked.clear()
        capturable = self.defaults["capturable"]
        for key, tensors in held.items():
            p = id_map[key]
            for name, value in tensors.items():
                self.state[p][name] = _state_tensor(value, p, layouts[key])
            if isinstance(self.state[p].get("step"), torch.Tensor):
                self.state[p]["step"] = self.state[p]["step"].detach().to(
                    p.device if capturable else "cpu", torch.float32, copy=True)
        for group in self.param_groups:  # e.g. a torch.optim.Adamax checkpoint: fill PATS' own keys
            for name, default in self.defaults.items():
                group.setdefault(name, default)
            group["capturable"] = capturable

    # -------------------------------------------------------------------------------------- step
    def _gather(self) -> List[tuple]:
        """``(group, param, grad, k, device)`` for every parameter with a gradient; raises before anything
        changes.

        The common case (a plain float parameter with a dense gradient, on the group's device) is checked with
        a few attribute reads; anything else goes through the full checks, which raise the named error."""
        work = []
        k = 0
        for gi, group in enumerate(self.param_groups):
            group_device = None
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is not None:
                    if not (grad.layout is _STRIDED and _plain_param(p)):
                        _refuse_param(p, grad, f"param group {gi}, params[{i}]")
                    device = p.device
                    if group_device is None:
                        group_device = device
                    elif device != group_device:
                        _check_one_device([q for q in group["params"] if q.grad is not None], f"param group {gi}")
                    work.append((group, p, grad, k, device))
                k += 1
        return work

    def _layout(self, p: torch.Tensor, where: str) -> Optional[sharding.ShardLayout]:
        """The :class:`~fusednoise.sharding.ShardLayout` of a DTensor parameter (cached), None for a plain one."""
        if not sharding.is_dtensor(p):
            return None
        shape = tuple(sharding.local(p).shape)
        cached = self._shard_layouts.get(id(p))
        if cached is None or cached[0] != shape:
            cached = self._shard_layouts[id(p)] = (shape, sharding.layout_of(p, where))
        return cached[1]

    def _state_for(self, group, p, k, device, layout, frozen: bool) -> Dict[str, Any]:
        """``self.state[p]``, created on the parameter's first step; state tensors that do not match the
        parameter (device, state dtype, contiguity, sharding) are converted, checked once per parameter layout.
        ``frozen`` (a CUDA graph is being captured): a RuntimeError instead of any change."""
        state = self.state[p]
        key = (p.dtype, device, group["noise"], layout)
        if self._state_layouts.get(id(p)) != key or "exp_avg" not in state:
            if frozen:
                raise RuntimeError("PATSAdamax: a parameter's state is being created while capturing: "
                                   f"{_warm_up_hint()}")
            self._init_state(group, p, k, layout)
            self._state_layouts[id(p)] = key
        return state

    def _init_state(self, group, p, k, layout) -> Dict[str, Any]:
        state = self.state[p]
        sdt = _reference.state_dtype(p.dtype)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if "stream" not in state:
            state["stream"] = k
        needed = ("exp_avg", "exp_inf", "sensitivity") if group["noise"] else ("exp_avg", "exp_inf")
        for name in needed:
            t = state.get(name)
            if t is None:
                zeros = torch.zeros(sharding.local(p).shape, dtype=sdt, device=p.device)
                state[name] = zeros if layout is None else sharding.sharded_like(zeros, p)
            elif (t.dtype != sdt or t.device != p.device or not t.is_contiguous()
                  or sharding.is_dtensor(t) != (layout is not None)):
                state[name] = _state_tensor(t, p, layout)
        return state

    def _step_counts(self, device: torch.device) -> _StepCounts:
        counts = self._steps.get(device)
        if counts is None:
            counts = self._steps[device] = _StepCounts(device)
        return counts

    @torch.no_grad()
    def step(self, closure=None):
        """One PATS-Adamax step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Under ``torch.compile`` the step is a graph break: it runs eagerly (the fused kernels on a GPU, the
        reference on a CPU) between the compiled graphs, so a compiled training step gives the eager result.
        Inside a CUDA graph capture it needs ``capturable=True`` and the Triton backend.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    @_backends.eager_only
    def _step(self) -> None:
        work = self._gather()
        if not work:
            return
        self._check_known_params()
        if self._flat_layouts:  # DeepSpeed steps one group at a time (a one-group list): k by position would repeat
            work = [(group, p, grad, self._flat_layouts[id(p)].slot if id(p) in self._flat_layouts else k, device)
                    for group, p, grad, k, device in work]
        _check_state_shapes(work, self.state, self._shapes_checked)  # before any state is created or changed
        capturable = self.defaults["capturable"]
        frozen = _capturing({device for *_, device in work})
        if frozen and not capturable:
            raise RuntimeError(
                "PATSAdamax.step is being captured into a CUDA graph, but the optimizer was built with "
                "capturable=False: its step count, bias correction and noise key are host numbers, so every replay "
                "would repeat the captured step. Build it with PATSAdamax(..., capturable=True).")
        use_kernels = {}  # resolved before any state is created: a backend error leaves everything as it was
        for _, p, _, _, device in work:
            key = (device, p.dtype)
            if key not in use_kernels:
                use_kernels[key] = p.dtype in _KERNEL_DTYPES and _backends.resolve(p) == "triton"
        if frozen and not all(use_kernels.values()):
            raise RuntimeError("PATSAdamax: only the Triton kernels can be captured into a CUDA graph (the reference "
                               "draws its noise on the host); float64 parameters and the reference backend cannot")
        dtensor = sharding.dtensor_type()  # None unless torch.distributed.tensor is in use: no check per parameter
        layouts = ([self._layout(p, f"parameter {k}") if isinstance(p, dtensor) else None for _, p, _, k, _ in work]
                   if dtensor is not None else [None] * len(work))
        states = [self._state_for(group, p, k, device, layout, frozen)
                  for (group, p, _, k, device), layout in zip(work, layouts)]
        ks = [k for _, _, _, k, _ in work]
        if capturable:
            # torch's capturable form: advance the counts on the device first, then read them in the kernels (or,
            # for the reference, on the host); the scalars' t-dependent fields are then not used by the kernels
            by_device: Dict[torch.device, List[int]] = defaultdict(list)
            for i, (_, p, _, _, _) in enumerate(work):
                by_device[p.device].append(i)
            for device, idx in by_device.items():
                counts = self._step_counts(device)
                counts.link([states[i] for i in idx], [ks[i] for i in idx], frozen)
                counts.advance([ks[i] for i in idx])
            needs_t = not all(use_kernels.values())
            steps = ([float(states[i]["step"]) - 1.0 for i in range(len(work))] if needs_t
                     else [0.0] * len(work))
        else:
            steps = self._step_counts(torch.device("cpu")).read(states, ks)
        if self._flat_layouts:  # DeepSpeed ZeRO-1/2 partitions: stepped as slices of the parameters they hold
            layouts = [self._flat_layouts.get(id(p), layout) for (_, p, _, _, _), layout in zip(work, layouts)]
        self._run(*self._jobs(work, layouts, states, steps, capturable), use_kernels)
        if not capturable:
            self._steps[torch.device("cpu")].advance(ks)

    def _jobs(self, work, layouts, states, steps, capturable):
        """The step's :class:`~fusednoise.reference.pats.PatsJob` per parameter, in ``(device, dtype)`` buckets
        (DTensors: their local shards and where those start in the unsharded tensors), and the sharded noise
        tensors by process group, as ``(bucket key, position)`` in parameter order."""
        scalars: Dict[tuple, _reference.StepScalars] = {}  # one per (group, step): shared by its tensors
        buckets: Dict[tuple, List[_reference.PatsJob]] = defaultdict(list)
        shared: Dict[Any, List[tuple]] = {}
        make = _reference.PatsJob._make  # from a tuple: less host time than the keyword constructor
        for (group, p, grad, k, device), layout, state, step in zip(work, layouts, states, steps):
            t = int(step) + 1
            sc = scalars.get((id(group), t))
            if sc is None:
                sc = scalars[(id(group), t)] = _group_scalars(group, t)
            step_count = state["step"] if capturable else None
            key = (device, p.dtype)
            bucket = buckets[key]
            if layout is None:  # a plain tensor
                bucket.append(make((p, grad, state["exp_avg"], state["exp_inf"],
                                    state["sensitivity"] if sc.noise else None, sc, state["stream"], 0, -1, 0,
                                    step_count)))
                continue
            if not isinstance(layout, sharding.ShardLayout):  # a DeepSpeed flat partition
                layout.add_jobs(bucket, shared, key, p, grad, state, sc, step_count)
                continue
            if layout.sharded and sc.draw:
                shared.setdefault(layout.group, []).append((key, len(bucket)))
            local = sharding.local
            bucket.append(_reference.PatsJob(local(p), local(grad), local(state["exp_avg"]), local(state["exp_inf"]),
                                             local(state["sensitivity"]) if sc.noise else None, sc, state["stream"],
                                             offset=layout.offset, total_numel=layout.numel, step=step_count))
        return buckets, shared

    def _run(self, buckets, shared, use_kernels) -> None:
        """Run the step: per ``(device, dtype)`` bucket the kernels or the reference; the sharded noise tensors in
        ``shared`` in two halves around one collective per process group (their local sums of s~ added across
        the ranks in rank order), through slots of one vector of sums assigned here, group by group."""
        sums = None
        if shared:
            slot = 0
            for positions in shared.values():
                for key, i in positions:
                    buckets[key][i] = buckets[key][i]._replace(mean_slot=slot)
                    slot += 1
            devices = {buckets[key][i].param.device for positions in shared.values() for key, i in positions}
            if len(devices) > 1:
                raise ValueError("PATSAdamax: the sharded parameters lie on several devices "
                                 f"({sorted(map(str, devices))}); their mean sensitivities are reduced in one vector")
            sums = torch.zeros(slot, dtype=torch.float64, device=devices.pop())
        finish = []  # what runs after the collective
        for key, bucket in buckets.items():
            begin = self._triton_begin if use_kernels[key] else self._reference_begin
            finish.append(begin(bucket, sums))
        start = 0
        for group, positions in shared.items():
            part = sums[start:start + len(positions)]
            part.copy_(sharding.sum_across_shards(part, group))
            start += len(positions)
        for done in finish:
            done()

    @staticmethod
    def _reference_begin(bucket, sums):
        """The reference's first half for one bucket (the whole step of unsharded tensors); returns the second."""
        second = []
        for job in bucket:
            if not job.param.numel():  # an empty shard: nothing to step, and 0 towards its tensor's sum
                continue
            if job.mean_slot < 0:
                _reference.pats_adamax_step_(*job[:7])
            else:
                sums[job.mean_slot] = _reference.sensitivity_ema_(job.param, job.grad, job.sensitivity, job.scalars)
                second.append(job)

        def finish():
            for job in second:
                mean = sums[job.mean_slot] / job.total_numel
                _reference.adamax_update_(*job[:7], mean=mean, offset=job.offset)
        return finish

    def _triton_begin(self, jobs, sums):
        """Stage non-contiguous tensors, build the launches and run all but the update; returns the rest."""
        from ..kernels.pats import PatsLauncher  # triton is imported only when a kernel runs

        if self._launcher is None:
            self._launcher = PatsLauncher()
        staged = []
        if not all(job[0].is_contiguous() and job[1].is_contiguous() for job in jobs):
            contiguous = []
            for job in jobs:
                work = job.param
                if not work.is_contiguous():
                    work = job.param.detach().contiguous()
                    staged.append((job.param, work))
                contiguous.append(job._replace(param=work, grad=job.grad.contiguous()))
            jobs = contiguous
        launches = self._launcher.launches(jobs, sums)  # reads data pointers only: no autograd involved
        for launch in launches[:-1]:
            launch.run()

        def finish(held=jobs):
            # ``held`` (the jobs) lives as long as this function: the launches read the contiguous copies of
            # non-contiguous parameters and gradients through the addresses in their tables, not through
            # references, so a copy dropped before the update's launch would be read after it was freed (and on a
            # GPU, refilled by the caching allocator). Once launched, freeing is safe: the allocator reuses a block
            # on the stream it was used on (the current one, where every launch and copy here runs) only in stream
            # order.
            if launches:
                launches[-1].run()
            for p, work in staged:
                p.detach().copy_(work)
        return finish

    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_launcher", "_state_layouts", "_shard_layouts", "_steps", "_shapes_checked", "_keys",
                     "_flat_layouts", "_known_lists"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_launcher", None)
        self.__dict__.setdefault("_state_layouts", {})
        self.__dict__.setdefault("_shard_layouts", {})
        self.__dict__.setdefault("_steps", {})
        self.__dict__.setdefault("_shapes_checked", {})
        self.__dict__.setdefault("_keys", {id(p): k for k, p in enumerate(
            chain.from_iterable(group["params"] for group in self.param_groups))})
        self.__dict__.setdefault("_flat_layouts", {})
        self.__dict__.setdefault("_known_lists", ())
        for group in self.param_groups:
            group.setdefault("capturable", False)
        self.defaults.setdefault("capturable", False)


# ----------------------------------------------------------------------------------------------- groups
# A parameter is inside a transformer layer stack when its name has ``<container>.<index>.`` with one of these
# containers: BERT/RoBERTa/ELECTRA/DeBERTa-v2/XLNet ``layer``, LLaMA/Mistral/Qwen2 ``layers``, GPT-2 ``h``,
# T5 ``block`` (and its inner ``layer``), ALBERT ``albert_layer_groups``/``albert_layers``.
LAYER_CONTAINERS = ("layer", "layers", "h", "block", "blocks", "albert_layer_groups", "albert_layers")
_LAYER_RE = re.compile(r"(?:^|\.)(?:%s)\.\d+\." % "|".join(LAYER_CONTAINERS))

# Matched case-insensitively as substrings of the parameter name. Norms: LayerNorm (BERT family), layer_norm
# (T5, XLNet), *_layernorm (LLaMA family), norm, RMSNorm, GPT-2's ln_1/ln_2/ln_f. Embeddings, including T5's
# relative_attention_bias table and XLNet's seg_embed/mask_emb. Task heads and poolers.
DEFAULT_NO_NOISE = (
    "LayerNorm", "layer_norm", "layernorm", "RMSNorm", "norm", "ln_",
    "embeddings", "embed", "relative_attention_bias", "mask_emb",
    "classifier", "pre_classifier", "classification_head", "pooler", "lm_head", "qa_outputs", "score", "cls.",
    "sequence_summary", "logits_proj",
)
DEFAULT_NO_DECAY = ("bias", "LayerNorm", "layer_norm", "layernorm", "RMSNorm", "norm", "ln_")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    lowered = name.lower()
    return any(pattern.lower() in lowered for pattern in patterns)


def pats_param_groups(model: torch.nn.Module, weight_decay: float = 0.0, no_noise=DEFAULT_NO_NOISE,
                      no_decay=DEFAULT_NO_DECAY, layer_pattern: Optional[str] = None) -> List[Dict[str, Any]]:
    """The paper's param groups for :class:`PATSAdamax`: noise on the transformer layers' weights only.

    A trainable parameter gets noise when its name lies inside the layer stack (``<container>.<i>.`` with a
    container from :data:`LAYER_CONTAINERS`, or the regex ``layer_pattern``) and matches none of ``no_noise``
    (case-insensitive substrings: norms, embeddings, task heads by default). Everything else (embeddings,
    LayerNorm/RMSNorm, poolers, task heads, final norms) takes the plain Adamax step. Names are matched, so
    this works on BERT, RoBERTa, DeBERTa-v2, ELECTRA, ALBERT, XLNet, GPT-2, LLaMA, Mistral, Qwen2 and T5.

    With ``weight_decay > 0`` parameters matching ``no_decay`` (biases and norms, the usual fine-tuning
    convention) get weight decay 0. Empty groups are dropped; tied parameters appear once.

    Raises ``ValueError`` (naming ``model``) when no parameter would get noise, which would silently make PATS
    plain Adamax.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_at_least(weight_decay, "weight_decay", 0.0)
    no_noise = check_name_patterns(no_noise, "no_noise")
    no_decay = check_name_patterns(no_decay, "no_decay")
    layer_re = _LAYER_RE if layer_pattern is None else re.compile(layer_pattern)
    buckets: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noisy = bool(layer_re.search(name)) and not _matches(name, no_noise)
        decay = weight_decay if weight_decay > 0 and not _matches(name, no_decay) else 0.0
        buckets[(noisy, decay)].append(p)
    if not any(noisy for noisy, _ in buckets):
        raise ValueError(f"model: no parameter of this {type(model).__name__} lies inside a recognised layer stack "
                         f"({', '.join(LAYER_CONTAINERS)}) outside no_noise; pass layer_pattern= to name it")
    order = [(True, weight_decay), (True, 0.0), (False, weight_decay), (False, 0.0)]
    groups = []
    for noisy, decay in dict.fromkeys(order):
        if buckets.get((noisy, decay)):
            groups.append({"params": buckets[(noisy, decay)], "weight_decay": decay, "noise": noisy})
    return groups
