"""fastopt: the optimizer half of a PyTorch training step at the speed of memory.

Fused multi-tensor norms, clipping, adaptive gradient clipping (AGC), AMP unscale + inf/nan
check and AdamW, behind drop-ins for torch's functions. Every op runs on the best backend
available for the tensors' device (``available_backends()``); ``use_backend(name)`` or the
``FASTOPT_BACKEND`` environment variable forces one.
"""

from fastopt import amp, optim
from fastopt.backends import available_backends, use_backend
from fastopt.clip import adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_
from fastopt.ops import adamw_, lion_, multi_tensor_norm, scale_, sgd_, unscale_and_check_

__version__ = "0.1.0"

__all__ = [
    "multi_tensor_norm",
    "unscale_and_check_",
    "scale_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "adaptive_clip_grad_",
    "adamw_",
    "sgd_",
    "lion_",
    "available_backends",
    "use_backend",
    "amp",
    "optim",
]
