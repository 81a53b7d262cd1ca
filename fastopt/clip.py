"""Drop-in replacements for torch.nn.utils.clip_grad_norm_ / clip_grad_value_, and AGC.

They take what torch's take (a tensor or an iterable of parameters), work on the ``.grad`` of
each parameter that has one, group by device, and call the functional ops. None of them syncs
the host, except ``clip_grad_norm_(error_if_nonfinite=True)``, which must read the norm to raise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fastopt import ops

__all__ = ["clip_grad_norm_", "clip_grad_value_", "adaptive_clip_grad_"]


def _parameters_with_grads(parameters, name: str = "parameters") -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    elif not isinstance(parameters, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(parameters).__name__}")
    parameters = list(parameters)
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return [p for p in parameters if p.grad is not None]


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[int]]:
    """Indices of ``tensors`` grouped by device, in first-seen order."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """torch.nn.utils.clip_grad_norm_, fused: one read of the grads for the norm, one
    read+write to scale them, no host sync.

    Returns the total norm of the grads before clipping, as a 0-d float32 tensor (torch returns
    it in the grads' dtype). ``foreach`` is accepted for compatibility and ignored: every
    fastopt backend is multi-tensor.
    """
    grads = [p.grad for p in _parameters_with_grads(parameters)]
    max_norm = ops.check_real("max_norm", max_norm, minimum=0.0, finite=False)
    norm_type = ops.check_norm_type(norm_type)
    if not grads:
        return torch.tensor(0.0)
    groups = _by_device(grads)
    device_grads = [[grads[i] for i in indices] for indices in groups.values()]
    # Validate every device's list before any grad is scaled: a rejected call changes nothing.
    for group in device_grads:
        ops.check_dense_floating(group, "grads")
        ops.check_writable({"grads": group})
    first_device = next(iter(groups))
    if len(device_grads) == 1:
        total_norm = ops.multi_tensor_norm(device_grads[0], norm_type)
    else:  # model parallel: combine the per-device norms on the first device, as torch does
        device_norms = [ops.multi_tensor_norm(group, norm_type).to(first_device) for group in device_grads]
        total_norm = torch.linalg.vector_norm(torch.stack(device_norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    # torch's formula, so that fp32 results match torch.nn.utils.clip_grad_norm_ bit for bit.
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for device, group in zip(groups, device_grads):
        ops.scale_(group, clip_coef.to(device))
    return total_norm


@torch.no_grad()
def clip_grad_value_(parameters, clip_value, foreach=None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every grad to [-clip_value, clip_value] in place."""
    grads = [p.grad for p in _parameters_with_grads(parameters)]
    clip_value = ops.check_real("clip_value", clip_value, minimum=0.0, finite=False)
    device_grads = [[grads[i] for i in indices] for indices in _by_device(grads).values()]
    for group in device_grads:
        ops.check_dense_floating(group, "grads")
        ops.check_writable({"grads": group})
    for group in device_grads:
        ops.clamp_(group, clip_value)


@torch.no_grad()
def adaptive_clip_grad_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0, *, unitwise: bool = True) -> None:
    """Adaptive gradient clipping (NFNets, Brock et al. 2021) of each parameter's grad, in place.

    For each unit u (an output row / channel of a >=2-D parameter; the whole parameter if it is
    <=1-D or ``unitwise=False``): ``max_u = clip_factor * max(||W_u||, eps)``; where
    ``||g_u|| > max_u``, ``g_u *= max_u / max(||g_u||, 1e-6)``. The same results as timm's
    ``adaptive_clip_grad``, without its per-tensor Python loop on backends that fuse.
    """
    params = _parameters_with_grads(parameters)
    grads = [p.grad for p in params]
    groups = [
        ([params[i].detach() for i in indices], [grads[i] for i in indices]) for indices in _by_device(params).values()
    ]
    clip_factor = ops.check_real("clip_factor", clip_factor, above=0.0)
    eps = ops.check_real("eps", eps, minimum=0.0)
    norm_type = ops.check_norm_type(norm_type)
    for group_params, group_grads in groups:
        ops.check_dense_floating(group_params, "parameters")
        ops.check_dense_floating(group_grads, "grads")
        ops.check_writable({"grads": group_grads})
    for group_params, group_grads in groups:
        ops.adaptive_clip_(group_params, group_grads, clip_factor, eps, norm_type, unitwise=unitwise)
