"""The NEFTune op (SPEC section 4b): input checks, backend dispatch and autograd, registered with ``torch.library``.

:func:`add_neftune_noise` is a ``torch.library.custom_op`` (``fusednoise::add_neftune_noise``) so
``torch.compile(fullgraph=True)`` traces through it; its seed is drawn inside the op from torch's CPU generator
when the caller gives none (see :mod:`fusednoise.rng`), which is what makes ``torch.manual_seed`` reproduce a run
and activation checkpointing replay the same noise. While a CUDA graph is being captured the kernel also reads a
device-side offset (the offset path of :mod:`fusednoise.rng`), so every replay draws new noise. The exact formula
and counter layout are in :mod:`fusednoise.reference.neftune`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backend
from . import graph_offsets, rng
from .reference import neftune as _reference
from .validation import check_float_tensor, check_real

DEFAULT_ALPHA = 5.0  # NEFTune (Jain et al. 2023): alpha in {5, 10, 15}


def _check_tokens(value, name: str, x: torch.Tensor, shape) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense integer tensor, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape x.shape[:-1] = {tuple(shape)} (one position per token), got "
                         f"{tuple(value.shape)}")
    if shape is None and value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (cumulative sequence lengths over the flattened tokens), got shape "
                         f"{tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device}, expected x's device {x.device}")


def _check_args(x, alpha, attention_mask, seed, position_ids=None, cu_seq_lens=None) -> None:
    check_float_tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., T, D), got shape {tuple(x.shape)}")
    check_real(alpha, "alpha")
    if seed is not None:
        rng.check_seed(seed)
    if position_ids is not None:
        _check_tokens(position_ids, "position_ids", x, x.shape[:-1])
    if cu_seq_lens is not None:
        _check_tokens(cu_seq_lens, "cu_seq_lens", x, None)
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.is_complex() or attention_mask.layout != torch.strided:
        raise TypeError(f"attention_mask must be a dense bool, integer or float tensor, got {attention_mask.dtype}")
    if tuple(attention_mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"attention_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (one flag per "
                         f"token), got {tuple(attention_mask.shape)}")
    if attention_mask.device != x.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, expected x's device {x.device}")


@torch.library.custom_op("fusednoise::add_neftune_noise", mutates_args=())
def _neftune_op(x: torch.Tensor, attention_mask: Optional[torch.Tensor], alpha: float, seed: Optional[int],
                position_ids: Optional[torch.Tensor], cu_seq_lens: Optional[torch.Tensor]) -> torch.Tensor:
    seed = rng.draw_seed() if seed is None else seed
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    backend = _backend.resolve(x)
    offset = graph_offsets.kernel_offset(x, backend, "add_neftune_noise")  # a ticket while capturing a CUDA graph
    with torch.no_grad():
        packed = None  # packed rows: every token's own sequence length
        if position_ids is not None or cu_seq_lens is not None:
            packed = _reference.token_lengths(x.shape, attention_mask, position_ids, cu_seq_lens)
        if backend == "reference":
            return _reference.neftune_noise(x, alpha, attention_mask, seed, graph_offsets.offset_value(offset),
                                            packed)
        from .kernels.neftune import launch_neftune  # triton is imported only when a kernel runs

        x_c = x.contiguous()
        out = torch.empty_like(x_c, memory_format=torch.contiguous_format)
        mask, lengths, per = None, None, None
        if attention_mask is not None:
            mask = attention_mask.reshape(-1)
            if mask.dtype == torch.bool:
                mask = mask.view(torch.uint8)  # Triton loads bytes; the kernel tests != 0
            mask = mask.contiguous()
            lengths = attention_mask.reshape(-1, x.shape[-2]).count_nonzero(dim=1)
        if packed is not None:  # the kernel reads one length per token (per = 1) and keeps where it is nonzero
            lengths, per = packed, 1
            mask = packed if mask is None else mask
        launch_neftune(x_c, mask, lengths, out, alpha, seed, offset, per)
        return out


@_neftune_op.register_fake
def _(x, attention_mask, alpha, seed, position_ids, cu_seq_lens):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _identity_backward(ctx, grad):
    # The noise is additive and independent of x (padded tokens are copied): d out / d x = I.
    return grad, None, None, None, None, None


torch.library.register_autograd("fusednoise::add_neftune_noise", _identity_backward)


def add_neftune_noise(x: torch.Tensor, alpha: float = DEFAULT_ALPHA, attention_mask: Optional[torch.Tensor] = None,
                      seed: Optional[int] = None, *, position_ids: Optional[torch.Tensor] = None,
                      cu_seq_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NEFTune: ``x + U(-1, 1) * alpha / sqrt(L_b * D)`` as a new tensor, with ``L_b`` each example's own token count.

    Args:
        x: token embeddings of shape (..., T, D) (usually (B, T, D): the output of
            ``model.get_input_embeddings()``), float32, float16 or bfloat16, any strides.
        alpha: noise scale, finite and >= 0. The paper (Jain et al. 2023) uses 5, 10 or 15; 5 is the default.
        attention_mask: optional (..., T) tensor, nonzero for a real token and 0 for padding (bool, integer or
            float). ``L_b`` is the number of nonzero entries of example b's row (the paper's sequence length L),
            and padded positions are returned unchanged, bit for bit. Without a mask every token counts, ``L_b = T``,
            which is also what ``transformers``' built-in NEFTune uses (the padded length) for every batch.
        seed: philox seed in [0, 2**62); ``None`` draws one from torch's CPU generator.
        position_ids: optional (..., T) integer positions of packed rows (TRL's packing and padding-free
            collators, ``DataCollatorWithFlattening``): a row holds several sequences, each starting where the
            positions return to 0, and each token is scaled by its own sequence's kept-token count ``L``.
        cu_seq_lens: optional 1-D cumulative sequence lengths over the flattened tokens (the ``cu_seq_lens_q``
            that the varlen attention kernels take), the other way to give the sequences of packed rows.

    One read of x and one write of the result on the Triton backend (the per-example scale is applied in the
    kernel; the token counts are one small reduction over the mask); the reference backend gives the same values
    (bitwise for x = 0, within float32 rounding of one add otherwise). Gradients pass through unchanged. An
    example whose mask is all zeros gets no noise.
    """
    _check_args(x, alpha, attention_mask, seed, position_ids, cu_seq_lens)
    if attention_mask is not None:
        attention_mask = attention_mask.detach()
    return torch.ops.fusednoise.add_neftune_noise(
        x, attention_mask, float(alpha), seed, position_ids.detach() if position_ids is not None else None,
        cu_seq_lens.detach() if cu_seq_lens is not None else None)


__all__ = ["DEFAULT_ALPHA", "add_neftune_noise"]
