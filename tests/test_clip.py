"""clip_grad_norm_, clip_grad_value_ and adaptive_clip_grad_ against torch and independent math."""

import math

import pytest
import torch

import fastopt
from tests.helpers import (
    MIXED_SHAPES,
    assert_bitwise_equal,
    assert_matches_torch,
    clone_layout,
    describe_dtype,
    devices,
    inject_nonfinite,
    random_tensors,
    tolerance,
)


def make_params(shapes, dtype=torch.float32, device="cpu", *, seed=0, grad_scale=1.0, non_contiguous=False):
    """Parameters with random values and random grads (grads possibly non-contiguous views)."""
    values = random_tensors(shapes, dtype, device, seed=seed)
    grads = random_tensors(shapes, dtype, device, seed=seed + 1000, scale=grad_scale, non_contiguous=non_contiguous)
    params = [torch.nn.Parameter(v) for v in values]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def clone_params(params):
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(clones, params):
        c.grad = None if p.grad is None else clone_layout(p.grad)
    return clones


# --------------------------------------------------------------------------- clip_grad_norm_


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_clip_grad_norm_equals_torch_bitwise(device, norm_type, max_norm, non_contiguous):
    ours = make_params(MIXED_SHAPES, device=device, seed=1, grad_scale=3.0, non_contiguous=non_contiguous)
    theirs = clone_params(ours)
    ours[2].grad = theirs[2].grad = None  # a parameter without a grad is skipped
    for q in theirs:  # torch cannot take the inf-norm of an empty tensor; fastopt ignores them
        if q.numel() == 0:
            q.grad = None

    total = fastopt.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=False)

    assert total.dtype == torch.float32 and total.shape == ()
    assert_matches_torch(total, expected)
    for p, q in zip(ours, theirs):
        if q.grad is not None:
            assert_matches_torch(p.grad, q.grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=describe_dtype)
def test_clip_grad_norm_low_and_high_precision(device, dtype):
    params = make_params(MIXED_SHAPES, dtype, device, seed=2)
    grads64 = [p.grad.to("cpu", torch.float64, copy=True) for p in params]
    norm64 = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads64]))
    coef = min(1.0, 0.25 / (norm64.item() + 1e-6))

    total = fastopt.clip_grad_norm_(params, 0.25)

    torch.testing.assert_close(total.double().cpu(), norm64, **tolerance(torch.float32))
    # The coefficient comes from the float32 norm, so fp64 grads are scaled to fp32 accuracy.
    grad_tol = tolerance(torch.float32 if dtype == torch.float64 else dtype)
    for p, g64 in zip(params, grads64):
        torch.testing.assert_close(p.grad.cpu(), (g64 * coef).to(dtype), **grad_tol)


def test_clip_grad_norm_accepts_a_lone_tensor_a_generator_and_no_grads():
    p = make_params([(5, 4)], seed=3)[0]
    expected = torch.linalg.vector_norm(p.grad)
    assert fastopt.clip_grad_norm_(p, 1e9) == expected
    assert fastopt.clip_grad_norm_((q for q in [p]), 1e9) == expected
    assert fastopt.clip_grad_norm_([torch.nn.Parameter(torch.randn(3))], 1.0).item() == 0.0


def test_clip_grad_norm_scales_by_nonfinite_norm_unless_asked_to_raise():
    params = make_params([(10,), (3, 3)], seed=4)
    inject_nonfinite([params[0].grad], seed=5, count=1, values=(math.inf,))
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, b in zip(params, before):
        assert_bitwise_equal(p.grad, b)
    assert fastopt.clip_grad_norm_(params, 1.0) == math.inf  # torch's behaviour: grads become nan / 0
    assert torch.isnan(params[0].grad).any()


# --------------------------------------------------------------------------- clip_grad_value_


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=describe_dtype)
def test_clip_grad_value_equals_torch(device, dtype):
    ours = make_params(MIXED_SHAPES, dtype, device, seed=6, non_contiguous=True)
    inject_nonfinite([p.grad for p in ours], seed=7)
    theirs = clone_params(ours)
    fastopt.clip_grad_value_(ours, 0.7)
    torch.nn.utils.clip_grad_value_(theirs, 0.7, foreach=False)
    for p, q in zip(ours, theirs):
        # The same values on any backend; which nan bits torch writes depends on its CPU vector width.
        assert_matches_torch(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)
    clip_value = torch.tensor(0.7, dtype=dtype).item()  # 0.7 rounded to the grads' dtype, as torch does
    assert max(p.grad.abs().nan_to_num(0).max().item() for p in ours if p.numel()) <= clip_value


# --------------------------------------------------------------------------- adaptive_clip_grad_


def agc_float64(weight: torch.Tensor, grad: torch.Tensor, clip_factor, eps, norm_type, unitwise) -> torch.Tensor:
    """AGC written out unit by unit in float64, independently of fastopt's code."""
    w, g = weight.double().cpu(), grad.double().cpu()
    if g.numel() == 0:
        return g.clone()
    units = [(i,) for i in range(w.shape[0])] if w.ndim >= 2 and unitwise else [(...,)]
    out = g.clone()
    for unit in units:
        w_norm = torch.linalg.vector_norm(w[unit].reshape(-1), norm_type).item()
        g_norm = torch.linalg.vector_norm(g[unit].reshape(-1), norm_type).item()
        max_norm = clip_factor * max(w_norm, eps)
        if g_norm > max_norm:
            out[unit] = g[unit] * (max_norm / max(g_norm, 1e-6))
    return out


AGC_SHAPES = [(), (7,), (16, 9), (8, 3, 3, 3), (0, 5), (5, 0), (1, 40)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=describe_dtype)
@pytest.mark.parametrize("unitwise", [True, False], ids=["unitwise", "whole-tensor"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=lambda p: f"p={p}")
def test_agc_matches_unit_by_unit_float64(device, dtype, unitwise, norm_type):
    # Grads of mixed magnitude, so that some units are clipped and some are not.
    params = make_params(AGC_SHAPES, dtype, device, seed=8, grad_scale=0.02, non_contiguous=True)
    with torch.no_grad():
        params[2].grad[::2] *= 100
        params[3].grad[1] *= 100
    expected = [agc_float64(p, p.grad, 0.01, 1e-3, norm_type, unitwise) for p in params]
    weights_before = [p.detach().clone() for p in params]
    clipped = sum(not torch.equal(want, p.grad.double().cpu()) for p, want in zip(params, expected))
    assert 0 < clipped < len(params)  # the data exercises both branches

    fastopt.adaptive_clip_grad_(params, norm_type=norm_type, unitwise=unitwise)

    for p, want, w in zip(params, expected, weights_before):
        assert_bitwise_equal(p.detach(), w)  # weights are read, never written
        torch.testing.assert_close(p.grad.cpu(), want.to(dtype), **tolerance(dtype))


@pytest.mark.parametrize("device", devices())
def test_agc_floors_small_weights_at_eps(device):
    # A zero-initialised layer still gets grads up to clip_factor * eps per unit.
    weight = torch.nn.Parameter(torch.zeros(4, 6, device=device))
    weight.grad = torch.randn(4, 6, device=device)
    expected = agc_float64(weight, weight.grad, 0.01, 1e-3, 2.0, True)
    fastopt.adaptive_clip_grad_([weight])
    torch.testing.assert_close(weight.grad.cpu(), expected.float())
    torch.testing.assert_close(weight.grad.norm(dim=1).cpu(), torch.full((4,), 1e-5))


def test_agc_equals_timm_formula():
    """The formula as timm writes it (timm.utils.agc), which docs/design.md follows."""

    def unitwise_norm(x, norm_type):
        if x.ndim <= 1:
            return x.norm(norm_type)
        return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

    params = make_params([(32, 16), (64,), (8, 4, 3, 3)], seed=9, grad_scale=0.05)
    expected = []
    for p in params:
        max_norm = unitwise_norm(p.detach(), 2.0).clamp_(min=1e-3).mul_(0.01)
        grad_norm = unitwise_norm(p.grad, 2.0)
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        expected.append(torch.where(grad_norm < max_norm, p.grad, clipped))
    fastopt.adaptive_clip_grad_(params, clip_factor=0.01, eps=1e-3)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, **tolerance(torch.float32))
