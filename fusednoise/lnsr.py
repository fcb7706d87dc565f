"""LNSR (Hua et al. 2021; journal version 2023): layer-wise noise stability regularisation.

Noise is injected at the input of layer ``b`` (default 0: the embedding output) and every layer from ``b`` on is
penalised for how far its output moves::

    R = sum_{r=b}^{L-1} lambda_r * mean_b || f^{b,r}(x_b + eps) - f^{b,r}(x_b) ||^2
    loss = task_loss(f(x)) + R          (gradients flow through both the clean and the noisy pass)

The papers do not say what ``||.||^2`` sums over. ``reduction=`` offers the three readings (SPEC section 2):
``"sum"`` over the example's tokens and hidden units (the formula read literally), ``"token_mean"`` (summed over
hidden units, averaged over its real tokens) and ``"mean"`` (averaged over both); padded tokens never count.
The default, :data:`DEFAULT_REDUCTION`, is the one the measurements in ``docs/lnsr.md`` support.

Usage::

    from fusednoise import lnsr

    reg = lnsr.LNSR(model, scale=0.05)                 # standard noise, b = 0, lambda_r = 1 (the papers' defaults)
    outputs, penalty = reg(**batch)                    # batch as for model(**batch), labels included
    (outputs.loss + penalty).backward()

Pieces (all also usable alone):

* :func:`layerwise_diff_norm`: the penalty for L pairs of hidden states in one fused launch (forward and
  backward), float32 accumulation, deterministic.
* :func:`scaled_noise`: standard noise, ``||eps|| = scale * ||x||`` per token vector (journal sec. III-E: 0.05).
* :func:`in_manifold_noise` + :func:`neighbor_table`: the journal's in-manifold noise (Algorithm 1): k = 10
  nearest vocabulary embeddings per token, their differences Gram-Schmidt-orthogonalised (not normalised),
  combined with ``N(0, mix_ratio^2)`` coefficients (mix ratio 0.1 to 0.2).

How :class:`LNSR` runs the two passes
-------------------------------------
The clean pass is ``model(**batch)`` with forward hooks on the layers (found by
:func:`fusednoise.integrations.transformers.find_layers`): they record the hidden states entering layer ``b`` and
every layer's output. The noisy pass runs the model a second time with

* the layers below ``b`` turned into pass-throughs that return their cached clean outputs (they are not run
  twice; only the embedding lookup in front of them is repeated),
* the input of layer ``b`` replaced by ``x_b + eps`` (``x_b`` from the clean pass, so gradients reach the lower
  layers through it) for standard noise; in-manifold noise instead goes where the journal puts it, into the output
  of ``model.get_input_embeddings()`` (the word embeddings, before position embeddings, the embedding LayerNorm and
  its dropout, which the noisy pass runs again),
* the pass stopped right after the last layer (no second final norm, task head or loss).

The model's own forward wires the noisy pass, so whatever a model passes between layers (attention masks, rotary
embeddings, T5's position bias and its encoder output feeding the decoder, XLNet's two streams) is handled the way
the model handles it. "A layer's output" is the hidden-state tensor it returns (the first element when it returns
a tuple). XLNet's (T, B, D) hidden states are read transposed, in place.

Randomness: the noise seed is drawn once per call from torch's CPU generator (``torch.manual_seed`` reproduces a
run). With ``replay_rng=True`` the noisy pass then replays the clean pass's random draws: torch's CPU and
CUDA generator states are set back to where the clean pass started, and each pass-through layer leaves them where
its clean call did; afterwards they continue from where they were (on the offset path of the noise ops, inside
``rng.graph_safe()``, the device's offset counter too, and the injected noise leaves it alone; inside a CUDA graph
capture ``replay_rng=True`` raises a RuntimeError, as torch's CUDA generator cannot be set back there). Both passes
therefore see the same dropout masks (and the same HyPe noise), the penalty measures the injected noise alone,
and ``scale=0`` gives a penalty of exactly 0. ``replay_rng=False`` lets the passes draw independently, as two
plain calls of the model would from layer ``b`` on (the penalty then also contains the dropout difference, R-Drop
style; below ``b`` the clean pass's outputs are reused, dropout included). The default,
:data:`DEFAULT_REPLAY_RNG`, is in ``docs/lnsr.md``.

Batched mode (``batched=True``): one forward in which, from layer ``b`` on, the batch is doubled to 2B (clean
then noisy half; attention masks and other batch-first tensors handed to the layers are repeated) and cut back to
B after the last layer, so the task head sees the clean half only. It launches half as many kernels for the
layers from ``b`` on and its penalty gradient lands in one buffer per layer, but it draws independent dropout
for the two halves (``replay_rng`` is not possible) and supports batch-first encoder or decoder stacks only
(BERT, RoBERTa, ELECTRA, ALBERT, GPT-2, LLaMA, Mistral, Qwen2). With ``output_hidden_states=True`` the hidden
states it returns for layers from ``b`` on hold 2B examples. Which mode is faster depends on the GPU and the batch
(small, launch-bound batches should gain most from 2B); ``benchmarks/test_bench_lnsr.py`` times both
(``lnsr-fused`` vs ``lnsr-batched``). The default is two passes because it works for every architecture and
can replay dropout; no GPU timing has been taken yet to justify switching the default.

Composes with HyPe: ``hype.apply(model)`` on the same model adds HyPe's noise to every layer input in both passes
(the combination experiments of the HyPe paper); with ``replay_rng`` both passes see the same HyPe noise from
layer ``b`` on.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import graph_offsets, rng
from .ops_lnsr import (DEFAULT_K, DEFAULT_MIX_RATIO, DEFAULT_REDUCTION, DEFAULT_SCALE, REDUCTIONS,
                       clear_neighbor_cache, in_manifold_noise, layerwise_diff_norm, layerwise_diff_norm_paired,
                       nearest_neighbors, neighbor_table, scaled_noise)
from .validation import check_module_list

NOISES = ("standard", "in_manifold")
# Whether the noisy pass replays the clean pass's dropout by default (two passes): see docs/lnsr.md.
DEFAULT_REPLAY_RNG = False
# Model types whose layers take batch-first hidden states and batch-first extra tensors, checked by the tests in
# batched mode. Encoder-decoder models (the decoder would need the noisy encoder output on a batch of B), XLNet
# ((T, B, D) layout, masks batched on dim 2) and DeBERTa-v2 (its optional conv mixes layer 0's output with the
# B-sized embedding output) are left to the two-pass mode.
BATCHED_MODEL_TYPES = ("bert", "roberta", "electra", "albert", "gpt2", "llama", "mistral", "qwen2")
TIME_MAJOR_MODEL_TYPES = ("xlnet",)

WeightsSpec = Union[None, float, Sequence[float], torch.Tensor]


class _StopNoisyPass(Exception):
    """Raised by the hook after the last layer of the noisy pass: the rest of the model is not needed."""


def _first_parameter_name(module: nn.Module) -> Optional[str]:
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if parameters and parameters[0].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                             inspect.Parameter.KEYWORD_ONLY):
        return parameters[0].name
    return None


def _hooks_run_inside_checkpoint(layer: nn.Module) -> bool:
    # transformers versions that checkpoint GradientCheckpointingLayer.__call__ (5.17 among them) run module hooks
    # inside the checkpoint and again on the backward recompute; 5.24 checkpoints forward only.
    return bool(getattr(layer, "gradient_checkpointing", False)) and type(layer).__call__ is not nn.Module.__call__


def _hidden_of(output):
    """The hidden-state tensor of a layer's output (the first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"LNSR cannot find the hidden states in a layer output of type {type(output).__name__}")


def _repeat_batch(value, batch: int):
    """Repeat batch-first tensors (dim 0 == batch, at least 2-D) to 2 * batch; recurse into tuples and lists."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return torch.cat([value, value], dim=0)
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_repeat_batch(v, batch) for v in value)
    if isinstance(value, list):
        return [_repeat_batch(v, batch) for v in value]
    return value


def _cut_batch(value, batch: int):
    """Keep the clean half of 2B-batched tensors in a layer's output."""
    if isinstance(value, torch.Tensor):
        return value[:batch] if value.dim() >= 1 and value.shape[0] == 2 * batch else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cut_batch(v, batch) for v in value)
    if isinstance(value, list):
        return [_cut_batch(v, batch) for v in value]
    return value


_is_capturing = torch.cuda.is_current_stream_capturing  # a name of its own: a CPU test forces a capture


class _RngState:
    """torch's CPU generator and, when the hidden states live there, the CUDA generator of their device; on the
    offset path of the noise ops (``rng.graph_safe()``) also the device's offset counter, as a device copy: the
    seeds replay from the CPU generator, and the offsets must replay too for the same noise.

    Not while a CUDA graph is being captured on the device (a RuntimeError): setting torch's CUDA generator back
    is a host operation that a capture does not record, so the graph would not replay the clean pass's dropout."""

    def __init__(self, device: torch.device):
        if device.type == "cuda" and _is_capturing():
            raise RuntimeError(
                "LNSR(replay_rng=True) cannot run inside a CUDA graph capture: replaying the clean pass's dropout "
                "sets torch's CUDA generator back, which a capture does not record (each replay of the graph would "
                "draw the noisy pass's dropout anew). Use replay_rng=False (the default: each pass draws its own "
                "dropout) for captured code.")
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.offsets = rng.save_offsets(device) if graph_offsets.offset_path_active(device) else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        if self.offsets is not None:
            rng.restore_offsets(self.offsets)


class _Run:
    """The state of one LNSR call."""

    def __init__(self, mode: str):
        self.mode = mode                  # "clean", "noisy" or "batched"
        self.call = 0                     # index of the next layer call (a layer's depth)
        self.stack: List[int] = []        # depths of the layer calls in progress
        self.outputs: Dict[int, object] = {}    # clean pass: the raw outputs of the layers below b
        self.hidden: Dict[int, torch.Tensor] = {}  # this pass's hidden outputs from b on
        self.x_b: Optional[torch.Tensor] = None
        self.embedded = False             # noisy pass, in-manifold: the noise went into the word embeddings
        self.batch: Optional[int] = None
        self.seed: Optional[int] = None   # the noise seed, drawn before the pass
        self.rng_start: Optional[_RngState] = None            # generator states at the start of the clean pass
        self.rng_after: Dict[int, _RngState] = {}             # ... and after each clean layer call below b


class LNSR:
    """Layer-wise noise stability regularisation for a Hugging Face model (or any model whose layers
    :func:`~fusednoise.integrations.transformers.find_layers` finds).

    ``reg = LNSR(model)``, then ``outputs, penalty = reg(**batch)`` and ``loss = outputs.loss + penalty``.

    Args:
        model: the model; its ``training`` flag decides: in eval mode ``reg(**batch)`` is ``model(**batch)``
            (no hooks, no second pass) with a penalty of 0.
        scale: standard noise, ``||eps|| = scale * ||x||`` per token vector (journal sec. III-E: 0.05).
        inject_layer: ``b``, the depth whose input gets the noise (0: the embedding output, the papers' choice).
            Depths count layer calls: for ALBERT, whose layer is shared, depth d is the d-th call.
        weights: ``lambda_r`` for the layers ``b .. L-1``: None (1 each, the papers' default), one number for all
            (the journal's grid {1.0, 0.8, 0.6, 0.4, 0.2}), or ``L - b`` numbers.
        noise: "standard" (scaled Gaussian, added to the input of layer ``b``) or "in_manifold" (journal
            Algorithm 1, added where the journal adds it: to the output of ``model.get_input_embeddings()``,
            before position embeddings and the embedding LayerNorm; needs ``input_ids`` in the batch,
            ``inject_layer=0`` and two passes).
        k: neighbours per token for in-manifold noise (journal: 10).
        mix_ratio: standard deviation of the in-manifold mixing coefficients (journal: 0.1 to 0.2).
        batched: run the clean and noisy pass from layer ``b`` on as one 2B batch (see the module docstring).
        replay_rng: True: the noisy pass replays the clean pass's random draws (dropout masks, HyPe noise), so
            the penalty measures the injected noise alone; False: each pass draws its own (two plain forward
            calls; the penalty then also measures dropout). None: :data:`DEFAULT_REPLAY_RNG` for two passes,
            False in batched mode (which cannot replay, and raises if asked).
        layers: the layer modules, in forward order, if :func:`find_layers` should not choose them.
        reduction: what ``||.||^2`` of one example is: "sum" over its tokens and hidden units (the papers'
            formula read literally), "token_mean" (summed over hidden units, averaged over its real tokens) or
            "mean" (averaged over its real tokens and hidden units); every one averages over the batch. Default
            :data:`DEFAULT_REDUCTION`; ``docs/lnsr.md`` has the measurements behind it.

    Attributes after a training call: ``last_terms`` (the per-layer penalty terms, float32, detached).
    """

    def __init__(self, model: nn.Module, scale: float = DEFAULT_SCALE, inject_layer: int = 0,
                 weights: WeightsSpec = None, noise: str = "standard", k: int = DEFAULT_K,
                 mix_ratio: float = DEFAULT_MIX_RATIO, batched: bool = False, replay_rng: Optional[bool] = None,
                 layers: Optional[Sequence[nn.Module]] = None, reduction: str = DEFAULT_REDUCTION):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.scale = _real(scale, "scale")
        if not isinstance(noise, str) or noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.noise = noise
        self.mix_ratio = _real(mix_ratio, "mix_ratio")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = int(k)
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be a bool, got {type(batched).__name__}")
        self.batched = batched
        if replay_rng is None:
            replay_rng = DEFAULT_REPLAY_RNG and not batched
        if not isinstance(replay_rng, bool):
            raise TypeError(f"replay_rng must be a bool or None, got {type(replay_rng).__name__}")
        if batched and replay_rng:
            raise ValueError("replay_rng=True needs two passes: batched=True draws the two halves' dropout together")
        self.replay_rng = replay_rng
        if not isinstance(reduction, str) or reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

        config = getattr(model, "config", None)
        self.model_type = getattr(config, "model_type", None)
        self.time_major = self.model_type in TIME_MAJOR_MODEL_TYPES
        self.layers, self.stack_of = self._resolve_layers(layers)
        self.depth = self._depth(config)
        if isinstance(inject_layer, bool) or not isinstance(inject_layer, numbers.Integral):
            raise TypeError(f"inject_layer must be an int, got {type(inject_layer).__name__}")
        if not 0 <= inject_layer < self.depth:
            raise ValueError(f"inject_layer must be in [0, {self.depth - 1}] (the model has {self.depth} layers), "
                             f"got {inject_layer}")
        self.inject_layer = int(inject_layer)
        self.weights = weights  # checked by the property's setter
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        if batched and self.model_type not in BATCHED_MODEL_TYPES:
            raise ValueError(f"batched=True supports the model types {BATCHED_MODEL_TYPES}; "
                             f"{type(model).__name__} (model_type {self.model_type!r}) needs batched=False")
        if noise == "in_manifold":
            if self.inject_layer != 0:
                raise ValueError("noise='in_manifold' is defined on the word-embedding space: it needs "
                                 f"inject_layer=0, got {inject_layer}")
            if batched:
                raise ValueError("noise='in_manifold' goes into the word embeddings, before the embedding layer "
                                 "that batched=True runs once for both halves: use batched=False")
            embedding = self._embedding_weight()
            if not 1 <= self.k < embedding.shape[0]:
                raise ValueError(f"k must be in [1, {embedding.shape[0] - 1}] (the vocabulary size - 1), got {k}")
        self.last_terms: Optional[torch.Tensor] = None
        self._run: Optional[_Run] = None
        self._kwarg_names = {id(m): _first_parameter_name(m) for m in self._distinct_layers()}

    # ----------------------------------------------------------------------------------------- set-up helpers
    def _resolve_layers(self, layers):
        if layers is None:
            from .layers import find_layer_stacks

            stacks = find_layer_stacks(self.model)
            found = [layer for stack in stacks for layer in stack]
            stack_of = {}
            for index, stack in enumerate(stacks):
                for layer in stack:
                    stack_of.setdefault(id(layer), index)
            return found, stack_of
        found = check_module_list(layers, "layers")
        if not found or not all(isinstance(m, nn.Module) for m in found):
            raise ValueError("layers must be a non-empty list of nn.Module objects")
        return found, {id(layer): 0 for layer in found}

    def _distinct_layers(self) -> List[nn.Module]:
        seen, distinct = set(), []
        for layer in self.layers:
            if id(layer) not in seen:
                seen.add(id(layer))
                distinct.append(layer)
        return distinct

    def _depth(self, config) -> int:
        if self.model_type == "albert" and config is not None:
            # One shared layer per group member, called at every depth: num_hidden_layers group calls, each
            # running the group's inner_group_num layers.
            return int(config.num_hidden_layers) * int(getattr(config, "inner_group_num", 1))
        return len(self.layers)

    @property
    def weights(self) -> Optional[Tuple[float, ...]]:
        """``lambda_r`` for the layers ``b .. L-1`` (None: 1 each). A tuple, so it cannot change in place:
        assign a new value (None, a number or ``L - b`` numbers, checked as in the constructor) and the next call
        uses it."""
        return self._lambdas

    @weights.setter
    def weights(self, weights: WeightsSpec) -> None:
        self._lambdas = self._check_weights(weights)
        # the weights as a float32 tensor per device, made at the first call on that device after an assignment
        self._weights_on: Dict[torch.device, torch.Tensor] = {}

    def _check_weights(self, weights) -> Optional[Tuple[float, ...]]:
        count = self.depth - self.inject_layer
        if weights is None:
            return None
        if isinstance(weights, numbers.Real) and not isinstance(weights, bool):
            return (_real(weights, "weights"),) * count
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().tolist()
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be None, a number or a sequence of numbers, got {type(weights).__name__}")
        if len(weights) != count:
            raise ValueError(f"weights must have one entry per penalised layer: {count} (layers {self.inject_layer}"
                             f" to {self.depth - 1}), got {len(weights)}")
        return tuple(_real(w, f"weights[{i}]") for i, w in enumerate(weights))

    def _embedding_weight(self) -> torch.Tensor:
        get = getattr(self.model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("noise='in_manifold' needs the model's word embeddings (model.get_input_embeddings()"
                             f".weight); {type(self.model).__name__} has none")
        return weight

    def _word_embeddings(self) -> List[nn.Module]:
        """``model.get_input_embeddings()`` and the modules of its type that share its weight (T5's encoder and
        decoder each look the tokens up through their own ``embed_tokens``, tied to ``shared``)."""
        embedding = self.model.get_input_embeddings()
        return [m for m in self.model.modules() if m is embedding or (
            type(m) is type(embedding) and getattr(m, "weight", None) is embedding.weight)]

    def refresh_neighbors(self) -> None:
        """Recompute the in-manifold neighbour table from the current word embeddings."""
        if self.noise == "in_manifold":
            neighbor_table(self._embedding_weight(), self.k, refresh=True)

    # ----------------------------------------------------------------------------------------- hooks
    def _hidden_arg(self, module, args, kwargs):
        if args:
            return args[0], True
        name = self._kwarg_names.get(id(module))
        if name is not None and name in kwargs:
            return kwargs[name], False
        raise TypeError(f"LNSR found no hidden states in the call of {type(module).__name__}: expected them as the "
                        f"first positional argument or as {name!r}=")

    def _with_hidden(self, module, args, kwargs, hidden, in_args):
        if in_args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[self._kwarg_names[id(module)]] = hidden
        return args, kwargs

    def _pre_hook(self, module, args, kwargs):
        run = self._run
        if run is None:
            return None
        depth = run.call
        run.call += 1
        run.stack.append(depth)
        b = self.inject_layer
        if run.mode == "clean":
            if depth == b:
                run.x_b, _ = self._hidden_arg(module, args, kwargs)
            return None
        if run.mode == "noisy":
            if depth != b:
                return None
            if self.noise == "in_manifold":
                if not run.embedded:
                    raise RuntimeError(f"noise='in_manifold': {type(self.model).__name__} did not call its input "
                                       "embeddings (model.get_input_embeddings()) before layer 0 in the noisy pass")
                return None
            _, in_args = self._hidden_arg(module, args, kwargs)
            return self._with_hidden(module, args, kwargs, self._make_noise(run.x_b, run.seed), in_args)
        # batched
        if depth < b:
            return None
        hidden, in_args = self._hidden_arg(module, args, kwargs)
        if depth == b:
            run.batch = hidden.shape[0]
            hidden = torch.cat([hidden, self._make_noise(hidden, run.seed)], dim=0)
        batch = run.batch
        args = tuple(_repeat_batch(a, batch) for a in (args[1:] if in_args else args))
        if in_args:
            args = (hidden,) + args
        kwargs = {key: _repeat_batch(value, batch) for key, value in kwargs.items()}
        return self._with_hidden(module, args, kwargs, hidden, in_args)

    def _post_hook(self, module, args, kwargs, output):
        run = self._run
        if run is None or not run.stack:
            return None
        depth = run.stack.pop()
        b = self.inject_layer
        if depth < b:
            if run.mode == "clean":
                run.outputs[depth] = output
                if self.replay_rng:
                    run.rng_after[depth] = _RngState(run.rng_start.device)
            return None
        run.hidden[depth] = _hidden_of(output)
        if run.mode == "noisy" and depth == self.depth - 1:
            raise _StopNoisyPass
        if run.mode == "batched" and depth == self.depth - 1:
            return _cut_batch(output, run.batch)
        return None

    def _make_noise(self, x_b: torch.Tensor, seed: int) -> torch.Tensor:
        with self._offsets_kept(x_b.device):
            return scaled_noise(x_b, self.scale, seed=seed)

    @contextlib.contextmanager
    def _offsets_kept(self, device: torch.device) -> Iterator[None]:
        # On the offset path of the noise ops (CUDA graphs) with replay_rng, the injected noise's ticket would shift
        # the offsets of the replayed draws after it (HyPe's calls): it reads the counter's next value and leaves the
        # counter as it was. Its own seed keys its words apart from those draws.
        if not (self.replay_rng and graph_offsets.offset_path_active(device)):
            yield
            return
        saved = rng.save_offsets(device)
        try:
            yield
        finally:
            rng.restore_offsets(saved)

    def _embedding_hook(self, module, args, output):
        # In-manifold noise, noisy pass: x_w + eps on the word-embedding lookup of the first stack (the encoder's
        # for T5), whose input is the token ids (already transposed for XLNet).
        run = self._run
        if run is None or run.mode != "noisy" or run.call != 0 or run.embedded or not args:
            return None
        ids = args[0]
        if not isinstance(output, torch.Tensor) or not isinstance(ids, torch.Tensor) \
                or tuple(ids.shape) != tuple(output.shape[:-1]):
            raise ValueError("noise='in_manifold' needs the input embeddings called on token ids: got "
                             f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))} -> "
                             f"{tuple(getattr(output, 'shape', ()))}")
        run.embedded = True
        weight = self._embedding_weight()
        with self._offsets_kept(output.device):
            return in_manifold_noise(output, ids, weight, self.k, self.mix_ratio, seed=run.seed,
                                     neighbors=neighbor_table(weight, self.k))

    def _install(self, passthrough: bool):
        handles, patched = [], []
        if self.noise == "in_manifold":
            handles.extend(m.register_forward_hook(self._embedding_hook) for m in self._word_embeddings())
        for layer in self._distinct_layers():
            handles.append(layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(self._post_hook, with_kwargs=True))
            if passthrough:
                patched.append((layer, layer.__dict__.get("forward", None)))
                layer.forward = self._passthrough_forward(layer, layer.forward)
        return handles, patched

    def _passthrough_forward(self, layer, original):
        def forward(*args, **kwargs):
            run = self._run
            if run is not None and run.mode == "noisy" and run.stack and run.stack[-1] < self.inject_layer:
                depth = run.stack[-1]
                if depth in run.rng_after:
                    run.rng_after[depth].restore()  # as if the layer had drawn its dropout again
                return run.outputs[depth]
            return original(*args, **kwargs)
        return forward

    @staticmethod
    def _uninstall(handles, patched) -> None:
        for handle in handles:
            handle.remove()
        for layer, previous in patched:
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous

    def _forward(self, mode: str, args, kwargs, passthrough: bool = False, run: Optional[_Run] = None):
        run = run or _Run(mode)
        run.mode = mode
        run.call, run.stack, run.hidden = 0, [], {}
        handles, patched = self._install(passthrough)
        self._run = run
        outputs = None
        resume = None
        try:
            if self.replay_rng:
                if mode == "clean":
                    run.rng_start = _RngState(self._device(args, kwargs))
                else:
                    # Replay the clean pass's draws; afterwards carry on from where the generators were.
                    resume = _RngState(run.rng_start.device)
                    run.rng_start.restore()
            outputs = self.model(*args, **kwargs)
        except _StopNoisyPass:
            pass
        finally:
            self._run = None
            self._uninstall(handles, patched)
            if resume is not None:
                resume.restore()
        if run.call != self.depth:
            raise RuntimeError(
                f"LNSR expected {self.depth} layer calls per forward of {type(self.model).__name__}, "
                f"observed {run.call} in the {mode} pass; pass layers= explicitly if the layer finder "
                "chose the wrong modules")
        return outputs, run

    # ----------------------------------------------------------------------------------------- the call
    def __call__(self, *args, **kwargs):
        """Run the clean (and noisy) pass: returns ``(outputs, penalty)``; ``outputs`` is the clean pass's."""
        model = self.model
        if not model.training:
            outputs = model(*args, **kwargs)
            return outputs, self._zero()
        for layer in self._distinct_layers():
            if _hooks_run_inside_checkpoint(layer):
                raise RuntimeError(
                    f"LNSR cannot run while {type(layer).__name__} runs its hooks inside gradient checkpointing (this "
                    "transformers version checkpoints the layer's __call__, so the recompute would not see the noise)"
                    ": turn gradient checkpointing off or use transformers >= 5.24, which checkpoints forward only")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.noise == "in_manifold" and not isinstance(ids, torch.Tensor):
            raise ValueError("noise='in_manifold' needs the token ids: call reg(input_ids=..., ...)")
        if self.batched:
            run = _Run("batched")
            run.seed = rng.draw_seed()
            outputs, run = self._forward("batched", args, kwargs, run=run)
            return outputs, self._penalty(run, None, kwargs)
        outputs, clean = self._forward("clean", args, kwargs)
        noisy_run = _Run("noisy")
        noisy_run.seed = rng.draw_seed()  # before the replay, so it is not one of the clean pass's draws
        noisy_run.x_b, noisy_run.outputs = clean.x_b, clean.outputs
        noisy_run.rng_start, noisy_run.rng_after = clean.rng_start, clean.rng_after
        _, noisy = self._forward("noisy", args, kwargs, passthrough=self.inject_layer > 0, run=noisy_run)
        penalty = self._penalty(clean, noisy, kwargs)
        return outputs, penalty

    def _device(self, args, kwargs) -> torch.device:
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _zero(self) -> torch.Tensor:
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)

    def _weights(self, device) -> Optional[torch.Tensor]:
        if self.weights is None:
            return None
        if device not in self._weights_on:
            self._weights_on[device] = torch.tensor(self.weights, dtype=torch.float32).to(device)
        return self._weights_on[device]

    def _batch_first(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.transpose(0, 1) if self.time_major else hidden

    def _mask_for(self, depth_layer_stack: int, kwargs, shape):
        key = "decoder_attention_mask" if (self.encoder_decoder and depth_layer_stack > 0) else "attention_mask"
        mask = kwargs.get(key)
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
            raise ValueError(f"LNSR needs {key} as a (B, T) tensor matching the hidden states {tuple(shape)}, "
                             f"got {tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        return mask

    def _stack_at(self, depth: int) -> int:
        if self.model_type == "albert":
            return 0
        return self.stack_of.get(id(self.layers[depth]), 0)

    def _penalty(self, clean: _Run, noisy: Optional[_Run], kwargs) -> torch.Tensor:
        b = self.inject_layer
        depths = list(range(b, self.depth))
        first = clean.hidden[depths[0]]
        weights = self._weights(first.device)
        # Consecutive depths with one shape and one mask are one fused launch (one group for most models; the
        # encoder and the decoder for T5).
        groups, current = [], None
        for depth in depths:
            c = self._batch_first(clean.hidden[depth])
            stack = self._stack_at(depth)
            key = (tuple(c.shape), stack)
            if current is None or current[0] != key:
                current = (key, [], [], [])
                groups.append(current)
            current[1].append(c)
            current[2].append(self._batch_first(noisy.hidden[depth]) if noisy is not None else None)
            current[3].append(depth - b)
        terms = []
        for (shape, stack), cs, ns, positions in groups:
            w = None if weights is None else weights[positions[0]:positions[-1] + 1]
            if noisy is None:
                batch = shape[0] // 2
                mask = self._mask_for(stack, kwargs, (batch, shape[1]))
                terms.append(layerwise_diff_norm_paired(cs, w, mask, reduction=self.reduction, per_layer=True))
            else:
                mask = self._mask_for(stack, kwargs, shape[:2])
                terms.append(layerwise_diff_norm(cs, ns, w, mask, reduction=self.reduction, per_layer=True))
        terms = torch.cat(terms) if len(terms) > 1 else terms[0]
        self.last_terms = terms.detach()
        return terms.sum()

    def __repr__(self) -> str:
        mode = "batched" if self.batched else "two passes"
        dropout = "replayed" if self.replay_rng else "independent"
        return (f"LNSR({type(self.model).__name__}, noise={self.noise!r}, scale={self.scale:g}, "
                f"inject_layer={self.inject_layer}, depth={self.depth}, reduction={self.reduction!r}, {mode}, "
                f"{dropout} dropout)")


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


__all__ = [
    "BATCHED_MODEL_TYPES", "DEFAULT_K", "DEFAULT_MIX_RATIO", "DEFAULT_REDUCTION", "DEFAULT_REPLAY_RNG",
    "DEFAULT_SCALE", "LNSR", "NOISES", "REDUCTIONS",
    "clear_neighbor_cache", "in_manifold_noise", "layerwise_diff_norm", "layerwise_diff_norm_paired",
    "nearest_neighbors", "neighbor_table", "scaled_noise",
]
