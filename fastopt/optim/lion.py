"""fastopt.optim.Lion: the Lion optimizer (Chen et al., 2023), on fastopt's fused step."""

from __future__ import annotations

import torch
from torch import Tensor

from fastopt import ops
from fastopt.optim.optimizer import FusedOptimizer, _GroupLists

__all__ = ["Lion"]


class Lion(FusedOptimizer):
    """Lion ("Symbolic Discovery of Optimization Algorithms", Chen et al. 2023): each step moves
    every element by ``lr`` in the direction of ``sign(beta1 * m + (1 - beta1) * g)``, with
    decoupled weight decay, then ``m = beta2 * m + (1 - beta2) * g``. One state per param
    (``exp_avg``), so it keeps half of Adam's state memory. The paper's advice: an lr 3-10x
    smaller than AdamW's and a weight decay 3-10x larger, for the same effective decay.

    The constructor follows the common PyTorch implementations (lucidrains' ``lion-pytorch``,
    timm's): ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False)``.
    fastopt's own arguments and what differs from torch's optimizers are in
    ``fastopt.optim.FusedOptimizer``'s docstring.
    """

    _OP = "lion_"
    _FLAT_STATE_KEYS = ("exp_avg",)
    _GROUP_DEFAULTS = {"maximize": False, "foreach": None, "differentiable": False, "fused": None}

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **fastopt_options,
    ):
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        for k, beta in enumerate(betas):
            ops.check_real(f"betas[{k}]", beta, minimum=0.0, below=1.0)
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)  # fmt: skip
        super().__init__(params, defaults, **fastopt_options)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg",)

    def _init_state(self, param: Tensor, group: dict, state: dict) -> bool:
        if "exp_avg" in state:
            return False
        dtype = self.state_dtype or param.dtype
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return True

    def _update_hyper(self, group: dict, lists: _GroupLists) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], maximize=group["maximize"])

    def _check_group(self, group: dict, where: str) -> None:
        for k, beta in enumerate(group["betas"]):
            ops.check_real(f"{where}['betas'][{k}]", beta, minimum=0.0, below=1.0)
        ops.check_real(f"{where}['weight_decay']", group["weight_decay"], minimum=0.0)
