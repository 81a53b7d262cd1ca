"""The meaning of every fastopt op, in plain torch.

This is the ``torch`` backend: the fallback for any device without a faster backend and the
oracle every other backend is tested against. Functions here receive arguments that
``fastopt.ops`` has already validated and normalised (lists of tensors on one device, floats
or 0-d tensors for scalars), so they do no checking of their own.

Vectorised ``torch._foreach_*`` calls are used where torch has them; a list comprehension of
single torch calls stands in where it has none (dim-wise norms, ``where``). No function here
reads a tensor's value on the host, but one: ``adamw_`` reads ``found_inf`` when it is a CPU
tensor, which costs nothing (no device to wait for), to skip an overflowed step at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Devices this backend runs on: any device torch itself supports.
DEVICE_TYPES = None

# Guard against dividing by a vanishing grad norm (torch's clip_grad_norm_ and timm's AGC use 1e-6).
NORM_EPS = 1e-6


def _nonempty(tensors: list[Tensor]) -> list[Tensor]:
    return [t for t in tensors if t.numel() > 0]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 / fp32 accumulate in fp32; fp64 keeps its precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor_norms(tensors: list[Tensor], norm_type: float) -> list[Tensor]:
    """Per-tensor norms as 0-d float32 tensors; every tensor is non-empty."""
    if all(t.dtype != torch.float64 for t in tensors):
        return list(torch._foreach_norm(tensors, norm_type, dtype=torch.float32))
    # fp64 cannot be narrowed inside vector_norm: norm it in fp64, then round the result.
    return [
        torch.linalg.vector_norm(t, norm_type, dtype=_accumulate_dtype(t.dtype)).float()
        for t in tensors
    ]


def multi_tensor_norm(tensors: list[Tensor], norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    device = tensors[0].device if tensors else torch.device("cpu")
    nonempty = _nonempty(tensors)
    if found_inf is not None and nonempty:
        _flag_nonfinite(nonempty, found_inf)
    if not nonempty:
        norms = torch.zeros(len(tensors), dtype=torch.float32, device=device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        return (total, norms) if per_tensor else total
    nonempty_norms = _tensor_norms(nonempty, norm_type)
    # The total is the norm of the per-tensor norms, exactly as torch.nn.utils.clip_grad_norm_
    # forms it, so fp32 results match torch's bit for bit.
    total = torch.linalg.vector_norm(torch.stack(nonempty_norms), norm_type)
    if not per_tensor:
        return total
    if len(nonempty) == len(tensors):
        return total, torch.stack(nonempty_norms)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    it = iter(nonempty_norms)
    return total, torch.stack([next(it) if t.numel() > 0 else zero for t in tensors])


def _multiply_(tensors: list[Tensor], factor: float | Tensor) -> None:
    """t *= factor, the product formed in fp32 (fp64 for fp64 tensors) and rounded once.

    torch._foreach_mul_ rounds a Python factor to the tensors' dtype (fp16 / bf16) first, and
    on CUDA so does a tensor factor of another dtype; so the factor is a 0-d tensor, and
    off the CPU the low-precision tensors are multiplied in a widened copy.
    """
    if not isinstance(factor, Tensor):
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        factor = torch.full((), factor, dtype=dtype, device=tensors[0].device)
    if tensors[0].device.type == "cpu":  # the CPU kernels read a 0-d factor at full precision
        torch._foreach_mul_(tensors, factor)
        return
    same = [t for t in tensors if t.dtype == factor.dtype]
    other = [t for t in tensors if t.dtype != factor.dtype]
    if same:
        torch._foreach_mul_(same, factor)
    if other:
        widened = [t.to(_accumulate_dtype(t.dtype), copy=True) for t in other]
        torch._foreach_mul_(widened, factor)
        torch._foreach_copy_(other, widened)


def _flag_nonfinite(tensors: list[Tensor], found_inf: Tensor) -> None:
    """found_inf = 1.0 if any element is inf or nan; otherwise left as it was. nan propagates
    through both min and max, and an inf shows in one of them."""
    extremes = torch.stack([torch.stack(torch.aminmax(t)).float() for t in tensors])
    found_inf.masked_fill_(~torch.isfinite(extremes).all(), 1.0)


def unscale_and_check_(tensors: list[Tensor], inv_scale: float | Tensor, found_inf: Tensor) -> None:
    nonempty = _nonempty(tensors)
    if not nonempty:
        return
    # Checked before scaling, as torch's _amp_foreach_non_finite_check_and_unscale_ does.
    _flag_nonfinite(nonempty, found_inf)
    _multiply_(nonempty, inv_scale)


def scale_(tensors: list[Tensor], coef: float | Tensor) -> None:
    nonempty = _nonempty(tensors)
    if nonempty:
        _multiply_(nonempty, coef)


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    nonempty = _nonempty(tensors)
    if nonempty:
        torch._foreach_clamp_min_(nonempty, -clip_value)
        torch._foreach_clamp_max_(nonempty, clip_value)


def unit_norms(t: Tensor, norm_type: float, unitwise: bool) -> Tensor:
    """Norm of each output unit (dim 0) of a >=2-D tensor, kept broadcastable against it;
    the norm of the whole tensor when it is <=1-D or unitwise is False."""
    dtype = _accumulate_dtype(t.dtype)
    if t.ndim <= 1 or not unitwise:
        return torch.linalg.vector_norm(t, norm_type, dtype=dtype)
    return torch.linalg.vector_norm(t, norm_type, dim=tuple(range(1, t.ndim)), keepdim=True, dtype=dtype)


def adaptive_clip_(
    params: list[Tensor],
    grads: list[Tensor],
    clip_factor: float,
    eps: float,
    norm_type: float,
    unitwise: bool,
) -> None:
    for p, g in zip(params, grads):
        if g.numel() == 0:
            continue
        coef = agc_coef(unit_norms(p, norm_type, unitwise), unit_norms(g, norm_type, unitwise), clip_factor, eps)
        if coef.ndim == 0:  # a whole-tensor factor: multiplied in fp32, not first rounded to g's dtype
            _multiply_([g], coef)
        else:  # per-unit factors broadcast: torch multiplies in their (fp32) precision
            g.mul_(coef)


def agc_coef(weight_norm: Tensor, grad_norm: Tensor, clip_factor: float, eps: float) -> Tensor:
    """AGC (Brock et al. 2021): a unit's grad may be at most clip_factor times its weight's norm,
    with the weight norm floored at eps so that zero-initialised weights can still move."""
    max_norm = weight_norm.clamp_min(eps) * clip_factor
    return torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(NORM_EPS), 1.0)


def _host_flag(found_inf: Tensor) -> bool | None:
    """Whether found_inf is non-zero, when that can be read at no cost: a plain CPU tensor, read
    from its memory (no dispatcher call, so no host read a GPU would sync on), outside
    torch.compile's tracing (a traced step must not branch on a value). None otherwise: the
    step then decides on the device."""
    if type(found_inf) is not Tensor or found_inf.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return any(value != 0 for value in found_inf.reshape(-1).tolist())


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
    """torch.optim.AdamW's single-tensor math in fp32 (fp64 for fp64 params).

    A CPU ``found_inf`` is read on the host: non-zero returns before anything is touched, zero
    steps as without it. Otherwise, when the step may be skipped (``found_inf`` on a device, or
    under torch.compile) or a tensor is not in the compute dtype, the math runs on copies that
    are written back at the end (through ``where`` when skipping), so that a skipped step keeps
    every old bit; otherwise it runs in place, as torch's does.
    """
    if not params:
        return
    if found_inf is not None:
        skip_now = _host_flag(found_inf)
        if skip_now:
            return
        if skip_now is False:
            found_inf = None
    compute_dtypes = [_accumulate_dtype(p.dtype) for p in params]

    def working(tensors: list[Tensor]) -> list[Tensor]:
        in_place = found_inf is None and all(t.dtype == d for t, d in zip(tensors, compute_dtypes))
        return tensors if in_place else [t.to(d, copy=True) for t, d in zip(tensors, compute_dtypes)]

    grad_vals = [g.to(d) for g, d in zip(grads, compute_dtypes)]  # read only: no copy needed
    if maximize:
        grad_vals = torch._foreach_neg(grad_vals)
    if grad_scale is not None:
        grad_vals = torch._foreach_div(grad_vals, grad_scale)
    if clip_coef is not None:
        grad_vals = torch._foreach_mul(grad_vals, clip_coef)

    new_steps = working(steps)
    torch._foreach_add_(new_steps, 1)
    # Bias corrections in fp64, as torch.optim.AdamW(foreach=False) forms them on the host,
    # but from the device step counters: the step count is never read back.
    step64 = torch.stack(new_steps).to(torch.float64)
    lr64 = lr.to(torch.float64) if isinstance(lr, Tensor) else lr
    bias_correction1 = 1 - torch.pow(beta1, step64)
    bias_correction2_sqrt = (1 - torch.pow(beta2, step64)).sqrt()
    neg_step_size = -lr64 / bias_correction1

    def per_tensor(values64: Tensor) -> list[Tensor]:
        return [v.to(d) for v, d in zip(values64.unbind(), compute_dtypes)]

    new_params = working(params)
    if weight_decay != 0:
        torch._foreach_mul_(new_params, 1 - lr64 * weight_decay)
    new_exp_avgs = working(exp_avgs)
    torch._foreach_lerp_(new_exp_avgs, grad_vals, 1 - beta1)
    new_exp_avg_sqs = working(exp_avg_sqs)
    torch._foreach_mul_(new_exp_avg_sqs, beta2)
    torch._foreach_addcmul_(new_exp_avg_sqs, grad_vals, grad_vals, value=1 - beta2)
    second_moment = new_exp_avg_sqs
    new_max_exp_avg_sqs = None
    if max_exp_avg_sqs is not None:
        new_max_exp_avg_sqs = working(max_exp_avg_sqs)
        torch._foreach_maximum_(new_max_exp_avg_sqs, new_exp_avg_sqs)
        second_moment = new_max_exp_avg_sqs

    denom = torch._foreach_sqrt(second_moment)
    torch._foreach_div_(denom, per_tensor(bias_correction2_sqrt))
    torch._foreach_add_(denom, eps)
    # p + (-step_size * m) / denom: the order in which torch's addcdiv_ evaluates.
    update = torch._foreach_mul(new_exp_avgs, per_tensor(neg_step_size))
    torch._foreach_div_(update, denom)
    torch._foreach_add_(new_params, update)

    outputs = [(params, new_params), (exp_avgs, new_exp_avgs), (exp_avg_sqs, new_exp_avg_sqs), (steps, new_steps)]
    if max_exp_avg_sqs is not None:
        outputs.append((max_exp_avg_sqs, new_max_exp_avg_sqs))
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for targets, values in outputs:
        if values is targets:
            continue
        if skip is None:
            torch._foreach_copy_(targets, values)
            continue
        for old, new in zip(targets, values):  # the old value where skipping, in one pass
            torch.where(skip, old, new.to(old.dtype), out=old)
