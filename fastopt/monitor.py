"""A training monitor that lives on the device: what each optimizer step saw, kept without a sync.

Attach one to ``fastopt.optim.AdamW(..., monitor=TrainingMonitor())``. Every step writes into
device tensors: the global grad norm into a ring buffer, whether it was clipped and skipped,
and the per-tensor (per-layer) grad norms, which come from the step's own read pass. Even the
ring's write position is a device tensor, so a step captured in a CUDA graph records correctly
on every replay. Nothing is read back until you call ``summary()`` or ``history()``, typically
when you log.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TrainingMonitor"]


class TrainingMonitor:
    """Device-side record of optimizer steps.

    Args:
        history: how many recent steps the grad-norm ring buffer keeps.
        names: optional names for the per-tensor norms, in the optimizer's param order
            (for example ``[n for n, p in model.named_parameters() if p.requires_grad]``).
    """

    def __init__(self, history: int = 1024, names: list[str] | None = None):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.capacity = history
        self.names = names
        self._buffers: dict[str, Tensor] = {}
        self._per_tensor_indices: list[int] = []

    def _buffer(self, name: str, shape, dtype, device) -> Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != torch.Size(shape) or buffer.device != device:
            buffer = torch.zeros(shape, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer

    def record(
        self,
        grad_norm: Tensor,
        clip_coef: Tensor,
        skipped: Tensor,
        per_tensor_norms: Tensor | None = None,
        param_indices: list[int] | None = None,
    ) -> None:
        """Called by the optimizer after its read pass; device tensors in, nothing read back.
        ``param_indices``: which params (in the optimizer's order) the per-tensor norms are of."""
        device = grad_norm.device
        slot = self._buffer("position", (1,), torch.int64, device)
        self._buffer("grad_norm", (self.capacity,), torch.float32, device).index_copy_(0, slot, grad_norm.reshape(1))
        self._buffer("skipped", (self.capacity,), torch.bool, device).index_copy_(0, slot, skipped.reshape(1))
        slot.add_(1).remainder_(self.capacity)
        self._buffer("steps", (), torch.int64, device).add_(1)
        self._buffer("clipped_steps", (), torch.int64, device).add_(clip_coef < 1)
        self._buffer("skipped_steps", (), torch.int64, device).add_(skipped)
        if per_tensor_norms is not None:
            self._buffer("per_tensor", per_tensor_norms.shape, torch.float32, device).copy_(per_tensor_norms)
            self._per_tensor_indices = param_indices or list(range(per_tensor_norms.numel()))

    @property
    def steps(self) -> int:
        """Steps recorded (this reads the device)."""
        return int(self._buffers["steps"].item()) if "steps" in self._buffers else 0

    def history(self) -> dict[str, Tensor]:
        """The recorded window, oldest first, on the host (this reads the device)."""
        steps = self.steps
        if not steps:
            return {"grad_norm": torch.zeros(0), "skipped": torch.zeros(0, dtype=torch.bool)}
        count = min(steps, self.capacity)
        first = (int(self._buffers["position"].item()) - count) % self.capacity
        order = [(first + i) % self.capacity for i in range(count)]
        return {name: self._buffers[name].cpu()[order] for name in ("grad_norm", "skipped")}

    def summary(self, top: int = 5) -> dict:
        """Numbers for a log line (this reads the device): steps, the last and mean grad norm
        of the window, the fraction of steps clipped, steps skipped, and the largest per-tensor
        grad norms of the last step."""
        steps = self.steps
        if not steps:
            return {"steps": 0}
        window = self.history()
        finite = window["grad_norm"][torch.isfinite(window["grad_norm"])]
        out = {
            "steps": steps,
            "grad_norm": window["grad_norm"][-1].item(),
            "grad_norm_mean": finite.mean().item() if finite.numel() else float("nan"),
            "clip_rate": self._buffers["clipped_steps"].item() / steps,
            "skipped_steps": int(self._buffers["skipped_steps"].item()),
        }
        if "per_tensor" in self._buffers:
            norms = self._buffers["per_tensor"].cpu()
            values, positions = norms.topk(min(top, norms.numel()))
            params = [self._per_tensor_indices[k] for k in positions.tolist()]
            names = [self.names[i] if self.names else f"param{i}" for i in params]
            out["largest_grad_norms"] = dict(zip(names, values.tolist()))
        return out

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "buffers": {k: v.clone() for k, v in self._buffers.items()},
                "per_tensor_indices": list(self._per_tensor_indices)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"saved monitor keeps {state['capacity']} steps, this one {self.capacity}")
        self._buffers = {k: v.clone() for k, v in state["buffers"].items()}
        self._per_tensor_indices = list(state["per_tensor_indices"])
