"""fastopt.amp.GradScaler: torch.amp.GradScaler with the overflow check moved into the step.

torch's scaler, when the user did not call ``unscale_``, runs a full read+write pass over the
grads (an unscale by 1.0) just to look for inf/nan before ``optimizer.step()``. With a fastopt
optimizer this scaler skips that pass: the optimizer's own read pass (the one that takes the
grad norm) sets the flag, and its update pass skips on the device. Everything else — scale(),
update() with its backoff and growth, state_dict, enabled=False — is torch's own code. Its
``unscale_`` works for fp16 grads too (torch's refuses them) and for bf16.

This holds for every fastopt optimizer, whatever its ``_step_supports_amp_scaling`` (which tells
``torch.amp.GradScaler`` and Lightning whether the step unscales itself): this scaler asks the
optimizer's ``_fastopt_can_check_inf`` instead. After a user's ``unscale_`` (to clip outside the
step), ``step`` is torch's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from fastopt import ops

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """A drop-in for ``torch.amp.GradScaler`` (same constructor and methods).

    ``scaler.step_skipped``: a 0-d bool device tensor, True when the last ``step()`` found an
    inf/nan and skipped the update (None before the first step). Reading it syncs; keeping it
    as a tensor does not.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_found_inf: Tensor | None = None

    @property
    def step_skipped(self) -> Tensor | None:
        return None if self._last_found_inf is None else self._last_found_inf != 0

    def _unscale_grads_(self, optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool):
        """One fused unscale + check per device, any floating grad dtype (fp16 included)."""
        grads_by_device: dict[torch.device, list[Tensor]] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:  # torch coalesces sparse grads first: leave those to it
                    return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
                grads_by_device.setdefault(param.grad.device, []).append(param.grad)
        found_inf_per_device = {}
        for device, grads in grads_by_device.items():
            flag = found_inf if found_inf.device == device else found_inf.to(device, copy=True)
            # A ZeRO-split optimizer names its group: the verdict must be the same on every rank.
            group = getattr(optimizer, "process_group", None)
            ops.unscale_and_check_(grads, inv_scale.to(device), flag, process_group=group)
            found_inf_per_device[device] = flag
        return found_inf_per_device

    def step(self, optimizer, *args, **kwargs):
        """torch's ``step``, except that a fastopt optimizer not yet unscaled does the inf/nan
        check in its own read pass instead of a separate pass here. Never syncs with a fastopt
        optimizer (torch's path reads the flag on the host for other optimizers)."""
        if not self._enabled:
            return super().step(optimizer, *args, **kwargs)
        state = self._per_optimizer_states[id(optimizer)]
        fused_check = (
            getattr(optimizer, "_fastopt_can_check_inf", False)
            and state["stage"] is OptState.READY
            and "closure" not in kwargs
        )
        if not fused_check:
            retval = super().step(optimizer, *args, **kwargs)
        else:
            self._check_scale_growth_tracker("step")
            found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
            optimizer.grad_scale = self._scale * getattr(optimizer, "grad_scale", 1)
            optimizer.found_inf = found_inf
            optimizer._fastopt_scaler_defers_inf_check = True
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale, optimizer.found_inf, optimizer._fastopt_scaler_defers_inf_check
            state["found_inf_per_device"] = {found_inf.device: found_inf}
            state["stage"] = OptState.STEPPED
        found = [f.to(self._scale.device) for f in state["found_inf_per_device"].values()]
        self._last_found_inf = torch.stack(found).sum() if found else None
        return retval
