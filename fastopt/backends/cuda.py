"""The ``cuda`` backend: fastopt's CUDA kernels (``csrc/cuda/``, the extension ``fastopt._C``).

The extension registers the ops as ``torch.ops.fastopt.*`` with CUDA implementations; this
module loads it, registers their fake (meta) implementations so that ``torch.compile`` and
``torch.library.opcheck`` can trace them, and maps the backend interface of
``fastopt.backends.reference`` onto them. Each pass of an op is one kernel launch whatever the number of
tensors: the per-tensor metadata lives in device memory, cached by the extension per layout
and stream (csrc/README.md).

A missing extension, or one built against another torch, is logged once and leaves this backend
unavailable with the reason (``python -m fastopt info``); the ops then run on Triton or torch.

``FASTOPT_CUDA_EMULATION=1`` (a test mode, as ``TRITON_INTERPRET=1`` is for Triton): the same kernels
and their host side built for the host emulation of the device (csrc/emulation, ``fastopt._C_emulated``,
ops ``torch.ops.fastopt_emulated.*``) run on CPU tensors, without a GPU.

Eager calls on plain tensors take each op's eager entry (``fastopt._C.adamw_``, ...: the same host
code, the Python lists read in place instead of boxed tensor by tensor); traced calls, dispatch
modes and tensor subclasses go through ``torch.ops`` (``_call``).

``adamw_planned_``, ``sgd_planned_``, ``lion_planned_`` and ``multi_tensor_norm_planned``: the updates
and the norm of fastopt.optim's step plan, through the extension's ``UpdatePlan`` and ``NormPlan``
(pybind11 classes, not torch ops): built once per plan, a call takes only the grads' addresses
(from the step plan's GradWatch, which has checked the grads) and the scalars, then launches, on
device tables of its own.
"""

from __future__ import annotations

import importlib
import logging
import operator
import os

import torch
from torch import Tensor

from fastopt.backends import reference
from fastopt.backends.watched import WatchedColumn, fill_lists, grads_of

EMULATED = os.environ.get("FASTOPT_CUDA_EMULATION") == "1"
EXTENSION = "fastopt._C_emulated" if EMULATED else "fastopt._C"
LIBRARY = "fastopt_emulated" if EMULATED else "fastopt"
DEVICE_TYPES = ("cpu",) if EMULATED else ("cuda",)

_log = logging.getLogger("fastopt")


def _torch_release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14': the part of torch's version its C++ ABI follows."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _load_extension() -> str | None:
    """Import fastopt._C (which registers the ops); the reason it cannot be used, or None.
    A broken or incompatible extension is logged: it is there, so the user expects it to run."""
    reason = _extension_problem()
    if reason is not None and "not built" not in reason:
        _log.warning("fastopt: the CUDA backend is unavailable: %s; using Triton or torch instead", reason)
    return reason


def _extension_problem() -> str | None:
    try:
        build_info = importlib.import_module("fastopt._build_info")
    except ImportError:
        build_info = None
    if build_info is not None and not EMULATED and _torch_release(build_info.TORCH_VERSION) != _torch_release(
        torch.__version__
    ):
        return (
            f"fastopt._C was built against torch {build_info.TORCH_VERSION} but torch {torch.__version__} is"
            " running; rebuild it (pip install --no-build-isolation -e .)"
        )
    try:
        importlib.import_module(EXTENSION)
    except ImportError as exc:
        if exc.name == EXTENSION:
            return f"the CUDA extension {EXTENSION} is not built (see csrc/README.md)"
        return f"{EXTENSION} failed to load: {exc}"
    except OSError as exc:
        return f"{EXTENSION} failed to load: {exc}"
    return None


LOAD_ERROR = _load_extension()
_EXTENSION = importlib.import_module(EXTENSION) if LOAD_ERROR is None else None


def unavailable_reason() -> str | None:
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    if not torch.cuda.is_available() and not EMULATED:
        return "no CUDA GPU is visible"
    return None


# --------------------------------------------------------------------------- fake implementations
# Shapes and dtypes of what each op returns; the in-place ops return nothing.


def _register_fakes() -> None:
    def multi_tensor_norm(tensors, norm_type, per_tensor, found_inf):
        total = tensors[0].new_empty((), dtype=torch.float32)
        return total, tensors[0].new_empty(len(tensors) if per_tensor else 0, dtype=torch.float32)

    def unscale_and_check_(tensors, inv_scale, inv_scale_tensor, found_inf, norm_type=None, per_tensor=False):
        total = tensors[0].new_empty(() if norm_type is not None else (0,), dtype=torch.float32)
        num_norms = len(tensors) if norm_type is not None and per_tensor else 0
        return total, tensors[0].new_empty(num_norms, dtype=torch.float32)

    def returns_nothing(*args, **kwargs):
        return None

    torch.library.register_fake(f"{LIBRARY}::multi_tensor_norm", multi_tensor_norm)
    torch.library.register_fake(f"{LIBRARY}::unscale_and_check_", unscale_and_check_)
    for name in ("scale_", "clamp_", "adaptive_clip_", "adamw_", "sgd_", "lion_"):
        torch.library.register_fake(f"{LIBRARY}::{name}", returns_nothing)


if LOAD_ERROR is None:
    _register_fakes()

_OPS = getattr(torch.ops, LIBRARY)  # torch.ops.fastopt (torch.ops.fastopt_emulated under the emulation)
# The extension's eager entries (fastopt._C.adamw_, ...: the ops without the dispatcher), when it
# has them.
_EAGER = _EXTENSION if _EXTENSION is not None and hasattr(_EXTENSION, "adamw_") else None


# --------------------------------------------------------------------------- the backend's ops


def _call(name: str, *args):
    """Op ``name`` of the extension. An eager call takes its eager entry (``fastopt._C.<name>``),
    which reads the lists in place: torch.ops converts every tensor of every list to an IValue and
    back, 13 of the 19 ms of host work of an adamw_ over 5,000 params on a 2-core machine. A call
    that torch.compile traces, or made under a dispatch mode (fake tensors, functionalization, a
    user's mode), goes through ``torch.ops.fastopt.<name>``, which they must see; so does one with
    a tensor subclass that dispatches to Python (the eager entry refuses it with a TypeError,
    before writing anything)."""
    if _EAGER is not None and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack():
        try:
            return getattr(_EAGER, name)(*args)
        except TypeError:  # a subclass, or arguments the schema's checks will name
            pass
    return getattr(_OPS, name)(*args)


def _split(value: float | Tensor | None, default: float = 1.0) -> tuple[float, Tensor | None]:
    """A "float or device scalar" argument as the schemas take it: (value, None) or (0, tensor)."""
    if isinstance(value, Tensor):
        return 0.0, value
    return (default if value is None else float(value)), None


# The (param, grad, state) dtypes the update kernels (AdamW, SGD, Lion) are compiled for
# (csrc/cuda/multi_tensor.cuh, FASTOPT_UPDATE_COMBINATIONS).
_f64, _f32, _bf16, _f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
UPDATE_BUILDS = frozenset(
    [(_f64, _f64, _f64), (_f32, _f32, _f32), (_f32, _bf16, _f32), (_f32, _f16, _f32)]
    + [(low, grad, state) for low in (_bf16, _f16) for grad in (low, _f32) for state in (low, _f32)]
)


def _builds_cover(params, grads, *states) -> bool:
    """Whether the kernels have a build for every tensor: its states all of one dtype (the param's
    when it has none), and (param, grad, state) compiled."""
    dtype = operator.attrgetter("dtype")
    states = [s for s in states if s]
    state_dtypes = list(map(dtype, states[0] if states else params))
    if not all(list(map(dtype, s)) == state_dtypes for s in states[1:]):
        return False
    return set(zip(map(dtype, params), map(dtype, grads), state_dtypes)) <= UPDATE_BUILDS


def _run_or_fall_back(op, fallback, covered) -> None:
    """op() on the kernels; fallback() (the reference) where they have no build for these dtypes.
    Traced through the fake, the op cannot say NotImplementedError until the graph runs: under
    torch.compile the choice is made in Python (``covered``)."""
    if torch.compiler.is_compiling() and not covered():
        return fallback()
    try:
        op()
    except NotImplementedError:  # raised before any write
        fallback()


def multi_tensor_norm(tensors: list[Tensor], norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    if not tensors:
        return reference.multi_tensor_norm(tensors, norm_type, per_tensor, found_inf)
    total, norms = _call("multi_tensor_norm", tensors, norm_type, per_tensor, found_inf)
    return (total, norms) if per_tensor else total


def unscale_and_check_(tensors: list[Tensor], inv_scale: float | Tensor, found_inf: Tensor) -> None:
    if tensors:
        _call("unscale_and_check_", tensors, *_split(inv_scale), found_inf)


def scale_(tensors: list[Tensor], coef: float | Tensor) -> None:
    if tensors:
        _call("scale_", tensors, *_split(coef))


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    if tensors:
        _call("clamp_", tensors, clip_value)


def adaptive_clip_(params, grads, clip_factor: float, eps: float, norm_type: float, unitwise: bool) -> None:
    if params:
        _call("adaptive_clip_", params, grads, clip_factor, eps, norm_type, unitwise)


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
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
        max_exp_avg_sqs=max_exp_avg_sqs, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
        decoupled_weight_decay=decoupled_weight_decay,
    )  # fmt: skip
    _run_or_fall_back(
        lambda: _call(
            "adamw_",
            params, grads, exp_avgs, exp_avg_sqs, steps, *_split(lr), beta1, beta2, eps, weight_decay, maximize,
            max_exp_avg_sqs or [], *_split(grad_scale), found_inf, *_split(clip_coef), decoupled_weight_decay,
        ),
        lambda: reference.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper),
        lambda: _builds_cover(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs),
    )  # fmt: skip


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
    hyper = dict(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, first_step=first_step, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
    )  # fmt: skip
    _run_or_fall_back(
        lambda: _call(
            "sgd_",
            params, grads, momentum_buffers or [], *_split(lr), momentum, dampening, weight_decay, nesterov, maximize,
            first_step, *_split(grad_scale), found_inf, *_split(clip_coef),
        ),
        lambda: reference.sgd_(params, grads, momentum_buffers, **hyper),
        lambda: _builds_cover(params, grads, momentum_buffers),
    )  # fmt: skip


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
    hyper = dict(
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf, clip_coef=clip_coef,
    )  # fmt: skip
    _run_or_fall_back(
        lambda: _call(
            "lion_",
            params, grads, exp_avgs, *_split(lr), beta1, beta2, weight_decay, maximize, *_split(grad_scale),
            found_inf, *_split(clip_coef),
        ),
        lambda: reference.lion_(params, grads, exp_avgs, **hyper),
        lambda: _builds_cover(params, grads, exp_avgs),
    )  # fmt: skip


# --------------------------------------------------------------------------- the planned updates
# fastopt.optim's step plan calls these from its second step, with a ``plan`` dict it keeps while
# its params and states stay the same (see ``fastopt.ops.update_prechecked_``). The extension's
# UpdatePlan (csrc/cuda/host_runtime.h; a pybind11 class, not a torch op, so the lists are never
# boxed) holds their addresses and device tables; a call reads the grads list in place and the
# scalars, then launches.

_PLANNED_OPS = {"adamw_": 0, "sgd_": 1, "lion_": 2}
# UpdatePlan.step's answers: done; nothing done, plan again; nothing done, run the op (capturing a
# CUDA graph); nothing done, no table for this stream yet (step with the grads as a list).
_DONE, _REPLAN, _UNPLANNED, _NEEDS_GRADS = 0, 1, 2, 3

# fastopt.optim's step plan may leave its grads lists unfilled: multi_tensor_norm_planned and the
# planned updates read the grads' addresses from the plan's GradWatch (fastopt.backends.watched).
READS_GRAD_WATCH = True


def _planned_states(op: str, lists: dict[str, list[Tensor]]) -> list[list[Tensor]]:
    """The state lists as UpdatePlan takes them (an absent optional list as [])."""
    names = {"adamw_": ("exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs"), "sgd_": ("momentum_buffers",),
             "lion_": ("exp_avgs",)}[op]  # fmt: skip
    return [lists.get(name) or [] for name in names]


def _planned(op: str, lists: dict[str, list[Tensor]], plan: dict, scalars: tuple, listed) -> None:
    """One planned update: the plan's UpdatePlan for ``op`` (made on the first call, and again when
    a param moved or a grad changed dtype or contiguity), else ``listed()``, the op on the lists:
    for lists a plan cannot hold (a strided tensor, a dtype combination without a kernel build)
    and during CUDA-graph capture, whose tables are the op's. The states are trusted to keep their
    storage while ``plan`` lives, as the step plan promises. With the step plan's GradWatch
    (``plan["watch"]``) the UpdatePlan gets the grads' addresses from it (``WatchedColumn``), and
    the grads list is filled only to make the plan, or for the op."""
    if not lists["params"]:
        return
    watched = plan.get("watch")
    if not hasattr(_EXTENSION, "UpdatePlan"):  # an extension built before UpdatePlan
        fill_lists(watched)
        return listed()
    key = ("cuda", op)  # a plan dict shared by two ops keeps one UpdatePlan per op
    native = plan.get(key)
    if native is not None:
        status = _planned_step(native, lists, plan.get(key + ("watched",)), scalars)
        if status == _DONE:
            return
        if status != _REPLAN:
            fill_lists(watched)
            return listed()
    fill_lists(watched)  # the grads as tensors, to plan with
    try:
        native = _EXTENSION.UpdatePlan(_PLANNED_OPS[op], lists["params"], lists["grads"], _planned_states(op, lists))
    except RuntimeError as exc:  # NotImplementedError too; raised before any write
        plan.pop(key, None)
        if isinstance(exc, NotImplementedError) or "UpdatePlan:" in str(exc):
            return listed()
        raise
    plan[key] = native
    if watched is not None:  # the plan is made for these grads' dtypes, contiguous
        plan[key + ("watched",)] = WatchedColumn(watched[0], [(watched[1], len(lists["params"]))])
    if native.step(lists["grads"], *scalars) != _DONE:
        listed()


def _planned_step(native, lists: dict[str, list[Tensor]], column: WatchedColumn | None, scalars: tuple) -> int:
    """UpdatePlan.step with the grads from the watch's column, or from the list without one."""
    if column is None:
        return native.step(lists["grads"], *scalars)
    if column.follow() is None:  # a grad changed dtype or contiguity
        return _REPLAN
    status = native.step(column.addresses, *scalars)
    if status == _NEEDS_GRADS:  # a stream without a table of this plan: made from the grads
        column.watch.fill_lists()
        status = native.step(lists["grads"], *scalars)
    return status


def multi_tensor_norm_planned(plan: dict, norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    """``multi_tensor_norm`` of the grads that fastopt.optim's step plan holds for one device
    (``plan["watch"]``: its GradWatch and the entries' ranges): the extension's NormPlan, kept in
    ``plan``, made once from the grads and then given their addresses (``WatchedColumn``). The
    grads are made Python tensors only to make it, and for the op (strided grads, CUDA-graph
    capture, another stream)."""
    watch, ranges = plan["watch"]
    entry = plan.get("cuda")
    if entry is None or entry[1].follow() is None:  # first call, or a grad changed dtype or contiguity
        entry = _norm_plan(plan, watch, ranges)
    if entry is not None:
        native, column = entry
        result = native.norm(column.addresses, float(norm_type), per_tensor, found_inf)
        if result is not None:
            return result if per_tensor else result[0]
    grads = grads_of(watch, ranges)
    return multi_tensor_norm(grads, norm_type, per_tensor, found_inf)


def _norm_plan(plan: dict, watch, ranges: list[tuple[int, int]]) -> tuple | None:
    """A NormPlan for the watch's grads of now, and their column, kept in ``plan``; None where none
    can be made (strided grads, no grad, during CUDA-graph capture, an older extension)."""
    plan.pop("cuda", None)
    column = WatchedColumn(watch, ranges)
    if not hasattr(_EXTENSION, "NormPlan") or column.dtypes is None or not len(column.addresses):
        return None
    grads = grads_of(watch, ranges)
    try:
        entry = plan["cuda"] = (_EXTENSION.NormPlan(grads), column)
    except RuntimeError as exc:  # made during capture: the op's own capture rules apply
        if "NormPlan:" not in str(exc):
            raise
        return None
    return entry


def _step_scalars(lr, grad_scale, clip_coef, found_inf, maximize, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0,
                  decoupled_weight_decay=True, momentum=0.0, dampening=0.0, nesterov=False,
                  first_step=False):  # fmt: skip
    """UpdatePlan.step's scalar arguments, in its order."""
    return (*_split(lr), *_split(grad_scale), *_split(clip_coef), found_inf, bool(maximize), float(beta1),
            float(beta2), float(eps), float(weight_decay), bool(decoupled_weight_decay), float(momentum),
            float(dampening), bool(nesterov), bool(first_step))  # fmt: skip


def adamw_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, beta1, beta2, eps, weight_decay, maximize,
                   grad_scale, found_inf, clip_coef, decoupled_weight_decay=True) -> None:  # fmt: skip
    """``adamw_`` for fastopt.optim's step plan (see ``_planned``)."""
    scalars = _step_scalars(lr, grad_scale, clip_coef, found_inf, maximize, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay)  # fmt: skip
    _planned("adamw_", lists, plan, scalars, lambda: adamw_(
        lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"], lr=lr, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
        max_exp_avg_sqs=lists.get("max_exp_avg_sqs"), grad_scale=grad_scale, found_inf=found_inf,
        clip_coef=clip_coef, decoupled_weight_decay=decoupled_weight_decay,
    ))  # fmt: skip


def sgd_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, momentum, dampening, weight_decay, nesterov,
                 maximize, first_step, grad_scale, found_inf, clip_coef) -> None:  # fmt: skip
    """``sgd_`` for fastopt.optim's step plan (see ``_planned``)."""
    scalars = _step_scalars(lr, grad_scale, clip_coef, found_inf, maximize, weight_decay=weight_decay,
                            momentum=momentum, dampening=dampening, nesterov=nesterov,
                            first_step=first_step)  # fmt: skip
    _planned("sgd_", lists, plan, scalars, lambda: sgd_(
        lists["params"], lists["grads"], lists.get("momentum_buffers"), lr=lr, momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
        grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
    ))  # fmt: skip


def lion_planned_(lists: dict[str, list[Tensor]], plan: dict, *, lr, beta1, beta2, weight_decay, maximize, grad_scale,
                  found_inf, clip_coef) -> None:  # fmt: skip
    """``lion_`` for fastopt.optim's step plan (see ``_planned``)."""
    scalars = _step_scalars(lr, grad_scale, clip_coef, found_inf, maximize, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay)  # fmt: skip
    _planned("lion_", lists, plan, scalars, lambda: lion_(
        lists["params"], lists["grads"], lists["exp_avgs"], lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
        clip_coef=clip_coef,
    ))  # fmt: skip
