"""DeepSpeed ZeRO: :class:`~fusednoise.optim.PATSAdamax` on ZeRO-1/2's flat partitions, and NoisyTune on ZeRO-3's
partitioned parameters (SPEC section 4c).

Under ZeRO-1 and ZeRO-2 DeepSpeed flattens each param group into one buffer (the group's parameters in its
``round_robin_bit16_groups`` order, each at its ``round_robin_bit16_offsets`` entry), cuts the buffer into equal
partitions, one per data-parallel rank, and hands the client optimizer, in place of the group's parameters, one
flat float32 tensor: this rank's partition. A partition crosses tensor boundaries, so PATS's per-tensor
statistics (the mean sensitivity of each matrix) and its noise keys (parameter ``k``, element ``i``) would silently
become per-partition ones. :func:`bind` gives the optimizer the engine's mapping back to the parameters: each
noise group's partition is stepped as slices, one per parameter it holds, each with its parameter's ``k``, the
index of its first element in the parameter, and that parameter's element count; a parameter cut between two
ranks' partitions gets its mean from the two slices' sums, added across the ranks in one collective per step
(the one FSDP2 uses). Every element's sensitivity, noise and update are then those of a run without DeepSpeed.

Usage (``FusedNoiseTrainer(pats=...)`` with ``TrainingArguments(deepspeed=...)`` does this by itself)::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=PATSAdamax(pats_param_groups(model)),
                                                   config={..., "zero_optimization": {"stage": 2},
                                                           "zero_allow_untested_optimizer": True})
    fusednoise.integrations.deepspeed.bind(engine)

Not supported, refused by :func:`bind` with an error naming the alternatives (and by the optimizer's first step
when :func:`bind` was not called): ZeRO-3 (each rank holds a slice of every parameter, flattened per sub-group),
DeepSpeed's stage-0 half-precision optimizers (``fp16``/``bf16`` without ZeRO: they flatten too) and CPU offload
(DeepSpeed's own Adam runs the step). Stage 0 in float32 hands the optimizer the model's own parameters and needs
nothing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple

import torch

ALTERNATIVES = ("ZeRO-1 or ZeRO-2 (zero_optimization.stage 1 or 2, with fusednoise.integrations.deepspeed.bind), "
                "FSDP2 (torch.distributed.fsdp.fully_shard), or DDP")


@dataclass(frozen=True)
class Piece:
    """One parameter's part of a flat partition: elements ``[start, stop)`` of the partition are elements
    ``[offset, offset + stop - start)`` of parameter ``k`` (its index in the optimizer's parameter list before
    DeepSpeed replaced it), which has ``numel`` elements. ``shared``: the parameter is cut between partitions,
    so its mean sensitivity is reduced across the ranks (every rank then lists it, with ``start == stop`` on the
    ranks that hold none of it)."""

    start: int
    stop: int
    k: int
    offset: int
    numel: int
    shared: bool


@dataclass(frozen=True)
class FlatPartition:
    """How a ZeRO-1/2 flat partition maps back to the parameters (:class:`Piece` s, in the group's flat order,
    the same on every rank), and the data-parallel process ``group`` its cut parameters are reduced over.
    Elements that no piece covers (DeepSpeed's alignment padding) are not stepped."""

    pieces: Tuple[Piece, ...]
    group: Any
    slot: int  # the partition's own index among the optimizer's tensors (its step count's slot): DeepSpeed steps
    #            one group at a time, so its position in the param list it steps is 0 for every group

    def add_jobs(self, bucket: list, shared: dict, key, flat, grad, state, scalars, step_count) -> None:
        """Append this partition's PATS jobs to ``bucket`` (one per piece); register the cut parameters' jobs in
        ``shared`` (by process group, as :meth:`PATSAdamax._jobs` does for FSDP2 shards)."""
        from ..reference.pats import PatsJob

        exp_avg, exp_inf, sensitivity = state["exp_avg"], state["exp_inf"], state.get("sensitivity")
        if not scalars.noise:  # Adamax alone is elementwise: the partition is one tensor to it
            bucket.append(PatsJob(flat, grad, exp_avg, exp_inf, None, scalars, state["stream"], step=step_count))
            return
        for piece in self.pieces:
            a, b = piece.start, piece.stop
            job = PatsJob(flat[a:b], grad[a:b], exp_avg[a:b], exp_inf[a:b],
                          sensitivity[a:b] if scalars.noise else None, scalars, piece.k,
                          offset=piece.offset, total_numel=piece.numel, step=step_count)
            if piece.shared and scalars.draw:
                shared.setdefault(self.group, []).append((key, len(bucket)))
            elif b == a:
                continue  # a cut parameter this rank holds none of, in a step that draws no noise
            bucket.append(job)


def _zero_optimizer(engine_or_optimizer):
    """The DeepSpeed ZeRO optimizer of an engine (or the optimizer itself)."""
    inner = getattr(engine_or_optimizer, "optimizer", None)
    if type(engine_or_optimizer).__name__ == "DeepSpeedEngine" or (
            inner is not None and hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer)):
        return inner
    return engine_or_optimizer


def _stage_name(zero) -> str:
    name = type(zero).__name__
    if name == "DeepSpeedZeroOptimizer":
        return "ZeRO-2" if getattr(zero, "partition_gradients", False) else "ZeRO-1"
    if name == "DeepSpeedZeroOptimizer_Stage3":
        return "ZeRO-3"
    return f"DeepSpeed's {name}"


def partitions(zero, keys) -> List[Optional[FlatPartition]]:
    """The :class:`FlatPartition` of each param group of a ZeRO-1/2 optimizer ``zero`` on this rank; ``keys``:
    ``id(parameter) -> k`` of the client optimizer's parameters as it was built."""
    import torch.distributed as dist

    result = []
    first_slot = max(keys.values(), default=-1) + 1
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        group = zero.real_dp_process_group[i]
        rank = dist.get_rank(group=group)
        size = int(zero.partition_size[i])
        if flat.numel() != size:
            raise RuntimeError(f"DeepSpeed's partition of param group {i} has {flat.numel()} elements, its "
                               f"partition_size says {size}: this DeepSpeed version lays partitions out differently")
        pieces = []
        for param, meta, start in zip(zero.round_robin_bit16_groups[i], zero.round_robin_bit16_meta[i],
                                      zero.round_robin_bit16_offsets[i]):
            if id(param) not in keys:
                raise ValueError(f"param group {i} of DeepSpeed's optimizer holds a parameter that the PATSAdamax "
                                 "it wraps was not built with")
            numel = meta.numel()
            first_rank, last_rank = start // size, (start + numel - 1) // size
            lo, hi = max(start, rank * size), min(start + numel, (rank + 1) * size)
            if first_rank == last_rank and first_rank != rank:
                continue
            lo, hi = (lo, hi) if lo < hi else (rank * size, rank * size)  # held elsewhere: an empty piece
            pieces.append(Piece(start=lo - rank * size, stop=hi - rank * size, k=keys[id(param)],
                                offset=lo - start if hi > lo else 0, numel=numel, shared=first_rank != last_rank))
        result.append(FlatPartition(tuple(pieces), group, first_slot + i))
    return result


def bind(engine_or_optimizer) -> None:
    """Give the :class:`~fusednoise.optim.PATSAdamax` inside a DeepSpeed engine (or its ZeRO optimizer) the
    mapping from its ZeRO-1/2 flat partitions back to the parameters, so that its step is the one it takes
    without DeepSpeed (module docs). Call it once after ``deepspeed.initialize``, before the first step.

    Raises ``TypeError`` when the engine's optimizer does not wrap a PATSAdamax, ``NotImplementedError`` naming
    the stage and the supported alternatives for ZeRO-3, CPU offload and DeepSpeed's stage-0 half-precision
    optimizers. A float32 stage-0 engine (the optimizer steps the model's parameters) needs nothing: no-op.
    """
    from ..optim import PATSAdamax

    zero = _zero_optimizer(engine_or_optimizer)
    if isinstance(zero, PATSAdamax):
        return  # stage 0, float32: the client optimizer holds the model's parameters
    client = getattr(zero, "optimizer", None)
    if not isinstance(client, PATSAdamax):
        raise TypeError(f"bind needs a DeepSpeed engine whose optimizer is a PATSAdamax, got "
                        f"{type(zero).__name__} wrapping {type(client).__name__}")
    stage = _stage_name(zero)
    if type(zero).__name__ != "DeepSpeedZeroOptimizer":
        raise NotImplementedError(f"PATSAdamax under {stage} is not supported: its per-tensor sensitivity means and "
                                  f"noise keys need each parameter whole or sliced in one flat buffer; use "
                                  f"{ALTERNATIVES}")
    if getattr(zero, "cpu_offload", False):
        raise NotImplementedError(f"PATSAdamax under {stage} with offload_optimizer is not supported (DeepSpeed "
                                  f"steps offloaded partitions with its own CPU Adam); use {ALTERNATIVES} without "
                                  "offload")
    client.bind_flat_partitions({id(flat): layout for flat, layout in
                                 zip(zero.single_partition_of_fp32_groups, partitions(zero, client.parameter_keys()))
                                 })


# --------------------------------------------------------------------------------------------- ZeRO-3 parameters
def is_zero3_param(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter that DeepSpeed ZeRO-3 partitions (it carries a ``ds_id``)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_status")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]):
    """The ZeRO-3 ``params`` whole on every rank inside the block; rank 0's changes are kept (and partitioned
    back to every rank) on leaving it: ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``. Every rank
    must enter it (it is collective) and make the same changes."""
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def refresh_master_weights(optimizer) -> bool:
    """After the model's parameters were changed in place (NoisyTune) once DeepSpeed holds its own float32 master
    copies (ZeRO-1/2/3, its fp16/bf16 optimizers), copy them into those masters, or the first step would write
    the unchanged masters back over them: ``refresh_fp32_params()`` of the DeepSpeed optimizer inside
    ``optimizer`` (an engine's, or accelerate's wrapper of it). Returns whether there was one to refresh."""
    for _ in range(4):  # accelerate's wrapper -> DeepSpeed's optimizer -> the client optimizer
        if optimizer is None:
            return False
        refresh = getattr(optimizer, "refresh_fp32_params", None)
        if callable(refresh):
            refresh()
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False


__all__ = ["ALTERNATIVES", "FlatPartition", "Piece", "bind", "gathered", "is_zero3_param", "partitions",
           "refresh_master_weights"]
