"""PATS-Adamax (Zhang et al., 2022, "PATS: Sensitivity-aware Noisy Learning for Pretrained Language Models").

Adamax whose update adds, to every parameter of the encoder layers, Gaussian noise whose variance grows as the
parameter's sensitivity ``|theta * grad|`` (an exponential moving average of it) falls below its matrix's mean,
masked by a Bernoulli(p) draw. The exact formulas are in :mod:`fusednoise.reference.pats` (SPEC section 4); the
design and the defaults are explained in ``docs/pats.md``.

The step is fused: on the Triton backend all tensors of one device and dtype take two kernel launches per
step (pass 1: sensitivity EMA and per-chunk partial sums; pass 2: the Adamax update and the noise), whatever
their number. On the reference backend (the default for CPU tensors) each tensor takes the eager reference.
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
from ..validation import check_name_patterns
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
    for flag in ("noise", "decoupled_weight_decay"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {type(group[flag]).__name__}")
    rng.check_seed(group["seed"], "seed")


def _is_sharded(p: torch.Tensor) -> bool:
    # FSDP2 parameters are DTensors; FSDP1 marks the original parameters it flattens and its FlatParameters.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(dtensor_module, "DTensor", None) if dtensor_module is not None else None
    if dtensor is not None and isinstance(p, dtensor):
        return True
    return bool(getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False))


def _check_param(p: torch.Tensor, where: str) -> None:
    if _is_sharded(p):
        raise TypeError(f"PATSAdamax does not support sharded (FSDP / DTensor) parameters yet: {where} is "
                        "sharded, and the per-matrix mean sensitivity would cover only this rank's shard; "
                        "see docs/pats.md, 'FSDP'")
    if p.is_complex():
        raise TypeError(f"PATSAdamax does not support complex parameters: {where} is {p.dtype}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"PATSAdamax needs float32, float16, bfloat16 or float64 parameters: {where} is {p.dtype}")
    if p.layout != torch.strided:
        raise TypeError(f"PATSAdamax needs dense (strided) parameters: {where} has layout {p.layout}")


_STRIDED = torch.strided
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)


def _plain_param(p: torch.Tensor) -> bool:
    """The per-step fast path of :func:`_check_param`: True for a plain dense float tensor or Parameter that
    no FSDP wrapper has flattened (False means: run the full check)."""
    if not (type(p) in _PLAIN_TYPES and p.dtype in _SUPPORTED_SET and p.layout is _STRIDED):
        return False
    attributes = p.__dict__  # a failed getattr costs an exception; most parameters have no attributes at all
    return not (attributes and (attributes.get("_fsdp_flattened") or attributes.get("_is_flat_param")))


def _refuse_param(p: torch.Tensor, grad: torch.Tensor, where: str) -> None:
    """The full checks of a parameter and its gradient: the named TypeError, or nothing when they pass."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(f"PATSAdamax does not support sparse gradients: {where} has a {grad.layout} gradient")
    _check_param(p, where)


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
    """Every parameter's ``state["step"]`` as a 0-dim view into one float32 CPU tensor (indexed by the
    parameter's position ``k``), so a step reads all counts with one op and advances them with one op.

    A tensor per parameter is what torch's optimizers keep and what checkpoints hold; reading and advancing
    200 separate tensors costs more host time than the rest of a fused step. A state whose ``"step"`` is not
    the linked view (a parameter's first step, a loaded checkpoint, a value set by hand) is linked again,
    keeping its value.
    """

    def __init__(self):
        self.storage = torch.zeros(0, dtype=torch.float32)
        self.views: Sequence[torch.Tensor] = ()
        self._index_cache: Dict[tuple, torch.Tensor] = {}

    def read(self, states: Sequence[Dict[str, Any]], ks: Sequence[int]) -> List[float]:
        """The step counts of ``states`` (those of parameters ``ks``), linking any that are not linked yet."""
        needed = max(ks) + 1
        if needed > self.storage.numel():
            grown = torch.zeros(max(needed, 2 * self.storage.numel()), dtype=torch.float32)
            grown[:self.storage.numel()] = self.storage
            self.storage, self.views = grown, grown.unbind()
            self._index_cache.clear()
        views = self.views
        for state, k in zip(states, ks):
            if state["step"] is not views[k]:
                views[k].fill_(float(state["step"]))
                state["step"] = views[k]
        counts = self.storage.tolist()
        return [counts[k] for k in ks]

    def advance(self, ks: Sequence[int]) -> None:
        """Add 1 to the counts of parameters ``ks`` (in place: the states hold views of the storage)."""
        key = tuple(ks)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 16:
                self._index_cache.clear()
            index = self._index_cache[key] = torch.tensor(ks, dtype=torch.int64)
        self.storage.index_add_(0, index, torch.ones((), dtype=torch.float32).expand(len(ks)))


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
            :func:`pats_param_groups` for the paper's groups). A group may set any argument below, and
            ``noise`` (bool, default True): groups with ``noise=False`` take exactly the Adamax step, with no
            sensitivity state.
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

    The noise of element ``i`` of parameter ``k`` (its index in this optimizer's parameter list, counted over
    all groups) at its step ``t`` is a function of ``(seed, t, k, i)`` only: a run resumed from
    ``state_dict()`` continues bitwise as if never stopped, and the result does not depend on how tensors are
    grouped or launched. The mean sensitivity is a fixed-order reduction (no atomics), so replicas with equal
    gradients stay bitwise equal.

    State per parameter: ``step`` (a 0-dim CPU float tensor, like torch's; the optimizer keeps them as views of
    one tensor, so a step reads and advances all of them in one op), ``exp_avg`` and ``exp_inf`` (Adamax's),
    ``sensitivity`` (noise groups only) and ``stream`` (the ``k`` above). State tensors are float32 (float64 for
    float64 parameters) even for float16/bfloat16 parameters, whose new values are rounded to nearest.

    Parameters without a gradient are skipped (their step count does not advance). With
    ``torch.amp.GradScaler``, a step skipped for inf/NaN gradients leaves parameters and state untouched.
    """

    def __init__(self, params, lr: float = 2e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sensitivity_beta: float = 0.75, noise_lambda: float = 2e-6,
                 gamma: float = 2e-3, noise_prob: float = 0.2, noise_eps: float = DEFAULT_NOISE_EPS,
                 seed: Optional[int] = None, *, decoupled_weight_decay: bool = True, noise: bool = True):
        if seed is None:
            seed = rng.draw_seed()
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, sensitivity_beta=sensitivity_beta, noise_lambda=noise_lambda,
                        gamma=gamma, noise_prob=noise_prob, noise_eps=noise_eps, seed=seed,
                        decoupled_weight_decay=decoupled_weight_decay, noise=noise)
        _check_hyperparameters(defaults)
        self._launcher = None
        self._state_layouts: Dict[int, tuple] = {}  # id(param): the (dtype, device, noise) its state was checked for
        self._steps = _StepCounts()
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
        _check_hyperparameters({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    # -------------------------------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Like torch's, except that state tensors keep the state dtype (float32 for half parameters) instead
        of being cast to the parameter's dtype, and are copied (never aliased with ``state_dict``'s). A
        ``torch.optim.Adamax`` checkpoint loads too (its groups get this optimizer's PATS defaults)."""
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
        super().load_state_dict({**state_dict, "state": stripped})
        self._state_layouts.clear()
        for key, tensors in held.items():
            p = id_map[key]
            for name, value in tensors.items():
                self.state[p][name] = value.detach().to(device=p.device, dtype=_reference.state_dtype(p.dtype),
                                                         copy=True).contiguous()
            if isinstance(self.state[p].get("step"), torch.Tensor):
                self.state[p]["step"] = self.state[p]["step"].detach().to("cpu", torch.float32, copy=True)
        for group in self.param_groups:  # e.g. a torch.optim.Adamax checkpoint: fill PATS' own keys
            for name, default in self.defaults.items():
                group.setdefault(name, default)

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

    def _state_for(self, group, p, k, device) -> Dict[str, Any]:
        """``self.state[p]``, created on the parameter's first step; state tensors that do not match the
        parameter (device, state dtype, contiguity) are converted, checked once per parameter layout."""
        state = self.state[p]
        layout = (p.dtype, device, group["noise"])
        if self._state_layouts.get(id(p)) != layout or "exp_avg" not in state:
            self._init_state(group, p, k)
            self._state_layouts[id(p)] = layout
        return state

    def _init_state(self, group, p, k) -> Dict[str, Any]:
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
                state[name] = torch.zeros(p.shape, dtype=sdt, device=p.device)
            elif t.dtype != sdt or t.device != p.device or not t.is_contiguous():
                state[name] = t.to(device=p.device, dtype=sdt).contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One PATS-Adamax step; ``closure`` (optional) re-evaluates the model and returns the loss.

        Under ``torch.compile`` the step is a graph break: it runs eagerly (the fused kernels on a GPU, the
        reference on a CPU) between the compiled graphs, so a compiled training step gives the eager result.
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
        use_kernels = {}  # resolved before any state is created: a backend error leaves everything as it was
        for _, p, _, _, device in work:
            key = (device, p.dtype)
            if key not in use_kernels:
                use_kernels[key] = p.dtype in _KERNEL_DTYPES and _backends.resolve(p) == "triton"
        states = [self._state_for(group, p, k, device) for group, p, _, k, device in work]
        ks = [k for _, _, _, k, _ in work]
        steps = self._steps.read(states, ks)
        buckets: Dict[tuple, List[tuple]] = defaultdict(list)
        scalars: Dict[tuple, _reference.StepScalars] = {}  # one per (group, step): shared by its tensors
        for (group, p, grad, _, device), state, step in zip(work, states, steps):
            t = int(step) + 1
            sc = scalars.get((id(group), t))
            if sc is None:
                sc = scalars[(id(group), t)] = _group_scalars(group, t)
            buckets[(device, p.dtype)].append((p, grad, state["exp_avg"], state["exp_inf"],
                                               state["sensitivity"] if sc.noise else None, sc, state["stream"]))
        for key, jobs in buckets.items():
            if use_kernels[key]:
                self._triton_step(jobs)
            else:
                for job in jobs:
                    _reference.pats_adamax_step_(*job)
        self._steps.advance(ks)

    def _triton_step(self, jobs: List[tuple]) -> None:
        from ..kernels.pats import PatsLauncher  # triton is imported only when a kernel runs

        if self._launcher is None:
            self._launcher = PatsLauncher()
        staged = []
        kernel_jobs = jobs
        if not all(p.is_contiguous() and grad.is_contiguous() for p, grad, *_ in jobs):
            kernel_jobs = []
            for p, grad, m, u, s, sc, stream in jobs:
                work = p
                if not p.is_contiguous():
                    work = p.detach().contiguous()
                    staged.append((p, work))
                kernel_jobs.append((work, grad.contiguous(), m, u, s, sc, stream))
        self._launcher.step(kernel_jobs)  # reads data pointers only: no autograd involved
        for p, work in staged:
            p.detach().copy_(work)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_launcher", None)
        state.pop("_state_layouts", None)
        state.pop("_steps", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_launcher", None)
        self.__dict__.setdefault("_state_layouts", {})
        self.__dict__.setdefault("_steps", _StepCounts())


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
