"""Property tests (hypothesis) of multi_tensor_norm and unscale_and_check_ on random lists of
tensors: 0-6 tensors of random shapes (0-d and zero-element included), dtypes and strides
(transposed, stepped and offset views), against oracles written here in float64.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NORM_TYPES = (1.0, 2.0, 3.5, math.inf, 0.5)

# Deterministic (same examples every run), no example database written into the checkout.
# Sized so the file runs in well under 40 s on 2 CPU cores.
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None, print_blob=True)


# --------------------------------------------------------------------------- random tensors

# How a tensor of the drawn shape is made from its base: the view is what the op receives.
VIEWS = {
    "contiguous": (lambda shape: shape, lambda base: base),
    "transposed": (lambda shape: (*shape[:-2], shape[-1], shape[-2]), lambda base: base.transpose(-1, -2)),
    "step": (lambda shape: (2 * shape[0], *shape[1:]), lambda base: base[::2]),
    "offset": (lambda shape: (*shape[:-1], shape[-1] + 1), lambda base: base[..., 1:]),
}


@dataclasses.dataclass
class Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    view: str
    magnitude: int  # values are randn * 2**magnitude
    seed: int

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, view): random data, never zeros; the view shares the base's memory."""
        base_shape, _ = VIEWS[self.view]
        generator = torch.Generator().manual_seed(self.seed)
        data = torch.randn(base_shape(self.shape), generator=generator, dtype=torch.float64)
        base = (data * 2.0**self.magnitude).to(self.dtype)
        return base, self.view_of(base)

    def view_of(self, base: torch.Tensor) -> torch.Tensor:
        return VIEWS[self.view][1](base)


shapes = st.one_of(
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),  # 0-d .. 3-d, zero-element too
    st.tuples(st.integers(1, 700)),  # long enough for vectorised inner loops and tails
    st.tuples(st.integers(0, 40), st.integers(0, 40)),
)


@st.composite
def specs(draw) -> Spec:
    shape = draw(shapes)
    views = (
        ["contiguous"] + (["step", "offset"] if len(shape) >= 1 else []) + (["transposed"] if len(shape) >= 2 else [])
    )
    return Spec(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        view=draw(st.sampled_from(views)),
        magnitude=draw(st.integers(-4, 4)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


spec_lists = st.lists(specs(), min_size=0, max_size=6)


NON_FINITE = (math.inf, -math.inf, math.nan)


def inject_non_finite(tensors: list[torch.Tensor], data) -> int:
    """Write inf / -inf / nan at hypothesis-drawn positions of some of the tensors (through the
    views, so the bases see them too); returns how many were written."""
    count = 0
    for t in tensors:
        if t.numel() == 0 or not data.draw(st.booleans(), label="inject into this tensor"):
            continue
        for _ in range(data.draw(st.integers(1, 3), label="how many")):
            flat = data.draw(st.integers(0, t.numel() - 1), label="position")
            index = []
            for size in reversed(t.shape):
                index.append(flat % size)
                flat //= size
            t[tuple(reversed(index))] = data.draw(st.sampled_from(NON_FINITE), label="value")
            count += 1
    return count


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (exact comparison, nan included)."""
    return t.detach().clone().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --------------------------------------------------------------------------- multi_tensor_norm


def oracle_norm(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    """The p-norm of all elements together, in float64 (bf16 / fp16 / fp32 values are exact in
    float64, so this is the true norm up to float64 rounding)."""
    flat = torch.cat([torch.zeros(0, dtype=torch.float64)] + [t.double().flatten() for t in tensors])
    if flat.numel() == 0:  # vector_norm has no identity for inf on empty input; the norm is 0
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(flat, p)


# Relative tolerances against the float64 oracle. The result is float32: per-tensor sums of
# |x|**p accumulated in fp32, then the p-norm of those norms in fp32. With at most ~1,600
# elements per tensor, the rounding error of an fp32 sum of non-negative terms is about
# sqrt(n) * 2**-24 ~ 3e-6 in the worst realistic case (torch's vectorised reductions do better),
# plus a few ulps (6e-8 each) from pow, the root and the final float32 rounding. Taking the
# 1/p-th root divides the sum's relative error by p, so p < 1 magnifies it (x2 for p = 0.5).
# The inf-norm is a max: exact in fp32 for bf16/fp16/fp32 inputs, one rounding for fp64 ones,
# so it is compared bit for bit with the oracle rounded to float32. Measured over 5,000 examples
# of these strategies: at most 3.0e-6 for p = 0.5 and 1.9e-6 for p >= 1, so the bounds below
# leave a margin of 5x or more.
NORM_RTOL = {1.0: 1e-5, 2.0: 1e-5, 3.5: 1e-5, 0.5: 2e-5}


def assert_norm_close(actual: torch.Tensor, expected64: torch.Tensor, p: float) -> None:
    assert actual.dtype == torch.float32
    if math.isinf(p):
        assert torch.equal(actual, expected64.float()), (actual, expected64)
        return
    # atol: far below any non-zero norm here (the smallest inputs are ~1e-7), so effectively
    # only lets an exact 0 (empty inputs) match 0.
    torch.testing.assert_close(actual.double(), expected64, rtol=NORM_RTOL[p], atol=1e-30)


@FUZZ
@given(spec_list=spec_lists, p=st.sampled_from(NORM_TYPES))
def test_multi_tensor_norm_matches_float64_oracle(spec_list: list[Spec], p: float):
    pairs = [spec.make() for spec in spec_list]
    tensors = [view for _, view in pairs]
    before = [bits(base) for base, _ in pairs]

    total = fastopt.multi_tensor_norm(tensors, p)
    total_again, norms = fastopt.multi_tensor_norm(tensors, p, per_tensor=True)

    assert total.shape == () and total.dtype == torch.float32 and total.device.type == "cpu"
    assert_norm_close(total, oracle_norm(tensors, p), p)
    # per_tensor=True returns the same total, and one float32 norm per input, 0 for empty ones.
    assert torch.equal(total_again, total)
    assert norms.shape == (len(tensors),) and norms.dtype == torch.float32
    for t, norm in zip(tensors, norms):
        if t.numel() == 0:
            assert norm.item() == 0.0
        else:
            assert_norm_close(norm, oracle_norm([t], p), p)
    # Deterministic: a second run gives the same bits.
    assert torch.equal(fastopt.multi_tensor_norm(tensors, p), total)
    assert torch.equal(fastopt.multi_tensor_norm(tensors, p, per_tensor=True)[1], norms)
    # Read only: the inputs keep every bit.
    assert all(torch.equal(bits(base), old) for (base, _), old in zip(pairs, before))


@FUZZ
@given(spec_list=spec_lists, p=st.sampled_from(NORM_TYPES), data=st.data())
def test_multi_tensor_norm_propagates_inf_and_nan(spec_list: list[Spec], p: float, data):
    """An inf makes the total inf, a nan makes it nan (nan wins over inf), as the oracle says."""
    tensors = [spec.make()[1] for spec in spec_list]
    injected = inject_non_finite(tensors, data)
    total, norms = fastopt.multi_tensor_norm(tensors, p, per_tensor=True)
    expected = oracle_norm(tensors, p)
    if injected:
        assert not math.isfinite(expected.item())
    if not math.isfinite(expected.item()):
        assert torch.equal(total.isnan(), expected.isnan()) and torch.equal(total.isinf(), expected.isinf())
        for t, norm in zip(tensors, norms):
            t_expected = oracle_norm([t], p)
            assert norm.isnan().item() == t_expected.isnan().item()
            assert norm.isinf().item() == t_expected.isinf().item()


# --------------------------------------------------------------------------- unscale_and_check_

# inv_scale as a float32 tensor or a Python float: any positive value, powers of two (what
# GradScaler uses) included.
tensor_inv_scales = st.floats(2.0**-27, 1024.0, width=32).map(lambda v: torch.tensor([v], dtype=torch.float32))
float_inv_scales = st.one_of(st.floats(2.0**-27, 1024.0), st.integers(-24, 8).map(lambda k: 2.0**k))


def unscaled(orig: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """What ``t *= inv_scale`` must give: the product in float32 (float64 for float64 tensors),
    rounded once to the tensor's dtype."""
    compute = torch.float64 if orig.dtype == torch.float64 else torch.float32
    return (orig.to(compute) * inv_scale).to(orig.dtype)


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@FUZZ
@given(
    spec_list=spec_lists,
    inv_scale=st.one_of(tensor_inv_scales, float_inv_scales),
    already_found=st.booleans(),
    data=st.data(),
)
def test_unscale_and_check(spec_list: list[Spec], inv_scale, already_found: bool, data):
    """Each tensor becomes exactly ``t * inv_scale`` (in its base too, for views), as with torch's
    own op; found_inf is set iff an inf / nan was injected, and a set flag stays set."""
    pairs = [spec.make() for spec in spec_list]
    tensors = [view for _, view in pairs]
    injected = inject_non_finite(tensors, data)
    originals = [base.clone() for base, _ in pairs]
    found_inf = torch.full((1,), 1.0 if already_found else 0.0)
    inv_value = inv_scale.item() if isinstance(inv_scale, torch.Tensor) else inv_scale
    # torch's op takes inv_scale as a float32 tensor; fastopt applies a Python float exactly to
    # fp64 tensors, so the two agree on fp64 only when the value is a float32.
    torch_can_express = torch.tensor(inv_value, dtype=torch.float32).item() == inv_value

    # torch's own op, on copies of the same views.
    torch_bases = [base.clone() for base, _ in pairs]
    torch_views = [spec.view_of(base) for spec, base in zip(spec_list, torch_bases)]
    torch_found_inf = found_inf.clone()
    torch._amp_foreach_non_finite_check_and_unscale_(
        torch_views, torch_found_inf, torch.tensor([inv_value], dtype=torch.float32)
    )

    fastopt.unscale_and_check_(tensors, inv_scale, found_inf)

    # found_inf: set iff a non-finite value was there, never cleared.
    expected_flag = 1.0 if (already_found or injected) else 0.0
    assert found_inf.tolist() == [expected_flag]
    assert torch_found_inf.tolist() == [expected_flag]
    for (base, view), spec, original, torch_base in zip(pairs, spec_list, originals, torch_bases):
        expected_base = original.clone()
        expected_view = spec.view_of(expected_base)
        expected_view.copy_(unscaled(expected_view, inv_value))
        # The write went through the view into the base, and nothing outside the view changed.
        assert_same_values(base, expected_base)
        assert_same_values(view, expected_view)
        if torch_can_express or original.dtype != torch.float64:
            assert_same_values(base, torch_base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["unscale_and_check_", "scale_"])
def test_python_float_factor_is_not_rounded_to_the_tensor_dtype(op, dtype):
    """A Python float factor must act like the same value as a float32 tensor:
    ``t = (t.float() * factor).to(dtype)``."""
    generator = torch.Generator().manual_seed(0)
    orig = (torch.randn(1000, generator=generator) * 100).to(dtype)
    factor = 0.1  # not a power of two: rounding it to fp16 / bf16 changes it
    by_float, by_tensor = orig.clone(), orig.clone()
    if op == "scale_":
        fastopt.scale_([by_float], factor)
        fastopt.scale_([by_tensor], torch.tensor(factor))
    else:
        fastopt.unscale_and_check_([by_float], factor, torch.zeros(1))
        fastopt.unscale_and_check_([by_tensor], torch.tensor([factor]), torch.zeros(1))
    expected = (orig.float() * torch.tensor(factor)).to(dtype)
    assert torch.equal(by_tensor, expected)
    assert torch.equal(by_float, expected)
