"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise on the
token embeddings while training, scaled by each example's own length.

    e <- e + U(-1, 1) * alpha / sqrt(L_b * d)        training only; e = model.get_input_embeddings()(input_ids)

with ``d`` the embedding width and ``L_b`` the number of real (unmasked) tokens of example ``b``: the paper's
sequence length L. Padded positions are left untouched. alpha in {5, 10, 15} in the paper; 5 is the default.

Usage::

    from fusednoise import neftune

    handle = neftune.apply(model, alpha=5.0)   # any Hugging Face model, PEFT-wrapped or not
    ...                                        # train: model(input_ids=..., attention_mask=..., labels=...)
    handle.remove()                            # or: with neftune.apply(model): ...

How it differs from ``transformers``' built-in (``TrainingArguments(neftune_noise_alpha=...)``): the built-in
scales every example by the *padded* length of the batch, ``alpha / sqrt(T * d)``, and adds noise to the padding
too, so a short example in a batch padded to a long one gets ``sqrt(L_b / T)`` of the noise the paper prescribes.
Here the scale follows each example's own length from the attention mask, and the noise is one fused pass
(:func:`fusednoise.add_neftune_noise`: one read and one write of the embeddings) where the built-in allocates a
noise tensor. Without padding (every example as long as the batch, or no attention mask) the two agree in
distribution.

Packed and padding-free batches (TRL's ``packing=True`` and ``padding_free=True``, ``transformers``'
``DataCollatorWithFlattening``) put several sequences in one row and pass ``position_ids`` (and the varlen
kernels' ``cu_seq_lens_q``) instead of an attention mask: each sequence is scaled by its own length, a sequence
starting where ``position_ids`` returns to 0 (or at each entry of ``cu_seq_lens_q``), still in the one fused pass.
The built-in scales the whole packed row by its length, so a sequence packed with others gets ``sqrt(L / T)`` of
its noise, whatever its neighbours.

Where the mask and positions come from: a forward pre-hook on the model records the ``attention_mask`` and
``position_ids`` of each call (keyword or positional, as the model's ``forward`` names them) and its
``cu_seq_lens_q`` keyword for the embedding hook of that call. No mask and no positions means every token of the
row counts. Calling a submodule of the model directly (not through the model given to :func:`apply`) leaves them
unseen.
"""
from __future__ import annotations

import inspect
import weakref
from typing import List, Optional

import torch
from torch import nn

from . import rng
from .hype import derive_seed
from .ops_neftune import DEFAULT_ALPHA, add_neftune_noise
from .validation import check_real

# Embedding modules that carry a NEFTune hook now: a second apply() would add the noise twice.
_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def input_embeddings(model: nn.Module) -> nn.Module:
    """``model.get_input_embeddings()``, with a clear error for a model that has none."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if callable(get):
        try:
            embeddings = get()
        except NotImplementedError:
            embeddings = None
    if not isinstance(embeddings, nn.Module):
        raise ValueError(f"model: {type(model).__name__} has no input embeddings (model.get_input_embeddings() "
                         "returned no module); NEFTune adds its noise to their output")
    return embeddings


def _arg_position(model: nn.Module, name: str) -> Optional[int]:
    """Where argument ``name`` sits among the positional arguments of ``model.forward`` (None if nowhere)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


def _call_argument(args, kwargs, name: str, position: Optional[int]):
    value = kwargs.get(name)
    if value is None and position is not None and len(args) > position:
        value = args[position]
    return value


class NEFTuneHandle:
    """NEFTune applied to a model. ``remove()`` (or leaving a ``with`` block) restores the model exactly.

    Attributes:
        model: the model NEFTune was applied to (its forward calls supply the attention mask).
        embeddings: the input-embedding module whose output gets the noise.
        alpha, seed: the settings of :func:`apply`.
    """

    def __init__(self, model: nn.Module, embeddings: nn.Module, alpha: float, seed: Optional[int]):
        self.model = model
        self.embeddings = embeddings
        self.alpha = alpha
        self.seed = seed
        self.calls = 0
        # (attention_mask, position_ids, cu_seq_lens_q) of every model call in flight (nested calls stack)
        self._masks: List[tuple] = []
        self._positions = {name: _arg_position(model, name) for name in ("attention_mask", "position_ids")}
        self._hook_handles: list = []
        self._active = False

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return self._active

    # ------------------------------------------------------------------------------------------- hooks
    def _record_mask(self, module, args, kwargs):
        self._masks.append((_call_argument(args, kwargs, "attention_mask", self._positions["attention_mask"]),
                            _call_argument(args, kwargs, "position_ids", self._positions["position_ids"]),
                            kwargs.get("cu_seq_lens_q")))

    def _forget_mask(self, module, args, kwargs, output):
        if self._masks:
            self._masks.pop()

    def _add_noise(self, module, args, output):
        if not module.training:
            return None  # eval: the embeddings are returned as computed; nothing is drawn from any generator
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"NEFTune expected the output of {type(module).__name__} to be a tensor of embeddings, "
                            f"got {type(output).__name__}")
        mask, position_ids, cu_seq_lens = self._masks[-1] if self._masks else (None, None, None)
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(output.shape[:-1])):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"NEFTune needs the model's attention_mask as one flag per token, shape "
                             f"{tuple(output.shape[:-1])} (the embeddings' (B, T)), got {got}; pass a (B, T) "
                             "padding mask, or none (every token then counts)")
        if isinstance(position_ids, torch.Tensor) and tuple(position_ids.shape) != tuple(output.shape[:-1]):
            try:  # a (1, T) row of positions shared by the batch
                position_ids = position_ids.expand(output.shape[:-1])
            except RuntimeError:
                raise ValueError(f"NEFTune reads the sequences of packed rows from position_ids, which must have the "
                                 f"embeddings' shape {tuple(output.shape[:-1])}, got "
                                 f"{tuple(position_ids.shape)}") from None
        if not isinstance(cu_seq_lens, torch.Tensor) or isinstance(position_ids, torch.Tensor):
            cu_seq_lens = None  # position_ids say the same where both are given
        if not isinstance(position_ids, torch.Tensor):
            position_ids = None
        seed = None
        if self.seed is not None:
            seed = derive_seed(self.seed, 0, self.calls)
            self.calls += 1
        return add_neftune_noise(output, self.alpha, mask, seed, position_ids=position_ids, cu_seq_lens=cu_seq_lens)

    def _install(self) -> None:
        # always_call: the mask is forgotten even when the forward raises (LNSR stops its noisy pass that way).
        self._hook_handles = [
            self.model.register_forward_pre_hook(self._record_mask, with_kwargs=True),
            self.model.register_forward_hook(self._forget_mask, with_kwargs=True, always_call=True),
            self.embeddings.register_forward_hook(self._add_noise),
        ]
        _HOOKED.add(self.embeddings)
        self._active = True

    def remove(self) -> None:
        """Remove the hooks. Calling it again does nothing."""
        if not self._active:
            return
        self._active = False
        for hook_handle in self._hook_handles:
            hook_handle.remove()
        self._hook_handles.clear()
        self._masks.clear()
        _HOOKED.discard(self.embeddings)

    def __enter__(self) -> "NEFTuneHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (f"NEFTuneHandle({type(self.model).__name__}, {type(self.embeddings).__name__}, alpha={self.alpha:g}, "
                f"seed={self.seed}, {state})")


def apply(model: nn.Module, alpha: float = DEFAULT_ALPHA, seed: Optional[int] = None) -> NEFTuneHandle:
    """Add NEFTune noise to the output of ``model.get_input_embeddings()`` while it is in training mode.

    Args:
        model: a Hugging Face model (base, task or causal-LM model; a PEFT ``PeftModel`` too) or any module with
            ``get_input_embeddings()``. Its forward calls supply the ``attention_mask`` that sets each example's
            length; call the model itself (not a submodule) for the mask to be seen.
        alpha: noise scale, finite and >= 0 (paper: 5, 10 or 15).
        seed: ``None`` (default): every noisy embedding call draws a fresh seed from torch's CPU generator
            (``torch.manual_seed`` reproduces a run). An int in [0, 2**62): the ``c``-th noisy call uses
            ``fusednoise.hype.derive_seed(seed, 0, c)``, whatever else draws from torch's generators.

    Noise is added only while the embedding module is in training mode (``model.train()``); in eval mode the
    model is bitwise the model without NEFTune and nothing is drawn. Gradients pass through the noise unchanged.

    Returns:
        A :class:`NEFTuneHandle`; ``handle.remove()`` or leaving ``with neftune.apply(model): ...`` undoes it.

    Raises:
        TypeError / ValueError naming the argument, before anything is changed on the model: a model without input
        embeddings, an embedding that already carries NEFTune (ours, or ``transformers``' built-in hook).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    alpha = check_real(alpha, "alpha")
    if seed is not None:
        rng.check_seed(seed)
    embeddings = input_embeddings(model)
    if embeddings in _HOOKED:
        raise ValueError("model: NEFTune is already applied to its input embeddings; remove() the earlier handle "
                         "first")
    if getattr(embeddings, "neftune_noise_alpha", None) is not None:
        raise ValueError("model: transformers' built-in NEFTune is active on its input embeddings "
                         "(TrainingArguments.neftune_noise_alpha); use one of the two, not both")
    handle = NEFTuneHandle(model, embeddings, alpha, seed)
    handle._install()
    return handle


__all__ = ["DEFAULT_ALPHA", "NEFTuneHandle", "add_neftune_noise", "apply", "input_embeddings"]
