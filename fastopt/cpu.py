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
