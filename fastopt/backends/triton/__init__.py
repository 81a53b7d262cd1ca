"""The ``triton`` backend: every fastopt op as multi-tensor Triton kernels.

Per-tensor metadata (addresses, sizes, which program handles which chunk of which tensor) lives
in device memory, is built with vectorised torch and cached while the tensors keep their
layout, so each pass of an op is one kernel launch at any tensor count (``tables.py``). The
kernels (``kernels.py``) accumulate in fp32 (fp64 for fp64 tensors), reduce in two
deterministic stages, and read every scalar that may be a device tensor (lr, grad_scale,
found_inf, clip_coef, steps) on the device. ``launch.py`` has the ops and their launch counts.
Every op runs under a device guard for its tensors' device; calls made during CUDA-graph capture
get private tables that later calls cannot change; launches whose tensors are 16-byte aligned use
128-bit loads and stores. The optimizer updates (``adamw_``, ``sgd_``, ``lion_``) share one
launch path; ``adamw_planned_``, ``sgd_planned_`` and ``lion_planned_`` are the same ops for
fastopt.optim's step plan, which keeps the op's table and has only the grads' (and params')
pointers re-read per step.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` (Triton's interpreter, which CI uses) on CPU
tensors too. The ops are also registered as torch custom ops (``torch.ops.fastopt_triton.*``,
``library.py``) so that ``torch.compile`` sees one opaque op per call instead of tracing into
the table building.
"""

from __future__ import annotations

import os

# The interpreter runs kernels on the host, where the address table's pointers are CPU addresses.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE_TYPES = ("cuda", "cpu") if INTERPRETED else ("cuda",)

MINIMUM_TRITON = (3, 6)

# fastopt.optim's step plan may leave its grads lists unfilled: multi_tensor_norm_planned and the
# planned updates read the grads' pointers from the plan's GradWatch (the CPU extension's).
READS_GRAD_WATCH = True


def unavailable_reason() -> str | None:
    import torch
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < MINIMUM_TRITON:
        return f"triton {triton.__version__} is too old (fastopt needs >= {'.'.join(map(str, MINIMUM_TRITON))})"
    if not INTERPRETED and not torch.cuda.is_available():
        return "no CUDA GPU is visible (TRITON_INTERPRET=1 runs Triton kernels on CPU tensors)"
    return None


from fastopt.backends.triton.library import (  # noqa: E402  (the backend's ops, after its attributes)
    adamw_,
    adamw_planned_,
    adaptive_clip_,
    clamp_,
    lion_,
    lion_planned_,
    multi_tensor_norm,
    multi_tensor_norm_planned,
    scale_,
    sgd_,
    sgd_planned_,
    unscale_and_check_,
)

__all__ = [
    "DEVICE_TYPES",
    "unavailable_reason",
    "multi_tensor_norm",
    "multi_tensor_norm_planned",
    "unscale_and_check_",
    "scale_",
    "clamp_",
    "adaptive_clip_",
    "adamw_",
    "adamw_planned_",
    "sgd_",
    "sgd_planned_",
    "lion_",
    "lion_planned_",
]
