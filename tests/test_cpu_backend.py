"""The cpu backend (csrc/cpu/, fastopt._cpu): every op against the reference, float64 and torch's own
functions; determinism whatever the number of threads; skipped steps; the compiled ISA clones.

Skipped as a whole when the extension is not built (a build without torch or a C++ compiler)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.backends import reference
from tests.helpers import (
    FLOAT_DTYPES,
    MIXED_SHAPES,
    assert_bitwise_equal,
    bits,
    clone_layout,
    describe_dtype,
    float64_norm,
    inject_nonfinite,
    random_tensors,
    tolerance,
)

cpu = pytest.importorskip("fastopt.backends.cpu")
if cpu.unavailable_reason() is not None:
    pytest.skip(f"cpu backend unavailable: {cpu.unavailable_reason()}", allow_module_level=True)

BLOCK = cpu._C.BLOCK_SIZE
# Shapes that cross block boundaries: a tensor of several blocks plus a ragged tail, and small ones.
LARGE_SHAPES = [(2 * BLOCK + 1234,), (3, 5), (BLOCK,), (700, 130), (1,), (0,), (BLOCK - 1,)]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_chosen_for_cpu_tensors_when_built(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert "cpu" in fastopt.available_backends()
    assert backends.select(torch.device("cpu")) is cpu
    with fastopt.use_backend("torch"):
        assert backends.select(torch.device("cpu")) is reference


def test_info_names_the_cpu_backend():
    out = subprocess.run(
        [__import__("sys").executable, "-m", "fastopt", "info"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "cpu     available" in out


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_norm_matches_float64_and_reference(dtype, norm_type, non_contiguous):
    tensors = random_tensors(MIXED_SHAPES + LARGE_SHAPES, dtype, seed=1, non_contiguous=non_contiguous)
    total, norms = cpu.multi_tensor_norm(tensors, norm_type, True)
    ref_total, ref_norms = reference.multi_tensor_norm(tensors, norm_type, True)
    assert total.dtype == norms.dtype == torch.float32 and total.shape == () and norms.shape == (len(tensors),)
    close = tolerance(torch.float32 if dtype != torch.float64 else torch.float64)
    close = {"rtol": max(close["rtol"], 2e-6), "atol": close["atol"]}  # results are rounded to fp32
    torch.testing.assert_close(total.double(), float64_norm(tensors, norm_type), **close)
    expected = torch.stack([float64_norm([t], norm_type) for t in tensors])
    torch.testing.assert_close(norms.double(), expected, **close)
    torch.testing.assert_close(norms, ref_norms, **tolerance(torch.float32))
    torch.testing.assert_close(total, ref_total, **tolerance(torch.float32))


def test_norm_agrees_with_torch_clip_grad_norm():
    grads = random_tensors(LARGE_SHAPES, torch.float32, seed=2)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(cpu.multi_tensor_norm(grads, 2.0, False), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["p2", "pinf"])
def test_norm_found_inf_from_the_same_read(dtype, norm_type):
    tensors = random_tensors(LARGE_SHAPES, dtype, seed=3)
    flag = torch.zeros(1)
    cpu.multi_tensor_norm(tensors, norm_type, False, found_inf=flag)
    assert flag.item() == 0.0
    for seed, value in enumerate([math.inf, -math.inf, math.nan]):
        flag = torch.zeros(1)
        bad = [t.clone() for t in tensors]
        inject_nonfinite(bad, seed=seed, count=1, values=(value,))
        total = cpu.multi_tensor_norm(bad, norm_type, False, found_inf=flag)
        assert flag.item() == 1.0, value
        assert not torch.isfinite(total)


def test_norm_of_large_finite_values_is_not_an_overflow_flag():
    """Squares of fp32 values above ~1.8e19 overflow fp32 but the values are finite: no flag."""
    t = torch.full((1000,), 3e19)
    flag = torch.zeros(1)
    cpu.multi_tensor_norm([t], 2.0, False, found_inf=flag)
    assert flag.item() == 0.0


@pytest.mark.parametrize("op", ["norm", "norm_pinf", "norm_p3", "unscale", "agc", "adamw", "adam", "sgd", "lion"])
def test_bit_identical_whatever_the_thread_count(op, threads):
    shapes = LARGE_SHAPES * 3 + [(s,) for s in range(1, 400, 7)]
    results = []
    for num_threads in (1, 2, 3, 2, 1):
        torch.set_num_threads(num_threads)
        tensors = random_tensors(shapes, torch.float32, seed=4)
        if op.startswith("norm"):
            p = {"norm": 2.0, "norm_pinf": math.inf, "norm_p3": 3.0}[op]
            total, norms = cpu.multi_tensor_norm(tensors, p, True)
            results.append([total, norms])
        elif op == "unscale":
            flag = torch.zeros(1)
            cpu.unscale_and_check_(tensors, torch.tensor(0.37), flag)
            results.append(tensors + [flag])
        elif op == "agc":
            params = random_tensors(shapes, torch.float32, seed=5, scale=0.01)
            cpu.adaptive_clip_(params, tensors, 0.01, 1e-3, 2.0, True)
            results.append(tensors)
        elif op in ("adamw", "adam"):
            params = random_tensors(shapes, torch.float32, seed=5)
            m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
            steps = [torch.zeros(()) for _ in params]
            for _ in range(2):
                cpu.adamw_(params, tensors, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                           maximize=False, max_exp_avg_sqs=None, grad_scale=None, found_inf=None, clip_coef=None,
                           decoupled_weight_decay=op == "adamw")  # fmt: skip
            results.append(params + m + v)
        elif op == "sgd":
            params = random_tensors(shapes, torch.float32, seed=5)
            buffers = [torch.zeros_like(p) for p in params]
            for k in range(2):
                cpu.sgd_(params, tensors, buffers, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1,
                         nesterov=False, maximize=False, first_step=k == 0, grad_scale=None, found_inf=None,
                         clip_coef=None)  # fmt: skip
            results.append(params + buffers)
        else:
            params = random_tensors(shapes, torch.float32, seed=5)
            m = [torch.zeros_like(p) for p in params]
            for _ in range(2):
                cpu.lion_(params, tensors, m, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False,
                          grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
            results.append(params + m)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bitwise_equal(a, b)


# --------------------------------------------------------------------------- element-wise ops


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_unscale_scale_clamp_equal_the_reference_bitwise(dtype, non_contiguous):
    def fresh():
        return random_tensors(MIXED_SHAPES + LARGE_SHAPES, dtype, seed=6, non_contiguous=non_contiguous, scale=3.0)

    for name, run in [
        ("unscale", lambda b, ts: b.unscale_and_check_(ts, torch.tensor(0.123), torch.zeros(1))),
        ("scale float", lambda b, ts: b.scale_(ts, 0.3)),
        ("scale tensor", lambda b, ts: b.scale_(ts, torch.tensor(1.7, dtype=torch.float64))),
        ("clamp", lambda b, ts: b.clamp_(ts, 0.5)),
    ]:
        ours, theirs = fresh(), fresh()
        originals = [clone_layout(t) for t in ours]
        run(cpu, ours)
        run(reference, theirs)
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a, b, name)
        assert any(not torch.equal(a, o) for a, o in zip(ours, originals) if a.numel()), name  # written through


def _odd_16bit_views(dtype, seed):
    """16-bit tensors that start at an odd element of their storage and have odd lengths (the
    loops over 16-bit arrays go by pairs of elements, as 32-bit words), holding inf, -inf and nans
    whose payloads a careless rounding would carry (bits 0x7F81 and 0xFFC1 in bf16)."""
    generator = torch.Generator().manual_seed(seed)
    views = []
    for n in (1, 3, 2 * BLOCK + 7, 301):
        base = (torch.randn(n + 1, generator=generator) * 3).to(dtype)
        views.append(base[1:])
    nans = torch.tensor([0x7F81, -63, 0x7C01, 0x7E01], dtype=torch.int16).view(dtype)  # -63: 0xFFC1
    big = views[2]
    for k, position in enumerate(torch.randint(big.numel(), (6,), generator=generator).tolist()):
        big[position] = nans[k % 2 if dtype == torch.bfloat16 else 2 + k % 2] if k < 4 else (-1) ** k * math.inf
    return views


def _assert_bitwise_equal_canonical_nans(ours: torch.Tensor, theirs: torch.Tensor, msg: str) -> None:
    """Bit for bit, except that a nan is c10's in ours (bf16 0x7FC0; fp16 0x7E00 with the sign):
    torch's own vectorised conversions write others (bf16 0xFFFF, fp16 the payload), depending on
    the element's position."""
    nan = ours.isnan()
    assert torch.equal(nan, theirs.isnan()), msg
    nan_bits = ours.view(torch.int16)[nan].int() & 0xFFFF
    canonical = 0x7FC0 if ours.dtype == torch.bfloat16 else 0x7E00
    assert bool(((nan_bits if ours.dtype == torch.bfloat16 else nan_bits & 0x7FFF) == canonical).all()), msg
    assert_bitwise_equal(ours[~nan], theirs[~nan], msg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
def test_16bit_pairs_at_odd_offsets_lengths_and_nan_payloads_match_the_reference_bitwise(dtype):
    assert all(t.data_ptr() % 4 == 2 for t in _odd_16bit_views(dtype, 0))
    for name, run in [
        ("unscale", lambda b, ts: b.unscale_and_check_(ts, torch.tensor(0.123), torch.zeros(1))),
        ("scale", lambda b, ts: b.scale_(ts, 0.3)),
        ("clamp", lambda b, ts: b.clamp_(ts, 0.5)),
    ]:
        ours, theirs = _odd_16bit_views(dtype, 1), _odd_16bit_views(dtype, 1)
        run(cpu, ours)
        run(reference, theirs)
        for a, b in zip(ours, theirs):
            _assert_bitwise_equal_canonical_nans(a, b, name)
    grads = _odd_16bit_views(dtype, 2)
    for op in ("adamw", "sgd", "lion"):
        ours = [_odd_16bit_views(dtype, 3 + k) for k in range(3)]
        theirs = [_odd_16bit_views(dtype, 3 + k) for k in range(3)]
        for backend, (params, m, v) in ((cpu, ours), (reference, theirs)):
            common = dict(lr=1e-2, maximize=False, grad_scale=None, found_inf=None, clip_coef=0.5)
            if op == "adamw":
                for t in v:
                    t.abs_()  # a second moment (its nans stay nans)
                steps = [torch.tensor(2.0) for _ in params]
                backend.adamw_(params, grads, m, v, steps,
                               beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, max_exp_avg_sqs=None,
                               **common)  # fmt: skip
            elif op == "sgd":
                backend.sgd_(params, grads, m, momentum=0.9, dampening=0.1, weight_decay=0.1, nesterov=False,
                             first_step=False, **common)  # fmt: skip
            else:
                backend.lion_(params, grads, m, beta1=0.9, beta2=0.99, weight_decay=0.1, **common)
        written = 3 if op == "adamw" else 2  # params and states: SGD and Lion leave v alone
        for a_list, b_list in zip(ours[:written], theirs[:written]):
            for a, b in zip(a_list, b_list):
                _assert_bitwise_equal_canonical_nans(a, b, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=describe_dtype)
def test_unscale_and_check_flags_inf_and_nan_and_never_clears(dtype):
    tensors = random_tensors(LARGE_SHAPES, dtype, seed=7)
    flag = torch.ones(1)
    cpu.unscale_and_check_(tensors, 0.5, flag)
    assert flag.item() == 1.0  # never cleared
    flag = torch.zeros(1)
    cpu.unscale_and_check_(tensors, 0.5, flag)
    assert flag.item() == 0.0
    where = inject_nonfinite(tensors, seed=8, count=3)
    cpu.unscale_and_check_(tensors, 0.5, flag)
    assert flag.item() == 1.0
    for i, flat, value in where:
        got = tensors[i].reshape(-1)[flat].item()
        assert (math.isnan(got) and math.isnan(value)) or got == value


def test_clamp_matches_torch_clip_grad_value():
    grads = random_tensors(LARGE_SHAPES, torch.float32, seed=9, scale=2.0)
    grads[0][3] = math.nan
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(params, expected):
        p.grad = g
    torch.nn.utils.clip_grad_value_(params, 0.7)
    cpu.clamp_(grads, 0.7)
    for a, b in zip(grads, expected):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("unitwise", [True, False], ids=["unitwise", "whole"])
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_agc_matches_the_reference(dtype, unitwise, non_contiguous):
    shapes = MIXED_SHAPES + [(300, 700), (64, 3, 3, 3), (BLOCK + 5,)]
    params = random_tensors(shapes, dtype, seed=10, non_contiguous=non_contiguous)
    ours = random_tensors(shapes, dtype, seed=11, non_contiguous=non_contiguous, scale=0.05)
    theirs = [clone_layout(g) for g in ours]
    cpu.adaptive_clip_(params, ours, 0.01, 1e-3, 2.0, unitwise)
    reference.adaptive_clip_(params, theirs, 0.01, 1e-3, 2.0, unitwise)
    close = tolerance(dtype)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **close)
    assert any(not torch.equal(a, b) for a, b in zip(ours, random_tensors(shapes, dtype, seed=11, scale=0.05)))


# --------------------------------------------------------------------------- AdamW


def _within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> bool:
    """|actual - expected| <= ulps units in the last place of the tensor's largest |value|: an
    AdamW step rounds at the scale of its operands (the param along its path, the update), so a
    param that ends near zero is measured at that scale, not its own (torch's fused CPU AdamW
    differs from its single-tensor one by 128 "own" ulps there, and by 0.5 on this scale)."""
    scale = expected.abs().max()
    ulp = torch.nextafter(scale, torch.tensor(math.inf)) - scale
    return bool(((actual - expected).abs() <= ulps * ulp).all())


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp-from-start", "lerp-from-end"])
def test_fp32_adamw_within_2_ulp_of_torch_after_20_steps(amsgrad, maximize, beta1):
    """Against torch.optim.AdamW(foreach=False): params within 2 ulp (torch's CPU sqrt is not
    correctly rounded), moments bit for bit. Against torch's fused CPU AdamW: bit for bit (without
    AMSGrad). beta1 < 0.5 makes the lerp of exp_avg evaluate from its far end."""
    shapes = [(BLOCK + 777,), (33, 17), (5,), (256, 300)]
    lr = 1e-2
    params = random_tensors(shapes, torch.float32, seed=12)
    torch_params = {flavor: [torch.nn.Parameter(p.clone()) for p in params] for flavor in ("single", "fused")}
    optimizers = {
        flavor: torch.optim.AdamW(torch_params[flavor], lr=lr, betas=(beta1, 0.99), weight_decay=0.05, amsgrad=amsgrad,
                                  maximize=maximize, **({"foreach": False} if flavor == "single" else {"fused": True}))
        for flavor in torch_params
    }  # fmt: skip
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else None
    steps = [torch.zeros(()) for _ in params]
    for k in range(20):
        grads = random_tensors(shapes, torch.float32, seed=100 + k)
        for flavor, opt in optimizers.items():
            for p, g in zip(torch_params[flavor], grads):
                p.grad = g.clone()
            opt.step()
        cpu.adamw_(params, grads, m, v, steps, lr=lr, beta1=beta1, beta2=0.99, eps=1e-8, weight_decay=0.05,
                   maximize=maximize, max_exp_avg_sqs=vmax, grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    for i, p in enumerate(torch_params["single"]):
        state = optimizers["single"].state[p]
        assert _within_ulps(params[i], p.detach(), 2), i
        assert_bitwise_equal(m[i], state["exp_avg"])  # the moments do not depend on the params: exact
        assert_bitwise_equal(v[i], state["exp_avg_sq"])
        if amsgrad:
            assert_bitwise_equal(vmax[i], state["max_exp_avg_sq"])
        assert steps[i].item() == state["step"].item() == 20
        # torch's fused AMSGrad rounds its own way; so does its maximize with beta1 < 0.5, in a
        # param or two of 100 K (the moments stay bit for bit; seen before the lerp's end became
        # a template argument too, and not traced further).
        if not amsgrad and not (maximize and beta1 < 0.5):
            assert_bitwise_equal(params[i], torch_params["fused"][i].detach())


DTYPE_COMBOS = {  # (param, grad, state): every combination compiled, and one that is not
    "fp32": (torch.float32, torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64, torch.float64),
    "fp32-bf16-grads": (torch.float32, torch.bfloat16, torch.float32),
    "fp32-fp16-grads": (torch.float32, torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "bf16-fp32-states": (torch.bfloat16, torch.bfloat16, torch.float32),
    "bf16-fp32-grads": (torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16-fp32-grads-states": (torch.bfloat16, torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16, torch.float16),
    "fp16-fp32-states": (torch.float16, torch.float16, torch.float32),
    "fp16-fp32-grads": (torch.float16, torch.float32, torch.float16),
    "fp16-fp32-grads-states": (torch.float16, torch.float32, torch.float32),
    "fallback-fp64-params-fp32-grads": (torch.float64, torch.float32, torch.float64),
}


# The step-wide scalars of an update call. A power-of-two grad_scale (GradScaler's; 1 with clipping
# alone) is applied as a multiply by its inverse, any other by a division: both must give the
# reference's bits, at the ends of the range too (2^120: unscaled grads below fp32's normal range).
STEP_SCALARS = {
    "plain": {},
    "scaled": dict(maximize=True, grad_scale=1024.0, clip_coef=0.25),
    "tensors": dict(lr=torch.tensor(3e-3), grad_scale=torch.tensor(8.0), clip_coef=torch.tensor(0.5),
                    found_inf=torch.zeros(1)),
    "scale-2^120": dict(grad_scale=torch.tensor(2.0**120), clip_coef=0.75),
    "scale-2^-100": dict(grad_scale=2.0**-100, clip_coef=torch.tensor(2.0**-90)),
    "scale-1000": dict(maximize=True, grad_scale=torch.tensor(1000.0), clip_coef=0.3),
    "clip-only": dict(clip_coef=torch.tensor(0.37)),
}  # fmt: skip


def _step_scalars(name: str) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in STEP_SCALARS[name].items()}


@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("scalars", STEP_SCALARS)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "l2"])
def test_adamw_matches_the_reference(combo, amsgrad, scalars, non_contiguous, decoupled):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    shapes = MIXED_SHAPES + [(BLOCK + 3,)]

    def state(seed):
        params = random_tensors(shapes, param_dtype, seed=seed, non_contiguous=non_contiguous)
        m = random_tensors(shapes, state_dtype, seed=seed + 1, non_contiguous=non_contiguous, scale=0.1)
        v = [t.abs() for t in random_tensors(shapes, state_dtype, seed=seed + 2, scale=0.01)]
        vmax = [t.abs() for t in random_tensors(shapes, state_dtype, seed=seed + 3, scale=0.01)] if amsgrad else None
        steps = [torch.tensor(float(i % 4)) for i in range(len(shapes))]
        return params, m, v, steps, vmax

    grads = random_tensors(shapes, grad_dtype, seed=20, non_contiguous=non_contiguous)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False, grad_scale=None,
                 found_inf=None, clip_coef=None, decoupled_weight_decay=decoupled)  # fmt: skip
    hyper.update(_step_scalars(scalars))
    ours, theirs = state(30), state(30)
    cpu.adamw_(ours[0], grads, ours[1], ours[2], ours[3], max_exp_avg_sqs=ours[4], **hyper)
    reference.adamw_(theirs[0], grads, theirs[1], theirs[2], theirs[3], max_exp_avg_sqs=theirs[4], **hyper)
    for name, a_list, b_list in zip(["params", "exp_avgs", "exp_avg_sqs", "steps"], ours, theirs):
        for a, b in zip(a_list, b_list):
            close = tolerance(a.dtype)
            if name == "params" and a.dtype == torch.float32:
                close = {"rtol": 2e-6, "atol": 1e-7}  # the reference's sqrt is not correctly rounded
            torch.testing.assert_close(a, b, **close, msg=f"{name} {combo}")
    if amsgrad:
        for a, b in zip(ours[4], theirs[4]):
            torch.testing.assert_close(a, b, **tolerance(a.dtype))


@pytest.mark.parametrize("combo", ["fp32", "bf16", "fp32-bf16-grads", "fp16-fp32-states"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("found", [1.0, 2.0, math.nan], ids=["one", "two", "nan"])
def test_a_skipped_step_changes_no_bit(combo, amsgrad, found):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    shapes = LARGE_SHAPES
    params = random_tensors(shapes, param_dtype, seed=40)
    grads = random_tensors(shapes, grad_dtype, seed=41)
    inject_nonfinite(grads, seed=42, count=4)
    m = random_tensors(shapes, state_dtype, seed=43)
    v = [t.abs() for t in random_tensors(shapes, state_dtype, seed=44)]
    vmax = [t.abs() for t in random_tensors(shapes, state_dtype, seed=45)] if amsgrad else None
    steps = [torch.tensor(5.0) for _ in shapes]
    everything = params + m + v + steps + (vmax or [])
    before = [bits(t).clone() for t in everything]
    versions = [t._version for t in everything]
    cpu.adamw_(params, grads, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
               maximize=False, max_exp_avg_sqs=vmax, grad_scale=torch.tensor(65536.0),
               found_inf=torch.tensor([found]), clip_coef=torch.tensor(0.5))  # fmt: skip
    for t, old in zip(everything, before):
        assert torch.equal(bits(t), old)
    assert [t._version for t in everything] == versions


# --------------------------------------------------------------------------- SGD, Lion, Adam (L2)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_fp32_adam_l2_within_2_ulp_of_torch_adam_after_20_steps(amsgrad, maximize):
    """decoupled_weight_decay=False against torch.optim.Adam(foreach=False): the L2 term is one fma
    (torch's add with alpha), so the moments are bit for bit, the params within 2 ulp (as AdamW)."""
    shapes = [(BLOCK + 777,), (33, 17), (5,)]
    params = random_tensors(shapes, torch.float32, seed=12)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = torch.optim.Adam(torch_params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05, amsgrad=amsgrad,
                                 maximize=maximize, foreach=False)  # fmt: skip
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else None
    steps = [torch.zeros(()) for _ in params]
    for k in range(20):
        grads = random_tensors(shapes, torch.float32, seed=100 + k)
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        optimizer.step()
        cpu.adamw_(params, grads, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05,
                   maximize=maximize, max_exp_avg_sqs=vmax, grad_scale=None, found_inf=None, clip_coef=None,
                   decoupled_weight_decay=False)  # fmt: skip
        for i, p in enumerate(torch_params):  # each step: the L2 term reads the param of that step
            state = optimizer.state[p]
            assert _within_ulps(params[i], p.detach(), 2), (k, i)
            assert_bitwise_equal(m[i], state["exp_avg"], f"step {k}, exp_avgs[{i}]")
            assert_bitwise_equal(v[i], state["exp_avg_sq"], f"step {k}, exp_avg_sqs[{i}]")
            params[i].copy_(p.detach())  # the params' sqrt differs by an ulp: keep the moments' inputs equal
    for i, p in enumerate(torch_params):
        if amsgrad:
            assert_bitwise_equal(vmax[i], optimizer.state[p]["max_exp_avg_sq"])


SGD_FLAVORS = {  # (momentum, dampening, nesterov, weight_decay)
    "plain": (0.0, 0.0, False, 0.0),
    "decay": (0.0, 0.0, False, 0.01),
    "momentum": (0.9, 0.0, False, 0.0),
    "dampened-decay": (0.9, 0.3, False, 0.01),
    "nesterov-decay": (0.9, 0.0, True, 0.01),
}


@pytest.mark.parametrize("flavor", SGD_FLAVORS)
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_fp32_sgd_bit_identical_to_torch_sgd_after_20_steps(flavor, maximize):
    """Against torch.optim.SGD(foreach=False) on CPU (each add with alpha one fma): params and
    momentum buffers bit for bit, the first step (buffer = grad) included."""
    momentum, dampening, nesterov, weight_decay = SGD_FLAVORS[flavor]
    shapes = [(2 * BLOCK + 777,), (33, 17), (5,), ()]
    params = random_tensors(shapes, torch.float32, seed=13)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = torch.optim.SGD(torch_params, lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                weight_decay=weight_decay, maximize=maximize, foreach=False)  # fmt: skip
    buffers = [torch.full_like(p, math.nan) for p in params] if momentum else None  # first_step: never read
    for k in range(20):
        grads = random_tensors(shapes, torch.float32, seed=200 + k)
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        optimizer.step()
        cpu.sgd_(params, grads, buffers, lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize, first_step=k == 0, grad_scale=None, found_inf=None,
                 clip_coef=None)  # fmt: skip
    for i, p in enumerate(torch_params):
        assert_bitwise_equal(params[i], p.detach(), f"params[{i}]")
        if momentum:
            assert_bitwise_equal(buffers[i], optimizer.state[p]["momentum_buffer"], f"momentum_buffers[{i}]")


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.3, 0.99), (0.9, 0.2), (0.3, 0.2)],
                         ids=["start-start", "end-start", "start-end", "end-end"])  # fmt: skip
@pytest.mark.parametrize("scalars", STEP_SCALARS)
def test_fp32_lion_bit_identical_to_the_reference_after_20_steps(betas, scalars):
    """Against the reference (torch's CPU lerp: one fma, from the end its weight picks), each lerp
    from either end: params and momentum bit for bit."""
    shapes = [(2 * BLOCK + 777,), (33, 17), (5,), (0,)]
    hyper = dict(lr=0.01, beta1=betas[0], beta2=betas[1], weight_decay=0.1, maximize=False, grad_scale=None,
                 found_inf=None, clip_coef=None)  # fmt: skip
    hyper.update(_step_scalars(scalars))
    ours = random_tensors(shapes, torch.float32, seed=14), random_tensors(shapes, torch.float32, seed=15, scale=0.1)
    theirs = [t.clone() for t in ours[0]], [t.clone() for t in ours[1]]
    for k in range(20):
        grads = random_tensors(shapes, torch.float32, seed=300 + k)
        cpu.lion_(*ours[:1], grads, ours[1], **hyper)
        reference.lion_(theirs[0], grads, theirs[1], **hyper)
    for a_list, b_list in zip(ours, theirs):
        for a, b in zip(a_list, b_list):
            assert_bitwise_equal(a, b)


def _update_case(op, combo, shapes, seed, non_contiguous=False):
    """(params, states) of an SGD (with momentum) or Lion call in the dtypes of DTYPE_COMBOS[combo]."""
    param_dtype, _, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(shapes, param_dtype, seed=seed, non_contiguous=non_contiguous)
    states = random_tensors(shapes, state_dtype, seed=seed + 1, non_contiguous=non_contiguous, scale=0.1)
    return params, states


def _update_hyper(op, scalars, **flags):
    common = dict(lr=1e-2, maximize=False, grad_scale=None, found_inf=None, clip_coef=None)
    common.update(_step_scalars(scalars))
    if op == "sgd":
        return dict(common, momentum=0.9, dampening=0.1, weight_decay=0.1, nesterov=False, first_step=False) | flags
    return dict(common, beta1=0.9, beta2=0.99, weight_decay=0.1) | flags


def _run_update(backend, op, params, grads, states, hyper):
    if op == "sgd":
        backend.sgd_(params, grads, states if hyper["momentum"] else None, **hyper)
    else:
        backend.lion_(params, grads, states, **hyper)


@pytest.mark.parametrize("op", ["sgd", "lion"])
@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("scalars", STEP_SCALARS)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_sgd_and_lion_match_the_reference_bitwise(op, combo, scalars, non_contiguous):
    """Every dtype combination (the one not compiled runs on the reference), bit for bit: the same
    fp32 (fp64) math, rounded once to each tensor's dtype. One exception, the reference's: Lion's
    0-d params with a tensor lr (its decay factor is a 0-d float64 tensor there, and a 0-d param
    times it computes in float64)."""
    shapes = MIXED_SHAPES + [(BLOCK + 3,)]
    grads = random_tensors(shapes, DTYPE_COMBOS[combo][1], seed=20, non_contiguous=non_contiguous)
    flavors = [{"momentum": 0.0, "dampening": 0.0}, {"first_step": True}, {"nesterov": True, "dampening": 0.0}, {}]
    for flags in flavors if op == "sgd" else [{}]:
        hyper = _update_hyper(op, scalars, **flags)
        ours, theirs = _update_case(op, combo, shapes, 30, non_contiguous), _update_case(op, combo, shapes, 30, non_contiguous)
        _run_update(cpu, op, *ours[:1], grads, ours[1], hyper)
        _run_update(reference, op, *theirs[:1], grads, theirs[1], hyper)
        for name, a_list, b_list in zip(["params", "states"], ours, theirs):
            for shape, a, b in zip(shapes, a_list, b_list):
                if op == "lion" and name == "params" and shape == () and scalars == "tensors":
                    torch.testing.assert_close(a, b, **tolerance(a.dtype))
                else:
                    assert_bitwise_equal(a, b, f"{name} {shape} {flags}")


@pytest.mark.parametrize("op", ["sgd", "sgd-no-momentum", "lion", "adam"])
@pytest.mark.parametrize("combo", ["fp32", "bf16", "fp16-fp32-states", "fallback-fp64-params-fp32-grads"])
@pytest.mark.parametrize("found", [1.0, math.nan], ids=["one", "nan"])
def test_a_skipped_sgd_lion_or_adam_step_changes_no_bit(op, combo, found):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(LARGE_SHAPES, param_dtype, seed=40)
    grads = random_tensors(LARGE_SHAPES, grad_dtype, seed=41)
    inject_nonfinite(grads, seed=42, count=4)
    states = random_tensors(LARGE_SHAPES, state_dtype, seed=43)
    squares = [t.abs() for t in random_tensors(LARGE_SHAPES, state_dtype, seed=44)]
    steps = [torch.tensor(5.0) for _ in LARGE_SHAPES]
    skip = dict(lr=torch.tensor(1e-2), maximize=False, grad_scale=torch.tensor(65536.0), found_inf=torch.tensor([found]),
                clip_coef=torch.tensor(0.5))  # fmt: skip
    everything = params + states + (squares + steps if op == "adam" else [])
    before = [bits(t).clone() for t in everything]
    versions = [t._version for t in everything]
    if op.startswith("sgd"):
        momentum = 0.0 if op == "sgd-no-momentum" else 0.9
        cpu.sgd_(params, grads, states if momentum else None, momentum=momentum, dampening=0.0, weight_decay=0.1,
                 nesterov=False, first_step=False, **skip)  # fmt: skip
    elif op == "lion":
        cpu.lion_(params, grads, states, beta1=0.9, beta2=0.99, weight_decay=0.1, **skip)
    else:
        cpu.adamw_(params, grads, states, squares, steps, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                   max_exp_avg_sqs=None, decoupled_weight_decay=False, **skip)  # fmt: skip
    for t, old in zip(everything, before):
        assert torch.equal(bits(t), old)
    assert [t._version for t in everything] == versions


# --------------------------------------------------------------------------- planned updates


def _planned_lists(op, shapes, combo="fp32", seed=60):
    param_dtype, _, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(shapes, param_dtype, seed=seed)
    lists = {"params": params, "grads": [None] * len(params)}
    if op == "adamw":
        lists.update(exp_avgs=random_tensors(shapes, state_dtype, seed=seed + 1, scale=0.1),
                     exp_avg_sqs=[t.abs() for t in random_tensors(shapes, state_dtype, seed=seed + 2, scale=0.01)],
                     steps=[torch.zeros(()) for _ in shapes])  # fmt: skip
    elif op == "sgd":
        lists.update(momentum_buffers=random_tensors(shapes, state_dtype, seed=seed + 1, scale=0.1))
    else:
        lists.update(exp_avgs=random_tensors(shapes, state_dtype, seed=seed + 1, scale=0.1))
    return lists


def _copy_lists(lists):
    return {name: [None if t is None else t.clone() for t in ts] for name, ts in lists.items()}


def _planned_hyper(op, k):
    common = dict(lr=torch.tensor(1e-2), maximize=k % 2 == 1, grad_scale=None, found_inf=None,
                  clip_coef=0.5 if k % 3 == 0 else None)  # fmt: skip
    if op == "adamw":
        return dict(common, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=k % 2 == 0)
    if op == "sgd":
        return dict(common, momentum=0.9, dampening=0.0, weight_decay=0.1 * (k % 2), nesterov=k > 2, first_step=k == 0)
    return dict(common, beta1=0.9, beta2=0.99, weight_decay=0.1)


def _unplanned(op, lists, hyper):
    if op == "adamw":
        cpu.adamw_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
                   max_exp_avg_sqs=None, **hyper)  # fmt: skip
    elif op == "sgd":
        cpu.sgd_(lists["params"], lists["grads"], lists["momentum_buffers"], **hyper)
    else:
        cpu.lion_(lists["params"], lists["grads"], lists["exp_avgs"], **hyper)


@pytest.mark.parametrize("op", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("watched", [False, True], ids=["listed", "watched"])
def test_planned_updates_equal_the_unplanned_bitwise(op, watched):
    """<op>_planned_ keeps its extension plan in ``plan`` from step to step: bit for bit the
    unplanned op, through variants that change between steps (SGD's first step, Nesterov, weight
    decay; Adam's L2 and AdamW; maximize; clip_coef), a param moved by ``p.data = ...`` (the plan
    is rebuilt) and, with listed grads, a grad of another dtype (bf16). Grads from the lists, or
    from a GradWatch (as fastopt.optim's step plan passes them)."""
    shapes = [(BLOCK + 5,), (3, 5), (0,), (7,)]
    planned_lists, listed = _planned_lists(op, shapes), _copy_lists(_planned_lists(op, shapes))
    plan = {}
    if watched:  # the watch reads each param's .grad
        planned_lists["params"] = [torch.nn.Parameter(p) for p in planned_lists["params"]]
    planned = getattr(cpu, op + "_planned_")
    for k in range(6):
        grads = random_tensors(shapes, torch.bfloat16 if k == 3 and not watched else torch.float32, seed=70 + k)
        if k == 4:  # p.data = ...: the plan's address of param 0 is stale
            for lists in (planned_lists, listed):
                lists["params"][0].data = lists["params"][0].data.clone()
        if watched:
            holders = planned_lists["params"]
            for h, g in zip(holders, grads):
                h.grad = g
            planned_lists["grads"] = [None] * len(shapes)  # the watch fills them only where the plan must
            watch = cpu._C.GradWatch([holders], list(range(len(shapes))), [planned_lists["grads"]] * len(shapes),
                                     list(range(len(shapes))), [])  # fmt: skip
            assert watch.refresh() >= 0
            plan["watch"] = (watch, 0)
        else:
            planned_lists["grads"] = grads
        listed["grads"] = grads
        hyper = _planned_hyper(op, k)
        planned(planned_lists, plan, **hyper)
        _unplanned(op, listed, hyper)
        assert plan["cpu"] is not False
        for name in listed:
            if name != "grads":
                for a, b in zip(planned_lists[name], listed[name]):
                    assert_bitwise_equal(a, b, f"step {k}: {name}")


@pytest.mark.parametrize("op", ["adamw", "sgd", "lion"])
def test_planned_updates_fall_back_for_lists_the_plan_cannot_hold(op):
    """A dtype combination not compiled (fp64 params, fp32 grads): the plan is marked False and the
    op runs on the reference, before any write."""
    shapes = [(9,), (3, 5)]
    planned_lists = _planned_lists(op, shapes, combo="fallback-fp64-params-fp32-grads")
    listed = _copy_lists(planned_lists)
    grads = random_tensors(shapes, torch.float32, seed=80)
    planned_lists["grads"], listed["grads"] = grads, grads
    plan = {}
    for k in range(2):
        hyper = _planned_hyper(op, k)
        getattr(cpu, op + "_planned_")(planned_lists, plan, **hyper)
        _unplanned(op, listed, hyper)
    assert plan["cpu"] is False
    for name in listed:
        if name != "grads":
            for a, b in zip(planned_lists[name], listed[name]):
                assert_bitwise_equal(a, b, name)


def test_in_place_ops_bump_the_version_counter():
    tensors = random_tensors([(10,), (BLOCK + 1,)], torch.float32, seed=50)
    versions = [t._version for t in tensors]
    cpu.scale_(tensors, 0.5)
    assert all(t._version > v for t, v in zip(tensors, versions))


def test_the_extension_reads_lists_and_tuples_in_place_and_refuses_what_is_not_a_tensor():
    """The ops borrow the tensors of a Python list or tuple (csrc/common/tensor_refs.h): a tuple
    works as a list does, strided tensors still run on copies written back, and an item that is
    not a tensor is a TypeError before anything is written."""
    tensors = random_tensors([(7,), (33, 17), (0,)], torch.float32, seed=51)
    tensors[1] = tensors[1].t()  # strided: scaled through a contiguous copy
    expected = [t * 0.5 for t in tensors]
    cpu._C.scale_(tuple(tensors), 0.5, None)
    for t, e in zip(tensors, expected):
        assert_bitwise_equal(t, e)
    total, _ = cpu._C.multi_tensor_norm(tuple(tensors), 2.0, False, None)
    assert_bitwise_equal(total, cpu._C.multi_tensor_norm(list(tensors), 2.0, False, None)[0])
    before = [t.clone() for t in tensors]
    for bad in ([tensors[0], 1.0], [tensors[0], None], tensors[0]):
        with pytest.raises(TypeError):
            cpu._C.scale_(bad, 0.5, None)
    for t, b in zip(tensors, before):
        assert_bitwise_equal(t, b)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_vector_clones_use_hardware_fma():
    """The x86-64-v3 / v4 clones of the AdamW, SGD and Lion loops hold packed vfmadd instructions and
    no call to fma (a library fma blocks vectorisation: 3-5x slower, measured on a 2-core Zen 4)."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("target_clones are compiled on x86-64 only")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", cpu._C.__file__], capture_output=True, text=True,
                         check=True, timeout=300).stdout  # fmt: skip
    functions = re.split(r"\n(?=[0-9a-f]+ <)", out)
    def clones_of(name):
        return [f for f in functions if name in f.split("\n", 1)[0] and "arch_x86_64_v" in f.split("\n", 1)[0]]

    adamw, sgd, lion = clones_of("adamw_block"), clones_of("sgd_block"), clones_of("lion_block")
    # AdamW: AMSGrad x L2 x the grad as it is, scaled by a multiply or by a division; SGD: with
    # momentum first x Nesterov x weight decay x the three grads, without it weight decay x the
    # three grads for the 8 combinations whose state dtype is the param's; Lion: the three grads.
    assert len(adamw) >= 2 * 11 * 12, "every compiled AdamW combination has a v3 and a v4 clone"
    assert len(sgd) >= 2 * (11 * 24 + 8 * 6), "every compiled SGD combination has a v3 and a v4 clone"
    assert len(lion) >= 2 * 11 * 3, "every compiled Lion combination has a v3 and a v4 clone"
    clones = adamw + sgd + lion
    for body in clones:
        head = body.split("\n", 1)[0]
        assert re.search(r"\bvfn?madd", body), head
        assert not re.search(r"call.*<fmaf?(@plt)?>", body), head
    # Every combination is vectorised in both clones, the 16-bit ones too: packed fma on the
    # clone's widest registers.
    for body in clones:
        head = body.split("\n", 1)[0]
        register = "zmm" if "arch_x86_64_v4" in head else "ymm"
        assert re.search(rf"\bvfn?madd\w*p[sd]\s+.*%{register}", body), head


def test_flat_grads_are_normed_as_one_run_that_matches_torch_and_reads_every_element():
    """With flat grads, the planned norm reads the grad buffer as one run once its layout has held
    for two steps (NormPlan's runs): the same norm as torch's within fp32 rounding, at every step,
    and an inf or nan anywhere in the buffer reaches it."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(3, 5), (0,), (7,), (2, 2, 3), (1,), (70,)] * 40
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    optimizer = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, flat_grads=True, flat_states=True)
    bad_steps = {5: math.inf, 7: math.nan}
    nonempty = [p for p in params if p.numel() > 0]
    with backends.use_backend("cpu"):
        for step in range(9):
            optimizer.zero_grad()
            for p in params:
                p.grad.copy_(torch.randn(p.shape, generator=generator) * (step + 1))
            if step in bad_steps:  # at a random element of a random grad
                grad = nonempty[int(torch.randint(len(nonempty), (1,), generator=generator))].grad
                grad.view(-1)[int(torch.randint(grad.numel(), (1,), generator=generator))] = bad_steps[step]
            expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
            optimizer.step()
            got = optimizer.stats["grad_norm"]
            # From the third step (a layout held for two), one run: the whole fp32 grad buffer.
            native = optimizer._step_plan.norm_plans[torch.device("cpu")].get("cpu")  # made at the second step
            assert (0 if native is None else native.runs) == (1 if step >= 2 else 0)
            if step in bad_steps:
                assert not torch.isfinite(got), f"step {step}: the {bad_steps[step]} was not seen"
            else:
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=0, msg=f"step {step}")


def test_grads_made_anew_each_step_are_normed_one_by_one():
    """Grads that each backward makes anew move every step: the norm plan does not look for runs."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(64)]
    optimizer = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0)
    with backends.use_backend("cpu"):
        for step in range(4):
            grads = torch.randn(64 * 8).split(8)  # end to end in one buffer, but new at every step
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            native = optimizer._step_plan.norm_plans[torch.device("cpu")].get("cpu")
            assert native is None or native.runs == 0
            torch.testing.assert_close(optimizer.stats["grad_norm"], torch.linalg.vector_norm(torch.cat(grads)))


def test_grads_are_says_whether_each_grad_is_its_view_as_python_would():
    """zero_grad's check with flat grads (the extension's loop) against the plain Python one."""
    from fastopt.optim.optimizer import _grads_are_in_python

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(40)]
    views = list(torch.zeros(120).split(3))
    for p, v in zip(params, views):
        p.grad = v
    cases = {"all views": lambda: None, "one None": lambda: setattr(params[17], "grad", None),
             "one equal copy": lambda: setattr(params[39], "grad", views[39].clone()),
             "first replaced": lambda: setattr(params[0], "grad", torch.zeros(3))}  # fmt: skip
    for name, change in cases.items():
        for p, v in zip(params, views):
            p.grad = v
        change()
        assert cpu._C.grads_are(params, views) == _grads_are_in_python(params, views) == (name == "all views"), name
    with pytest.raises(RuntimeError, match="one view per param"):
        cpu._C.grads_are(params, views[:-1])


def test_a_step_refused_part_way_leaves_no_stale_run_of_flat_grads():
    """A step that raises on a bad grad after moving others must not leave the norm plan reading
    the flat buffer where a moved grad used to be."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(16)]
    optimizer = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, flat_grads=True)
    views = [p.grad for p in params]
    with backends.use_backend("cpu"):
        for _ in range(3):
            for view in views:
                view.copy_(torch.randn(8))
            optimizer.step()
        assert optimizer._step_plan.norm_plans[torch.device("cpu")]["cpu"].runs == 1
        params[0].grad = torch.randn(8) * 100  # moved out of the buffer (checked first)
        params[5].grad = params[6].detach()  # shares memory with a param the step writes
        with pytest.raises(ValueError, match="shares memory"):
            optimizer.step()
        params[5].grad = views[5]  # back in place: only params[0]'s grad has moved since the runs
        for _ in range(2):
            optimizer.step()
            expected = torch.linalg.vector_norm(torch.cat([p.grad for p in params]))
            torch.testing.assert_close(optimizer.stats["grad_norm"], expected, rtol=1e-6, atol=0)


def test_grad_watch_hands_out_the_grads_address_column_and_tells_a_changed_layout():
    """What the GPU backends read of the step plan's grads (GradWatch.grad_column: addresses and
    dtype codes, no Python object per grad), and layout(): it changes when a grad moves, changes
    dtype, or stays at its address with other strides (a transposed view of the same storage)."""
    shapes = [(4, 4), (7,), (0,), (3, 2)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    lists = [[None] * len(shapes)]
    watch = cpu._C.GradWatch([params], list(range(len(shapes))), lists * len(shapes), list(range(len(shapes))), [])

    def column(first, count):
        addresses = torch.full((count,), -1, dtype=torch.int64)  # poisoned: every element is written
        codes = watch.grad_column(first, count, addresses)
        return addresses.tolist(), codes

    addresses, codes = column(0, 4)
    assert addresses[:2] + addresses[3:] == [g.data_ptr() for i, g in enumerate(grads) if i != 2]
    assert addresses[2] == 0  # an empty grad has no address
    assert codes == bytes([6, 6, 6, 6])  # c10::ScalarType::Float
    assert column(1, 2)[0] == addresses[1:3]
    assert [g is h for g, h in zip(watch.grads(1, 3), grads[1:])] == [True] * 3
    for first, count in ((3, 2), (-1, 1), (0, 5)):
        with pytest.raises(RuntimeError, match="past the watch's"):
            column(first, count)
    with pytest.raises(RuntimeError, match="contiguous CPU int64 tensor of 2 elements"):
        watch.grad_column(0, 2, torch.zeros(3, dtype=torch.int64))

    layout = watch.layout()
    assert watch.refresh() == 0 and watch.layout() == layout  # nothing moved
    params[0].grad = grads[0].t()  # same address, strided now
    assert watch.refresh() == 0 and watch.layout() != layout
    assert column(0, 4)[1] is None
    layout = watch.layout()
    params[0].grad = grads[0]
    if hasattr(params[3], "grad_dtype"):  # torch >= 2.10 checks a grad's dtype unless told not to
        params[3].grad_dtype = None
    params[3].grad = torch.randn(shapes[3], dtype=torch.bfloat16)
    assert watch.refresh() == 1 and watch.layout() != layout
    addresses, codes = column(0, 4)
    assert codes == bytes([6, 6, 6, 15]) and addresses[3] == params[3].grad.data_ptr()  # BFloat16 is 15
    watch.release()
    with pytest.raises(RuntimeError, match="refresh\\(\\) first"):
        column(0, 4)


@pytest.mark.parametrize("flat_states", [False, True])
def test_planned_steps_bump_the_versions_of_what_they_write(flat_states):
    """A planned step (the optimizer's second on) gives every param and state a new version, as
    torch's in-place ops do; flat states are views of one buffer, whose shared counter is bumped."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5,), (3, 4), (BLOCK + 3,)]]
    optimizer = fastopt.optim.AdamW(params, lr=1e-3, flat_states=flat_states)
    with backends.use_backend("cpu"):
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape)
            written = params + [v for s in optimizer.state.values() for v in s.values()]
            versions = [t._version for t in written]
            optimizer.step()
            if step:  # the first step's states are made by it
                assert all(t._version > v for t, v in zip(written, versions)), step
    assert optimizer._step_plan is not None


def test_scan_lists_reads_what_python_would():
    """The triton backend's one-pass read of its tensor lists (addresses, dtype codes, sizes) and
    contiguity check, against the tensors' own attributes."""
    import numpy

    lists = [[torch.randn(3, 4), torch.zeros(0), torch.randn(()), torch.randn(5, dtype=torch.float64)],
             [torch.randn(3, 4, dtype=torch.bfloat16), torch.zeros(0), torch.randn(()), torch.randn(10)[::2]]]  # fmt: skip
    addresses = torch.full((2, 4), -1, dtype=torch.int64)  # poisoned: every element is written
    codes, numels, contiguous = cpu._C.scan_lists(lists, addresses)
    assert contiguous is False  # lists[1][3] is strided
    assert cpu._C.scan_lists(lists[:1], torch.zeros(1, 4, dtype=torch.int64))[2] is True
    assert addresses.tolist() == [[t.data_ptr() for t in tensors] for tensors in lists]
    assert addresses[0, 1] == 0  # an empty tensor: no address, as data_ptr() says
    float_codes = {torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}  # c10::ScalarType
    assert codes == bytes(float_codes[t.dtype] for tensors in lists for t in tensors)
    assert numpy.frombuffer(numels, numpy.int64).tolist() == [12, 0, 1, 5]
    assert cpu._C.all_contiguous(lists[0]) and not cpu._C.all_contiguous(lists[1]) and cpu._C.all_contiguous([])
    with pytest.raises(RuntimeError, match=r"shape \[2, 4\]"):
        cpu._C.scan_lists(lists, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="lists of 4 tensors"):
        cpu._C.scan_lists([lists[0], lists[1][:3]], addresses)
    with pytest.raises(RuntimeError, match="must be a tensor"):
        cpu._C.scan_lists([[1.0] * 4], torch.zeros(1, 4, dtype=torch.int64))
    if hasattr(torch, "_lazy_clone"):  # a copy-on-write clone: the kernels may write at its address
        source = torch.randn(8)
        clone = torch._lazy_clone(source)
        address = torch.zeros(1, 1, dtype=torch.int64)
        cpu._C.scan_lists([[clone]], address)
        assert address.item() == clone.data_ptr() != source.data_ptr()  # its own copy, not the source's
