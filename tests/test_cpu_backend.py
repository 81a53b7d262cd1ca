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
from fastopt import backends, reference
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

cpu = pytest.importorskip("fastopt.cpu")
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


@pytest.mark.parametrize("op", ["norm", "norm_pinf", "norm_p3", "unscale", "agc", "adamw"])
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
        else:
            params = random_tensors(shapes, torch.float32, seed=5)
            m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
            steps = [torch.zeros(()) for _ in params]
            for _ in range(2):
                cpu.adamw_(params, tensors, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                           maximize=False, max_exp_avg_sqs=None, grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
            results.append(params + m + v)
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


@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("scalars", ["plain", "scaled", "tensors"])
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_adamw_matches_the_reference(combo, amsgrad, scalars, non_contiguous):
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
                 found_inf=None, clip_coef=None)  # fmt: skip
    if scalars == "scaled":
        hyper.update(maximize=True, grad_scale=1024.0, clip_coef=0.25)
    elif scalars == "tensors":
        hyper.update(lr=torch.tensor(3e-3), grad_scale=torch.tensor(8.0), clip_coef=torch.tensor(0.5),
                     found_inf=torch.zeros(1))  # fmt: skip
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


def test_in_place_ops_bump_the_version_counter():
    tensors = random_tensors([(10,), (BLOCK + 1,)], torch.float32, seed=50)
    versions = [t._version for t in tensors]
    cpu.scale_(tensors, 0.5)
    assert all(t._version > v for t, v in zip(tensors, versions))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_vector_clones_use_hardware_fma():
    """The x86-64-v3 / v4 clones of the AdamW loops hold packed vfmadd instructions and no call to
    fma (a library fma blocks vectorisation: 3-5x slower, measured on a 2-core Zen 4)."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("target_clones are compiled on x86-64 only")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", cpu._C.__file__], capture_output=True, text=True,
                         check=True, timeout=300).stdout  # fmt: skip
    functions = re.split(r"\n(?=[0-9a-f]+ <)", out)
    clones = [f for f in functions if "adamw_block" in f.split("\n", 1)[0] and "arch_x86_64_v" in f.split("\n", 1)[0]]
    assert len(clones) >= 2 * 11 * 4, "every compiled AdamW combination has a v3 and a v4 clone"
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
