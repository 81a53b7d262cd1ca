"""fastopt.optim.SGD: torch.optim.SGD's drop-in, with clipping, AGC and AMP inside the step."""

from __future__ import annotations

import torch
from torch import Tensor

from fastopt import ops
from fastopt.optim.optimizer import FusedOptimizer, _GroupLists

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    """SGD with momentum, dampening, Nesterov and weight decay: torch.optim.SGD's constructor,
    math and state_dict (``momentum_buffer`` per param, absent before its first step, none without
    momentum). fp32 trajectories equal ``torch.optim.SGD(foreach=False)`` bit for bit on the cpu
    and torch backends (torch's CPU kernels round ``add(x, alpha=a)`` as one fused multiply-add,
    and so do they); the GPU backends are within an ulp per step.

    A param's first step sets its buffer to the grad (torch's first step), in the same one pass.
    A first step skipped on the device (an AMP overflow, a spike) leaves a zero buffer: the next
    step then forms ``momentum * 0 + (1 - dampening) * g``, which is torch's first step when
    ``dampening`` is 0 (the default) and ``(1 - dampening) * g`` otherwise (torch never runs a
    skipped step; telling which it was would need a host sync).

    fastopt's own arguments (``max_grad_norm``, AGC, ``spike_guard``, ``monitor``, ``flat_states``
    for the momentum buffers, ``flat_grads``, ``process_group``, ``state_dtype``) and what differs
    from torch are in ``fastopt.optim.FusedOptimizer``'s docstring.
    """

    _OP = "sgd_"
    _FLAT_STATE_KEYS = ("momentum_buffer",)
    _GROUP_DEFAULTS = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
                       "foreach": None, "differentiable": False, "fused": None}  # fmt: skip

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **fastopt_options,
    ):
        # torch.optim.SGD's checks and messages.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        super().__init__(params, defaults, **fastopt_options)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _init_state(self, param: Tensor, group: dict, state: dict) -> bool:
        if state.get("momentum_buffer") is not None:
            return False
        # Zeros, not torch.empty: a first step skipped on the device leaves the buffer as made.
        dtype = self.state_dtype or param.dtype
        state["momentum_buffer"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return True

    def _update_hyper(self, group: dict, lists: _GroupLists) -> dict:
        return dict(
            momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"], first_step=self._first_step(lists),
        )  # fmt: skip

    @staticmethod
    def _first_step(lists: _GroupLists) -> bool:
        """Whether every buffer of these lists is new. Never in a traced step: a compiled graph
        would keep the first step's choice for every later step; the zero buffers give the first
        step's result anyway without dampening (traced groups have none, see _host_read_hyper)."""
        return not torch.compiler.is_compiling() and bool(lists.fresh) and False not in lists.fresh

    def _host_read_hyper(self, group: dict) -> bool:
        # A dampened first step needs the host's word on which buffers are new: not traced.
        return group["momentum"] != 0 and group["dampening"] != 0

    def _check_group(self, group: dict, where: str) -> None:
        momentum = ops.check_real(f"{where}['momentum']", group["momentum"], minimum=0.0)
        dampening = ops.check_real(f"{where}['dampening']", group["dampening"])
        ops.check_real(f"{where}['weight_decay']", group["weight_decay"], minimum=0.0)
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{where}: Nesterov momentum requires a momentum and zero dampening")

    def _update_group(self, kernels, group: dict, lists: _GroupLists, device: torch.device, hyper: dict,
                      prechecked: bool) -> None:  # fmt: skip
        """One update call, or two when only some buffers are new (a param stepped for the first
        time beside others): the new ones take torch's first step."""
        if not hyper["first_step"] and True in lists.fresh and not torch.compiler.is_compiling():
            for first in (True, False):
                part = [i for i, fresh in enumerate(lists.fresh) if fresh is first]
                sub = {name: [values[i] for i in part] for name, values in lists.as_op_lists().items()}
                kernels.sgd_(**sub, **dict(hyper, first_step=first))
            return
        super()._update_group(kernels, group, lists, device, hyper, prechecked)
