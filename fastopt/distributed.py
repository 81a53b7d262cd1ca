"""Global norms and overflow flags on torch.distributed: DTensor (FSDP2) shards and process groups.

The ops work on local tensors. What makes a result global is here:

- DTensor inputs (``torch.distributed.fsdp.fully_shard``, tensor parallel) are unwrapped to
  their local shards. A norm is formed from local sums of |x|^p (max |x| for the inf-norm),
  all-reduced over exactly the mesh dimensions that shard each tensor: replicated dimensions
  hold full copies and are counted once. Elementwise ops (scale, clamp, AdamW) need nothing
  more: every rank updates its own shard.
- ``process_group=`` (ZeRO-style optimizers, each rank holding different params): the total
  sums the local contributions of every rank in the group.
- The inf/nan flag is all-reduced (max) over every rank involved, so an overflow on any rank
  skips the step on all of them.

Collectives are issued on device tensors and never read back to the host (no sync). Partial
(unreduced) DTensors are rejected: their local values are not pieces of the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist
from torch import Tensor

from fastopt.backends import reference

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(*lists) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for ts in lists if ts for t in ts)


def to_local(tensors: list[Tensor]) -> list[Tensor]:
    """Each DTensor's local shard (the same memory: in-place writes land in the DTensor)."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def check_placements(tensors: list[Tensor], name: str) -> None:
    for i, t in enumerate(tensors):
        if is_dtensor(t) and any(p.is_partial() for p in t.placements):
            raise ValueError(
                f"{name}[{i}] is a DTensor with a Partial (unreduced) placement {t.placements}; "
                "reduce it first (.redistribute() or .full_tensor())"
            )


@dataclasses.dataclass(frozen=True)
class _ReduceKey:
    """The collectives that turn one tensor's local contribution into its global one."""

    mesh: object  # DeviceMesh, or None for a plain tensor
    mesh_dims: tuple[int, ...]  # mesh dimensions to reduce over


def _sharded_mesh_dims(t: Tensor, *, exclude_tensor_dim: int | None = None) -> tuple[int, ...]:
    """Mesh dimensions along which ``t`` is sharded (optionally ignoring shards of one tensor
    dim: for unit-wise norms the units along dim 0 are disjoint, not partial)."""
    if not is_dtensor(t):
        return ()
    return tuple(
        mesh_dim
        for mesh_dim, placement in enumerate(t.placements)
        if placement.is_shard() and placement.dim != exclude_tensor_dim
    )


def _all_reduce_over(values: Tensor, key: _ReduceKey, op) -> None:
    for mesh_dim in key.mesh_dims:
        dist.all_reduce(values, op=op, group=key.mesh.get_group(mesh_dim))


def _reduce_op(norm_type: float):
    return dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM


def to_powers(norms: Tensor, norm_type: float) -> Tensor:
    """|x|^p sums from p-norms (the inf-norm is its own reduction)."""
    return norms if math.isinf(norm_type) else norms.pow(norm_type)


def from_powers(powers: Tensor, norm_type: float) -> Tensor:
    return powers if math.isinf(norm_type) else powers.pow(1.0 / norm_type)


def global_norms(
    tensors: list[Tensor], local_norms: Tensor, norm_type: float, process_group
) -> tuple[Tensor, Tensor]:
    """(total, per-tensor norms) over all ranks, from the per-tensor norms of local shards.

    Per-tensor norms are reduced over each DTensor's sharding mesh dimensions. With a
    process_group, the total also sums over its ranks (whose tensors are different params);
    per-tensor norms then stay those of each rank's own tensors.
    """
    powers = to_powers(local_norms, norm_type)
    op = _reduce_op(norm_type)
    groups: dict[_ReduceKey, list[int]] = {}
    for i, t in enumerate(tensors):
        dims = _sharded_mesh_dims(t)
        if dims:
            groups.setdefault(_ReduceKey(t.device_mesh, dims), []).append(i)
    for key, indices in groups.items():  # one collective per sharding layout, not per tensor
        if len(indices) == len(tensors):  # FSDP2's usual case: every tensor laid out alike
            _all_reduce_over(powers, key, op)
            continue
        index = _index_on(tuple(indices), powers.device)
        partial = powers.index_select(0, index)
        _all_reduce_over(partial, key, op)
        powers = powers.index_copy(0, index, partial)
    if not len(powers):
        total_power = powers.new_zeros(())
    else:
        total_power = powers.max() if math.isinf(norm_type) else powers.sum()
    if process_group is not None:
        dist.all_reduce(total_power, op=op, group=process_group)
    return from_powers(total_power, norm_type), from_powers(powers, norm_type)


@functools.lru_cache(maxsize=64)
def _index_on(indices: tuple[int, ...], device: torch.device) -> Tensor:
    """An index tensor on the device, made once per layout: building it from a Python list on
    every call would copy from pageable memory, which waits for the device."""
    return torch.tensor(indices, device=device)


def all_reduce_flag(found_inf: Tensor, tensors: list[Tensor], process_group) -> None:
    """found_inf = max over every rank that holds a piece of these tensors."""
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if is_dtensor(t)}
    for mesh in meshes.values():
        _all_reduce_over(found_inf, _ReduceKey(mesh, tuple(range(mesh.ndim))), dist.ReduceOp.MAX)
    if process_group is not None:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=process_group)


def adaptive_clip_(params, grads, clip_factor, eps, norm_type, unitwise) -> None:
    """AGC on DTensor shards: each unit's norm reduced over the mesh dimensions that split it.

    Units are slices along dim 0, so a Shard(0) layout (FSDP2's) keeps every unit whole on one
    rank and needs no collective; shards of other dims, and whole-tensor norms, are reduced.
    """
    pairs = [(p, g) for p, g in zip(params, grads) if g.numel() > 0]
    partials: list[Tensor] = []  # local |x|^p sums (or max) per unit: params' then grads', per pair
    keys: list[_ReduceKey] = []
    for p, g in pairs:
        unit_wise = unitwise and p.ndim >= 2
        dims = _sharded_mesh_dims(g, exclude_tensor_dim=0 if unit_wise else None)
        key = _ReduceKey(g.device_mesh if dims else None, dims)
        for t in (p, g):
            local = t.to_local() if is_dtensor(t) else t
            reduce_dims = tuple(range(1, local.ndim)) if unit_wise else None
            norms = torch.linalg.vector_norm(local, norm_type, dim=reduce_dims, keepdim=unit_wise, dtype=torch.float32)
            partials.append(to_powers(norms, norm_type))
            keys.append(key)
    op = _reduce_op(norm_type)
    for key in dict.fromkeys(keys):  # one collective per layout, in the same order on every rank
        if not key.mesh_dims:
            continue
        members = [i for i, k in enumerate(keys) if k == key]
        flat = torch.cat([partials[i].reshape(-1) for i in members])
        _all_reduce_over(flat, key, op)
        for i, piece in zip(members, flat.split([partials[i].numel() for i in members])):
            partials[i] = piece.view_as(partials[i])
    for k, (_, g) in enumerate(pairs):
        weight_norm, grad_norm = (from_powers(partials[2 * k + j], norm_type) for j in (0, 1))
        local_grad = g.to_local() if is_dtensor(g) else g
        local_grad.mul_(reference.agc_coef(weight_norm, grad_norm, clip_factor, eps))
