"""HyPe (Yuan et al., ACL 2023): noise on the input hidden states of every transformer layer, while training.

For layer ``l`` with input ``h_l``: ``h_l <- h_l + eps``, then ``h_{l+1} = g_l(h_l)``, in training mode only.

* HyPe-N: ``distribution="normal"``, ``eps ~ N(0, sigma^2)`` elementwise (``sigma`` is the standard deviation).
* HyPe-U: ``distribution="uniform"``, ``eps ~ U(-sigma, sigma)`` elementwise. The authors' released code draws
  ``sigma * U[0, 1)`` (not centred); we follow the paper's ``U(-sigma, sigma)``.
* Paper defaults: ``sigma = 1e-5`` for both variants (grid 1e-5 / 1e-6), and hidden dropout turned off while
  HyPe is on (``disable_dropout=True`` does that here; it is off by default so that ``apply`` only adds noise).
* Half precision: ``sigma = 1e-5`` added to O(1) hidden states mostly rounds away in bfloat16 (about 0.16% of
  elements change) and float16 (about 1.2%), so HyPe in pure bf16 with round-to-nearest is close to a no-op.
  ``rounding="stochastic"`` rounds the float32 sum up or down at random, so the noise survives in expectation.

Usage::

    from fusednoise import hype

    handle = hype.apply(model, sigma=1e-5, distribution="normal", disable_dropout=True)
    ...                       # train: every layer's input gets fresh noise; model.eval() turns it off
    handle.remove()           # the model is back exactly as it was

    with hype.apply(model):   # or scoped
        train(model)

The noise is added by forward pre-hooks on the layers that :func:`fusednoise.layers.find_layers` finds (or the
``layers=`` you choose), through :func:`fusednoise.add_noise`: one fused pass, no noise tensor. With
``apply(..., fused=True)`` on LLaMA, Mistral, Qwen2, Gemma (float32), BERT, RoBERTa or ELECTRA, the layers'
residual-add + norm are patched with the fused ops of :mod:`fusednoise.fused` and each layer's noise is added by
the op that produces its input, at no extra pass (the same noise; LLaMA-family first layers add theirs in their
input norm, BERT-family first layers keep the hook).

With ``seed=``, the noise of a layer call depends on how many noisy calls that layer has made: ``handle.state_dict()``
holds those counters and ``handle.load_state_dict()`` restores them, so a run resumed from a checkpoint continues
the noise sequence instead of replaying it from call 0 (the Trainer integration saves them in its checkpoints).
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import ops, rng
from .layers import (configured_hidden_dropout, find_layer_stacks, find_layers, hidden_dropout_attributes,
                     hidden_dropout_modules)
from .validation import check_module_list

DEFAULT_SIGMA = 1e-5
LAYER_PRESETS = ("all", "lower", "upper")

LayersSpec = Union[None, str, nn.ModuleList, Sequence[int], Sequence[nn.Module]]

# Layers that carry a HyPe hook now: a second apply() on the same layer would add the noise twice.
_HOOKED_LAYERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# Dropout probabilities switched off by live handles: module -> {attribute: [original value, number of handles
# holding it]}, the attribute being ``p`` of an nn.Dropout or a float such as BART's ``dropout``. Shared
# bookkeeping so two handles that both disable dropout restore the original value whichever is removed first.
_DISABLED_DROPOUT: "weakref.WeakKeyDictionary[nn.Module, Dict[str, list]]" = weakref.WeakKeyDictionary()

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, layer: int, call: int) -> int:
    """The seed HyPe uses for the ``call``-th noisy forward of hooked layer ``layer`` when ``apply(seed=seed)``.

    ``splitmix64(splitmix64(splitmix64(seed) ^ layer) ^ call) >> 2``: a 62-bit seed (the range of
    :func:`fusednoise.rng.draw_seed`), different for every (layer, call) pair, and a pure function of its
    arguments, so a run is reproducible whatever else draws from torch's generators.
    """
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ layer) ^ call) >> 2


# --------------------------------------------------------------------------------------------- validation
def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    return sigma


def _check_choice(value, choices, name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _select_half(model: nn.Module, which: str) -> List[nn.Module]:
    # Per stack, so an encoder-decoder model gets the lower (upper) half of its encoder and of its decoder. An odd
    # stack gives its middle layer to the upper half.
    selected: List[nn.Module] = []
    for stack in find_layer_stacks(model):
        if len(stack) < 2:
            raise ValueError(
                f"layers={which!r} needs at least 2 layers per stack, but {type(model).__name__} has a stack of "
                f"{len(stack)} layer module(s) (ALBERT shares one layer module across depth, so a subset of depths "
                "cannot be chosen by module); pass layers='all' or a list of modules")
        half = len(stack) // 2
        selected.extend(stack[:half] if which == "lower" else stack[half:])
    return selected


def _resolve_layers(model: nn.Module, layers: LayersSpec) -> List[nn.Module]:
    """The modules to hook, in forward order for presets and indices, in the given order for modules."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return find_layers(model)
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"layers must be one of {LAYER_PRESETS}, a list of int indices into "
                             f"find_layers(model), or a list of modules; got {layers!r}")
        return _select_half(model, layers)
    items = check_module_list(layers, "layers",
                              f"None, {LAYER_PRESETS}, a list of int indices or a list of modules")
    if not items:
        raise ValueError("layers must not be empty")
    if all(isinstance(item, numbers.Integral) and not isinstance(item, bool) for item in items):
        items = [int(item) for item in items]  # numpy / torch integers too
        candidates = find_layers(model)
        for index in items:
            if not -len(candidates) <= index < len(candidates):
                raise ValueError(f"layers index {index} is out of range: {type(model).__name__} has "
                                 f"{len(candidates)} layers (find_layers(model))")
        normalised = sorted({index % len(candidates) for index in items})
        if len(normalised) != len(items):
            raise ValueError(f"layers contains the same layer twice: {items}")
        return [candidates[index] for index in normalised]
    if all(isinstance(item, nn.Module) for item in items):
        in_model = {id(module) for module in model.modules()}
        for item in items:
            if id(item) not in in_model:
                raise ValueError(f"layers contains a {type(item).__name__} that is not a submodule of the model")
        if len({id(item) for item in items}) != len(items):
            raise ValueError("layers contains the same module twice")
        return items
    raise TypeError("layers must hold only int indices or only nn.Module objects, got "
                    f"{sorted({type(item).__name__ for item in items})}")


# --------------------------------------------------------------------------------------------- the hook
def _first_parameter_name(module: nn.Module) -> Optional[str]:
    """The name the hidden states have when passed by keyword: the first parameter of ``module.forward``
    (``hidden_states`` for most layers, ``output_h`` for XLNet)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if parameters and parameters[0].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        return parameters[0].name
    return None


def _hooks_run_inside_checkpoint(layer: nn.Module) -> bool:
    # Some transformers versions (5.17 among them) checkpoint GradientCheckpointingLayer.__call__, so module hooks
    # run inside the checkpoint and again on the backward recompute; later ones (5.24) checkpoint forward only and
    # keep hooks outside. Either way the hook only sees the flag it needs: gradient_checkpointing on the layer.
    return bool(getattr(layer, "gradient_checkpointing", False)) and type(layer).__call__ is not nn.Module.__call__


class _NoiseHook:
    """Forward pre-hook (``with_kwargs=True``) that replaces a layer's hidden-state input by ``h + eps``."""

    def __init__(self, handle: "HyPeHandle", position: int, layer: nn.Module):
        self.handle = handle
        self.position = position
        self.kwarg_name = _first_parameter_name(layer)
        self.calls = 0

    def __call__(self, module: nn.Module, args, kwargs):
        if not module.training:
            return None  # eval: the layer sees exactly its inputs; nothing is drawn from any generator
        handle = self.handle
        if args:
            hidden, in_args = args[0], True
        elif self.kwarg_name is not None and self.kwarg_name in kwargs:
            hidden, in_args = kwargs[self.kwarg_name], False
        else:
            raise TypeError(f"HyPe found no hidden states in the call of {type(module).__name__}: expected them "
                            f"as the first positional argument or as {self.kwarg_name!r}=")
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"HyPe expected the hidden states of {type(module).__name__} to be a tensor, "
                            f"got {type(hidden).__name__}")
        if handle.seed is None:
            # The op draws the seed from torch's CPU generator at run time: a fresh, independent stream for every
            # layer and step, reproduced by torch.manual_seed, and replayed when activation checkpointing reruns
            # this hook (checkpoint saves and restores the CPU RNG state).
            seed = None
        else:
            if _hooks_run_inside_checkpoint(module):
                raise RuntimeError(
                    f"hype.apply(seed=...) cannot be used while {type(module).__name__} runs its hooks inside "
                    "gradient checkpointing (this transformers version checkpoints the layer's __call__): the "
                    "recompute would count as a new call and draw different noise. Use seed=None: "
                    "torch.manual_seed then reproduces the run and the recompute replays the same noise")
            seed = derive_seed(handle.seed, self.position, self.calls)
            self.calls += 1
        # Out of place, never add_noise_: the tensor entering layer l is one the caller still holds. It is the
        # previous layer's output, which transformers may keep as a returned hidden state (output_hidden_states)
        # and which a checkpointed layer keeps to recompute from (writing into it would add the noise twice on
        # the recompute); for layer 0 it is the embedding output, possibly the user's own inputs_embeds or a leaf
        # made to require grad (enable_input_require_grads), and DeBERTa-v2's optional conv reads it again after
        # layer 0. Autograd catches only some of these. The price is one short-lived allocation the size of h per
        # layer call (the clean h is freed as soon as the caller drops it); the noise itself is never stored.
        noisy = ops.add_noise(hidden, handle.sigma, handle.distribution, seed, handle.rounding)
        if in_args:
            return (noisy,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[self.kwarg_name] = noisy
        return args, kwargs


# --------------------------------------------------------------------------------------------- public API
class HyPeHandle:
    """HyPe applied to a model. ``remove()`` (or leaving a ``with`` block) restores the model exactly.

    Attributes:
        model: the model HyPe was applied to.
        layers: the hooked layer modules, in the order their seed positions are numbered.
        sigma, distribution, rounding, seed: the settings of :func:`apply`.
        dropout_modules: the dropout modules set to p=0 (empty unless ``disable_dropout=True``).
        dropout_attributes: the ``(module, name)`` float dropout probabilities set to 0 (BART, OPT, ...; empty
            unless ``disable_dropout=True``).
    """

    def __init__(self, model: nn.Module, layers: List[nn.Module], sigma: float, distribution: str,
                 rounding: str, seed: Optional[int], dropout_modules: List[nn.Module],
                 dropout_attributes: Sequence[Tuple[nn.Module, str]] = (),
                 fused_stacks: Optional[List[List[nn.Module]]] = None):
        self.model = model
        self.layers = layers
        self.sigma = sigma
        self.distribution = distribution
        self.rounding = rounding
        self.seed = seed
        self.dropout_modules = dropout_modules
        self.dropout_attributes = list(dropout_attributes)
        self._hooks: list = []  # per position: a _NoiseHook, or the fused op's NoiseSource (both count calls)
        self._hook_handles: list = []
        self._active = False
        self._fused_stacks = fused_stacks
        self._fused_patch = None
        self.fused_layers: List[nn.Module] = []  # the layers whose norms are fused (empty: hooks only)
        self.hooked_layers: List[nn.Module] = []  # the noisy layers that get their noise from a hook

    def _switches(self) -> List[Tuple[nn.Module, str]]:
        return [(module, "p") for module in self.dropout_modules] + self.dropout_attributes

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the noise sequence: the seed and, per hooked layer, the number of
        noisy calls made so far (they select the noise when ``seed`` is set; with ``seed=None`` the noise comes
        from torch's CPU generator, which the checkpoint restores instead)."""
        return {"seed": self.seed, "calls": [hook.calls for hook in self._hooks]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the per-layer call counters of :meth:`state_dict` (same seed and number of hooked layers)."""
        if not isinstance(state, dict) or "calls" not in state:
            raise TypeError(f"state must be a dict from HyPeHandle.state_dict(), got {type(state).__name__}")
        calls = list(state["calls"])
        if state.get("seed") != self.seed:
            raise ValueError(f"state was saved with seed={state.get('seed')}, this handle has seed={self.seed}")
        if len(calls) != len(self._hooks):
            raise ValueError(f"state holds counters for {len(calls)} layers, this handle hooks {len(self._hooks)}")
        if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in calls):
            raise ValueError(f"state['calls'] must be ints >= 0, got {calls}")
        for hook, count in zip(self._hooks, calls):
            hook.calls = int(count)

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return self._active

    def _install(self) -> None:
        from . import fused

        # Fused: a noisy layer whose predecessor in its stack is patched gets its noise from that predecessor's
        # last fused op (the op that produces its input); a first layer adds it in its input norm (pre-LN) or
        # keeps the hook (post-LN).
        producer_of = {}
        for stack in self._fused_stacks or ():
            for before, layer in zip(stack, stack[1:]):
                producer_of[id(layer)] = before
        in_fused = {id(layer) for stack in self._fused_stacks or () for layer in stack}
        try:
            sources, entries = {}, {}
            for position, layer in enumerate(self.layers):
                producer = producer_of.get(id(layer))
                if producer is not None:
                    source = fused.NoiseSource(self, position, layer, producer)
                    sources[id(producer)] = source
                    self._hooks.append(source)
                elif id(layer) in in_fused and fused.family(layer) == "pre_ln":
                    # No producer, but a pre-LN layer's input norm can add the noise to its own input.
                    source = fused.NoiseSource(self, position, layer, layer)
                    entries[id(layer)] = source
                    self._hooks.append(source)
                else:
                    hook = _NoiseHook(self, position, layer)
                    self._hooks.append(hook)
                    self._hook_handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
                    self.hooked_layers.append(layer)
                _HOOKED_LAYERS.add(layer)
            if self._fused_stacks is not None:
                self._fused_patch = fused.FusedNorms(self.model, [l for s in self._fused_stacks for l in s], sources,
                                                     entries)
                self.fused_layers = list(self._fused_patch.layers)
            for module, name in self._switches():
                entry = _DISABLED_DROPOUT.setdefault(module, {}).get(name)
                if entry is None:
                    _DISABLED_DROPOUT[module][name] = [getattr(module, name), 1]
                    setattr(module, name, 0.0)  # dropout with p=0 returns its input and draws nothing
                else:
                    entry[1] += 1
        except BaseException:
            self._active = True
            self.remove()
            raise
        self._active = True

    def layer_seed(self, position: int, call: int) -> int:
        """:func:`derive_seed` of this handle's ``seed`` for layer ``position``'s ``call``-th noisy forward (the
        fused ops' noise sources ask the handle, so :mod:`fusednoise.fused` need not import this module)."""
        return derive_seed(self.seed, position, call)

    def remove(self) -> None:
        """Remove the hooks and restore the dropout probabilities. Calling it again does nothing."""
        if not self._active:
            return
        self._active = False
        for hook_handle in self._hook_handles:
            hook_handle.remove()
        self._hook_handles.clear()
        if self._fused_patch is not None:
            self._fused_patch.remove()
        for layer in self.layers:
            _HOOKED_LAYERS.discard(layer)
        for module, name in self._switches():
            entry = _DISABLED_DROPOUT.get(module, {}).get(name)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                setattr(module, name, entry[0])
                del _DISABLED_DROPOUT[module][name]
                if not _DISABLED_DROPOUT[module]:
                    del _DISABLED_DROPOUT[module]

    def __enter__(self) -> "HyPeHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        fused = f", {len(self.fused_layers)} fused" if self.fused_layers else ""
        return (f"HyPeHandle({type(self.model).__name__}, {len(self.layers)} layers{fused}, sigma={self.sigma:g}, "
                f"distribution={self.distribution!r}, rounding={self.rounding!r}, seed={self.seed}, {state})")


def _fused_stacks(model: nn.Module, selected: List[nn.Module], fused) -> Optional[List[List[nn.Module]]]:
    """The stacks to patch for ``fused`` (None: hooks only); raises for ``fused=True`` on what cannot be fused."""
    from . import fused as fused_module

    if fused is False:
        return None
    if fused is not True and fused != "auto":
        raise ValueError(f"fused must be one of {fused_module.FUSED_CHOICES}, got {fused!r}")
    stacks, reason = fused_module.fusable_stacks(model, noisy=True)
    if stacks is not None:
        in_stacks = {id(layer) for stack in stacks for layer in stack}
        outside = [layer for layer in selected if id(layer) not in in_stacks]
        if outside:
            stacks, reason = None, f"{type(outside[0]).__name__} is not in one of the model's layer stacks"
    if stacks is None:
        if fused is True:
            raise ValueError(f"hype.apply(fused=True) cannot fuse {type(model).__name__}: {reason}; "
                             "use fused='auto' to fall back to hooks, or fused=False")
        warnings.warn(f"hype.apply(fused='auto'): {type(model).__name__} cannot be fused ({reason}); "
                      "falling back to HyPe's hooks", UserWarning, stacklevel=3)
    return stacks


def apply(model: nn.Module, sigma: float = DEFAULT_SIGMA, distribution: str = "normal", layers: LayersSpec = None,
          disable_dropout: bool = False, rounding: str = "nearest", seed: Optional[int] = None,
          fused: Union[bool, str] = False) -> HyPeHandle:
    """Add HyPe noise to the input hidden states of the model's layers while ``model.training``.

    Args:
        model: a Hugging Face model (base or task model) or any ``nn.Module`` whose layer stack
            :func:`~fusednoise.layers.find_layer_stacks` finds; otherwise pass ``layers``.
        sigma: noise scale, >= 0: the standard deviation for "normal", the half-width for "uniform". The paper
            uses 1e-5 for both HyPe-N and HyPe-U (grid 1e-5 / 1e-6).
        distribution: "normal" (HyPe-N, ``N(0, sigma^2)``) or "uniform" (HyPe-U, ``U(-sigma, sigma)`` as in the
            paper; the authors' code draws ``sigma * U[0, 1)``).
        layers: which layers get noise on their input:
            ``None`` or "all": every layer of :func:`~fusednoise.layers.find_layers`;
            "lower" / "upper": the first / second half of each stack (the paper's appendix; an odd stack gives its
            middle layer to "upper"); a list of int indices into ``find_layers(model)`` (negative indices count
            from the end); or an ``nn.ModuleList`` / list of modules of the model (their first argument, or the
            keyword named like their ``forward``'s first parameter, must be the hidden states).
        disable_dropout: set the hidden-state dropout to 0 while applied, as the paper does: the dropout modules
            of :func:`~fusednoise.layers.hidden_dropout_modules` (p=0) and the float probabilities of
            :func:`~fusednoise.layers.hidden_dropout_attributes` (BART, OPT and other models that call
            ``F.dropout`` with a float attribute). Attention-probability dropout is left alone. ``remove()``
            restores every value. When the model's config declares hidden dropout but neither kind is found, a
            ``UserWarning`` says that hidden dropout stays on.
        rounding: "nearest" or "stochastic" for float16/bfloat16 hidden states. At sigma 1e-5, HyPe in pure
            bf16 with round-to-nearest is nearly a no-op (the noise is far below bf16's resolution);
            "stochastic" keeps the noise in expectation.
        seed: ``None`` (default): every noisy layer call draws a fresh seed from torch's CPU generator, so layers
            and steps get independent streams, ``torch.manual_seed`` reproduces a run, and activation
            checkpointing replays the same noise on recompute. An int in [0, 2**62): the ``c``-th noisy call of
            the ``p``-th hooked layer (``handle.layers[p]``, counting from 0 since ``apply``) uses
            ``derive_seed(seed, p, c)``, whatever else draws from torch's generators. With hooks that run inside
            an activation checkpoint (transformers versions that checkpoint a layer's ``__call__``, or a layer
            you wrap in ``torch.utils.checkpoint`` yourself) the recompute is one more call: use ``seed=None``
            there (the first case raises an error rather than give wrong gradients). transformers 5.24 keeps
            hooks outside the checkpoint, so ``seed=`` works with its activation checkpointing.
        fused: ``False`` (default): the noise is added by hooks, one extra pass per layer. ``True``: patch the
            layers' residual-add + norm with the fused ops of :mod:`fusednoise.fused` and add each layer's noise
            in the op that produces its input (no extra pass; a pre-LN stack's first layer adds its own in its input
            norm, a post-LN stack's first layer keeps a hook); raises
            ValueError naming the layer class when the architecture is not one the patches know (LLaMA, Mistral,
            Qwen2, Gemma in float32, BERT, RoBERTa, ELECTRA). ``"auto"``: fuse when possible, else warn and use hooks. The same
            noise as the hook path (same seeds, same philox words per element), so with ``seed=`` the fused and
            hook runs match up to the rounding of ``(a + b) + eps`` in half precision. Every layer of a fused
            stack is patched (only the chosen ones get noise); ``handle.fused_layers`` lists them. With fusing,
            hidden states returned by ``output_hidden_states=True`` carry the noise of the layer they feed.
            ``seed=`` with gradient checkpointing is refused at the first call (the recompute would redraw).

    Noise is added only while a hooked layer is in training mode (its ``training`` flag, which ``model.train()``
    and ``model.eval()`` set). Eval mode is bitwise the model without HyPe: the hooks return at once and draw
    nothing. Gradients pass through the noise unchanged. The hidden states a layer receives are a new tensor:
    the caller's tensor (the previous layer's output, a returned hidden state, ``inputs_embeds``) is not changed.

    Returns:
        A :class:`HyPeHandle`; ``handle.remove()`` or leaving ``with hype.apply(model): ...`` undoes everything.

    Raises:
        TypeError / ValueError naming the argument, before anything is changed on the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sigma = _check_sigma(sigma)
    _check_choice(distribution, ops.DISTRIBUTIONS, "distribution")
    _check_choice(rounding, ops.ROUNDINGS, "rounding")
    if seed is not None:
        rng.check_seed(seed)
    if not isinstance(disable_dropout, bool):
        raise TypeError(f"disable_dropout must be a bool, got {type(disable_dropout).__name__}")
    selected = _resolve_layers(model, layers)
    already = [type(layer).__name__ for layer in selected if layer in _HOOKED_LAYERS]
    if already:
        raise ValueError(f"layers: HyPe is already applied to {len(already)} of these layers ({already[0]}, ...); "
                         "remove() the earlier handle first, or choose other layers")
    dropouts = hidden_dropout_modules(model) if disable_dropout else []
    attributes = hidden_dropout_attributes(model) if disable_dropout else []
    configured = configured_hidden_dropout(model)
    if disable_dropout and not dropouts and not attributes and configured:
        warnings.warn(f"hype.apply(disable_dropout=True): {type(model).__name__}'s config declares hidden dropout "
                      f"{configured:g}, but no dropout module or float dropout attribute was found to turn off: "
                      "hidden dropout stays on (set it to 0 in the model's config before building the model)",
                      UserWarning, stacklevel=2)
    fused_stacks = _fused_stacks(model, selected, fused)
    handle = HyPeHandle(model, selected, sigma, distribution, rounding, seed, dropouts, attributes, fused_stacks)
    handle._install()
    return handle


__all__ = ["DEFAULT_SIGMA", "HyPeHandle", "apply", "derive_seed"]
