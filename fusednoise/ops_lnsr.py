"""The LNSR ops (SPEC section 2): input checks, backend dispatch and autograd, registered with ``torch.library``.

* :func:`layerwise_diff_norm` -- ``sum_r w_r * mean_b ||clean_r - noisy_r||^2`` over L layers in one kernel launch
  (and one for the backward), float32 accumulation, deterministic (fixed-slot partial sums, no atomics).
* :func:`layerwise_diff_norm_paired` -- the same for layer outputs of a 2B batch whose first half is the clean
  pass and second half the noisy one (LNSR's batched mode); the gradient lands in one buffer per layer.
* :func:`scaled_noise` -- LNSR's standard noise, ``x + scale * ||x|| e / ||e||`` per token vector.
* :func:`in_manifold_noise` -- the journal's in-manifold noise (nearest vocabulary embeddings, Gram-Schmidt,
  Gaussian mix), with :func:`neighbor_table` computing and caching the k-NN table.

Every op is a ``torch.library.custom_op`` (``fusednoise::...``) so ``torch.compile`` traces through it. Seeds are
drawn inside the ops from torch's CPU generator when the caller gives none (see :mod:`fusednoise.rng`).
The exact formulas and the philox counter layout are in :mod:`fusednoise.reference.lnsr`.
"""
from __future__ import annotations

import hashlib
import numbers
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import backends as _backend
from . import graph_offsets, rng
from .kernels import host_tables
from .reference import lnsr as _reference
from .validation import check_float_tensor as _check_float_tensor, check_real as _check_real

DEFAULT_SCALE = 0.05       # journal sec. III-E: ||eps|| = 0.05 ||x||
DEFAULT_K = 10             # journal sec. III-E: 10 nearest neighbours
DEFAULT_MIX_RATIO = 0.1    # journal Table V: 0.1 (RTE) to 0.2 (STS-B)
# What ||.||^2 of one example means (the papers do not say): see docs/lnsr.md for the measurements behind it.
DEFAULT_REDUCTION = "mean"
REDUCTIONS = _reference.REDUCTIONS

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]
Weights = Union[None, float, Sequence[float], torch.Tensor]


# --------------------------------------------------------------------------------------------- validation
def _as_layer_list(layers: Layers, name: str, batch_factor: int = 1) -> List[torch.Tensor]:
    """A stacked (L, B, T, D) tensor or a sequence of L (B, T, D) tensors -> list of L (B, T, D) tensors."""
    if isinstance(layers, torch.Tensor):
        _check_float_tensor(layers, name)
        if layers.dim() != 4:
            raise ValueError(f"{name} must be a stacked (L, B, T, D) tensor or a sequence of (B, T, D) tensors; "
                             f"got a tensor of shape {tuple(layers.shape)}")
        return [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"{name} must be a sequence of (B, T, D) tensors or a stacked (L, B, T, D) tensor, "
                        f"got {type(layers).__name__}")
    items = list(layers)
    if not items:
        raise ValueError(f"{name} must hold at least one layer, got an empty sequence")
    for i, item in enumerate(items):
        _check_float_tensor(item, f"{name}[{i}]")
        if item.dim() != 3:
            raise ValueError(f"{name}[{i}] must be a (B, T, D) tensor, got shape {tuple(item.shape)}")
    return items


def _layer_count(items: List[torch.Tensor]) -> int:
    return sum(t.shape[0] if t.dim() == 4 else 1 for t in items)


def _layer_shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape[1:]) if t.dim() == 4 else tuple(t.shape)


def _check_same(items: List[torch.Tensor], name: str, shape, dtype, device) -> None:
    for i, t in enumerate(items):
        where = name if len(items) == 1 and t.dim() == 4 else f"{name}[{i}]"
        if _layer_shape(t) != shape:
            raise ValueError(f"{where} has layers of shape {_layer_shape(t)}, expected {shape} (every layer of "
                             "clean and noisy must have the same (B, T, D) shape)")
        if t.dtype != dtype:
            raise ValueError(f"{where} has dtype {t.dtype}, expected {dtype} (clean and noisy must share a dtype)")
        if t.device != device:
            raise ValueError(f"{where} is on {t.device}, expected {device} (clean and noisy must share a device)")


def _weights_tensor(weights: Weights, L: int, device) -> Optional[torch.Tensor]:
    if weights is None:
        return None
    if isinstance(weights, numbers.Real) and not isinstance(weights, bool):
        value = _check_real(weights, "weights")
        return torch.full((L,), value, dtype=torch.float32, device=device)
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.shape[0] != L:
            raise ValueError(f"weights must have one entry per layer ({L}), got shape {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a float tensor, got {weights.dtype}")
        if weights.device.type == "cpu":
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("weights must be finite and >= 0")
        weights = weights.detach().to(torch.float32)
        return weights.to(device) if weights.device.type != "cpu" else host_tables.to_device(weights, device)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be None, a number, a sequence of L numbers or a (L,) tensor, "
                        f"got {type(weights).__name__}")
    values = list(weights)
    if len(values) != L:
        raise ValueError(f"weights must have one entry per layer ({L}), got {len(values)}")
    values = [_check_real(v, f"weights[{i}]") for i, v in enumerate(values)]
    # pinned, and held while a CUDA graph that copies from it may replay (kernels/host_tables.py)
    return host_tables.to_device(torch.tensor(values, dtype=torch.float32), torch.device(device))


def _mask_tensor(mask, batch: int, tokens: int, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"mask must have shape (B, T) = {(batch, tokens)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, expected {device} (the hidden states' device)")
    if mask.is_complex():
        raise TypeError(f"mask must be a bool, integer or float tensor, got {mask.dtype}")
    return mask.detach().contiguous()


# --------------------------------------------------------------------------------------------- layer views
def _expand(clean: List[torch.Tensor], noisy: List[torch.Tensor], paired: bool):
    """Per-layer (B, T, D) views of the clean and the noisy hidden states."""
    def unbind(items):
        views = []
        for t in items:
            views.extend(t.unbind(0) if t.dim() == 4 else [t])
        return views

    cv = unbind(clean)
    if paired:
        half = cv[0].shape[0] // 2
        return [v[:half] for v in cv], [v[half:] for v in cv]
    return cv, unbind(noisy)


def _diff_norm_sums(cv, nv, rho) -> torch.Tensor:
    if _backend.resolve(cv[0]) == "reference":
        return _reference.diff_norm_sums(cv, nv, rho)
    from .kernels.diff_norm import launch_forward

    return launch_forward(cv, nv, rho)


# --------------------------------------------------------------------------------------------- custom ops
# ``row_weight`` is the (B, T) float32 rho of :func:`fusednoise.reference.lnsr.row_weights` (mask / c_b) or None,
# ``scale`` the per-layer factor (1 / B with row weights, 1 / (B c) without).
@torch.library.custom_op("fusednoise::layerwise_diff_norm", mutates_args=())
def _diff_norm_op(clean: List[torch.Tensor], noisy: List[torch.Tensor], weights: Optional[torch.Tensor],
                  row_weight: Optional[torch.Tensor], scale: float, paired: bool) -> torch.Tensor:
    cv, nv = _expand(clean, noisy, paired)
    with torch.no_grad():
        return _reference.finish_terms(_diff_norm_sums(cv, nv, row_weight), weights, scale)


@_diff_norm_op.register_fake
def _(clean, noisy, weights, row_weight, scale, paired):
    return clean[0].new_empty((_layer_count(clean),), dtype=torch.float32)


@torch.library.custom_op("fusednoise::layerwise_diff_norm_backward", mutates_args=())
def _diff_norm_backward_op(clean: List[torch.Tensor], noisy: List[torch.Tensor], coef: torch.Tensor,
                           row_weight: Optional[torch.Tensor], paired: bool) -> List[torch.Tensor]:
    # Laid out like the inputs where they are dense (XLNet's token-major hidden states get token-major gradients,
    # which the kernel writes in place), contiguous otherwise.
    grads_clean = [torch.empty_like(t) for t in clean]
    grads_noisy = [torch.empty_like(t) for t in noisy]
    cv, nv = _expand(clean, noisy, paired)
    gcv, gnv = _expand(grads_clean, grads_noisy, paired)
    with torch.no_grad():
        if _backend.resolve(cv[0]) == "reference":
            _reference.diff_norm_backward_into(cv, nv, coef, row_weight, gcv, gnv)
        else:
            from .kernels.diff_norm import launch_backward

            launch_backward(cv, nv, row_weight, coef.contiguous(), gcv, gnv)
    return grads_clean + grads_noisy


@_diff_norm_backward_op.register_fake
def _(clean, noisy, coef, row_weight, paired):
    return [torch.empty_like(t) for t in list(clean) + list(noisy)]


def _diff_norm_setup(ctx, inputs, output):
    clean, noisy, weights, row_weight, scale, paired = inputs
    ctx.n_clean = len(clean)
    ctx.n_noisy = len(noisy)
    ctx.paired = paired
    ctx.scale = scale
    ctx.save_for_backward(*clean, *noisy, weights, row_weight)


def _diff_norm_backward(ctx, grad_terms):
    saved = ctx.saved_tensors
    clean = list(saved[:ctx.n_clean])
    noisy = list(saved[ctx.n_clean:ctx.n_clean + ctx.n_noisy])
    weights, row_weight = saved[-2], saved[-1]
    coef = grad_terms.to(torch.float32) * (2.0 * ctx.scale)
    if weights is not None:
        coef = coef * weights
    grads = torch.ops.fusednoise.layerwise_diff_norm_backward(clean, noisy, coef, row_weight, ctx.paired)
    return list(grads[:ctx.n_clean]), list(grads[ctx.n_clean:]), None, None, None, None


torch.library.register_autograd("fusednoise::layerwise_diff_norm", _diff_norm_backward,
                                setup_context=_diff_norm_setup)


def _seed_or_draw(seed: Optional[int]) -> int:
    return rng.draw_seed() if seed is None else seed


# The noise makers take the offset path of fusednoise.rng while a CUDA graph is being captured: their kernels read
# a device ticket (graph_offsets.kernel_offset) beside the host seed, so every replay draws new noise.
# scaled_noise returns the offset it drew with, so that the backward redraws the same noise.
@torch.library.custom_op("fusednoise::scaled_noise", mutates_args=())
def _scaled_noise_op(x: torch.Tensor, scale: float,
                     seed: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(x + eps, seed, offset)``: the seed as a CPU int64 scalar and the offset as an int64 (1,) tensor on
    x's device (0 on the host path), from which the backward redraws the same noise."""
    seed = _seed_or_draw(seed)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    backend = _backend.resolve(x)
    offset = graph_offsets.kernel_offset(x, backend, "lnsr.scaled_noise")
    saved = offset if graph_offsets.is_ticket(x, offset) else torch.zeros(1, dtype=torch.int64, device=x.device)
    with torch.no_grad():
        if backend == "reference":
            return _reference.scaled_noise(x, scale, seed, graph_offsets.offset_value(offset)), seed_t, saved
        from .kernels.lnsr_noise import launch_scaled_noise

        D = x.shape[-1]
        x2 = x.contiguous().view(-1, D)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        launch_scaled_noise(x2, None, out.view(-1, D), scale, seed, offset)
        return out, seed_t, saved


@_scaled_noise_op.register_fake
def _(x, scale, seed):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty((), dtype=torch.int64),
            torch.empty(1, dtype=torch.int64, device=x.device))


@torch.library.custom_op("fusednoise::scaled_noise_backward", mutates_args=())
def _scaled_noise_backward_op(grad: torch.Tensor, x: torch.Tensor, scale: float, seed: torch.Tensor,
                              offset: torch.Tensor) -> torch.Tensor:
    seed = int(seed)
    backend = _backend.resolve(x)
    graph_offsets.check_capturable(x, backend, "lnsr.scaled_noise")
    with torch.no_grad():
        if backend == "reference":
            return _reference.scaled_noise_backward(grad, x, scale, seed, graph_offsets.offset_value(offset))
        from .kernels.lnsr_noise import launch_scaled_noise

        D = x.shape[-1]
        out = torch.empty(x.shape, dtype=grad.dtype, device=x.device)
        launch_scaled_noise(x.contiguous().view(-1, D), grad.contiguous().view(-1, D), out.view(-1, D), scale,
                            seed, offset)
        return out


@_scaled_noise_backward_op.register_fake
def _(grad, x, scale, seed, offset):
    return torch.empty(x.shape, dtype=grad.dtype, device=x.device)


def _scaled_noise_setup(ctx, inputs, output):
    x, scale, _ = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, output[1], output[2])


def _scaled_noise_backward(ctx, grad_out, grad_seed, grad_offset):
    x, seed_t, offset = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    return torch.ops.fusednoise.scaled_noise_backward(grad_out, x, ctx.scale, seed_t, offset), None, None


torch.library.register_autograd("fusednoise::scaled_noise", _scaled_noise_backward,
                                setup_context=_scaled_noise_setup)


@torch.library.custom_op("fusednoise::in_manifold_noise", mutates_args=())
def _in_manifold_op(x: torch.Tensor, token_ids: torch.Tensor, embedding_weight: torch.Tensor,
                    neighbors: torch.Tensor, mix_ratio: float, seed: Optional[int]) -> torch.Tensor:
    seed = _seed_or_draw(seed)
    k = neighbors.shape[1]
    D = x.shape[-1]
    backend = _backend.resolve(x)
    if backend == "triton":
        from .kernels import lnsr_noise  # triton is imported only when a kernel runs

        if not lnsr_noise.manifold_tile_fits(k, D):
            backend = "reference"  # a (k, D) tile too large for the kernel's registers
            graph_offsets.check_capturable(x, backend, "lnsr.in_manifold_noise",
                                           f" (which runs a (k, D) = ({k}, {D}) tile too large for the kernel)")
    offset = graph_offsets.kernel_offset(x, backend, "lnsr.in_manifold_noise")
    with torch.no_grad():
        if backend == "triton":
            weight = embedding_weight if embedding_weight.stride(-1) == 1 else embedding_weight.contiguous()
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            lnsr_noise.launch_in_manifold(x.contiguous().view(-1, D), token_ids.contiguous().view(-1), weight,
                                          neighbors.contiguous(), out.view(-1, D), mix_ratio, seed, offset)
            return out
        return _reference.in_manifold_noise(x, token_ids, embedding_weight, neighbors, mix_ratio, seed,
                                            graph_offsets.offset_value(offset))


@_in_manifold_op.register_fake
def _(x, token_ids, embedding_weight, neighbors, mix_ratio, seed):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _in_manifold_backward(ctx, grad):
    # The noise is a sampled constant: d(x + eps)/dx = I, and the embedding matrix gets no gradient through it.
    return grad, None, None, None, None, None


torch.library.register_autograd("fusednoise::in_manifold_noise", _in_manifold_backward)


# --------------------------------------------------------------------------------------------- public API
def _reduce(terms: torch.Tensor, per_layer: bool) -> torch.Tensor:
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    return terms if per_layer else terms.sum()


def _check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _diff_norm_terms(clean_items, noisy_items, weights, mask, reduction, paired: bool) -> torch.Tensor:
    first = clean_items[0]
    B, T, D = _layer_shape(first)
    if paired:
        B //= 2
    L = _layer_count(clean_items)
    w = _weights_tensor(weights, L, first.device)
    m = _mask_tensor(mask, B, T, first.device)
    rho, scale = _reference.row_weights(m, _check_reduction(reduction), B, T, D)
    return torch.ops.fusednoise.layerwise_diff_norm(clean_items, noisy_items, w, rho, scale, paired)


def layerwise_diff_norm(clean: Layers, noisy: Layers, weights: Weights = None, mask: Optional[torch.Tensor] = None,
                        reduction: str = DEFAULT_REDUCTION, per_layer: bool = False) -> torch.Tensor:
    """LNSR's penalty ``sum_r w_r * mean_b ||clean_r - noisy_r||^2`` (SPEC section 2) in one fused launch.

    Args:
        clean, noisy: the L clean and L noisy layer outputs, each a sequence of (B, T, D) tensors or a stacked
            (L, B, T, D) tensor; float32, float16 or bfloat16, one shape, dtype and device for all. Any batch and
            token strides are read in place (unit stride along D avoids a copy).
        weights: ``lambda_r``: None (1 for every layer, the papers' default), one number for all layers (the
            journal's grid is {1.0, 0.8, 0.6, 0.4, 0.2}), or L numbers / a (L,) tensor. No gradient flows to them.
        mask: (B, T) tensor, nonzero for real tokens (a Hugging Face ``attention_mask``); padded tokens contribute
            nothing and get a zero gradient. The mean is still over the B examples.
        reduction: what ``||.||^2`` of one example is (the papers do not say; :data:`DEFAULT_REDUCTION` is the
            default, ``docs/lnsr.md`` the evidence): ``"sum"`` over its tokens and hidden units (the formula read
            literally), ``"token_mean"`` summed over hidden units and averaged over its unmasked tokens, or
            ``"mean"`` averaged over its unmasked tokens and hidden units (``F.mse_loss``-style).
        per_layer: return the L weighted terms (float32, shape (L,), summing to the total) instead of the total.

    Returns:
        A float32 scalar (or (L,) tensor), accumulated in float32 whatever the input dtype. Deterministic: the
        same inputs give the same bits (fixed-slot partial sums, no atomics). Backward:
        ``2 w_r m (clean_r - noisy_r) / (B c_b)`` for clean (``c_b`` = 1, the example's token count, or that
        times D), its negation for noisy, one launch for all layers.

    Raises:
        TypeError / ValueError naming the argument: mismatched layer counts, shapes, dtypes or devices, weights of
        the wrong length, a mask that is not (B, T), an unknown reduction.
    """
    clean_items = _as_layer_list(clean, "clean")
    noisy_items = _as_layer_list(noisy, "noisy")
    L = _layer_count(clean_items)
    if _layer_count(noisy_items) != L:
        raise ValueError(f"clean has {L} layers but noisy has {_layer_count(noisy_items)}: they must match")
    first = clean_items[0]
    shape, dtype, device = _layer_shape(first), first.dtype, first.device
    _check_same(clean_items, "clean", shape, dtype, device)
    _check_same(noisy_items, "noisy", shape, dtype, device)
    return _reduce(_diff_norm_terms(clean_items, noisy_items, weights, mask, reduction, False), per_layer)


def layerwise_diff_norm_paired(outputs: Layers, weights: Weights = None, mask: Optional[torch.Tensor] = None,
                               reduction: str = DEFAULT_REDUCTION, per_layer: bool = False) -> torch.Tensor:
    """:func:`layerwise_diff_norm` for layer outputs of one 2B batch: examples ``[:B]`` are the clean pass and
    ``[B:]`` the noisy one (LNSR's batched mode). ``outputs``: L tensors (2B, T, D) or a stacked (L, 2B, T, D)
    tensor; ``mask`` is (B, T). The gradient of each layer is written into one (2B, T, D) buffer (no slicing
    copies)."""
    items = _as_layer_list(outputs, "outputs")
    first = items[0]
    shape, dtype, device = _layer_shape(first), first.dtype, first.device
    _check_same(items, "outputs", shape, dtype, device)
    if shape[0] % 2:
        raise ValueError(f"outputs must hold an even batch (clean then noisy halves), got batch {shape[0]}")
    return _reduce(_diff_norm_terms(items, [], weights, mask, reduction, True), per_layer)


def scaled_noise(x: torch.Tensor, scale: float = DEFAULT_SCALE, seed: Optional[int] = None) -> torch.Tensor:
    """``x + eps`` with Gaussian noise rescaled per token vector: ``||eps_n|| = scale * ||x_n||`` (LNSR's standard
    noise; the journal, sec. III-E, uses scale 0.05).

    ``eps_n = scale * ||x_n|| * e_n / ||e_n||`` with ``e ~ N(0, I)`` drawn from ``philox(seed, ...)`` in the same
    kernel that takes both row norms and adds (rows are the last dimension). A zero row of x gets zero noise. The
    result has x's dtype (computed in float32). Gradients are exact: ``dx = g + scale (e.g)/(|e||x|) x`` per row,
    redrawn from the seed in the backward (no noise tensor is stored).

    Args:
        x: float32/float16/bfloat16 tensor (..., D), e.g. hidden states (B, T, D).
        scale: noise-to-signal norm ratio, >= 0 (default 0.05).
        seed: philox seed in [0, 2**62); None draws one from torch's CPU generator.
    """
    _check_float_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the token vectors are its last dimension)")
    scale = _check_real(scale, "scale")
    if seed is not None:
        rng.check_seed(seed)
    out, _, _ = torch.ops.fusednoise.scaled_noise(x, scale, seed)
    return out


# --------------------------------------------------------------------------------------------- neighbour table
# id(weight) -> (weakref to weight, {(k, shape, device): table}); an entry goes when its weight is freed.
_NEIGHBOR_CACHE: Dict[int, Tuple["weakref.ref", Dict[tuple, torch.Tensor]]] = {}
# (digest of the weight's bytes, dtype, k, shape, device) -> table, for a weight tensor not seen before whose
# values are: each seed of a comparison loads the same pretrained embeddings into a new tensor, and a MiniLM
# table costs about a minute on a CPU. Hashing runs once per new tensor, never per step. Newest last, bounded.
_NEIGHBOR_BY_CONTENT: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_NEIGHBOR_BY_CONTENT_SIZE = 4


def _content_digest(weight: torch.Tensor) -> str:
    data = weight.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def _check_k(k, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k < vocab:
        raise ValueError(f"k must be in [1, {vocab - 1}] (the vocabulary has {vocab} rows), got {k}")
    return k


def _check_embedding(weight, name: str = "embedding_weight") -> None:
    _check_float_tensor(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a (V, D) matrix, got shape {tuple(weight.shape)}")


def nearest_neighbors(embedding_weight: torch.Tensor, k: int = DEFAULT_K, row_chunk: int = 1024,
                      col_chunk: int = 16384) -> torch.Tensor:
    """The k nearest vocabulary rows (Euclidean, self excluded, nearest first) of every row: int64 (V, k).

    Computed in chunks of ``row_chunk`` x ``col_chunk`` scores (a matmul and a top-k each, on the weight's device,
    float32 scores) so no V x V matrix is ever held. Not cached: see :func:`neighbor_table`.
    """
    _check_embedding(embedding_weight)
    k = _check_k(k, embedding_weight.shape[0])
    for value, name in ((row_chunk, "row_chunk"), (col_chunk, "col_chunk")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    with torch.no_grad():
        return _reference.nearest_neighbors(embedding_weight, k, int(row_chunk), int(col_chunk))


def neighbor_table(embedding_weight: torch.Tensor, k: int = DEFAULT_K, refresh: bool = False) -> torch.Tensor:
    """:func:`nearest_neighbors`, computed once per embedding matrix (and k) and cached.

    The cache holds the table as long as the weight tensor lives; it does not follow updates of the weight's
    values during fine-tuning (the journal builds its k-NN index once): pass ``refresh=True`` (or call
    :func:`clear_neighbor_cache`) to recompute from the current values. A new tensor holding the same values as
    one seen before (the same pretrained model loaded again, say for another seed) reuses that table: the last
    few tables are also kept by a digest of the weight's bytes.
    """
    _check_embedding(embedding_weight)
    k = _check_k(k, embedding_weight.shape[0])
    key = id(embedding_weight)
    entry = _NEIGHBOR_CACHE.get(key)
    if entry is None or entry[0]() is not embedding_weight:
        def _drop(_ref, key=key):
            current = _NEIGHBOR_CACHE.get(key)
            if current is not None and current[0] is _ref:
                del _NEIGHBOR_CACHE[key]

        entry = (weakref.ref(embedding_weight, _drop), {})
        _NEIGHBOR_CACHE[key] = entry
    tables = entry[1]
    signature = (k, tuple(embedding_weight.shape), embedding_weight.device)
    if refresh or signature not in tables:
        if embedding_weight.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fusednoise.lnsr.neighbor_table: the k-NN table of this embedding matrix is not "
                               "computed yet, and it cannot be inside a CUDA graph capture (it reads values back "
                               "to the host). Run the captured code once eagerly before capturing.")
        content_key = (_content_digest(embedding_weight), embedding_weight.dtype) + signature
        table = None if refresh else _NEIGHBOR_BY_CONTENT.get(content_key)
        if table is None:
            table = nearest_neighbors(embedding_weight, k)
        _NEIGHBOR_BY_CONTENT[content_key] = table
        _NEIGHBOR_BY_CONTENT.move_to_end(content_key)
        while len(_NEIGHBOR_BY_CONTENT) > _NEIGHBOR_BY_CONTENT_SIZE:
            _NEIGHBOR_BY_CONTENT.popitem(last=False)
        tables[signature] = table
    return tables[signature]


def clear_neighbor_cache() -> None:
    """Forget every cached neighbour table."""
    _NEIGHBOR_CACHE.clear()
    _NEIGHBOR_BY_CONTENT.clear()


def in_manifold_noise(x: torch.Tensor, token_ids: torch.Tensor, embedding_weight: torch.Tensor,
                      k: int = DEFAULT_K, mix_ratio: float = DEFAULT_MIX_RATIO, seed: Optional[int] = None,
                      neighbors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + eps`` with the journal's in-manifold noise (Algorithm 1, lines 9-13).

    For each token: its k nearest vocabulary embeddings ``W[n_j]`` (k = 10 in the journal), differences
    ``d_j = W[n_j] - W[token]``, Gram-Schmidt orthogonalised in neighbour order and *not* normalised, and
    ``eps = sum_j z_j d~_j`` with ``z_j ~ N(0, mix_ratio^2)`` (mix ratio 0.1 to 0.2 in the journal, Table V).
    Differences that are zero or linearly dependent on earlier ones are dropped. One program per token gathers,
    orthogonalises in registers and adds (the reference backend, or a (k, D) tile too large for registers, runs
    the eager version).

    Args:
        x: float32/float16/bfloat16 hidden states (..., D) at the injection point (the embedding output).
        token_ids: integer tensor of shape ``x.shape[:-1]``, the vocabulary ids of the tokens.
        embedding_weight: the (V, D) word-embedding matrix (``model.get_input_embeddings().weight``).
        k: number of neighbours (ignored when ``neighbors`` is given).
        mix_ratio: standard deviation of the mixing coefficients, >= 0.
        seed: philox seed in [0, 2**62); None draws one from torch's CPU generator.
        neighbors: a precomputed (V, k) int64 table; default :func:`neighbor_table` (computed once, cached).

    The noise is a sampled constant for autograd: ``d out / d x = I`` and ``embedding_weight`` gets no gradient
    through it.
    """
    _check_float_tensor(x, "x")
    _check_embedding(embedding_weight)
    if x.dim() < 1 or x.shape[-1] != embedding_weight.shape[1]:
        raise ValueError(f"x's last dimension must match embedding_weight's D = {embedding_weight.shape[1]}, "
                         f"got x of shape {tuple(x.shape)}")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("token_ids must be an int32 or int64 tensor, got "
                        f"{token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}")
    if tuple(token_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"token_ids must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                         f"got {tuple(token_ids.shape)}")
    for tensor, name in ((token_ids, "token_ids"), (embedding_weight, "embedding_weight")):
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, expected x's device {x.device}")
    mix_ratio = _check_real(mix_ratio, "mix_ratio")
    if seed is not None:
        rng.check_seed(seed)
    V = embedding_weight.shape[0]
    if token_ids.device.type == "cpu" and token_ids.numel() and (
            int(token_ids.min()) < 0 or int(token_ids.max()) >= V):
        raise ValueError(f"token_ids must lie in [0, {V}) (the embedding matrix's rows)")
    if neighbors is None:
        neighbors = neighbor_table(embedding_weight, k)
    else:
        if not isinstance(neighbors, torch.Tensor) or neighbors.dim() != 2 or neighbors.shape[0] != V \
                or neighbors.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"neighbors must be an integer (V, k) table with V = {V}")
        if neighbors.device != x.device:
            raise ValueError(f"neighbors is on {neighbors.device}, expected x's device {x.device}")
    return torch.ops.fusednoise.in_manifold_noise(x, token_ids, embedding_weight.detach(), neighbors.to(torch.int64),
                                                  mix_ratio, seed)


__all__ = [
    "DEFAULT_K", "DEFAULT_MIX_RATIO", "DEFAULT_REDUCTION", "DEFAULT_SCALE", "REDUCTIONS", "clear_neighbor_cache", "in_manifold_noise",
    "layerwise_diff_norm", "layerwise_diff_norm_paired", "nearest_neighbors", "neighbor_table", "scaled_noise",
]
