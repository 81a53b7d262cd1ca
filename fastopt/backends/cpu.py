"""The ``cpu`` backend: fastopt's C++ loops for CPU tensors (``csrc/cpu/``, the extension
``fastopt._cpu_torch<release>``, e.g. ``fastopt._cpu_torch2_13``, built for that torch release).

The same machinery as the CUDA backend, compiled for the host: the chunk plan (``csrc/common/chunk_plan.h``)
cuts all tensors of a call into blocks of 64 K elements, one ``at::parallel_for`` walks them, and
each block runs the per-element math of ``csrc/common/element_math.h`` in a loop that g++ vectorises,
compiled per ISA and chosen at run time. Reductions fold per-block partials in a fixed order, so
results do not depend on the number of threads. A step is the two passes of docs/design.md section 1.

Scalars held in 0-d tensors (lr, grad_scale, clip_coef, found_inf) are read by the extension from
host memory (no dispatcher call, no synchronisation on CPU). A skipped step (``found_inf != 0``)
returns before touching anything. Without the extension (not built, or built for another torch) the backend is
unavailable, with the reason (``python -m fastopt info``), and CPU tensors run on the reference.
"""

from __future__ import annotations

import importlib

from torch import Tensor

from fastopt import backends
from fastopt.backends import reference

DEVICE_TYPES = ("cpu",)
# fastopt.optim's step plan may leave the grads in its GradWatch (C++) instead of Python lists:
# multi_tensor_norm_planned and adamw_planned_ / sgd_planned_ / lion_planned_ read them there.
READS_GRAD_WATCH = True


def _load() -> tuple[object | None, str | None]:
    name = backends.cpu_extension_name()
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name == name:
            return None, f"the CPU extension {name} is not built (pip install --no-build-isolation -e .)"
        return None, f"{name} failed to load: {exc}"
    except OSError as exc:
        return None, f"{name} failed to load: {exc}"
    return module, None


_C, LOAD_ERROR = _load()


def unavailable_reason() -> str | None:
    return LOAD_ERROR


def _split(value: float | Tensor | None, default: float = 1.0) -> tuple[float, Tensor | None]:
    """A "float or 0-d tensor" argument as the extension takes it: (value, None) or (0, tensor)."""
    if isinstance(value, Tensor):
        return 0.0, value
    return (default if value is None else float(value)), None


def multi_tensor_norm(tensors: list[Tensor], norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    if not tensors:
        return reference.multi_tensor_norm(tensors, norm_type, per_tensor, found_inf)
    total, norms = _C.multi_tensor_norm(tensors, float(norm_type), per_tensor, found_inf)
    return (total, norms) if per_tensor else total


def unscale_and_check_(tensors: list[Tensor], inv_scale: float | Tensor, found_inf: Tensor) -> None:
    if tensors:
        _C.unscale_and_check_(tensors, *_split(inv_scale), found_inf)


def scale_(tensors: list[Tensor], coef: float | Tensor) -> None:
    if tensors:
        _C.scale_(tensors, *_split(coef))


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    if tensors:
        _C.clamp_(tensors, float(clip_value))


def adaptive_clip_(params, grads, clip_factor: float, eps: float, norm_type: float, unitwise: bool) -> None:
    if params:
        _C.adaptive_clip_(params, grads, float(clip_factor), float(eps), float(norm_type), bool(unitwise))


def _step_arguments(lr, maximize, grad_scale, found_inf, clip_coef):
    """The step-wide scalars of an update as the extension takes them."""
    return _C.StepArguments(
        *_split(lr), bool(maximize), *_split(grad_scale), found_inf, *_split(clip_coef), grad_scale is not None,
        clip_coef is not None,
    )  # fmt: skip


def _adamw_arguments(*, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf, clip_coef,
                     decoupled_weight_decay):  # fmt: skip
    step = _step_arguments(lr, maximize, grad_scale, found_inf, clip_coef)
    return _C.AdamWArguments(step, float(beta1), float(beta2), float(eps), float(weight_decay),
                             bool(decoupled_weight_decay))  # fmt: skip


def _sgd_arguments(*, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, grad_scale, found_inf,
                   clip_coef):  # fmt: skip
    step = _step_arguments(lr, maximize, grad_scale, found_inf, clip_coef)
    return _C.SGDArguments(step, float(momentum), float(dampening), float(weight_decay), bool(nesterov),
                           bool(first_step))  # fmt: skip


def _lion_arguments(*, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf, clip_coef):
    step = _step_arguments(lr, maximize, grad_scale, found_inf, clip_coef)
    return _C.LionArguments(step, float(beta1), float(beta2), float(weight_decay))


def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    max_exp_avg_sqs: list[Tensor] | None,
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    clip_coef: float | Tensor | None,
    decoupled_weight_decay: bool = True,
) -> None:
    if not params:
        return
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
                 grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
                 decoupled_weight_decay=decoupled_weight_decay)  # fmt: skip
    try:
        _C.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs or [], _adamw_arguments(**hyper))
    except NotImplementedError:  # a dtype combination not compiled; raised before any write
        reference.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs=max_exp_avg_sqs, **hyper)


def sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    clip_coef: float | Tensor | None,
) -> None:
    if not params:
        return
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize, first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
                 clip_coef=clip_coef)  # fmt: skip
    try:
        _C.sgd_(params, grads, momentum_buffers or [], _sgd_arguments(**hyper))
    except NotImplementedError:  # a dtype combination not compiled; raised before any write
        reference.sgd_(params, grads, momentum_buffers, **hyper)


def lion_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    clip_coef: float | Tensor | None,
) -> None:
    if not params:
        return
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                 found_inf=found_inf, clip_coef=clip_coef)  # fmt: skip
    try:
        _C.lion_(params, grads, exp_avgs, _lion_arguments(**hyper))
    except NotImplementedError:  # a dtype combination not compiled; raised before any write
        reference.lion_(params, grads, exp_avgs, **hyper)


def multi_tensor_norm_planned(plan: dict, norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    """``multi_tensor_norm`` of the grads that fastopt.optim's step plan holds for one device
    (``plan["watch"]``: its GradWatch and the entries' ranges), read as C++ tensors."""
    watch, ranges = plan["watch"]
    native = plan.get("cpu")
    if native is None:  # the chunks of these grads, worked out once
        native = plan["cpu"] = _C.NormPlan(watch, ranges)
    total, norms = native.norm(watch, float(norm_type), per_tensor, found_inf)
    return (total, norms) if per_tensor else total


# The planned updates: each op's extension plan (AdamWPlan, SGDPlan, LionPlan), how its arguments
# are made, its state lists (as the plan's constructor takes them) and the unplanned op.
_PLANNED = {
    "adamw_": ("AdamWPlan", _adamw_arguments, ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")),
    "sgd_": ("SGDPlan", _sgd_arguments, ("momentum_buffers",)),
    "lion_": ("LionPlan", _lion_arguments, ("exp_avgs",)),
}


def _planned(op: str, lists: dict[str, list[Tensor]], plan: dict, hyper: dict) -> None:
    """An update for a caller that keeps ``plan`` (a dict, empty at first) while ``lists`` holds the
    same params and states, validated by the op in ``fastopt.ops``, and grads of their shapes,
    checked (fastopt.optim's step plan; see ``fastopt.ops.update_prechecked_``). The extension's
    plan kept there has worked out the chunks, addresses and loops once: a call reads only the
    grads' addresses and dtypes, from the step plan's GradWatch when ``plan["watch"]`` is there
    (then ``lists["grads"]`` may be unfilled), else from ``lists["grads"]``. Lists that cannot be
    planned (a non-contiguous param or state, a dtype combination not compiled) take the op."""
    plan_name, make_arguments, state_names = _PLANNED[op]
    native = plan.get("cpu")
    if native is False or not lists["params"]:
        return _listed(op, lists, plan, hyper)
    arguments = make_arguments(**hyper)
    watched = plan.get("watch")

    def step() -> bool:
        if watched is not None:
            return native.step_watched(watched[0], watched[1], arguments)
        return native.step_list(lists["grads"], arguments)

    try:
        if native is not None and step():
            return
        # First call, or a param moved since (p.data = x): plan these lists, with their grads.
        if watched is not None:
            watched[0].fill_lists()
        native = plan["cpu"] = getattr(_C, plan_name)(
            lists["params"], lists["grads"], *[lists.get(name) or [] for name in state_names]
        )
        step()
    except RuntimeError as exc:  # NotImplementedError too: a dtype combination not compiled
        if not isinstance(exc, NotImplementedError) and f"{plan_name}:" not in str(exc):
            raise
        plan["cpu"] = False  # lists the plan cannot hold; raised before any write
        _listed(op, lists, plan, hyper)


def _listed(op: str, lists: dict[str, list[Tensor]], plan: dict, hyper: dict) -> None:
    """The op on the lists, filled first from the step plan's GradWatch when there is one."""
    watched = plan.get("watch")
    if watched is not None:
        watched[0].fill_lists()
    if op == "adamw_":
        adamw_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
               max_exp_avg_sqs=lists.get("max_exp_avg_sqs"), **hyper)  # fmt: skip
    elif op == "sgd_":
        sgd_(lists["params"], lists["grads"], lists.get("momentum_buffers"), **hyper)
    else:
        lion_(lists["params"], lists["grads"], lists["exp_avgs"], **hyper)


def adamw_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, beta1, beta2, eps, weight_decay, maximize,
                   grad_scale, found_inf, clip_coef, decoupled_weight_decay=True) -> None:  # fmt: skip
    """``adamw_`` for fastopt.optim's step plan (see ``_planned``)."""
    _planned("adamw_", lists, plan, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                         maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                                         clip_coef=clip_coef, decoupled_weight_decay=decoupled_weight_decay))  # fmt: skip


def sgd_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, momentum, dampening, weight_decay, nesterov,
                 maximize, first_step, grad_scale, found_inf, clip_coef) -> None:  # fmt: skip
    """``sgd_`` for fastopt.optim's step plan (see ``_planned``)."""
    _planned("sgd_", lists, plan, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                       nesterov=nesterov, maximize=maximize, first_step=first_step,
                                       grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef))  # fmt: skip


def lion_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, beta1, beta2, weight_decay, maximize, grad_scale,
                  found_inf, clip_coef) -> None:  # fmt: skip
    """``lion_`` for fastopt.optim's step plan (see ``_planned``)."""
    _planned("lion_", lists, plan, dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                                        grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef))  # fmt: skip
