"""The ``cpu`` backend: fastopt's C++ loops for CPU tensors (``csrc/cpu/``, the extension
``fastopt._cpu_torch<release>``, e.g. ``fastopt._cpu_torch2_13``, built for that torch release).

The same machinery as the CUDA backend, compiled for the host: the chunk plan (``csrc/chunk_plan.h``)
cuts all tensors of a call into blocks of 64 K elements, one ``at::parallel_for`` walks them, and
each block runs the per-element math of ``csrc/element_math.h`` in a loop that g++ vectorises,
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

from fastopt import backends, reference

DEVICE_TYPES = ("cpu",)
# fastopt.optim.AdamW's step plan may leave the grads in its GradWatch (C++) instead of Python lists:
# multi_tensor_norm_planned and adamw_planned_ read them there.
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
) -> None:
    if not params:
        return
    try:
        _C.adamw_(
            params, grads, exp_avgs, exp_avg_sqs, steps, *_split(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(maximize), max_exp_avg_sqs or [], *_split(grad_scale), found_inf,
            *_split(clip_coef), grad_scale is not None, clip_coef is not None,
        )  # fmt: skip
    except NotImplementedError:  # a dtype combination not compiled; raised before any write
        reference.adamw_(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, maximize=maximize, max_exp_avg_sqs=max_exp_avg_sqs,
            grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        )  # fmt: skip


def multi_tensor_norm_planned(plan: dict, norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    """``multi_tensor_norm`` of the grads that fastopt.optim.AdamW's step plan holds for one device
    (``plan["watch"]``: its GradWatch and the entries' ranges), read as C++ tensors."""
    watch, ranges = plan["watch"]
    total, norms = _C.planned_norm(watch, ranges, float(norm_type), per_tensor, found_inf)
    return (total, norms) if per_tensor else total


def adamw_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, beta1, beta2, eps, weight_decay, maximize,
                   grad_scale, found_inf, clip_coef) -> None:  # fmt: skip
    """``adamw_`` for a caller that keeps ``plan`` (a dict, empty at first) while ``lists`` holds the
    same params and states, validated by ``fastopt.ops.adamw_``, and grads of their shapes, checked
    (fastopt.optim.AdamW's step plan; see ``fastopt.ops.adamw_prechecked_``). The extension's
    ``AdamWPlan`` kept there has worked out the chunks, addresses and loops once: a call reads
    only the grads' addresses and dtypes, from the step plan's GradWatch when ``plan["watch"]``
    is there (then ``lists["grads"]`` may be unfilled), else from ``lists["grads"]``. Lists that
    cannot be planned (a non-contiguous param or state, a dtype combination not compiled) take
    ``adamw_``."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
                 grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)  # fmt: skip
    native = plan.get("cpu")
    if native is False or not lists["params"]:
        return _adamw_listed(lists, plan, hyper)
    arguments = _C.AdamWArguments(
        *_split(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize), *_split(grad_scale),
        found_inf, *_split(clip_coef), grad_scale is not None, clip_coef is not None,
    )  # fmt: skip
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
        native = plan["cpu"] = _C.AdamWPlan(
            lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
            lists.get("max_exp_avg_sqs") or [], lists["steps"],
        )  # fmt: skip
        step()
    except RuntimeError as exc:  # NotImplementedError too: a dtype combination not compiled
        if not isinstance(exc, NotImplementedError) and "AdamWPlan:" not in str(exc):
            raise
        plan["cpu"] = False  # lists the plan cannot hold; raised before any write
        _adamw_listed(lists, plan, hyper)


def _adamw_listed(lists: dict[str, list[Tensor]], plan: dict, hyper: dict) -> None:
    """``adamw_`` on the lists, filled first from the step plan's GradWatch when there is one."""
    watched = plan.get("watch")
    if watched is not None:
        watched[0].fill_lists()
    adamw_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
           max_exp_avg_sqs=lists.get("max_exp_avg_sqs"), **hyper)  # fmt: skip
