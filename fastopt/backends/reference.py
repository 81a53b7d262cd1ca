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


class _Outputs:
    """The tensors an update writes, as the math sees them: the tensors themselves when it can run
    in place (nothing may skip it, every tensor in its compute dtype), else copies in the compute
    dtype, written back by ``commit`` (through ``where`` when ``skip`` is given, so that a skipped
    step keeps every old bit)."""

    def __init__(self, compute_dtypes: list[torch.dtype], skip: Tensor | None):
        self.compute_dtypes, self.skip, self.pairs = compute_dtypes, skip, []

    def working(self, tensors: list[Tensor]) -> list[Tensor]:
        in_place = self.skip is None and all(t.dtype == d for t, d in zip(tensors, self.compute_dtypes))
        values = tensors if in_place else [t.to(d, copy=True) for t, d in zip(tensors, self.compute_dtypes)]
        self.pairs.append((tensors, values))
        return values

    def commit(self) -> None:
        skip = None if self.skip is None else self.skip.reshape(()) != 0
        for targets, values in self.pairs:
            if values is targets:
                continue
            if skip is None:
                torch._foreach_copy_(targets, values)
                continue
            for old, new in zip(targets, values):  # the old value where skipping, in one pass
                torch.where(skip, old, new.to(old.dtype), out=old)


def _skip_flag(found_inf: Tensor | None) -> tuple[bool, Tensor | None]:
    """(return now, the flag the math must still skip on): a CPU found_inf is read on the host
    (non-zero: nothing to do; zero: as without it); otherwise the step decides on the device."""
    if found_inf is None:
        return False, None
    skip_now = _host_flag(found_inf)
    if skip_now is None:
        return False, found_inf
    return skip_now, None


def _effective_grads(grads: list[Tensor], compute_dtypes: list[torch.dtype], maximize: bool,
                     grad_scale: float | Tensor | None, clip_coef: float | Tensor | None) -> list[Tensor]:
    """Each grad as an update uses it, in its compute dtype: g / grad_scale * clip_coef, negated
    when maximizing (torch's order: the negation first; the factors are exact on it)."""
    values = [g.to(d) for g, d in zip(grads, compute_dtypes)]  # read only: no copy needed
    if maximize:
        values = torch._foreach_neg(values)
    if grad_scale is not None:
        values = torch._foreach_div(values, grad_scale)
    if clip_coef is not None:
        values = torch._foreach_mul(values, clip_coef)
    return values


def _decay_(params: list[Tensor], lr: float | Tensor, weight_decay: float, compute_dtypes: list[torch.dtype]) -> None:
    """params *= 1 - lr * weight_decay, the factor formed in float64 (on the device for a tensor
    lr) and rounded once to each param's compute dtype, as the kernels form it. (A 0-d float64
    factor would make torch compute a 0-d param's product in float64.)"""
    if not isinstance(lr, Tensor):
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        return
    factor = 1 - lr.to(torch.float64) * weight_decay
    torch._foreach_mul_(params, [factor.to(d) for d in compute_dtypes])


def _add_scaled_by_lr_(targets: list[Tensor], values: list[Tensor], lr: float | Tensor) -> None:
    """targets += -lr * values, as torch's add with alpha (one fused multiply-add on CPU): addcmul
    with the 0-d lr when it is a tensor (never read on the host)."""
    if isinstance(lr, Tensor):
        lrs = [lr.to(device=t.device, dtype=t.dtype) for t in targets]
        torch._foreach_addcmul_(targets, values, lrs, value=-1)
    else:
        torch._foreach_add_(targets, values, alpha=-lr)


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
    """torch.optim.AdamW's single-tensor math in fp32 (fp64 for fp64 params); with
    ``decoupled_weight_decay=False``, torch.optim.Adam's (weight_decay * param added to the grad).

    A CPU ``found_inf`` is read on the host: non-zero returns before anything is touched, zero
    steps as without it. Otherwise, when the step may be skipped (``found_inf`` on a device, or
    under torch.compile) or a tensor is not in the compute dtype, the math runs on copies that
    are written back at the end (through ``where`` when skipping), so that a skipped step keeps
    every old bit; otherwise it runs in place, as torch's does.
    """
    if not params:
        return
    skip_now, found_inf = _skip_flag(found_inf)
    if skip_now:
        return
    compute_dtypes = [_accumulate_dtype(p.dtype) for p in params]
    outputs = _Outputs(compute_dtypes, found_inf)
    grad_vals = _effective_grads(grads, compute_dtypes, maximize, grad_scale, clip_coef)
    if not decoupled_weight_decay and weight_decay != 0:
        grad_vals = torch._foreach_add(grad_vals, [p.to(d) for p, d in zip(params, compute_dtypes)], alpha=weight_decay)

    new_steps = outputs.working(steps)
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

    new_params = outputs.working(params)
    if decoupled_weight_decay and weight_decay != 0:
        _decay_(new_params, lr, weight_decay, compute_dtypes)
    new_exp_avgs = outputs.working(exp_avgs)
    torch._foreach_lerp_(new_exp_avgs, grad_vals, 1 - beta1)
    new_exp_avg_sqs = outputs.working(exp_avg_sqs)
    torch._foreach_mul_(new_exp_avg_sqs, beta2)
    torch._foreach_addcmul_(new_exp_avg_sqs, grad_vals, grad_vals, value=1 - beta2)
    second_moment = new_exp_avg_sqs
    if max_exp_avg_sqs is not None:
        second_moment = outputs.working(max_exp_avg_sqs)
        torch._foreach_maximum_(second_moment, new_exp_avg_sqs)

    denom = torch._foreach_sqrt(second_moment)
    torch._foreach_div_(denom, per_tensor(bias_correction2_sqrt))
    torch._foreach_add_(denom, eps)
    # p + (-step_size * m) / denom: the order in which torch's addcdiv_ evaluates.
    update = torch._foreach_mul(new_exp_avgs, per_tensor(neg_step_size))
    torch._foreach_div_(update, denom)
    torch._foreach_add_(new_params, update)
    outputs.commit()


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
    """torch.optim.SGD's single-tensor math in fp32 (fp64 for fp64 params). ``momentum_buffers``
    is None without momentum; ``first_step``: the buffers hold no history yet and are set to the
    grad (torch's first step), not read. Skipping as ``adamw_``."""
    if not params:
        return
    skip_now, found_inf = _skip_flag(found_inf)
    if skip_now:
        return
    compute_dtypes = [_accumulate_dtype(p.dtype) for p in params]
    outputs = _Outputs(compute_dtypes, found_inf)
    grad_vals = _effective_grads(grads, compute_dtypes, maximize, grad_scale, clip_coef)
    new_params = outputs.working(params)
    if weight_decay != 0:
        grad_vals = torch._foreach_add(grad_vals, new_params, alpha=weight_decay)
    if momentum_buffers is not None:
        buffers = outputs.working(momentum_buffers)
        if first_step:
            torch._foreach_copy_(buffers, grad_vals)
        else:
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grad_vals, alpha=1 - dampening)
        grad_vals = torch._foreach_add(grad_vals, buffers, alpha=momentum) if nesterov else buffers
    _add_scaled_by_lr_(new_params, grad_vals, lr)
    outputs.commit()


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
    """Lion (Chen et al. 2023): p = p * (1 - lr * weight_decay) - lr * sign(lerp(m, g, 1 - beta1)),
    then m = lerp(m, g, 1 - beta2); in fp32 (fp64 for fp64 params). Skipping as ``adamw_``."""
    if not params:
        return
    skip_now, found_inf = _skip_flag(found_inf)
    if skip_now:
        return
    compute_dtypes = [_accumulate_dtype(p.dtype) for p in params]
    outputs = _Outputs(compute_dtypes, found_inf)
    grad_vals = _effective_grads(grads, compute_dtypes, maximize, grad_scale, clip_coef)
    new_exp_avgs = outputs.working(exp_avgs)
    directions = torch._foreach_lerp(new_exp_avgs, grad_vals, 1 - beta1)
    torch._foreach_sign_(directions)
    new_params = outputs.working(params)
    if weight_decay != 0:
        _decay_(new_params, lr, weight_decay, compute_dtypes)
    _add_scaled_by_lr_(new_params, directions, lr)
    torch._foreach_lerp_(new_exp_avgs, grad_vals, 1 - beta2)
    outputs.commit()
