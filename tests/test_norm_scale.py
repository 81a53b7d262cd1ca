"""multi_tensor_norm, unscale_and_check_ and scale_: against float64 math and torch's own ops."""

import math

import pytest
import torch

import fastopt
from tests.helpers import (
    FLOAT_DTYPES,
    MIXED_SHAPES,
    assert_bitwise_equal,
    assert_matches_torch,
    describe_dtype,
    devices,
    float64_norm,
    inject_nonfinite,
    random_tensors,
    tolerance,
)

NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_norm_matches_float64(device, dtype, norm_type, non_contiguous):
    tensors = random_tensors(MIXED_SHAPES, dtype, device, seed=1, non_contiguous=non_contiguous)
    total, norms = fastopt.multi_tensor_norm(tensors, norm_type, per_tensor=True)

    assert total.dtype == torch.float32 and total.shape == () and total.device.type == device
    assert norms.dtype == torch.float32 and norms.shape == (len(tensors),)
    # bf16 / fp16 inputs are exact in fp64, so only the fp32 accumulation (and the fp32 result,
    # for fp64 inputs) differs from the float64 computation.
    tol = tolerance(torch.float32)
    torch.testing.assert_close(total.double().cpu(), float64_norm(tensors, norm_type), **tol)
    expected = torch.stack([float64_norm([t], norm_type) for t in tensors])
    torch.testing.assert_close(norms.double().cpu(), expected, **tol)
    assert all(norms[i] == 0 for i, t in enumerate(tensors) if t.numel() == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
def test_norm_equals_torch_get_total_norm_bitwise(device, norm_type):
    tensors = random_tensors([(100, 30), (7,), (), (5, 5, 5)], torch.float32, device, seed=2)
    expected = torch.nn.utils.get_total_norm(tensors, norm_type, foreach=False)
    assert_matches_torch(fastopt.multi_tensor_norm(tensors, norm_type), expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
def test_norm_is_bitwise_deterministic(device, dtype):
    tensors = random_tensors([(1000, 37), (4097,), (3, 3)], dtype, device, seed=3)
    first = fastopt.multi_tensor_norm(tensors, per_tensor=True)
    for _ in range(3):
        again = fastopt.multi_tensor_norm(tensors, per_tensor=True)
        assert_bitwise_equal(again[0], first[0])
        assert_bitwise_equal(again[1], first[1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=describe_dtype)
def test_low_precision_norm_accumulates_in_fp32(device, dtype):
    # 2^16 ones: a bf16/fp16 running sum of squares would stall far below 2^16 (bf16 at 256).
    ones = [torch.ones(1 << 16, dtype=dtype, device=device)]
    assert fastopt.multi_tensor_norm(ones).item() == 256.0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_norm_of_nonfinite_input_is_nonfinite(device, norm_type, value):
    tensors = random_tensors(MIXED_SHAPES, torch.float32, device, seed=4)
    inject_nonfinite(tensors, seed=5, count=1, values=(value,))
    total = fastopt.multi_tensor_norm(tensors, norm_type)
    assert torch.isnan(total) if math.isnan(value) else total == math.inf


def test_norm_of_nothing_is_zero():
    assert fastopt.multi_tensor_norm([]).item() == 0.0
    total, norms = fastopt.multi_tensor_norm([torch.empty(0), torch.empty(3, 0)], math.inf, per_tensor=True)
    assert total.item() == 0.0 and norms.tolist() == [0.0, 0.0]


def test_norm_accepts_string_inf_and_a_lone_tensor():
    t = torch.randn(10)
    assert fastopt.multi_tensor_norm(t, "inf") == t.abs().max()


# --------------------------------------------------------------------------- unscale_and_check_


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=describe_dtype)
@pytest.mark.parametrize("inject", [False, True], ids=["finite", "inf-nan"])
def test_unscale_equals_torch_amp_unscale_bitwise(device, dtype, inject):
    tensors = random_tensors(MIXED_SHAPES, dtype, device, seed=6, scale=1000.0)
    if inject:
        inject_nonfinite(tensors, seed=7)
    expected = [t.clone() for t in tensors]
    expected_found = torch.zeros(1, device=device)
    inv_scale = torch.full((1,), 1 / 1024, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(
        [t for t in expected if t.numel()], expected_found, inv_scale
    )

    found_inf = torch.zeros(1, device=device)
    fastopt.unscale_and_check_(tensors, inv_scale, found_inf)

    assert found_inf.item() == (1.0 if inject else 0.0)
    assert_bitwise_equal(found_inf, expected_found)
    for actual, want in zip(tensors, expected):
        # The same values on any backend; which nan bits torch writes depends on its CPU vector width.
        assert_matches_torch(actual, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", devices())
def test_unscale_writes_through_views_and_never_clears_found_inf(device):
    tensors = random_tensors(MIXED_SHAPES, torch.float32, device, seed=8, non_contiguous=True)
    bases = [t._base if t._base is not None else t for t in tensors]
    expected = [t * 0.5 for t in tensors]
    found_inf = torch.ones((), device=device)  # already set by an earlier call: must stay set
    fastopt.unscale_and_check_(tensors, 0.5, found_inf)
    assert found_inf.item() == 1.0
    for actual, want, base in zip(tensors, expected, bases):
        torch.testing.assert_close(actual, want, rtol=0, atol=0)
        assert actual.data_ptr() == base.data_ptr() or actual.numel() == 0


def test_unscale_checks_values_before_scaling():
    # 60000 * 2 overflows fp16, as in torch: the check looks at the input, which is finite.
    t = torch.full((4,), 60000.0, dtype=torch.float16)
    found_inf = torch.zeros(1)
    fastopt.unscale_and_check_([t], 2.0, found_inf)
    assert found_inf.item() == 0.0 and torch.isinf(t).all()


# --------------------------------------------------------------------------- scale_


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("coef_kind", ["float", "0-d tensor", "1-element tensor"])
def test_scale_matches_float64_and_writes_through(device, dtype, coef_kind):
    tensors = random_tensors(MIXED_SHAPES, dtype, device, seed=9, non_contiguous=True)
    coef = {"float": 0.3, "0-d tensor": torch.tensor(0.3), "1-element tensor": torch.tensor([0.3])}[coef_kind]
    if isinstance(coef, torch.Tensor):
        coef = coef.to(device)
    coef_value = float(coef) if isinstance(coef, float) else coef.double().reshape(()).cpu()  # a float32 0.3
    expected = [(t.double().cpu() * coef_value).to(dtype) for t in tensors]
    fastopt.scale_(tensors, coef)
    for actual, want in zip(tensors, expected):
        torch.testing.assert_close(actual.cpu(), want, **tolerance(dtype))


def test_disjoint_views_of_one_flat_buffer_are_accepted():
    # Grads that are views into one flat buffer (DDP buckets, FSDP flat params) are distinct memory.
    flat = torch.randn(100)
    views = [flat[:30].view(5, 6), flat[30:31], flat[31:100]]
    expected = flat * 2
    fastopt.scale_(views, 2.0)
    assert_bitwise_equal(flat, expected)


def test_interleaved_views_are_rejected_as_overlapping():
    # A documented limit: the overlap check compares memory ranges, and these two ranges interleave.
    flat = torch.randn(10)
    with pytest.raises(ValueError, match=r"tensors\[1\] and tensors\[0\] share memory"):
        fastopt.scale_([flat[0::2], flat[1::2]], 2.0)
