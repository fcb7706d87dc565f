"""NoisyTune (Wu et al., 2022, "NoisyTune: A Little Noise Can Help You Finetune Pretrained Language Models
Better"): perturb the pretrained weights once, before fine-tuning.

For every parameter matrix ``W``: ``W <- W + U(-lambda/2, lambda/2) * std(W)`` with the unbiased standard
deviation of that matrix (SPEC section 3). The exact arithmetic and random numbers are in
:mod:`fusednoise.reference.noisytune`. On the Triton backend all matrices of one device and dtype take two
launches (per-matrix statistics, then the noise), whatever their number.

The paper perturbs the *pretrained* model's matrices. A Hugging Face task model (``...ForSequenceClassification``
and the like) adds a freshly initialised head outside ``model.base_model``; that head is not pretrained, so it is
left alone by default and reported as skipped (``include_head=True`` perturbs it too).

FSDP2-sharded parameters (DTensors, SPEC section 4c) are perturbed on their local shards with the std of the
whole matrix (the shards' moments merged across the ranks, one collective for all matrices) and the noise of
each element keyed by its index in the unsharded matrix: the same noise as on the unwrapped model.

DeepSpeed ZeRO-3 parameters (placeholders whose data the ranks hold in slices) are gathered whole for the
perturbation (``deepspeed.zero.GatheredParameters``, rank 0's result partitioned back), so each std is the whole
matrix's; DeepSpeed's float32 master weights must then take the change
(:func:`fusednoise.integrations.deepspeed.refresh_master_weights`; ``FusedNoiseTrainer`` does it).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from . import backends as _backends
from . import rng
from . import sharding
from .validation import check_name_patterns, first_overlap, memory_span
from .reference import noisytune as _reference

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = _KERNEL_DTYPES + (torch.float64,)


@dataclass
class PerturbReport:
    """What :func:`perturb_` did: which tensors it perturbed (with their std), which it skipped and why."""

    noise_lambda: float
    seed: int
    perturbed: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    std: Dict[str, float] = field(default_factory=dict)

    @property
    def n_perturbed(self) -> int:
        return len(self.perturbed)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def reasons(self) -> Dict[str, int]:
        """How many tensors were skipped for each reason."""
        counts: Dict[str, int] = defaultdict(int)
        for reason in self.skipped.values():
            counts[reason] += 1
        return dict(counts)

    def __str__(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons().items()))
        text = f"NoisyTune(lambda={self.noise_lambda:g}): perturbed {self.n_perturbed} tensors"
        return text + (f", skipped {self.n_skipped} ({why})" if self.skipped else ", skipped 0")


HEAD_REASON = "task head (outside model.base_model: not pretrained; include_head=True perturbs it)"


def _head_names(model: torch.nn.Module) -> set:
    """Names of the parameters of a Hugging Face task model that lie outside ``model.base_model`` (its freshly
    initialised head); empty for a base model, a plain module, or a wrapper whose base model holds everything."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, torch.nn.Module) or base is model:
        return set()
    inside = {id(p) for p in base.parameters()}
    return {name for name, p in model.named_parameters() if id(p) not in inside}


def _named_tensors(model_or_params) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, torch.nn.Module):
        return list(model_or_params.named_parameters())
    if isinstance(model_or_params, torch.Tensor):
        return [("0", model_or_params)]
    try:
        items = list(model_or_params)
    except TypeError:
        raise TypeError("model_or_params must be an nn.Module, a tensor, or an iterable of tensors or "
                        f"(name, tensor) pairs, got {type(model_or_params).__name__}") from None
    named = []
    seen = set()
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, tensor = item
        else:
            name, tensor = str(i), item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_or_params[{i}] must be a tensor or a (name, tensor) pair, got "
                            f"{type(tensor).__name__}")
        if id(tensor) in seen:  # tied parameters are perturbed once, as named_parameters() does
            continue
        seen.add(id(tensor))
        named.append((name, tensor))
    return named


def _skip_reason(name: str, x: torch.Tensor, exclude: Tuple[str, ...], head: set) -> Optional[str]:
    if any(pattern in name for pattern in exclude):
        return "excluded"
    if name in head:
        return HEAD_REASON
    if x.is_complex() or not x.is_floating_point():
        return "not a real floating-point tensor"
    if x.dtype not in _SUPPORTED_DTYPES:
        return f"unsupported dtype {x.dtype}"
    if x.layout != torch.strided or x.device.type == "meta":
        return "not a dense tensor with data"
    if x.numel() < 2:
        return "fewer than 2 elements (no unbiased std)"
    return None


def perturb_(model_or_params: Union[torch.nn.Module, Iterable], noise_lambda: float = 0.15,
             exclude: Union[str, Iterable[str]] = (), seed: Optional[int] = None,
             include_head: bool = False) -> PerturbReport:
    """NoisyTune: ``W += U(-noise_lambda/2, noise_lambda/2) * std(W)`` for every parameter matrix, in place.

    Args:
        model_or_params: an ``nn.Module`` (its ``named_parameters()``), or an iterable of tensors or
            ``(name, tensor)`` pairs (unnamed tensors are named by their position).
        noise_lambda: the relative noise intensity, finite and >= 0 (paper: 0.15 on GLUE, 0.1 on XTREME).
        exclude: names left untouched: a parameter is excluded when one of these strings occurs in its name
            (e.g. ``"word_embeddings"``: the paper leaves token embeddings alone for multilingual models).
        seed: philox seed in [0, 2**62); ``None`` draws one from torch's CPU generator.
        include_head: also perturb the parameters of a Hugging Face task model that lie outside
            ``model.base_model`` (the task head, freshly initialised, which the paper does not perturb). Default
            False: they are skipped with the reason ``HEAD_REASON``. Ignored for tensors and lists of tensors.

    ``std`` is the matrix's unbiased standard deviation (float32). On an FSDP2-wrapped model (DTensor
    parameters) each rank perturbs its shards with the std of the whole matrix and the noise of the unsharded
    element, so the model ends as the unwrapped one would (call it on every rank, with the same seed).
    Matrices with std 0 (constant, such as
    RoBERTa's token-type embeddings) or a non-finite std are left untouched bit for bit, as are excluded
    names, the task head (unless ``include_head``), tensors with fewer than 2 elements and non-floating-point
    tensors. The noise of element ``i`` of the ``k``-th tensor (its position in ``model_or_params``, skipped
    ones counted) depends on ``(seed, k, i)`` only, so skipping the head leaves the other tensors' noise as it was.
    Tensors are perturbed once each: a second tensor object over the same elements as an earlier one (a tied
    weight, ``p.data``) is skipped with ``SAME_MEMORY_REASON``, and two that overlap only in part raise a ValueError
    naming them (before anything is perturbed).

    Returns a :class:`PerturbReport` (``print(report)`` gives one line: how many perturbed, skipped and why).
    """
    if isinstance(noise_lambda, bool) or not isinstance(noise_lambda, (int, float)):
        raise TypeError(f"noise_lambda must be a float, got {type(noise_lambda).__name__}")
    if not math.isfinite(noise_lambda) or noise_lambda < 0:
        raise ValueError(f"noise_lambda must be a finite number >= 0, got {noise_lambda}")
    patterns = check_name_patterns(exclude, "exclude")
    if not isinstance(include_head, bool):
        raise TypeError(f"include_head must be a bool, got {type(include_head).__name__}")
    seed = rng.resolve_seed(seed)
    named = _named_tensors(model_or_params)
    head = (_head_names(model_or_params) if isinstance(model_or_params, torch.nn.Module) and not include_head
            else set())
    report = PerturbReport(noise_lambda=float(noise_lambda), seed=seed)

    # DeepSpeed ZeRO-3 partitions every parameter across the ranks (the module holds empty placeholders): gather the
    # matrices whole for the perturbation, so each std is the whole matrix's; rank 0's result is partitioned back.
    gather = contextlib.nullcontext()
    if any(hasattr(x, "ds_id") for _, x in named):
        from .integrations.deepspeed import gathered

        gather = gathered([x for _, x in named])
    with gather:
        stds = _perturb_named(named, patterns, head, report, float(noise_lambda), seed)

    for name, _ in named:
        if name in stds:
            s = stds[name]
            if not math.isfinite(s):
                report.skipped[name] = "non-finite std"
            elif s == 0.0:
                report.skipped[name] = "constant (std 0)"
            else:
                report.perturbed.append(name)
                report.std[name] = s
    return report


def _perturb_named(named, patterns, head, report: PerturbReport, noise_lambda: float, seed: int) -> Dict[str, float]:
    """Perturb the tensors of ``named`` that no skip reason excludes (recorded in ``report.skipped``); returns
    their stds by name."""
    # (device, dtype) -> (name, local tensor, k, ShardLayout of a sharded matrix or None)
    buckets: Dict[tuple, List[tuple]] = defaultdict(list)
    views: Dict[tuple, str] = {}  # (memory, shape, strides, dtype) of a tensor to perturb -> its name
    for k, (name, x) in enumerate(named):
        reason = _skip_reason(name, x, patterns, head)
        view = _view_key(sharding.local(x))
        if reason is None and view is not None and view in views:
            reason = SAME_MEMORY_REASON  # another tensor object over the same elements: perturbed once, as if tied
        if reason is not None:
            report.skipped[name] = reason
        else:
            if view is not None:
                views[view] = name
            layout = sharding.layout_of(x, f"model_or_params[{name!r}]")
            buckets[(x.device, x.dtype)].append((name, sharding.local(x), k,
                                                 layout if layout is not None and layout.sharded else None))
    _refuse_overlaps([item for items in buckets.values() for item in items])

    stds: Dict[str, float] = {}
    with torch.no_grad():
        merged = _merged_stds([item for items in buckets.values() for item in items if item[3] is not None])
        for (device, dtype), items in buckets.items():
            use_kernels = dtype in _KERNEL_DTYPES and _backends.resolve(items[0][1]) == "triton"
            plain = [item for item in items if item[3] is None]
            shards = [item for item in items if item[3] is not None]
            stds.update(_perturb_bucket(plain, use_kernels, noise_lambda, seed))
            _perturb_shards(shards, use_kernels, noise_lambda, seed, merged)
            stds.update({name: float(merged[name]) for name, _, _, _ in shards})

    return stds


SAME_MEMORY_REASON = "same elements as an earlier tensor"


def _view_key(x: torch.Tensor) -> Optional[tuple]:
    span = memory_span(x)
    return None if span is None else (span, tuple(x.shape), x.stride(), x.dtype)


def _refuse_overlaps(items: List[tuple]) -> None:
    """ValueError naming two tensors to perturb (``(name, local tensor, ...)`` items) whose memory overlaps: one
    fused launch perturbs all tensors of a device and dtype at once, so two views of one storage would race on a
    GPU (and each element's noise would depend on which write lands). Raised before anything is perturbed."""
    pair = first_overlap([item[1] for item in items])
    if pair is not None:
        a, b = (items[i][0] for i in pair)
        raise ValueError(f"model_or_params: {a!r} and {b!r} share memory (views of one storage that overlap); "
                         "NoisyTune perturbs every tensor once, in one launch: pass only one of them")


def _merged_stds(shards: List[tuple]) -> Dict[str, torch.Tensor]:
    """The std (float32, 0-dim) of every sharded matrix in ``shards`` (name, local shard, k, layout), from its
    ranks' float64 moments merged in rank order: one collective per process group (one under FSDP2)."""
    by_group: Dict[object, List[tuple]] = {}
    for item in shards:
        by_group.setdefault(item[3].group, []).append(item)
    stds = {}
    for group, members in by_group.items():
        moments = torch.stack([_reference.shard_moments(x) for _, x, _, _ in members])
        std = _reference.merge_moments(sharding.gather_across_shards(moments, group))
        stds.update({name: value for (name, _, _, _), value in zip(members, std)})
    return stds


def _perturb_bucket(items: List[tuple], use_kernels: bool, noise_lambda: float, seed: int) -> Dict[str, float]:
    """Perturb unsharded ``items`` (name, tensor, k, None) of one device and dtype; returns their stds by name."""
    if not items:
        return {}
    if use_kernels:
        std = _launch(items, noise_lambda, seed).tolist()
    else:
        std = [float(_reference.perturb_tensor_(x.detach(), noise_lambda, seed, k)) for _, x, k, _ in items]
    return {name: value for (name, _, _, _), value in zip(items, std)}


def _perturb_shards(items: List[tuple], use_kernels: bool, noise_lambda: float, seed: int,
                    merged: Dict[str, torch.Tensor]) -> None:
    """Perturb local shards ``items`` (name, shard, k, layout) of one device and dtype with their matrices'
    ``merged`` stds, the noise of each element keyed by its index in the unsharded matrix."""
    items = [item for item in items if item[1].numel() > 0]  # an empty shard has nothing to perturb
    if not items:
        return
    if use_kernels:
        _launch(items, noise_lambda, seed, torch.stack([merged[name] for name, _, _, _ in items]))
    else:
        for name, x, k, layout in items:
            _reference.add_scaled_noise_(x.detach(), noise_lambda, seed, k, merged[name], layout.offset)


def _launch(items: List[tuple], noise_lambda: float, seed: int, std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernels on ``items`` (staged through contiguous copies where needed); ``std`` given: shards."""
    from .kernels.noisytune import launch_perturb

    works = [x.detach() if x.is_contiguous() else x.detach().contiguous() for _, x, _, _ in items]
    offsets = None if std is None else [layout.offset for _, _, _, layout in items]
    std = launch_perturb(works, [k for _, _, k, _ in items], noise_lambda, seed, offsets, std)
    for (_, x, _, _), work in zip(items, works):
        if work.data_ptr() != x.data_ptr():
            x.detach().copy_(work)
    return std
