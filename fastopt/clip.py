"""Drop-in replacements for torch.nn.utils.clip_grad_norm_ / clip_grad_value_, and AGC.

They take what torch's take (a tensor or an iterable of parameters), work on the ``.grad`` of
each parameter that has one, group by device, and call the functional ops. None of them syncs
the host, except ``clip_grad_norm_(error_if_nonfinite=True)``, which must read the norm to raise.

Under torch.compile they trace fastopt's reference formulas (``fastopt.backends.reference``, torch ops that
Inductor fuses) after the checks that need no memory address; the backends' kernels and the
memory-overlap checks (``data_ptr``) are for eager calls. What cannot be traced (sharded DTensor
grads, a ``process_group``, ``error_if_nonfinite=True``) runs eagerly behind one graph break.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fastopt import backends, distributed, ops
from fastopt.backends import reference

__all__ = ["clip_grad_norm_", "clip_grad_value_", "adaptive_clip_grad_"]


def _grads_by_device(parameters, *, params_are_read: bool = False) -> tuple[list, bool]:
    """(params, grads, indices) per device, in first-seen order, for the parameters that have a
    grad (``indices``: where each one was in ``parameters``, for errors: ``_labels``); and whether
    they are checked already: one device whose grads (and params, when the op reads them) passed
    ``_check_grads_writable``'s checks in the CPU extension's one pass over them."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    elif not isinstance(parameters, Iterable):
        raise TypeError(f"parameters must be a tensor or an iterable of tensors, got {type(parameters).__name__}")
    params = list(parameters)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] must be a torch.Tensor, got {type(p).__name__}")
    grads = [p.grad for p in params]
    indices = [i for i, grad in enumerate(grads) if grad is not None]
    if len(indices) < len(params):
        params, grads = [params[i] for i in indices], [grads[i] for i in indices]
    if not grads:
        return [], True
    lists = {"params": params, "grads": grads} if params_are_read else {"grads": grads}
    if ops._lists_in_one_pass(lists, written=("grads",)) is not None:
        return [(params, grads, indices)], True
    groups: dict[torch.device, tuple[list, list, list]] = {}
    for i, p, grad in zip(indices, params, grads):
        device_params, device_grads, device_indices = groups.setdefault(grad.device, ([], [], []))
        device_params.append(p)
        device_grads.append(grad)
        device_indices.append(i)
    return list(groups.values()), False


def _labels(indices: list[int], suffix: str = ".grad") -> tuple[str, ...]:
    """How errors name the grads (or, with suffix "", the params) of ``_grads_by_device``."""
    return tuple(f"parameters[{i}]{suffix}" for i in indices)


def _check_grads_writable(groups, *, params_are_read: bool = False) -> None:
    """Validate every device's grads (and the params, when the op reads them) before any is
    changed: a rejected call changes nothing."""
    for params, grads, indices in groups:
        labels = _labels(indices)
        ops.check_dense_floating(grads, labels)
        distributed.check_placements(grads, "grads")
        read_only = {}
        if params_are_read:
            param_labels = _labels(indices, "")
            ops.check_dense_floating(params, param_labels)
            read_only = {param_labels: distributed.to_local(params)}
        ops.check_writable({labels: distributed.to_local(grads)}, read_only=read_only)


def _traced_groups(parameters, process_group=None):
    """Under torch.compile: the grads by device, checked as far as a traced tensor allows (type,
    layout, dtype), or None when the call must run eagerly (not compiling, sharded grads, a
    process group)."""
    if not torch.compiler.is_compiling() or process_group is not None:
        return None
    groups, _ = _grads_by_device(parameters)
    for params, grads, indices in groups:
        ops.check_dense_floating(grads, _labels(indices))
        if distributed.any_dtensor(grads):
            return None
    return groups


@torch.no_grad()
def clip_grad_norm_(
    parameters, max_norm, norm_type=2.0, error_if_nonfinite: bool = False, foreach=None, *, process_group=None
) -> Tensor:
    """torch.nn.utils.clip_grad_norm_, fused: one read of the grads for the norm, one
    read+write to scale them, no host sync.

    Returns the total norm of the grads before clipping, as a 0-d float32 tensor (torch returns
    it in the grads' dtype). ``foreach`` is accepted for compatibility and ignored: every
    fastopt backend is multi-tensor. With FSDP2 (DTensor grads) the norm is the global one, a
    plain tensor equal on every rank (no ``.full_tensor()`` needed); ``process_group`` makes it
    global over a ZeRO-style split of the params.
    """
    if torch.compiler.is_compiling():
        if isinstance(parameters, Tensor):
            parameters = [parameters]
        parameters = list(parameters)  # read twice when the traced path gives way to the eager one
        groups = None if error_if_nonfinite else _traced_groups(parameters, process_group)
        if groups is None:
            return _clip_grad_norm_untraced(parameters, max_norm, norm_type, error_if_nonfinite, process_group=process_group)
        max_norm = ops.check_real("max_norm", max_norm, minimum=0.0, finite=False)
        norm_type = ops.check_norm_type(norm_type)
        if not groups:
            return torch.tensor(0.0)
        norms = [reference.multi_tensor_norm(grads, norm_type, False) for _, grads, _ in groups]
        first_device = norms[0].device
        total_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(
            torch.stack([n.to(first_device) for n in norms]), norm_type
        )
        clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for _, grads, _ in groups:
            reference.scale_(grads, clip_coef.to(grads[0].device))
        return total_norm
    groups, checked = _grads_by_device(parameters)
    max_norm = ops.check_real("max_norm", max_norm, minimum=0.0, finite=False)
    norm_type = ops.check_norm_type(norm_type)
    if not checked:
        _check_grads_writable(groups)
    if not groups:
        return torch.tensor(0.0)
    first_device = groups[0][1][0].device
    if checked and process_group is None:  # one device, plain tensors, checked: straight to the backend
        total_norm = ops.multi_tensor_norm_prechecked(groups[0][1], first_device, norm_type)
    elif len(groups) == 1:
        total_norm = ops.multi_tensor_norm(groups[0][1], norm_type, process_group=process_group)
    else:  # model parallel: combine the per-device norms on the first device, as torch does
        device_norms = [
            ops.multi_tensor_norm(grads, norm_type, process_group=process_group).to(first_device)
            for _, grads, _ in groups
        ]
        total_norm = torch.linalg.vector_norm(torch.stack(device_norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    # torch's formula, so that fp32 results match torch.nn.utils.clip_grad_norm_ bit for bit.
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if checked:
        backends.select(first_device).scale_(groups[0][1], clip_coef)
        return total_norm
    for _, grads, _ in groups:
        ops.scale_(grads, clip_coef.to(grads[0].device))
    return total_norm


@torch.no_grad()
def clip_grad_value_(parameters, clip_value, foreach=None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every grad to [-clip_value, clip_value] in place."""
    if torch.compiler.is_compiling() and not isinstance(parameters, Tensor):
        parameters = list(parameters)  # read twice when the traced path gives way to the eager one
    traced = _traced_groups(parameters)
    if traced is not None:
        clip_value = ops.check_real("clip_value", clip_value, minimum=0.0, finite=False)
        for _, grads, _ in traced:
            reference.clamp_(grads, clip_value)
        return
    groups, checked = _grads_by_device(parameters)
    clip_value = ops.check_real("clip_value", clip_value, minimum=0.0, finite=False)
    if not checked:
        _check_grads_writable(groups)
    for _, grads, _ in groups:
        ops.clamp_(grads, clip_value)


@torch.no_grad()
def adaptive_clip_grad_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0, *, unitwise: bool = True) -> None:
    """Adaptive gradient clipping (NFNets, Brock et al. 2021) of each parameter's grad, in place.

    For each unit u (an output row / channel of a >=2-D parameter; the whole parameter if it is
    <=1-D or ``unitwise=False``): ``max_u = clip_factor * max(||W_u||, eps)``; where
    ``||g_u|| > max_u``, ``g_u *= max_u / max(||g_u||, 1e-6)``. The same results as timm's
    ``adaptive_clip_grad``, without its per-tensor Python loop on backends that fuse.
    """
    groups, checked = _grads_by_device(parameters, params_are_read=True)
    clip_factor = ops.check_real("clip_factor", clip_factor, above=0.0)
    eps = ops.check_real("eps", eps, minimum=0.0)
    norm_type = ops.check_norm_type(norm_type)
    if not checked:
        _check_grads_writable(groups, params_are_read=True)
    for params, grads, _ in groups:
        ops.adaptive_clip_(params, grads, clip_factor, eps, norm_type, unitwise=unitwise)


# The eager clip_grad_norm_, for what torch.compile cannot trace: run outside the graph.
_clip_grad_norm_untraced = torch.compiler.disable(clip_grad_norm_)
