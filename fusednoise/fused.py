"""Fused residual-add + norm patches for known transformer layers, with or without HyPe's noise.

:func:`fuse_norms` (and ``hype.apply(..., fused=True)``) rebinds ``forward`` on the *instances* of a model's layers
(never on their classes), as Liger-Kernel does: no parameter, buffer or ``state_dict`` key changes, so it works
on a ``PeftModel`` and on FSDP2-wrapped layers, and ``remove()`` restores the original forwards exactly.
FSDP2 (``fully_shard``, before or after patching: it swaps a layer's class for an ``FSDP<Layer>`` subclass, which
:func:`family` recognises through the MRO, and keeps the instance ``forward``) all-gathers the parameters in its
forward pre-hook, which ``Module.__call__`` runs before the rebound forward: the fused ops get the plain unsharded
weights, never DTensor shards (``tests/test_fused_fsdp.py``).

What each family's patch computes (the eager layer's own arithmetic, fused; ``fusednoise/ops_norms.py``):

* pre-LN, LLaMA / Mistral / Qwen2 / Gemma (``*DecoderLayer`` with ``*RMSNorm``): ``input_layernorm`` and the
  ``post_attention_layernorm`` with the residual add before it become :func:`~fusednoise.add_rms_norm` calls;
  the layer's last add, ``residual + mlp(...)``, is the next layer's input, and with HyPe it becomes
  :func:`~fusednoise.add_residual_noise` carrying the *next* layer's noise (what the hook path adds to that
  tensor at the next layer's entry: the same seed and philox words per element). Gemma's RMSNorm multiplies by
  ``1 + w`` in float32 and rounds once (``add_rms_norm(unit_offset=True)``): exact in float32 only, so a Gemma
  model in bfloat16 / float16 is refused (the op rounds the normalised value before the weight, as LLaMA does).
* post-LN, BERT / RoBERTa / ELECTRA (``*Layer`` whose ``attention.output`` and ``output`` are dense, dropout,
  ``LayerNorm(hidden + input_tensor)``): both ``LayerNorm(hidden + input_tensor)`` become
  :func:`~fusednoise.add_layer_norm`; with HyPe the second, the layer's output and so the next layer's input,
  carries the next layer's noise. Hidden dropout stays torch's (``hype.apply(disable_dropout=True)`` turns it
  off, as the paper does).

Liger-Kernel's RMSNorm (its ``LigerRMSNorm`` class, or its forward bound on a ``LlamaRMSNorm`` instance by
``apply_liger_kernel_to_llama(model=...)``) is recognised by its ``offset`` and ``casting_mode`` and replaced by the
fused op when it computes LLaMA's or Gemma's arithmetic; any other replaced norm forward is refused, naming it.

A noisy layer with no patched predecessor in its stack (the first layer) gets its noise in its input norm
(pre-LN: ``add_rms_norm(x + eps)``, the hook's ``add_noise`` then the norm, in one pass) or from the usual HyPe
hook (post-LN, whose layers begin with attention, not a norm).

Differences from the hook path that a user can see: the hidden states a model returns with
``output_hidden_states=True`` include the noise of the layer they feed (the hook path adds it to a copy), and
in half precision ``(a + b) + eps`` is rounded once instead of twice. A layer whose ``forward`` no longer has
the structure these patches assume (a new ``transformers`` release) is caught by ``tests/test_fused.py``,
which compares patched and unpatched layers.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import ops
from .layers import find_layer_stacks
from .ops_norms import add_layer_norm, add_rms_norm

# Layer classes (or their bases: FSDP2 and other wrappers subclass them) the patches know, by family.
PRE_LN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GemmaDecoderLayer")
PRE_LN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x.to(dtype), eps: variance_epsilon
# (x * (1 + w)) in float32, rounded once, eps: eps. The op reproduces it in float32 only (add_rms_norm's
# unit_offset): a Gemma model in bfloat16 / float16 is refused.
UNIT_OFFSET_NORMS = ("GemmaRMSNorm",)
# Liger-Kernel's RMSNorm: the class its module-level patch puts in transformers, or the forward its ``model=``
# patch binds on the instances of the classes above. Its ``offset`` and ``casting_mode`` say whose arithmetic it
# computes: LLaMA's (0.0, "llama") and Gemma's (1.0, "gemma") are the ones the fused op reproduces.
LIGER_NORMS = ("LigerRMSNorm",)
LIGER_ARITHMETIC = {(0.0, "llama"): False, (1.0, "gemma"): True}  # -> unit_offset
POST_LN_LAYERS = ("BertLayer", "RobertaLayer", "ElectraLayer")
FUSED_CHOICES = (True, False, "auto")

# Modules whose forward a live patch has rebound: module -> the patch.
_PATCHED: "weakref.WeakKeyDictionary[nn.Module, FusedNorms]" = weakref.WeakKeyDictionary()


class NoiseSource:
    """The HyPe noise of one noisy layer, drawn by the fused op of the layer before it (its producer).

    ``calls`` counts the noisy calls, as the hook path's counter does, so ``derive_seed(seed, position, calls)``
    gives the same seeds and ``HyPeHandle.state_dict`` covers both kinds."""

    def __init__(self, handle, position: int, layer: nn.Module, producer: nn.Module):
        self.handle = handle
        self.position = position
        self.layer = layer
        self.producer = producer
        self.calls = 0

    def draw(self):
        """``(sigma, distribution, seed, rounding)`` of this call, or None when the noisy layer is in eval mode
        (nothing is drawn then)."""
        if not self.layer.training:
            return None
        handle = self.handle
        if handle.seed is None:
            return handle.sigma, handle.distribution, None, handle.rounding
        if getattr(self.producer, "gradient_checkpointing", False):
            raise RuntimeError(
                f"hype.apply(seed=..., fused=True) cannot be used with gradient checkpointing on "
                f"{type(self.producer).__name__}: the fused noise is drawn inside the checkpointed forward, whose "
                "recompute would count as a new call and draw different noise. Use seed=None (torch.manual_seed "
                "reproduces the run and the recompute replays the same noise) or fused=False")
        seed = handle.layer_seed(self.position, self.calls)
        self.calls += 1
        return handle.sigma, handle.distribution, seed, handle.rounding


# --------------------------------------------------------------------------------------------- structure checks
def _class_names(module: nn.Module) -> List[str]:
    return [cls.__name__ for cls in type(module).__mro__]


def family(layer: nn.Module) -> Optional[str]:
    """``"pre_ln"``, ``"post_ln"`` or None (not a layer class the patches know)."""
    names = _class_names(layer)
    if any(name in PRE_LN_LAYERS for name in names):
        return "pre_ln"
    if any(name in POST_LN_LAYERS for name in names):
        return "post_ln"
    return None


def _post_ln_output_ok(sub) -> bool:
    norm = getattr(sub, "LayerNorm", None)
    return (isinstance(getattr(sub, "dense", None), nn.Module) and isinstance(getattr(sub, "dropout", None), nn.Module)
            and isinstance(norm, nn.LayerNorm) and norm.weight is not None and len(norm.normalized_shape) == 1)


def _rebound_by(norm: nn.Module) -> Optional[str]:
    """The module that defined ``norm``'s instance ``forward`` (another library's patch), or None."""
    forward = norm.__dict__.get("forward")
    if forward is None:
        return None
    return getattr(getattr(forward, "__func__", forward), "__module__", None) or "an unknown module"


def norm_arithmetic(norm: nn.Module):
    """``((unit_offset, eps), None)`` for an RMSNorm whose arithmetic the fused op reproduces (LLaMA's
    ``w * x.to(dtype)``, Gemma's ``(x * (1 + w))`` in float32), else ``(None, why)``: a sentence naming its class,
    and Liger-Kernel when Liger patched it with an arithmetic the op does not compute."""
    names = _class_names(norm)
    owner = _rebound_by(norm)
    liger = any(n in LIGER_NORMS for n in names) or (owner or "").startswith("liger_kernel")
    name = type(norm).__name__
    if liger:
        key = (float(getattr(norm, "offset", -1.0)), getattr(norm, "casting_mode", None))
        if key not in LIGER_ARITHMETIC:
            return None, (f"{name} patched by Liger-Kernel with offset={key[0]}, casting_mode={key[1]!r}: the "
                          "fused ops compute Liger's LLaMA (0.0, 'llama') and Gemma (1.0, 'gemma') RMSNorms only")
        return (LIGER_ARITHMETIC[key], norm.variance_epsilon), None
    if owner is not None:
        return None, f"{name} whose forward was replaced by {owner}: the fused op would not compute what it does"
    if any(n in UNIT_OFFSET_NORMS for n in names):
        return (True, norm.eps), None
    if any(n in PRE_LN_NORMS for n in names):
        return (False, norm.variance_epsilon), None
    return None, f"{name}, not one of {PRE_LN_NORMS + UNIT_OFFSET_NORMS + LIGER_NORMS}"


def why_not_fusable(layer: nn.Module, noisy: bool = False) -> Optional[str]:
    """Why ``layer`` cannot be patched (a sentence naming its class), or None when it can."""
    kind = family(layer)
    name = type(layer).__name__
    if kind is None:
        return (f"{name} is not a layer the fused patches know (pre-LN: {', '.join(PRE_LN_LAYERS)}; post-LN: "
                f"{', '.join(POST_LN_LAYERS)})")
    if kind == "pre_ln":
        for attribute in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, attribute, None)
            if not isinstance(norm, nn.Module):
                return f"{name}.{attribute} is {type(norm).__name__}, not an RMSNorm module"
            arithmetic, why = norm_arithmetic(norm)
            if arithmetic is None:
                return f"{name}.{attribute} is {why}"
            if arithmetic[0] and norm.weight.dtype != torch.float32:
                return (f"{name}.{attribute} is {type(norm).__name__} in {norm.weight.dtype}: Gemma multiplies by "
                        "(1 + w) in float32 and rounds once, while the fused op rounds the normalised value to the "
                        "model's dtype before the weight, so only a float32 Gemma is fused exactly")
        if not all(isinstance(getattr(layer, a, None), nn.Module) for a in ("self_attn", "mlp")):
            return f"{name} has no self_attn or mlp submodule"
        return None
    for path, sub in (("attention.output", getattr(getattr(layer, "attention", None), "output", None)),
                      ("output", getattr(layer, "output", None))):
        if sub is None or not _post_ln_output_ok(sub):
            return f"{name}.{path} is not dense, dropout, LayerNorm(hidden + input_tensor) with an affine LayerNorm"
    if noisy and getattr(layer, "chunk_size_feed_forward", 0):
        return (f"{name} runs its feed-forward in chunks (chunk_size_feed_forward="
                f"{layer.chunk_size_feed_forward}): the fused noise would repeat per chunk")
    return None


# --------------------------------------------------------------------------------------------- the forwards
def _eager_needed(*tensors) -> bool:
    """Whether a call must run the eager arithmetic: mixed dtypes (autocast's bf16 matmul outputs beside a float32
    residual stream: torch promotes, the fused ops do not) or autocast, which runs LayerNorm in float32."""
    first = tensors[0]
    return (any(t.dtype != first.dtype for t in tensors[1:])
            or torch.is_autocast_enabled(first.device.type))


def _rms_norm(x, residual, norm, arithmetic, noise=None):
    """``(norm(s), s)`` with ``s = x + residual`` (``x`` when residual is None) plus ``noise``'s draw when given
    (``(sigma, distribution, seed, rounding)``), fused when the dtypes allow. ``arithmetic``: the norm's
    ``(unit_offset, eps)`` (:func:`norm_arithmetic`, found when the layer was patched)."""
    if residual is not None and _eager_needed(x, residual):
        s = residual + x
        return norm(s), s
    unit_offset, eps = arithmetic
    if unit_offset:  # Gemma: (1 + w) in float32 (a half-precision x is refused by the op, naming Gemma)
        return add_rms_norm(x, residual, norm.weight, eps, *(noise or ()), unit_offset=True)
    if noise is None:
        return add_rms_norm(x, residual, norm.weight, eps)
    return add_rms_norm(x, residual, norm.weight, eps, *noise)


def _pre_ln_forward(layer: nn.Module, original: Callable, source: Optional[NoiseSource],
                    entry: Optional[NoiseSource] = None) -> Callable:
    """The fused forward of a pre-LN layer. ``source``: the next layer's noise, added in the last residual add;
    ``entry``: this layer's own input noise (a layer with no patched predecessor), added in the input norm."""
    signature = inspect.signature(original)
    parameters = list(signature.parameters.values())
    first = parameters[0].name
    var_keyword = next((p.name for p in parameters if p.kind == inspect.Parameter.VAR_KEYWORD), None)
    input_arithmetic = norm_arithmetic(layer.input_layernorm)[0]  # checked by why_not_fusable before patching
    post_arithmetic = norm_arithmetic(layer.post_attention_layernorm)[0]

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        hidden_states = arguments.pop(first)
        extra = arguments.pop(var_keyword, {}) if var_keyword else {}
        own_noise = entry.draw() if entry is not None else None
        normed, residual = _rms_norm(hidden_states, None, layer.input_layernorm, input_arithmetic, own_noise)
        attention = layer.self_attn(hidden_states=normed, **arguments, **extra)[0]
        normed, residual = _rms_norm(attention, residual, layer.post_attention_layernorm, post_arithmetic)
        mlp = layer.mlp(normed)
        noise = source.draw() if source is not None else None
        if noise is None:
            return residual + mlp
        sigma, distribution, seed, rounding = noise
        if mlp.dtype != residual.dtype:
            return ops.add_noise(residual + mlp, sigma, distribution, seed, rounding)
        return ops.add_residual_noise(residual, mlp, sigma, distribution, seed, rounding)

    return forward


def _post_ln_output_forward(sub: nn.Module, source: Optional[NoiseSource]) -> Callable:
    def forward(hidden_states, input_tensor):
        hidden_states = sub.dropout(sub.dense(hidden_states))
        norm = sub.LayerNorm
        noise = source.draw() if source is not None else None
        if _eager_needed(hidden_states, input_tensor, norm.weight):
            out = norm(hidden_states + input_tensor)
            return out if noise is None else ops.add_noise(out, *noise)
        if noise is None:
            return add_layer_norm(hidden_states, input_tensor, norm.weight, norm.bias, norm.eps)
        sigma, distribution, seed, rounding = noise
        return add_layer_norm(hidden_states, input_tensor, norm.weight, norm.bias, norm.eps, sigma, distribution,
                              seed, rounding)

    return forward


# --------------------------------------------------------------------------------------------- the patch
class FusedNorms:
    """Fused norms patched into a model's layers. ``remove()`` (or leaving a ``with`` block) restores them.

    Attributes:
        layers: the patched layer modules, in stack order.
        modules: the modules whose ``forward`` was rebound (the layers for pre-LN families, their two output
            submodules for post-LN ones).
    """

    def __init__(self, model: nn.Module, layers: List[nn.Module], sources: Dict[int, NoiseSource],
                 entries: Optional[Dict[int, NoiseSource]] = None):
        self.model = model
        self.layers = layers
        self.modules: List[nn.Module] = []
        self._saved: list = []  # (module, had an instance forward, that forward)
        self._active = False
        self._install(sources, entries or {})

    def _rebind(self, module: nn.Module, forward: Callable) -> None:
        own = module.__dict__.get("forward")
        self._saved.append((module, "forward" in module.__dict__, own))
        module.forward = forward
        self.modules.append(module)
        _PATCHED[module] = self

    def _install(self, sources: Dict[int, NoiseSource], entries: Dict[int, NoiseSource]) -> None:
        already = [type(m).__name__ for layer in self.layers for m in layer.modules() if m in _PATCHED]
        if already:
            raise ValueError(f"{already[0]} is already fused by another live patch: remove() it first")
        self._active = True
        try:
            for layer in self.layers:
                source = sources.get(id(layer))
                if family(layer) == "pre_ln":
                    self._rebind(layer, _pre_ln_forward(layer, layer.forward, source, entries.get(id(layer))))
                else:
                    self._rebind(layer.attention.output, _post_ln_output_forward(layer.attention.output, None))
                    self._rebind(layer.output, _post_ln_output_forward(layer.output, source))
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Restore every rebound forward. Calling it again does nothing."""
        if not self._active:
            return
        self._active = False
        for module, had_own, own in reversed(self._saved):
            if had_own:
                module.forward = own
            else:
                module.__dict__.pop("forward", None)
            _PATCHED.pop(module, None)
        self._saved.clear()
        self.modules.clear()

    def __enter__(self) -> "FusedNorms":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FusedNorms({type(self.model).__name__}, {len(self.layers)} layers, " \
               f"{'active' if self._active else 'removed'})"


def fusable_stacks(model: nn.Module, noisy: bool = False):
    """``(stacks, None)`` with the model's layer stacks when every layer in them can be patched, else
    ``(None, reason)``."""
    try:
        stacks = find_layer_stacks(model)
    except ValueError as error:
        return None, str(error)
    for stack in stacks:
        if len({id(layer) for layer in stack}) != len(stack):
            return None, f"{type(model).__name__} shares a layer module across depths"
        for layer in stack:
            reason = why_not_fusable(layer, noisy)
            if reason is not None:
                return None, reason
    return [list(stack) for stack in stacks], None


def fuse_norms(model: nn.Module) -> FusedNorms:
    """Patch the residual-add + norm of every layer of ``model`` with the fused ops, without noise: the same
    outputs and gradients (up to float32 summation order), fewer passes over the hidden states.

    Known families: LLaMA, Mistral, Qwen2, Gemma in float32 (pre-LN RMSNorm) and BERT, RoBERTa, ELECTRA (post-LN
    LayerNorm).
    Raises ValueError naming the layer class when the model has another architecture. Returns a
    :class:`FusedNorms`; ``remove()`` restores the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    stacks, reason = fusable_stacks(model)
    if stacks is None:
        raise ValueError(f"fuse_norms cannot fuse {type(model).__name__}: {reason}")
    return FusedNorms(model, [layer for stack in stacks for layer in stack], {})


__all__ = ["FUSED_CHOICES", "FusedNorms", "NoiseSource", "fuse_norms", "fusable_stacks", "norm_arithmetic",
           "why_not_fusable"]
