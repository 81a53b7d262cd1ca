"""The Triton backend's ops, registered as torch custom ops (``torch.ops.fastopt_triton.*``).

Why custom ops and not ``torch.library.triton_op`` + ``wrap_triton``: the kernels reach their
tensors through an address table built from ``data_ptr()``, which a traced (fake) tensor does
not have, and which would hide from the compiler which tensors a kernel writes. A custom op
declares what it mutates and has a fake implementation, so ``torch.compile`` keeps each call as
one opaque node (instead of tracing into per-tensor Python), and the real op builds its tables
at run time.

Eagerly, the backend functions below call the implementations in ``launch.py`` directly (no
dispatcher round trip); under ``torch.compile`` they call the registered ops. The schemas split
a "float or 0-d tensor" argument into a float and an optional tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastopt.backends.triton import launch

NAMESPACE = "fastopt_triton"


def _split(value: float | Tensor | None) -> tuple[float | None, Tensor | None]:
    """A float-or-tensor argument as the schemas take it: (float, None) or (None, tensor)."""
    return (None, value) if isinstance(value, Tensor) else (value, None)


def _join(value: float | None, tensor: Tensor | None) -> float | Tensor | None:
    return tensor if tensor is not None else value


# --------------------------------------------------------------------------- the ops


@torch.library.custom_op(f"{NAMESPACE}::multi_tensor_norm", mutates_args=("found_inf",))
def multi_tensor_norm_op(tensors: list[Tensor], norm_type: float, per_tensor: bool,
                         found_inf: Optional[Tensor]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(total, norms); norms is empty unless per_tensor. Needs at least one tensor."""
    if per_tensor:
        return launch.multi_tensor_norm(tensors, norm_type, True, found_inf)
    total = launch.multi_tensor_norm(tensors, norm_type, False, found_inf)
    return total, tensors[0].new_empty(0, dtype=torch.float32)


@multi_tensor_norm_op.register_fake
def _(tensors, norm_type, per_tensor, found_inf):
    total = tensors[0].new_empty((), dtype=torch.float32)
    return total, tensors[0].new_empty(len(tensors) if per_tensor else 0, dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::unscale_and_check_", mutates_args=("tensors", "found_inf"))
def unscale_and_check_op(tensors: list[Tensor], inv_scale: Optional[float], inv_scale_tensor: Optional[Tensor],
                         found_inf: Tensor) -> None:  # fmt: skip
    launch.unscale_and_check_(tensors, _join(inv_scale, inv_scale_tensor), found_inf)


@unscale_and_check_op.register_fake
def _(tensors, inv_scale, inv_scale_tensor, found_inf):
    return None


@torch.library.custom_op(f"{NAMESPACE}::scale_", mutates_args=("tensors",))
def scale_op(tensors: list[Tensor], coef: Optional[float], coef_tensor: Optional[Tensor]) -> None:
    launch.scale_(tensors, _join(coef, coef_tensor))


@scale_op.register_fake
def _(tensors, coef, coef_tensor):
    return None


@torch.library.custom_op(f"{NAMESPACE}::clamp_", mutates_args=("tensors",))
def clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    launch.clamp_(tensors, clip_value)


@clamp_op.register_fake
def _(tensors, clip_value):
    return None


@torch.library.custom_op(f"{NAMESPACE}::adaptive_clip_", mutates_args=("grads",))
def adaptive_clip_op(params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float, norm_type: float,
                     unitwise: bool) -> None:  # fmt: skip
    launch.adaptive_clip_(params, grads, clip_factor, eps, norm_type, unitwise)


@adaptive_clip_op.register_fake
def _(params, grads, clip_factor, eps, norm_type, unitwise):
    return None


@torch.library.custom_op(
    f"{NAMESPACE}::adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs")
)
def adamw_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Optional[float],
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    max_exp_avg_sqs: list[Tensor],  # empty: no AMSGrad (a schema has no optional tensor list)
    grad_scale: Optional[float],
    grad_scale_tensor: Optional[Tensor],
    found_inf: Optional[Tensor],
    clip_coef: Optional[float],
    clip_coef_tensor: Optional[Tensor],
    decoupled_weight_decay: bool,
) -> None:
    launch.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        lr=_join(lr, lr_tensor), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
        max_exp_avg_sqs=max_exp_avg_sqs or None, grad_scale=_join(grad_scale, grad_scale_tensor), found_inf=found_inf,
        clip_coef=_join(clip_coef, clip_coef_tensor), decoupled_weight_decay=decoupled_weight_decay,
    )  # fmt: skip


@adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, maximize,
      max_exp_avg_sqs, grad_scale, grad_scale_tensor, found_inf, clip_coef, clip_coef_tensor,
      decoupled_weight_decay):  # fmt: skip
    return None


@torch.library.custom_op(f"{NAMESPACE}::sgd_", mutates_args=("params", "momentum_buffers"))
def sgd_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],  # empty: no momentum
    lr: Optional[float],
    lr_tensor: Optional[Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Optional[float],
    grad_scale_tensor: Optional[Tensor],
    found_inf: Optional[Tensor],
    clip_coef: Optional[float],
    clip_coef_tensor: Optional[Tensor],
) -> None:
    launch.sgd_(
        params, grads, momentum_buffers or None,
        lr=_join(lr, lr_tensor), momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, first_step=first_step, grad_scale=_join(grad_scale, grad_scale_tensor), found_inf=found_inf,
        clip_coef=_join(clip_coef, clip_coef_tensor),
    )  # fmt: skip


@sgd_op.register_fake
def _(params, grads, momentum_buffers, lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, first_step,
      grad_scale, grad_scale_tensor, found_inf, clip_coef, clip_coef_tensor):  # fmt: skip
    return None


@torch.library.custom_op(f"{NAMESPACE}::lion_", mutates_args=("params", "exp_avgs"))
def lion_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    lr: Optional[float],
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[float],
    grad_scale_tensor: Optional[Tensor],
    found_inf: Optional[Tensor],
    clip_coef: Optional[float],
    clip_coef_tensor: Optional[Tensor],
) -> None:
    launch.lion_(
        params, grads, exp_avgs,
        lr=_join(lr, lr_tensor), beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
        grad_scale=_join(grad_scale, grad_scale_tensor), found_inf=found_inf,
        clip_coef=_join(clip_coef, clip_coef_tensor),
    )  # fmt: skip


@lion_op.register_fake
def _(params, grads, exp_avgs, lr, lr_tensor, beta1, beta2, weight_decay, maximize, grad_scale, grad_scale_tensor,
      found_inf, clip_coef, clip_coef_tensor):  # fmt: skip
    return None


# --------------------------------------------------------------------------- the backend functions


def multi_tensor_norm(tensors: list[Tensor], norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    if not tensors or not torch.compiler.is_compiling():
        return launch.multi_tensor_norm(tensors, norm_type, per_tensor, found_inf)
    total, norms = multi_tensor_norm_op(tensors, norm_type, per_tensor, found_inf)
    return (total, norms) if per_tensor else total


def unscale_and_check_(tensors: list[Tensor], inv_scale: float | Tensor, found_inf: Tensor) -> None:
    if not torch.compiler.is_compiling():
        return launch.unscale_and_check_(tensors, inv_scale, found_inf)
    unscale_and_check_op(tensors, *_split(inv_scale), found_inf)


def scale_(tensors: list[Tensor], coef: float | Tensor) -> None:
    if not torch.compiler.is_compiling():
        return launch.scale_(tensors, coef)
    scale_op(tensors, *_split(coef))


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    if not torch.compiler.is_compiling():
        return launch.clamp_(tensors, clip_value)
    clamp_op(tensors, clip_value)


def adaptive_clip_(params, grads, clip_factor: float, eps: float, norm_type: float, unitwise: bool) -> None:
    if not torch.compiler.is_compiling():
        return launch.adaptive_clip_(params, grads, clip_factor, eps, norm_type, unitwise)
    adaptive_clip_op(params, grads, clip_factor, eps, norm_type, unitwise)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, maximize,
           max_exp_avg_sqs, grad_scale, found_inf, clip_coef, decoupled_weight_decay=True) -> None:  # fmt: skip
    if not torch.compiler.is_compiling():
        return launch.adamw_(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, maximize=maximize, max_exp_avg_sqs=max_exp_avg_sqs, grad_scale=grad_scale,
            found_inf=found_inf, clip_coef=clip_coef, decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
    adamw_op(
        params, grads, exp_avgs, exp_avg_sqs, steps, *_split(lr), beta1, beta2, eps, weight_decay, maximize,
        max_exp_avg_sqs or [], *_split(grad_scale), found_inf, *_split(clip_coef), decoupled_weight_decay,
    )  # fmt: skip


def sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
         grad_scale, found_inf, clip_coef) -> None:  # fmt: skip
    if not torch.compiler.is_compiling():
        return launch.sgd_(
            params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
            clip_coef=clip_coef,
        )  # fmt: skip
    sgd_op(
        params, grads, momentum_buffers or [], *_split(lr), momentum, dampening, weight_decay, nesterov, maximize,
        first_step, *_split(grad_scale), found_inf, *_split(clip_coef),
    )  # fmt: skip


def lion_(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf,
          clip_coef) -> None:  # fmt: skip
    if not torch.compiler.is_compiling():
        return launch.lion_(
            params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
            grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        )  # fmt: skip
    lion_op(
        params, grads, exp_avgs, *_split(lr), beta1, beta2, weight_decay, maximize, *_split(grad_scale), found_inf,
        *_split(clip_coef),
    )  # fmt: skip


# The planned updates keep the op's table in ``plan``, a dict that the caller (fastopt.optim's step
# plan) owns while its lists keep their params and states (see ``launch.adamw_planned_``). Under
# torch.compile, the op itself: a traced step keeps no table.


def multi_tensor_norm_planned(plan: dict, norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    return launch.multi_tensor_norm_planned(plan, norm_type, per_tensor, found_inf)


multi_tensor_norm_planned.__doc__ = launch.multi_tensor_norm_planned.__doc__


def adamw_planned_(lists: dict[str, list[Tensor]], plan: dict, **hyper) -> None:
    if not torch.compiler.is_compiling():
        return launch.adamw_planned_(lists, plan, **hyper)
    adamw_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
           max_exp_avg_sqs=lists.get("max_exp_avg_sqs"), **hyper)  # fmt: skip


def sgd_planned_(lists: dict[str, list[Tensor]], plan: dict, **hyper) -> None:
    if not torch.compiler.is_compiling():
        return launch.sgd_planned_(lists, plan, **hyper)
    sgd_(lists["params"], lists["grads"], lists.get("momentum_buffers"), **hyper)


def lion_planned_(lists: dict[str, list[Tensor]], plan: dict, **hyper) -> None:
    if not torch.compiler.is_compiling():
        return launch.lion_planned_(lists, plan, **hyper)
    lion_(lists["params"], lists["grads"], lists["exp_avgs"], **hyper)
