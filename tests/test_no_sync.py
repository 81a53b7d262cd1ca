"""No op reads a tensor's value on the host: the calls that would sync a GPU never happen.

On CPU this is checked at the dispatcher: `.item()`, `bool(t)`, `float(t)`, `.tolist()` and
`if t:` all go through `aten._local_scalar_dense` or `aten.is_nonzero`, so a dispatch mode that
raises on those (on data tensors) catches any value read on the hot path. On a GPU the same
calls run under `torch.cuda.set_sync_debug_mode("error")`.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastopt
from fastopt import ops
from tests.helpers import MIXED_SHAPES, devices, inject_nonfinite, no_host_sync, random_tensors

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class ForbidHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))


def make_calls(device):
    """Every op, with tensor scalars where the API allows them and inf/nan in the grads."""

    def params_with_grads(seed):
        params = [torch.nn.Parameter(t) for t in random_tensors(MIXED_SHAPES, torch.float32, device, seed=seed)]
        for p, g in zip(params, random_tensors(MIXED_SHAPES, torch.float32, device, seed=seed + 1)):
            p.grad = g
        return params

    grads = random_tensors(MIXED_SHAPES, torch.bfloat16, device, seed=1)
    inject_nonfinite(grads, seed=2)
    params = random_tensors(MIXED_SHAPES, torch.float32, device, seed=3)
    states = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    found_inf = torch.zeros(1, device=device)
    scalar = torch.tensor(0.5, device=device)
    return {
        "multi_tensor_norm": lambda: fastopt.multi_tensor_norm(grads, math.inf, per_tensor=True),
        "unscale_and_check_": lambda: fastopt.unscale_and_check_(grads, torch.ones(1, device=device), found_inf),
        "scale_": lambda: fastopt.scale_(grads, scalar),
        "clamp_": lambda: ops.clamp_(grads, 1.0),
        "clip_grad_norm_": lambda: fastopt.clip_grad_norm_(params_with_grads(4), 1.0),
        "clip_grad_value_": lambda: fastopt.clip_grad_value_(params_with_grads(5), 1.0),
        "adaptive_clip_grad_": lambda: fastopt.adaptive_clip_grad_(params_with_grads(6)),
        "adamw_": lambda: fastopt.adamw_(
            params, random_tensors(MIXED_SHAPES, torch.bfloat16, device, seed=7), *states, steps,
            lr=torch.tensor(1e-3, device=device), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
            grad_scale=torch.tensor(2.0, device=device), found_inf=found_inf, clip_coef=scalar,
        ),  # fmt: skip
        "sgd_": lambda: fastopt.sgd_(
            params, random_tensors(MIXED_SHAPES, torch.bfloat16, device, seed=8), states[0],
            lr=torch.tensor(1e-2, device=device), momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
            grad_scale=torch.tensor(2.0, device=device), found_inf=found_inf, clip_coef=scalar,
        ),  # fmt: skip
        "lion_": lambda: fastopt.lion_(
            params, random_tensors(MIXED_SHAPES, torch.bfloat16, device, seed=9), states[1],
            lr=torch.tensor(1e-3, device=device), beta1=0.9, beta2=0.99, weight_decay=0.1,
            grad_scale=torch.tensor(2.0, device=device), found_inf=found_inf, clip_coef=scalar,
        ),  # fmt: skip
    }


OPS = list(make_calls("cpu"))


@pytest.mark.parametrize("op", OPS)
def test_no_host_reads_on_cpu(op):
    call = make_calls("cpu")[op]
    with ForbidHostReads():
        call()


def test_the_detector_detects():
    with pytest.raises(AssertionError, match="host read"), ForbidHostReads():
        torch.ones(1).item()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", [d for d in devices() if d != "cpu"])
def test_no_sync_on_gpu(op, device):
    call = make_calls(device)[op]
    call()  # first call: allocator warm-up, lazy init
    with no_host_sync():
        call()
