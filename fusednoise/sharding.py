"""Sharded tensors (FSDP2's DTensor parameters): where a rank's shard lies in the unsharded tensor, and the one
collective that adds per-tensor statistics across the shards (SPEC section 4c).

Under ``torch.distributed.fsdp.fully_shard`` a parameter is a ``DTensor`` placed ``Shard(0)`` on a device mesh:
rank ``r`` holds rows ``[r * ceil(R / W), ...)`` of the ``R`` rows (the last ranks may hold fewer, or none). The
methods that need a whole-matrix statistic (PATS's mean sensitivity, NoisyTune's std) compute it on each local
shard, add the shards' values with :func:`sum_across_shards` (one collective for all tensors, added in rank
order, so every rank gets the same bits), and key every random draw by the element's index in the unsharded
tensor (:attr:`ShardLayout.offset` plus the local index), so an element's noise does not depend on the number of
ranks.

Supported placements: ``Shard(d)`` on at most one mesh dimension (FSDP2, or HSDP's ``(Replicate(), Shard(0))``),
``Replicate()`` on the others, with a local shard that is one contiguous range of the unsharded tensor's
row-major order (``Shard(0)``, or ``Shard(d)`` when every dimension before ``d`` has size 1). Anything else
(tensor parallelism's ``Shard(1)`` of a matrix, ``Partial``) is refused with a ``TypeError``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch


def dtensor_type() -> Optional[type]:
    """``torch.distributed.tensor.DTensor`` when that module is already imported (nothing can be a DTensor
    otherwise), else None: importing it costs time that unsharded users should not pay."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(tensor: Any) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (a view sharing its storage: in-place updates reach the DTensor), or
    ``tensor`` itself when it is not one."""
    if not is_dtensor(tensor):
        return tensor
    shard = getattr(tensor, "_local_tensor", None)  # to_local() goes through autograd: more host time
    return shard if shard is not None else tensor.to_local()


@dataclass(frozen=True)
class ShardLayout:
    """Where a rank's shard of one tensor lies: the unsharded tensor's ``numel``, the row-major index ``offset``
    of the shard's first element in it (0 for an empty shard), and the process ``group`` of the ranks whose
    shards make up the tensor (None when it is not sharded across ranks)."""

    numel: int
    offset: int
    group: Any = None

    @property
    def sharded(self) -> bool:
        return self.group is not None


def layout_of(tensor: torch.Tensor, where: str) -> Optional[ShardLayout]:
    """The :class:`ShardLayout` of a DTensor (None for a plain tensor); ``TypeError`` naming ``where`` for a
    placement this module does not support."""
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    shard_dims = [i for i, placement in enumerate(placements) if isinstance(placement, Shard)]
    unsupported = [p for p in placements if not isinstance(p, (Shard, Replicate))]
    if unsupported or len(shard_dims) > 1:
        raise TypeError(f"{where} is a DTensor placed {placements}: only Shard(d) on one mesh dimension (FSDP2, "
                        "HSDP) with Replicate() on the others is supported")
    shape = tuple(tensor.shape)
    numel = tensor.numel()
    if not shard_dims:
        return ShardLayout(numel=numel, offset=0, group=None)
    local_shape, global_offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    local_numel = 1
    for size in local_shape:
        local_numel *= size
    # One contiguous range of the row-major order: the shard may cut one dimension, with only dimensions of size 1
    # before it and whole dimensions after it.
    cut = next((d for d, (a, b) in enumerate(zip(local_shape, shape)) if a != b), None)
    if local_numel and cut is not None and (any(shape[d] != 1 for d in range(cut))
                                            or any(local_shape[d] != shape[d] for d in range(cut + 1, len(shape)))):
        raise TypeError(f"{where} is a DTensor placed {placements} over shape {shape}: its local shard "
                        f"{tuple(local_shape)} is not one contiguous range of the tensor (shard the first "
                        "dimension, as FSDP2 does)")
    offset = 0
    stride = 1
    for d in reversed(range(len(shape))):
        offset += global_offset[d] * stride
        stride *= shape[d]
    return ShardLayout(numel=numel, offset=offset if local_numel else 0, group=mesh.get_group(shard_dims[0]))


def sharded_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a tensor of ``like``'s local shape) as a DTensor placed as the DTensor ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def shard_of(value: torch.Tensor, like: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """The rank's shard of ``value``, a plain tensor of ``like``'s unsharded shape, as a DTensor placed as
    ``like`` (e.g. optimizer state saved from an unsharded run)."""
    shard = local(like)
    flat = value.reshape(-1)[layout.offset:layout.offset + shard.numel()]
    return sharded_like(flat.reshape(shard.shape).clone(), like)


def gather_across_shards(values: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``values`` (same shape on every rank of ``group``), stacked in rank order: ``(ranks,
    *values.shape)``, by one all-gather."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return values.unsqueeze(0).clone()
    gathered = torch.empty((world * values.numel(),), dtype=values.dtype, device=values.device)
    # all_gather_into_tensor's new name (torch 2.13 warns on the old one; torch 2.11 has only the old one)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, values.contiguous().view(-1), group=group)
    return gathered.view(world, *values.shape)


def sum_across_shards(values: torch.Tensor, group) -> torch.Tensor:
    """``values`` (one number per tensor, this rank's part) added over the ranks of ``group``: one collective
    (:func:`gather_across_shards`), then the ranks' rows added in rank order, so every rank gets the same bits
    whatever the collective's own reduction order."""
    rows = gather_across_shards(values, group)
    total = rows[0].clone()
    for rank in range(1, rows.shape[0]):
        total += rows[rank]
    return total
