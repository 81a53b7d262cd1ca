"""fastopt.optim.Adam and fastopt.optim.AdamW: torch's drop-ins, with clipping inside the step.

One update op for both (``fastopt.ops.adamw_``; Adam is its ``decoupled_weight_decay=False``
flag), as torch's AdamW is its Adam with ``decoupled_weight_decay=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastopt import ops
from fastopt.optim.optimizer import FusedOptimizer, _beta_value, _GroupLists, _step_dtype

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba) with torch.optim.Adam's constructor, math and state_dict: weight decay
    as an L2 term added to the grad, or decoupled (AdamW) with ``decoupled_weight_decay=True``,
    as torch's. AMSGrad, maximize, tensor lr and betas as torch's.

    fastopt's own arguments (clipping inside the step, AGC, spike guard, monitor, flat storage,
    ZeRO process group, ``state_dtype`` for the moments) and what differs from torch are in
    ``fastopt.optim.FusedOptimizer``'s docstring.
    """

    _OP = "adamw_"
    _FLAT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                       "differentiable": False, "fused": None, "decoupled_weight_decay": False}  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        **fastopt_options,
    ):
        # torch.optim.Adam's checks and messages.
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for k, beta in enumerate(betas):
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{k}] must be 1-element")
        # As torch: a 1-element tensor beta is kept as a 0-d tensor (read on the host by step()).
        betas = tuple(beta.squeeze() if isinstance(beta, Tensor) and beta.dim() != 0 else beta for beta in betas)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=bool(decoupled_weight_decay),
        )  # fmt: skip
        super().__init__(params, defaults, **fastopt_options)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq", "step")

    def _init_state(self, param: Tensor, group: dict, state: dict) -> bool:
        fresh = not state
        if fresh:
            dtype = self.state_dtype or param.dtype
            state["step"] = torch.zeros((), dtype=_step_dtype(), device=param.device)
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        return fresh

    def _update_hyper(self, group: dict, lists: _GroupLists) -> dict:
        beta1, beta2 = map(_beta_value, group["betas"])
        return dict(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"],
        )  # fmt: skip

    def _check_group(self, group: dict, where: str) -> None:
        for k, beta in enumerate(group["betas"]):
            if isinstance(beta, Tensor):  # its value is read (and range-checked) by the op
                if beta.numel() != 1 or not beta.is_floating_point():
                    raise ValueError(f"{where}['betas'][{k}] must be a number or a 1-element floating tensor")
                continue
            ops.check_real(f"{where}['betas'][{k}]", beta, minimum=0.0, below=1.0)
        ops.check_real(f"{where}['eps']", group["eps"], minimum=0.0)
        ops.check_real(f"{where}['weight_decay']", group["weight_decay"], minimum=0.0)

    def _host_read_hyper(self, group: dict) -> bool:
        return any(isinstance(beta, Tensor) for beta in group["betas"])

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:  # checkpoints from before torch 1.12 keep steps as numbers
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state.get("step", torch.zeros(()))):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32, device=p.device)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter) with torch.optim.AdamW's constructor, math and state_dict:
    ``fastopt.optim.Adam`` with decoupled weight decay (default 1e-2), as torch's AdamW is torch's
    Adam with ``decoupled_weight_decay=True``.

    fastopt's own arguments (``max_grad_norm``, AGC, ``spike_guard``, ``monitor``, ``flat_states``,
    ``flat_grads``, ``process_group``, ``state_dtype``) and what differs from torch are in
    ``fastopt.optim.FusedOptimizer``'s docstring.
    """

    _GROUP_DEFAULTS = {**Adam._GROUP_DEFAULTS, "decoupled_weight_decay": True}

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **fastopt_options,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True, **fastopt_options,
        )  # fmt: skip
