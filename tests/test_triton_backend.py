"""The Triton backend's machinery, which the op tests cannot see.

The op tests (test_norm_scale, test_clip, test_adamw, test_fuzz, test_validation, ...) check the
backend's results when the suite runs on it: ``make test-triton`` (``FASTOPT_BACKEND=triton
TRITON_INTERPRET=1``, Triton's interpreter on CPU tensors). This file checks what they cannot: one
launch per pass at any tensor count, the chunk-table cache and its pointer refresh, thousands of
tensors, tensors and AGC units spanning several chunks, the torch custom ops (opcheck,
torch.compile), that every launch the ops make compiles for a GPU, that the aligned variants
compile to 128-bit accesses (and that unaligned tensors take the scalar ones, with equal
results), SGD and Lion bit for bit with the reference over chunks and dtype groups, the update
ops' step-plan tables (one per op) and cache keys, private tables during graph capture, and, on a GPU,
tensors of more than 2**31 elements, tensors on another GPU than the current one, a captured
graph replayed after eager calls with its layout, and one layout on two streams at once.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import backends, ops
from fastopt.backends import reference
from tests.helpers import assert_bitwise_equal, float64_norm, random_tensors, tolerance

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"  # where the backend runs in this process
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def runs_here(test):
    """For tests of the backend's behaviour: they run where it runs, on CPU tensors under the
    interpreter, else on a GPU (marked cuda), and skip where it is unavailable."""
    backends.refresh()
    available = "triton" in fastopt.available_backends()
    test = pytest.mark.skipif(not available, reason="the triton backend is unavailable here (see `make info`)")(test)
    return test if INTERPRETED else pytest.mark.cuda(test)


if TRITON_INSTALLED:
    from fastopt.backends.triton import launch
    from fastopt.backends.triton.tables import CHUNK_SIZE


@pytest.fixture
def triton_backend():
    """Force the triton backend; start with empty launch counts and table cache."""
    launch.LAUNCHES.clear()
    launch.TABLES.clear()
    with fastopt.use_backend("triton"):
        yield
    launch.TABLES.clear()


def launches() -> dict[str, int]:
    counts = dict(launch.LAUNCHES)
    launch.LAUNCHES.clear()
    return counts


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def adamw_state(params, state_dtype=None):
    gen = torch.Generator().manual_seed(7)
    exp_avgs = [(torch.randn(p.shape, generator=gen) * 0.1).to(p.device, state_dtype or p.dtype) for p in params]
    exp_avg_sqs = [(torch.rand(p.shape, generator=gen) * 0.01).to(p.device, state_dtype or p.dtype) for p in params]
    steps = [torch.tensor(float(i % 5), device=p.device) for i, p in enumerate(params)]
    return exp_avgs, exp_avg_sqs, steps


def clone_all(tensors):
    return [t.clone() for t in tensors]


# --------------------------------------------------------------------------- one launch per pass


@runs_here
@pytest.mark.parametrize("num_tensors", [1, 60])
@pytest.mark.usefixtures("triton_backend")
def test_each_pass_is_one_launch_at_any_tensor_count(num_tensors):
    shapes = [(i % 7 + 1, 3) if i % 2 else (i % 11 + 1,) for i in range(num_tensors)]
    grads = random_tensors(shapes, device=DEVICE, seed=1)
    params = random_tensors(shapes, device=DEVICE, seed=2)

    fastopt.multi_tensor_norm(grads, per_tensor=True)
    assert launches() == {"chunk_norm_partials_kernel": 1, "segment_norms_kernel": 1}
    fastopt.multi_tensor_norm(grads, 3.0, found_inf=torch.zeros(1, device=DEVICE))
    assert launches() == {"chunk_norm_partials_kernel": 1, "segment_norms_kernel": 1}
    fastopt.unscale_and_check_(grads, torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE))
    assert launches() == {"scale_kernel": 1}
    fastopt.scale_(grads, 0.5)
    assert launches() == {"scale_kernel": 1}
    ops.clamp_(grads, 1.0)
    assert launches() == {"clamp_kernel": 1}
    ops.adaptive_clip_(params, grads)
    assert launches() == {"chunk_norm_partials_kernel": 1, "unit_clip_coefficients_kernel": 1, "scale_kernel": 1}
    fastopt.adamw_(params, grads, *adamw_state(params), **HYPER, found_inf=torch.zeros(1, device=DEVICE))
    assert launches() == {"adamw_kernel": 1}
    fastopt.adamw_(params, grads, *adamw_state(params), **HYPER, decoupled_weight_decay=False)
    assert launches() == {"adamw_kernel": 1}
    fastopt.sgd_(params, grads, clone_all(grads), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    assert launches() == {"sgd_kernel": 1}
    fastopt.sgd_(params, grads, lr=0.1, found_inf=torch.zeros(1, device=DEVICE))
    assert launches() == {"sgd_kernel": 1}
    fastopt.lion_(params, grads, clone_all(grads), lr=1e-3, weight_decay=0.1)
    assert launches() == {"lion_kernel": 1}


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_one_launch_per_dtype_combination():
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    shapes = [(5, 4), (33,), (7,), (2, 9), ()]
    tensors = [t.to(d) for t, d in zip(random_tensors(shapes, device=DEVICE, seed=3), dtypes)]
    total, norms = fastopt.multi_tensor_norm(tensors, per_tensor=True)
    assert launches() == {"chunk_norm_partials_kernel": 3, "segment_norms_kernel": 1}
    expected_total, expected_norms = reference.multi_tensor_norm(tensors, 2.0, True)
    torch.testing.assert_close(total, expected_total, **tolerance(torch.float32))
    torch.testing.assert_close(norms, expected_norms, **tolerance(torch.float32))

    # AdamW groups by the combination over all its lists: bf16 params with fp32 states, and fp32 throughout.
    params = random_tensors([(4, 3), (9,), (2, 2), (5,)], device=DEVICE, seed=4)
    params[1], params[3] = params[1].bfloat16(), params[3].bfloat16()
    grads = [g.to(p.dtype) for g, p in zip(random_tensors([p.shape for p in params], device=DEVICE, seed=5), params)]
    exp_avgs, exp_avg_sqs, steps = adamw_state(params, torch.float32)
    expected = [clone_all(params), clone_all(exp_avgs), clone_all(exp_avg_sqs), clone_all(steps)]
    fastopt.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **HYPER)
    assert launches() == {"adamw_kernel": 2}
    reference.adamw_(*expected[:1], grads, *expected[1:], **HYPER, maximize=False, max_exp_avg_sqs=None,
                     grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    for actual, want in zip([params, exp_avgs, exp_avg_sqs, steps], expected):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(a.dtype))


# --------------------------------------------------------------------------- the table cache


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_tables_are_cached_and_only_the_pointers_refresh():
    tables = launch.TABLES
    grads = random_tensors([(5, 4), (0,), (), (70,)], device=DEVICE, seed=6)

    total = fastopt.multi_tensor_norm(grads)
    fastopt.scale_(grads, torch.clamp(1.0 / (total + 1e-6), max=1.0))  # clip_grad_norm_: one table for both passes
    assert (tables.misses, tables.hits, tables.pointer_refreshes) == (1, 1, 1)
    table = tables.lookup([grads])
    addresses = table.addresses
    assert (tables.misses, tables.hits, tables.pointer_refreshes) == (1, 2, 1)

    # Re-allocated grads (zero_grad(set_to_none=True)): same table, its addresses rewritten in place.
    new_grads = [g.clone() * 3 for g in grads]
    before = clone_all(grads)
    fastopt.scale_(new_grads, 0.5)
    assert (tables.misses, tables.hits, tables.pointer_refreshes) == (1, 3, 2)
    assert tables.lookup([new_grads]) is table and table.addresses is addresses
    assert table.addresses[0].tolist() == [g.data_ptr() for g in new_grads]
    for g, b, new in zip(grads, before, new_grads):
        assert_bitwise_equal(g, b)  # the old tensors are not touched any more
        torch.testing.assert_close(new, b * 1.5, rtol=0, atol=0)

    # Another layout (a size or a dtype changed) is another table.
    fastopt.scale_(new_grads[:3] + [torch.randn(71, device=DEVICE)], 0.5)
    fastopt.scale_(new_grads[:3] + [new_grads[3].double()], 0.5)
    assert tables.misses == 3


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_adamw_with_grads_reallocated_every_step_matches_the_reference():
    shapes = [(6, 5), (11,), (), (3, 2, 2)]
    params = random_tensors(shapes, device=DEVICE, seed=8)
    state = adamw_state(params)
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]
    for step in range(3):
        grads = random_tensors(shapes, device=DEVICE, seed=20 + step)  # new tensors, new pointers
        lr = torch.tensor(1e-2 / (step + 1), device=DEVICE)
        fastopt.adamw_(params, grads, *state, **{**HYPER, "lr": lr})
        reference.adamw_(expected_params, grads, *expected_state, **{**HYPER, "lr": lr}, maximize=False,
                         max_exp_avg_sqs=None, grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    assert (launch.TABLES.misses, launch.TABLES.pointer_refreshes) == (1, 3)
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


# --------------------------------------------------------------------------- many tensors, big tensors


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_5000_small_tensors_in_one_launch_per_pass():
    generator = torch.Generator().manual_seed(9)
    sizes = torch.randint(0, 9, (5000,), generator=generator).tolist()
    grads = [(torch.randn(n, generator=generator) * 2).to(DEVICE) for n in sizes]
    expected_total, expected_norms = reference.multi_tensor_norm(grads, 2.0, True)

    expected_grads = clone_all(grads)

    total, norms = fastopt.multi_tensor_norm(grads, per_tensor=True)
    clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    fastopt.scale_(grads, clip_coef)

    assert launches() == {"chunk_norm_partials_kernel": 1, "segment_norms_kernel": 1, "scale_kernel": 1}
    torch.testing.assert_close(total, expected_total, **tolerance(torch.float32))
    torch.testing.assert_close(norms, expected_norms, **tolerance(torch.float32))
    reference.scale_(expected_grads, clip_coef)
    torch.testing.assert_close(torch.cat(grads), torch.cat(expected_grads), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend")
def test_5000_small_tensors_adamw_on_gpu():
    shapes = [(int(n),) for n in torch.randint(1, 65536, (5000,), generator=torch.Generator().manual_seed(10))]
    params = random_tensors(shapes, device="cuda", seed=11)
    grads = random_tensors(shapes, device="cuda", seed=12)
    state = adamw_state(params)
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]
    fastopt.adamw_(params, grads, *state, **HYPER)
    assert launches() == {"adamw_kernel": 1}
    reference.adamw_(expected_params, grads, *expected_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                     grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_tensors_and_units_spanning_several_chunks():
    # A tensor of 2.5 chunks, a unit (row) of 1.5 chunks, and small ones between them.
    shapes = [(5 * CHUNK_SIZE // 2,), (3,), (2, 3 * CHUNK_SIZE // 2), (4, 5)]
    grads = random_tensors(shapes, device=DEVICE, seed=13, scale=0.05)
    params = random_tensors(shapes, device=DEVICE, seed=14)
    grads[2][0] *= 100  # one unit clipped, the other not

    for p in [2.0, math.inf]:
        total, norms = fastopt.multi_tensor_norm(grads, p, per_tensor=True)
        # Against float64: torch's own fp32 norm of the (2, 49152) tensor is off by 2.5e-5 here.
        torch.testing.assert_close(total.double().cpu(), float64_norm(grads, p), **tolerance(torch.float32))
        expected_norms = torch.stack([float64_norm([g], p) for g in grads])
        torch.testing.assert_close(norms.double().cpu(), expected_norms, **tolerance(torch.float32))

    expected = clone_all(grads)
    ops.adaptive_clip_(params, grads)
    reference.adaptive_clip_(params, expected, 0.01, 1e-3, 2.0, True)
    for g, want in zip(grads, expected):
        torch.testing.assert_close(g, want, **tolerance(torch.float32))

    # AdamW: every chunk of a tensor reads the old step, and the step is written once; twice, so
    # that the second launch shows the first one left its arrival counters at zero.
    state = adamw_state(params)
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]
    for _ in range(2):
        fastopt.adamw_(params, grads, *state, **HYPER)
        reference.adamw_(expected_params, grads, *expected_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                         grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    assert [s.item() for s in state[2]] == [s.item() for s in expected_state[2]] == [2.0, 3.0, 4.0, 5.0]
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


SGD_OPTIONS = {
    "plain": dict(momentum_buffers=False),
    "weight-decay-maximize": dict(momentum_buffers=False, weight_decay=0.1, maximize=True),
    "first-step": dict(momentum=0.9, dampening=0.5, weight_decay=0.1, first_step=True),
    "dampened": dict(momentum=0.9, dampening=0.5, weight_decay=0.1),
    "nesterov-amp": dict(momentum=0.9, nesterov=True, weight_decay=0.1, grad_scale=4.0, clip_coef=0.5),
}


def sgd_call(options, lr):
    """(momentum buffers wanted, sgd_'s keyword arguments as a backend takes them)."""
    options = dict(options)
    with_buffers = options.pop("momentum_buffers", True)
    hyper = dict(lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False,
                 grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    return with_buffers, {**hyper, **options}


def lion_hyper(lr, **options):
    return {**dict(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None,
                   clip_coef=None), **options}  # fmt: skip


@runs_here
@pytest.mark.parametrize("option", SGD_OPTIONS)
@pytest.mark.usefixtures("triton_backend")
def test_sgd_and_lion_span_chunks_and_dtype_groups_bit_for_bit(option):
    """SGD and Lion over tensors of several chunks, empty ones and two dtype groups (bf16 params
    with fp32 states): bit for bit as the reference (the kernels round as torch's CPU kernels:
    each add with alpha, lerp and the sign's step one rounding), in one launch per group; a set
    found_inf changes no bit."""
    shapes = [(5 * CHUNK_SIZE // 2,), (0,), (3,), (2, 3 * CHUNK_SIZE // 2), (4, 5), ()]
    params = random_tensors(shapes, device=DEVICE, seed=90)
    params[3], params[5] = params[3].bfloat16(), params[5].bfloat16()
    states = random_tensors(shapes, device=DEVICE, seed=91)  # fp32: bf16 params keep fp32 states
    lr = torch.tensor(0.05, device=DEVICE)
    with_buffers, hyper = sgd_call(SGD_OPTIONS[option], lr)
    buffers = states if with_buffers else None
    lion_params = clone_all(params)
    lion_options = dict(weight_decay=0.1, maximize=True, grad_scale=2.0) if option != "plain" else {}
    for step in range(2):
        grads = [g.to(p.dtype) for g, p in zip(random_tensors(shapes, device=DEVICE, seed=92 + step), params)]
        expected = [clone_all(params), None if buffers is None else clone_all(buffers)]
        launch.sgd_(params, grads, buffers, **hyper)
        reference.sgd_(*expected[:1], grads, expected[1], **hyper)
        for actual, want in zip(params + (buffers or []), expected[0] + (expected[1] or [])):
            assert_bitwise_equal(actual, want)
        hyper["first_step"] = False
        lion_states = clone_all(states)
        expected = [clone_all(lion_params), clone_all(lion_states)]
        launch.lion_(lion_params, grads, lion_states, **lion_hyper(lr, **lion_options))
        reference.lion_(expected[0], grads, expected[1], **lion_hyper(lr, **lion_options))
        for actual, want in zip(lion_params + lion_states, expected[0] + expected[1]):
            assert_bitwise_equal(actual, want)
    assert launches() == {"sgd_kernel": 4, "lion_kernel": 4}

    before = clone_all(params + (buffers or []) + lion_params + states)
    found_inf = torch.ones((), device=DEVICE)
    launch.sgd_(params, grads, buffers, **{**hyper, "found_inf": found_inf})
    launch.lion_(lion_params, grads, states, **lion_hyper(lr, found_inf=found_inf))
    for actual, want in zip(params + (buffers or []) + lion_params + states, before):
        assert_bitwise_equal(actual, want)


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_adam_l2_weight_decay_matches_the_reference():
    """decoupled_weight_decay=False (torch.optim.Adam's L2 decay) over several chunks, AMSGrad:
    moments bit for bit as the reference; a zero weight decay adds no term (a nan param leaves
    the moments finite, as torch's)."""
    shapes = [(5 * CHUNK_SIZE // 2,), (3,), (4, 5)]
    params = random_tensors(shapes, device=DEVICE, seed=95)
    grads = random_tensors(shapes, device=DEVICE, seed=96)
    for weight_decay in (0.1, 0.0):
        if weight_decay == 0:
            params[2][0, 0] = float("nan")
        state = adamw_state(params)
        max_exp_avg_sqs = [v * 1.5 for v in state[1]]
        expected = [clone_all(params), *[clone_all(s) for s in state], clone_all(max_exp_avg_sqs)]
        hyper = dict(HYPER, weight_decay=weight_decay, maximize=False, grad_scale=None, found_inf=None, clip_coef=None,
                     decoupled_weight_decay=False)  # fmt: skip
        launch.adamw_(params, grads, *state, max_exp_avg_sqs=max_exp_avg_sqs, **hyper)
        reference.adamw_(expected[0], grads, *expected[1:4], max_exp_avg_sqs=expected[4], **hyper)
        for actual, want in zip([*state[:2], max_exp_avg_sqs], [expected[1], expected[2], expected[4]]):
            for a, w in zip(actual, want):
                assert_bitwise_equal(a, w)
        for a, w in zip(params + state[2], expected[0] + expected[3]):
            torch.testing.assert_close(a, w, **tolerance(torch.float32), equal_nan=True)
    assert state[0][2].isfinite().all() and state[1][2].isfinite().all()  # weight_decay 0: no nan * 0 term


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend")
def test_more_than_2_to_the_31_elements():
    numel = 2**31 + 3 * CHUNK_SIZE + 7
    ones = torch.ones(numel, dtype=torch.float16, device="cuda")
    _, norms = fastopt.multi_tensor_norm([torch.ones(5, device="cuda"), ones], per_tensor=True)
    assert norms[1].item() == torch.tensor(math.sqrt(numel), dtype=torch.float32).item()  # fp32 sums of ones are exact
    fastopt.scale_([ones], 0.5)
    assert ones.eq(0.5).all()
    del ones

    # AdamW in bf16: the last elements, past 2**31, step as a short tensor with the same values does.
    param, grad, exp_avg, exp_avg_sq = (torch.full((numel,), v, dtype=torch.bfloat16, device="cuda")
                                        for v in (1.0, 0.5, 0.1, 0.01))  # fmt: skip
    step = torch.zeros((), device="cuda")
    fastopt.adamw_([param], [grad], [exp_avg], [exp_avg_sq], [step], **HYPER)
    small = [torch.full((9,), v, dtype=torch.bfloat16, device="cuda") for v in (1.0, 0.5, 0.1, 0.01)]
    fastopt.adamw_([small[0]], [small[1]], [small[2]], [small[3]], [torch.zeros((), device="cuda")], **HYPER)
    assert step.item() == 1.0
    for big, short in zip((param, exp_avg, exp_avg_sq), (small[0], small[2], small[3])):
        assert_bitwise_equal(big[-9:], short)
        assert_bitwise_equal(big[:9], short)


# --------------------------------------------------------------------------- torch.library


def custom_op_cases(device):
    """(op, arguments) for each registered op, on fresh tensors."""
    ts = random_tensors([(3, 5), (7,), ()], device=device, seed=15)

    def copies(scale=1.0):
        return [t.clone() * scale for t in ts]

    def scalar(value, shape=()):
        return torch.full(shape, value, device=device)

    library = torch.ops.fastopt_triton
    states = [[torch.zeros_like(t) for t in ts], [torch.rand_like(t) for t in ts], [torch.ones_like(t) for t in ts]]
    steps = [scalar(0.0) for _ in ts]
    flag = scalar(0.0, (1,))
    return {
        "multi_tensor_norm": (library.multi_tensor_norm.default, (ts, 2.0, True, None)),
        "multi_tensor_norm-inf-found_inf": (library.multi_tensor_norm.default, (ts, math.inf, False, flag)),
        "unscale_and_check_": (library.unscale_and_check_.default, (copies(), None, scalar(0.5, (1,)), flag)),
        "scale_": (library.scale_.default, (copies(), 0.5, None)),
        "clamp_": (library.clamp_.default, (copies(), 0.5)),
        "adaptive_clip_": (library.adaptive_clip_.default, (copies(), copies(0.1), 0.01, 1e-3, 2.0, True)),
        # lr as a tensor, AMSGrad, grad_scale as a float, found_inf, clip_coef as a tensor.
        "adamw_": (library.adamw_.default, (copies(), copies(), states[0], states[1], steps, None, scalar(1e-3), 0.9,
                                            0.999, 1e-8, 0.01, False, states[2], 2.0, None, flag.clone(), None,
                                            scalar(0.5), True)),
        # Adam's L2 decay, lr as a float, grad_scale as a tensor, maximize.
        "adamw_-l2": (library.adamw_.default, (copies(), copies(), states[0], states[1], steps, 1e-3, None, 0.9,
                                               0.999, 1e-8, 0.01, True, [], None, scalar(2.0), None, 0.5, None,
                                               False)),
        # Nesterov momentum with weight decay, lr as a tensor, grad_scale as a float, found_inf.
        "sgd_": (library.sgd_.default, (copies(), copies(), states[1], None, scalar(0.1), 0.9, 0.0, 0.01, True, False,
                                        False, 2.0, None, flag.clone(), None, scalar(0.5))),
        # No momentum (no buffers), maximize.
        "sgd_-plain": (library.sgd_.default, (copies(), copies(), [], 0.1, None, 0.0, 0.0, 0.0, False, True, False,
                                              None, None, None, None, None)),
        "lion_": (library.lion_.default, (copies(), copies(), states[1], None, scalar(1e-3), 0.9, 0.99, 0.1, True,
                                          None, scalar(2.0), flag.clone(), 0.5, None)),
    }  # fmt: skip


CUSTOM_OPS = list(custom_op_cases("cpu")) if TRITON_INSTALLED else []


@runs_here
@pytest.mark.parametrize("name", CUSTOM_OPS)
def test_custom_ops_pass_opcheck(name):
    op, args = custom_op_cases(DEVICE)[name]
    torch.library.opcheck(op, args)


@runs_here
def test_compiled_step_calls_the_custom_ops():
    """torch.compile keeps each op as one node (it never traces into the table building)."""
    graphs = []

    def record_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def clip_step(grads):
        total, _ = torch.ops.fastopt_triton.multi_tensor_norm(grads, 2.0, False, None)
        torch.ops.fastopt_triton.scale_(grads, None, torch.clamp(1.0 / (total + 1e-6), max=1.0))
        return total

    grads = random_tensors([(4, 5), (9,)], device=DEVICE, seed=16, scale=3.0)
    expected = clone_all(grads)
    compiled_total = torch.compile(clip_step, backend=record_graph, fullgraph=True)(grads)
    torch.testing.assert_close(compiled_total, clip_step(expected))  # (the eager call scales `expected`)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert "fastopt_triton.multi_tensor_norm" in targets and "fastopt_triton.scale_" in targets


@runs_here
def test_compiled_sgd_and_lion_steps_call_the_custom_ops():
    """Under torch.compile the backend's sgd_ and lion_ are one custom-op node each, with the
    eager kernels' results."""
    graphs = []

    def record_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    triton_backend = backends.status("triton").module

    def step(params, grads, buffers, exp_avgs, lr):
        triton_backend.sgd_(params, grads, buffers, lr=lr, momentum=0.9, dampening=0.0, weight_decay=0.1,
                            nesterov=True, maximize=False, first_step=False, grad_scale=2.0, found_inf=None,
                            clip_coef=None)  # fmt: skip
        triton_backend.lion_(params, grads, exp_avgs, lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=True,
                             grad_scale=None, found_inf=None, clip_coef=0.5)  # fmt: skip

    shapes = [(4, 5), (9,)]
    lists = [random_tensors(shapes, device=DEVICE, seed=120 + k) for k in range(4)]
    expected = [clone_all(t) for t in lists]
    lr = torch.tensor(0.01, device=DEVICE)
    torch.compile(step, backend=record_graph, fullgraph=True)(*lists, lr)
    step(*expected, lr)
    for actual, want in zip(lists, expected):
        for a, w in zip(actual, want):
            assert_bitwise_equal(a, w)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets == ["fastopt_triton.sgd_.default", "fastopt_triton.lion_.default"]


@pytest.mark.cuda
@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_inductor_compiles_a_clipped_adamw_step_through_the_public_api():
    shapes = [(64, 32), (32,), (5, 64)]
    params, grads = random_tensors(shapes, device="cuda", seed=17), random_tensors(shapes, device="cuda", seed=18)
    state = adamw_state(params)
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        total = fastopt.multi_tensor_norm(grads)
        clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        fastopt.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **HYPER, clip_coef=clip_coef)
        return total

    with fastopt.use_backend("triton"):
        total = torch.compile(step)(params, grads, *state)
        expected_total = step(expected_params, grads, *expected_state)
    assert_bitwise_equal(total, expected_total)
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            assert_bitwise_equal(a, w)


# --------------------------------------------------------------------------- compiled for a GPU

_COMPILE_CHECK = """
import sys
import tests.test_triton_backend as t
sys.exit(t.compile_every_launch_for_a_gpu())
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
@pytest.mark.skipif(INTERPRETED, reason="runs once, in the lane without the interpreter (`make test`)")
def test_every_launch_compiles_for_a_gpu():
    """What the interpreter cannot show: the kernels as the ops launch them compile to sm_90 code.
    Runs without a GPU: the ops run on CPU tensors with launches recorded, then each distinct
    launch signature is compiled with Triton's CUDA backend."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTOPT_BACKEND")}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, env=env,
                            timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compiled" in result.stdout


_SIGNATURE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                     torch.int32: "i32", torch.int64: "i64"}  # fmt: skip


def _record_launches(calls) -> list:
    """Run ``calls`` with every kernel launch recorded (kernel, arguments) instead of run."""
    recorded = []

    def record(kernel, num_programs, *args, **kwargs):
        if num_programs:
            recorded.append((kernel, args, kwargs))

    real_launch, launch._launch = launch._launch, record
    try:
        for call in calls:
            call()
    finally:
        launch._launch = real_launch
    return recorded


def _signature(kernel, args, kwargs) -> tuple[dict, dict]:
    """Triton's (signature, constexprs) for a launch, as its launcher would specialise it."""
    signature, constexprs = {}, {}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _SIGNATURE_DTYPES[value.dtype]
        elif isinstance(value, float):
            signature[param.name] = "fp64"
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    return signature, constexprs


def compile_every_launch_for_a_gpu(arch: int = 90) -> int:
    """The launches of every op, over the dtype combinations and options they specialise on,
    compiled for CUDA sm_``arch`` (no GPU needed). Returns a process exit status."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def adamw(dtypes, **options):
        params = [torch.randn(4, 3).to(dtypes[0]), torch.randn(5).to(dtypes[0])]
        grads = [p.to(dtypes[1]) for p in params]
        states = [[torch.rand_like(p, dtype=dtypes[2]) for p in params] for _ in range(3)]
        return lambda: launch.adamw_(
            params, grads, states[0], states[1], [torch.zeros(()) for _ in params],
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=options.get("maximize", False),
            max_exp_avg_sqs=states[2] if options.get("amsgrad") else None,
            lr=options.get("lr", 1e-3), grad_scale=options.get("grad_scale"), found_inf=options.get("found_inf"),
            clip_coef=options.get("clip_coef"), decoupled_weight_decay=not options.get("l2", False),
        )  # fmt: skip

    def sgd(dtypes, momentum=0.0, **options):
        params = [torch.randn(4, 3).to(dtypes[0]), torch.randn(5).to(dtypes[0])]
        grads = [p.to(dtypes[1]) for p in params]
        buffers = [torch.rand_like(p, dtype=dtypes[2]) for p in params] if momentum else None
        return lambda: launch.sgd_(
            params, grads, buffers, lr=options.get("lr", 0.1), momentum=momentum, dampening=0.0,
            weight_decay=options.get("weight_decay", 0.0), nesterov=options.get("nesterov", False),
            maximize=options.get("maximize", False), first_step=options.get("first_step", False),
            grad_scale=options.get("grad_scale"), found_inf=options.get("found_inf"),
            clip_coef=options.get("clip_coef"),
        )  # fmt: skip

    def lion(dtypes, **options):
        params = [torch.randn(4, 3).to(dtypes[0]), torch.randn(5).to(dtypes[0])]
        grads = [p.to(dtypes[1]) for p in params]
        exp_avgs = [torch.rand_like(p, dtype=dtypes[2]) for p in params]
        return lambda: launch.lion_(
            params, grads, exp_avgs, lr=options.get("lr", 1e-3), beta1=0.9, beta2=0.99, weight_decay=0.1,
            maximize=options.get("maximize", False), grad_scale=options.get("grad_scale"),
            found_inf=options.get("found_inf"), clip_coef=options.get("clip_coef"),
        )  # fmt: skip

    flag, half = torch.zeros(1), torch.tensor(0.5)
    calls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        tensors = [torch.randn(5, 3).to(dtype), torch.randn(7).to(dtype)]
        for p in (1.0, 2.0, 3.5, math.inf):
            calls.append(lambda t=tensors, p=p: launch.multi_tensor_norm(t, p, True))
        calls += [
            lambda t=tensors: launch.multi_tensor_norm(t, 2.0, False, flag),
            lambda t=tensors: launch.unscale_and_check_(t, half, flag),
            lambda t=tensors: launch.scale_(t, 0.5),
            lambda t=tensors: launch.clamp_(t, 0.5),
            lambda t=tensors: launch.adaptive_clip_(t, [x * 0.1 for x in t], 0.01, 1e-3, 2.0, True),
        ]
    for dtype in (torch.float32, torch.bfloat16):  # tensors not 16-byte aligned: the scalar variants
        tensors = [torch.randn(5 * 3 + 1).to(dtype)[1:].view(5, 3), torch.randn(8).to(dtype)[1:]]
        states = [[t.clone() for t in tensors] for _ in range(3)]
        calls += [
            lambda t=tensors: launch.multi_tensor_norm(t, 2.0, True),
            lambda t=tensors: launch.scale_(t, 0.5),
            lambda t=tensors: launch.clamp_(t, 0.5),
            lambda t=tensors, s=states: launch.adamw_(
                t, [x.clone() for x in t], s[0], s[1], [torch.zeros(()) for _ in t],
                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False, max_exp_avg_sqs=None,
                grad_scale=None, found_inf=None, clip_coef=None),
        ]  # fmt: skip
    every_option = dict(amsgrad=True, maximize=True, lr=half, grad_scale=half, found_inf=flag, clip_coef=half)
    mixed = [(torch.float32, torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float32)]
    every_sgd_option = dict(momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True, lr=half, grad_scale=half,
                            found_inf=flag, clip_coef=half)  # fmt: skip
    every_lion_option = dict(maximize=True, lr=half, grad_scale=half, found_inf=flag, clip_coef=half)
    for dtypes in [(torch.float32,) * 3, (torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.float64,) * 3, *mixed]:
        calls += [adamw(dtypes), adamw(dtypes, **every_option), adamw(dtypes, l2=True, found_inf=flag)]
        calls += [sgd(dtypes, **every_sgd_option), sgd(dtypes, momentum=0.9, first_step=True), lion(dtypes),
                  lion(dtypes, **every_lion_option)]  # fmt: skip
    calls += [sgd((torch.float32,) * 3), sgd((torch.bfloat16,) * 3, weight_decay=0.01)]  # no momentum buffers

    distinct = {}
    for kernel, args, kwargs in _record_launches(calls):
        signature, constexprs = _signature(kernel, args, kwargs)
        distinct[(kernel.fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())))] = (
            kernel, signature, constexprs)  # fmt: skip
    target = GPUTarget("cuda", arch, 32)
    for kernel, signature, constexprs in distinct.values():
        full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
        triton_compile(ASTSource(kernel, signature=full_signature, constexprs=constexprs), target=target,
                       options=launch.COMPILE_OPTIONS)  # fmt: skip
    print(f"compiled {len(distinct)} distinct launches of {len({k[0] for k in distinct})} kernels for sm_{arch}")
    return 0


# --------------------------------------------------------------------------- alignment, plans, capture


def offset_views(shapes, dtype=torch.float32, seed=0):
    """Contiguous tensors that start one element into their storage: not 16-byte aligned."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(math.prod(s) + 1, generator=generator).to(dtype).to(DEVICE)[1:].view(s) for s in shapes]


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_unaligned_tensors_take_the_scalar_path_and_give_the_same_results():
    shapes = [(3 * 1024 + 5,), (2, 700), (9,)]  # whole blocks and a tail; a tail only
    aligned = random_tensors(shapes, device=DEVICE, seed=30)
    unaligned = offset_views(shapes, seed=30)
    for a, u in zip(aligned, unaligned):
        u.copy_(a)
    assert launch.TABLES.lookup([aligned]).aligned((0,)) == [True]
    assert launch.TABLES.lookup([unaligned]).aligned((0,)) == [False]
    assert launch.TABLES.lookup([aligned[:1] + unaligned[1:]]).aligned((0,)) == [False]
    # AGC units start anywhere in their tensor: no vector path unless every unit is whole blocks.
    assert launch.TABLES.lookup([aligned, aligned], units=[1, 2, 1]).aligned((0, 1)) == [False]

    for p in (2.0, math.inf):
        assert_bitwise_equal(fastopt.multi_tensor_norm(aligned, p), fastopt.multi_tensor_norm(unaligned, p))
    fastopt.scale_(aligned, 0.75)
    fastopt.scale_(unaligned, 0.75)
    for a, u in zip(aligned, unaligned):
        assert_bitwise_equal(a, u)
    for params in (aligned, unaligned):
        grads = [torch.full_like(t, 0.5) for t in params]
        fastopt.adamw_(params, grads, *adamw_state(params), **HYPER, grad_scale=2.0, clip_coef=0.5)
    for a, u in zip(aligned, unaligned):
        assert_bitwise_equal(a, u)
    states = []
    for params in (aligned, unaligned):
        grads = [t * 0.5 for t in params]
        buffers, exp_avgs = [t * 0.25 for t in params], [t * 0.125 for t in params]
        fastopt.sgd_(params, grads, buffers, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
        fastopt.lion_(params, grads, exp_avgs, lr=0.01, weight_decay=0.1)
        states.append(buffers + exp_avgs)
    for a, u in zip(aligned + states[0], unaligned + states[1]):
        assert_bitwise_equal(a, u)


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_planned_adamw_keeps_its_table_and_refreshes_only_the_grads_row():
    shapes = [(6, 5), (2 * 1024 + 3,), (), (3, 2, 2)]
    params = random_tensors(shapes, device=DEVICE, seed=31)
    state = adamw_state(params)
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]
    plan = {}
    for step in range(3):
        grads = random_tensors(shapes, device=DEVICE, seed=40 + step)  # new tensors, new pointers
        lists = dict(params=params, grads=grads, exp_avgs=state[0], exp_avg_sqs=state[1], steps=state[2])
        launch.adamw_planned_(lists, plan, **HYPER, maximize=False, grad_scale=None, found_inf=None, clip_coef=None)
        reference.adamw_(expected_params, grads, *expected_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                         grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
        (entry,) = plan.values()
        if step == 0:
            table = entry.table
        assert entry.table is table
        assert table.addresses[1].tolist() == [g.data_ptr() for g in grads]
    assert launches() == {"adamw_kernel": 3}
    assert launch.TABLES.misses == 0  # the plan's table is its own, not the shared cache's
    # A param's storage swapped under the plan (p.data = x): the plan follows it.
    params[1].data = params[1].data.clone()
    lists = dict(params=params, grads=grads, exp_avgs=state[0], exp_avg_sqs=state[1], steps=state[2])
    launch.adamw_planned_(lists, plan, **HYPER, maximize=False, grad_scale=None, found_inf=None, clip_coef=None)
    reference.adamw_(expected_params, grads, *expected_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                     grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    assert plan[next(iter(plan))].table is table and table.addresses[0].tolist() == [p.data_ptr() for p in params]
    # Non-contiguous grads, or grads of another dtype: the full path, still right.
    grads = random_tensors(shapes, device=DEVICE, seed=50, non_contiguous=True)
    lists = dict(params=params, grads=grads, exp_avgs=state[0], exp_avg_sqs=state[1], steps=state[2])
    launch.adamw_planned_(lists, plan, **HYPER, maximize=False, grad_scale=None, found_inf=None, clip_coef=None)
    reference.adamw_(expected_params, grads, *expected_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                     grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    assert launch.TABLES.misses == 1
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_planned_adamw_rebuilds_its_table_for_a_param_swapped_to_another_dtype():
    """``p.data = x`` with x of another dtype: the plan's table (made for the old dtype) must not
    run it; the call builds a table for the new layout and gives the reference's results."""
    shapes = [(5, 3), (1024 + 7,), (4,)]
    params = random_tensors(shapes, device=DEVICE, seed=33)
    state = adamw_state(params)
    plan = {}
    hyper = dict(HYPER, maximize=False, grad_scale=None, found_inf=None, clip_coef=None)
    for step in range(2):
        grads = random_tensors(shapes, device=DEVICE, seed=70 + step)
        lists = dict(params=params, grads=grads, exp_avgs=state[0], exp_avg_sqs=state[1], steps=state[2])
        launch.adamw_planned_(lists, plan, **hyper)
    (table,) = (entry.table for entry in plan.values())
    params[1].data = params[1].data.double()
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]
    grads = random_tensors(shapes, device=DEVICE, seed=72)
    lists = dict(params=params, grads=grads, exp_avgs=state[0], exp_avg_sqs=state[1], steps=state[2])
    launch.adamw_planned_(lists, plan, **hyper)
    reference.adamw_(expected_params, grads, *expected_state, **hyper, max_exp_avg_sqs=None)
    (entry,) = plan.values()
    assert entry.table is not table and entry.table.groups != table.groups
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            assert a.dtype == w.dtype
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_planned_sgd_and_lion_keep_a_table_per_op():
    """sgd_planned_ and lion_planned_ as adamw_planned_: the plan keeps a table of its own, only
    the grads row follows new grads; each op's table under its own key (a plan shared by two ops
    would otherwise run one op's kernel on the other's rows); results bit for bit as the reference."""
    shapes = [(6, 5), (2 * 1024 + 3,), (), (0,)]
    params = random_tensors(shapes, device=DEVICE, seed=100)
    buffers, exp_avgs = random_tensors(shapes, device=DEVICE, seed=101), random_tensors(shapes, device=DEVICE, seed=102)
    expected = [clone_all(params), clone_all(buffers), clone_all(exp_avgs)]
    sgd_hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False,
                     first_step=False, grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
    plan = {}
    for step in range(3):
        grads = random_tensors(shapes, device=DEVICE, seed=103 + step)  # new tensors, new pointers
        launch.sgd_planned_(dict(params=params, grads=grads, momentum_buffers=buffers), plan,
                            **dict(sgd_hyper, first_step=step == 0))  # fmt: skip
        reference.sgd_(expected[0], grads, expected[1], **dict(sgd_hyper, first_step=step == 0))
        launch.lion_planned_(dict(params=params, grads=grads, exp_avgs=exp_avgs), plan, **lion_hyper(1e-3))
        reference.lion_(expected[0], grads, expected[2], **lion_hyper(1e-3))
        if step == 0:
            tables = {key[1]: entry.table for key, entry in plan.items()}
        assert {key[1]: entry.table for key, entry in plan.items()} == tables
    assert sorted(tables) == ["lion_", "sgd_"] and tables["sgd_"] is not tables["lion_"]
    assert tables["lion_"].addresses[1].tolist() == [g.data_ptr() for g in grads]
    assert tables["lion_"].addresses[2].tolist() == [m.data_ptr() for m in exp_avgs]
    assert tables["sgd_"].addresses[2].tolist() == [b.data_ptr() for b in buffers]
    assert launches() == {"sgd_kernel": 3, "lion_kernel": 3}
    assert launch.TABLES.misses == 0  # the plan's tables are its own, not the shared cache's
    for actual, want in zip(params + buffers + exp_avgs, expected[0] + expected[1] + expected[2]):
        assert_bitwise_equal(actual, want)

    # Without momentum: no buffers row (the list absent, or None).
    plain = dict(sgd_hyper, momentum=0.0, nesterov=False)
    for lists in (dict(params=params, grads=grads), dict(params=params, grads=grads, momentum_buffers=None)):
        plain_plan = {}
        launch.sgd_planned_(lists, plain_plan, **plain)
        reference.sgd_(expected[0], grads, None, **plain)
        (entry,) = plain_plan.values()
        assert entry.table.addresses.shape[0] == 2
    for actual, want in zip(params, expected[0]):
        assert_bitwise_equal(actual, want)


@runs_here
@pytest.mark.parametrize("scan", ["C++ scan", "Python columns"])
@pytest.mark.usefixtures("triton_backend")
def test_update_tables_are_cached_by_what_their_kernels_read(scan, monkeypatch):
    """The shared cache keys a table by its lists' layout: SGD without momentum (2 rows) and with
    it (3 rows) are two tables, Lion shares the 3-row one (same rows, pointers refreshed), AdamW
    has its own (a chunk for every tensor and arrival counters for its step counters). The same
    with the lists read by the CPU extension's scan_lists and without it."""
    from fastopt.backends.triton import tables as table_module

    if scan == "Python columns":
        monkeypatch.setattr(table_module, "scanner", lambda: None)
    elif table_module.scanner() is None:
        pytest.skip("the CPU extension (its scan_lists) is not built")
    tables = launch.TABLES
    shapes = [(5, 4), (0,), (70,)]
    params, grads = random_tensors(shapes, device=DEVICE, seed=110), random_tensors(shapes, device=DEVICE, seed=111)
    states = random_tensors(shapes, device=DEVICE, seed=112)
    fastopt.sgd_(params, grads, lr=0.1)
    fastopt.sgd_(params, grads, states, lr=0.1, momentum=0.9)
    assert (tables.misses, tables.hits) == (2, 0)
    fastopt.lion_(params, grads, states, lr=1e-3)
    assert (tables.misses, tables.hits, tables.pointer_refreshes) == (2, 1, 2)
    lion_table = tables.lookup([params, grads, states])
    assert lion_table.arrivals is None and lion_table.num_chunks == 2  # the empty tensor has no chunk
    fastopt.adamw_(params, grads, *adamw_state(params), **HYPER)
    assert tables.misses == 3
    assert launches() == {"sgd_kernel": 2, "lion_kernel": 1, "adamw_kernel": 1}
    new_grads = [g.clone() for g in grads]  # new addresses: the table's grads row follows them
    assert tables.lookup([params, new_grads, states]) is lion_table and tables.pointer_refreshes == 4
    assert lion_table.addresses[1].tolist() == [g.data_ptr() for g in new_grads]


# fastopt.optim's optimizers against torch's (Lion has none: fastopt's on the reference backend).
STEP_PLAN_OPTIMIZERS = {
    "adamw": (lambda ps: fastopt.optim.AdamW(ps, lr=1e-2, max_grad_norm=1.0),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "adam-l2": (lambda ps: fastopt.optim.Adam(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0),
                lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)),
    "sgd-nesterov": (lambda ps: fastopt.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1,
                                                  max_grad_norm=1.0),
                     lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "lion": (lambda ps: fastopt.optim.Lion(ps, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0),
             lambda ps: fastopt.optim.Lion(ps, lr=1e-3, weight_decay=0.1)),
}  # fmt: skip


@runs_here
@pytest.mark.parametrize("name", STEP_PLAN_OPTIMIZERS)
@pytest.mark.usefixtures("triton_backend")
def test_the_optimizer_step_plan_holds_the_triton_table(name):
    """Steps 2 and 3 of each optimizer run on the plan's own table of its op (SGD's first step, with
    no momentum history, and the later ones on one table)."""
    make_ours, make_torch = STEP_PLAN_OPTIMIZERS[name]
    params = [torch.nn.Parameter(t) for t in random_tensors([(4, 3), (1500,)], device=DEVICE, seed=32)]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer, expected = make_ours(params), make_torch(reference_params)
    for step in range(3):
        for p, r in zip(params, reference_params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(60 + step)).to(DEVICE) * 0.1
            r.grad = p.grad.clone()
        optimizer.step()
        torch.nn.utils.clip_grad_norm_(reference_params, 1.0)
        with fastopt.use_backend("torch"):
            expected.step()
    (lists,) = optimizer._step_plan.gathered[0][1].values()
    tables = [key for key in lists.backend_plan if isinstance(key, tuple) and key[0] == "triton"]
    assert len(tables) == 1  # steps 2 and 3 ran on the plan's own table
    for p, r in zip(params, reference_params):
        torch.testing.assert_close(p, r, **tolerance(torch.float32))


@runs_here
@pytest.mark.parametrize("flat", [False, True], ids=["grads-made-anew", "flat-grads"])
@pytest.mark.usefixtures("triton_backend")
def test_the_step_plan_hands_the_grads_over_in_its_watch(flat):
    """With the CPU extension, a reused step plan leaves its grads lists unfilled: the norm's and
    the update's tables (the plan's own) read the grads' addresses from its GradWatch, and read
    nothing while the grads stay where they were (flat grads). A strided grad (the full path) and
    a grad of another dtype (a new table) in between; every step against the reference backend."""
    from fastopt.backends import cpu

    if cpu._C is None:
        pytest.skip("the CPU extension (its GradWatch) is not built")
    shapes = [(4, 3), (1500,), (0,), (2, 2049)]
    params = [torch.nn.Parameter(t) for t in random_tensors(shapes, device=DEVICE, seed=34)]
    expected_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = lambda ps: fastopt.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, flat_grads=flat)  # noqa: E731
    optimizer, expected = make(params), make(expected_params)
    device = torch.device(DEVICE)
    for step in range(7):
        grads = random_tensors(shapes, device=DEVICE, seed=90 + step, non_contiguous=step == 4)
        if step == 5:  # a bf16 grad for a fp32 param: another dtype combination, another table
            grads[1] = grads[1].bfloat16()
            params[1].grad_dtype = expected_params[1].grad_dtype = None
        for p, r, g in zip(params, expected_params, grads):
            if flat and step != 4 and step != 5 and step != 6:
                p.grad.copy_(g)  # into the flat buffer
            else:
                p.grad = g
            r.grad = g.clone()
        optimizer.step()
        with fastopt.use_backend("torch"):
            expected.step()
        plan = optimizer._step_plan
        (lists,) = plan.gathered[0][1].values()
        assert all(g is None for g in lists.grads)  # released after the step, as without a watch
        if step >= 1 and step != 4:  # the plan's own tables (not the shared cache's), following the watch
            watched = plan.norm_plans[device][("triton", "multi_tensor_norm", None)]
            assert watched.column.layout == plan.watch.layout()
            assert watched.table.addresses[0].tolist() == [p.grad.data_ptr() for p in params]
            (update,) = (entry for key, entry in lists.backend_plan.items() if isinstance(key, tuple))
            assert update.watched.column.layout == plan.watch.layout()
            assert update.table.addresses[1].tolist() == [p.grad.data_ptr() for p in params]
            if step == 1:
                norm_table, update_table, misses = watched.table, update.table, launch.TABLES.misses
            if step in (2, 3):  # on the plan's tables alone
                assert watched.table is norm_table and update.table is update_table
                assert launch.TABLES.misses == misses
        torch.testing.assert_close(optimizer.stats["grad_norm"], expected.stats["grad_norm"], rtol=1e-5, atol=0)
        for p, r in zip(params, expected_params):
            torch.testing.assert_close(p, r, **tolerance(torch.float32))


@runs_here
@pytest.mark.usefixtures("triton_backend")
def test_tables_made_during_capture_are_private_and_never_evicted(monkeypatch):
    """The capture logic on the host (a GPU test below captures for real): while capturing, a
    call gets a table of its own, keyed by its pointers; later eager calls with the same layout,
    a full cache and clear() leave it as it was."""
    from fastopt.backends.triton import tables

    grads = random_tensors([(5, 4), (70,)], device=DEVICE, seed=33)
    others = [g.clone() for g in grads]
    monkeypatch.setattr(tables, "capturing", lambda device: True)
    captured = launch.TABLES.lookup([grads])
    assert launch.TABLES.lookup([grads]) is captured and launch.TABLES.captured == 1
    assert captured.capturing and captured._staging is not None
    with pytest.raises(RuntimeError, match="captured"):
        captured.point_to([others])
    monkeypatch.setattr(tables, "capturing", lambda device: False)
    eager = launch.TABLES.lookup([others])
    assert eager is not captured
    for n in range(launch.TABLES.capacity + 1):  # evict every eager table
        launch.TABLES.lookup([[torch.zeros(n + 1, device=DEVICE)]])
    launch.TABLES.clear()
    assert launch.TABLES.captured == 1
    assert captured.addresses[0].tolist() == [g.data_ptr() for g in grads]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.usefixtures("triton_backend")
def test_every_op_runs_on_its_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: Triton would launch on cuda:0 unguarded."""
    shapes = [(40, 33), (2 * CHUNK_SIZE + 5,), (7,)]
    with torch.cuda.device(0):
        grads = random_tensors(shapes, device="cuda:1", seed=34)
        params = random_tensors(shapes, device="cuda:1", seed=35)
        want_grads, want_params = clone_all(grads), clone_all(params)
        total = fastopt.multi_tensor_norm(grads)
        assert total.device == torch.device("cuda:1")
        torch.testing.assert_close(total, reference.multi_tensor_norm(want_grads, 2.0, False))
        flag = torch.zeros(1, device="cuda:1")
        fastopt.unscale_and_check_(grads, torch.full((1,), 0.5, device="cuda:1"), flag)
        reference.unscale_and_check_(want_grads, torch.full((1,), 0.5, device="cuda:1"), torch.zeros(1, device="cuda:1"))
        ops.clamp_(grads, 1.0)
        reference.clamp_(want_grads, 1.0)
        ops.adaptive_clip_(params, grads)
        reference.adaptive_clip_(want_params, want_grads, 0.01, 1e-3, 2.0, True)
        state = adamw_state(params)
        want_state = [clone_all(s) for s in state]
        fastopt.adamw_(params, grads, *state, **HYPER)
        reference.adamw_(want_params, want_grads, *want_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                         grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert flag.item() == 0.0
    for actual, want in zip([grads, params, *state], [want_grads, want_params, *want_state]):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend")
def test_captured_graph_survives_eager_calls_with_its_layout_and_evictions():
    shapes = [(64, 33), (CHUNK_SIZE + 17,), (5,)]
    params, others = random_tensors(shapes, device="cuda", seed=36), random_tensors(shapes, device="cuda", seed=37)
    grads = random_tensors(shapes, device="cuda", seed=38)
    state, other_state = adamw_state(params), adamw_state(others)
    expected_params, expected_state = clone_all(params), [clone_all(s) for s in state]

    def step(ps, st):
        total = fastopt.multi_tensor_norm(grads)
        clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        fastopt.adamw_(ps, grads, *st, **HYPER, clip_coef=clip_coef)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels), then rewind the state
        warm = clone_all(params), [clone_all(s) for s in state]
        step(*warm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(params, state)
    assert launch.TABLES.captured >= 2  # the norm's and AdamW's, private to the graph

    # The same layout eagerly on other tensors, then enough other layouts to evict every table.
    step(others, other_state)
    for n in range(launch.TABLES.capacity + 1):
        fastopt.scale_([torch.ones(n + 1, device="cuda")], 0.5)
    launch.TABLES.clear()
    for _ in range(2):
        graph.replay()
        total = reference.multi_tensor_norm(grads, 2.0, False)
        reference.adamw_(expected_params, grads, *expected_state, **HYPER, maximize=False, max_exp_avg_sqs=None,
                         grad_scale=None, found_inf=None, clip_coef=torch.clamp(1.0 / (total + 1e-6), max=1.0))
    torch.cuda.synchronize()
    assert [s.item() for s in state[2]] == [s.item() + 2 for s in adamw_state(params)[2]]
    for actual, want in zip([params, *state], [expected_params, *expected_state]):
        for a, w in zip(actual, want):
            torch.testing.assert_close(a, w, **tolerance(torch.float32))


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend")
def test_one_layout_on_two_streams_at_once():
    """Tables are keyed by stream: two streams running one layout share no address row and no
    arrival counters."""
    shapes = [(3 * CHUNK_SIZE + 11,), (300,)] * 50
    lists = [random_tensors(shapes, device="cuda", seed=70 + k) for k in range(2)]
    grads = [random_tensors(shapes, device="cuda", seed=80 + k) for k in range(2)]
    states = [adamw_state(ps) for ps in lists]
    expected = [(clone_all(ps), [clone_all(s) for s in st]) for ps, st in zip(lists, states)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(3):
        for k, s in enumerate(streams):
            with torch.cuda.stream(s):
                fastopt.adamw_(lists[k], grads[k], *states[k], **HYPER)
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    for k in range(2):
        for _ in range(3):
            reference.adamw_(expected[k][0], grads[k], *expected[k][1], **HYPER, maximize=False, max_exp_avg_sqs=None,
                             grad_scale=None, found_inf=None, clip_coef=None)  # fmt: skip
        for actual, want in zip([lists[k], *states[k]], [expected[k][0], *expected[k][1]]):
            for a, w in zip(actual, want):
                torch.testing.assert_close(a, w, **tolerance(torch.float32))


_VECTOR_CHECK = """
import sys
import tests.test_triton_backend as t
sys.exit(t.vector_accesses_of_aligned_launches())
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
@pytest.mark.skipif(INTERPRETED, reason="runs once, in the lane without the interpreter (`make test`)")
def test_aligned_launches_compile_to_128_bit_accesses():
    """The AdamW, SGD, Lion and norm kernels, compiled for sm_90 (no GPU needed) as the ops launch
    them: the ALIGNED variants load (and the updates store) with ld.global.v4 / st.global.v4, the
    others with scalar accesses only; the updates keep their explicit fmas (fma.rn.f32)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTOPT_BACKEND")}
    result = subprocess.run([sys.executable, "-c", _VECTOR_CHECK], capture_output=True, text=True, env=env,
                            timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "vector accesses checked" in result.stdout


def vector_accesses_of_aligned_launches(arch: int = 90) -> int:
    """Compile the AdamW, SGD (with momentum), Lion and norm launches over fp32 and bf16 tensors,
    ALIGNED and not, and check the PTX for 128-bit accesses. Returns a process exit status."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    calls = []
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(3000).to(dtype), torch.randn(5000).to(dtype)]
        states = [[p.clone() for p in params] for _ in range(3)]
        calls += [
            lambda ps=params, st=states: launch.adamw_(
                ps, st[0], st[1], st[2], [torch.zeros(()) for _ in ps], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.01, maximize=False, max_exp_avg_sqs=None, grad_scale=None, found_inf=None,
                clip_coef=None),
            lambda ps=params: launch.multi_tensor_norm(ps, 2.0, False),
            lambda ps=params, st=states: launch.sgd_(
                ps, st[0], st[1], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
                maximize=False, first_step=False, grad_scale=None, found_inf=None, clip_coef=None),
            lambda ps=params, st=states: launch.lion_(
                ps, st[0], st[1], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=False, grad_scale=None,
                found_inf=None, clip_coef=None),
        ]  # fmt: skip
    failures, checked = [], 0
    for kernel, args, kwargs in _record_launches(calls):
        if "ALIGNED" not in kwargs:
            continue
        assert kwargs["ALIGNED"], "the host should find fresh tensors 16-byte aligned"
        for aligned in (True, False):
            signature, constexprs = _signature(kernel, args, {**kwargs, "ALIGNED": aligned})
            source = ASTSource(kernel, signature={**signature, **{n: "constexpr" for n in constexprs}},
                               constexprs=constexprs)  # fmt: skip
            ptx = triton_compile(source, target=GPUTarget("cuda", arch, 32), options=launch.COMPILE_OPTIONS).asm["ptx"]
            loads, stores = ptx.count("ld.global.v4"), ptx.count("st.global.v4")
            name = f"{kernel.fn.__name__} {constexprs.get('PARAM_DTYPE', constexprs.get('FIRST_DTYPE'))} ALIGNED={aligned}"
            print(f"{name}: {loads} ld.global.v4, {stores} st.global.v4")
            writes = kernel.fn.__name__ in ("adamw_kernel", "sgd_kernel", "lion_kernel")
            if aligned and (loads == 0 or (writes and stores == 0)):
                failures.append(f"{name}: no 128-bit accesses")
            # The updates round as torch's CPU kernels with explicit fmas, kept with FP fusion off.
            if writes and "fma.rn.f32" not in ptx:
                failures.append(f"{name}: no fma.rn.f32")
            if not aligned and (loads or stores):
                failures.append(f"{name}: 128-bit accesses without the alignment")
            checked += 1
    if failures or checked != 16:
        print("\n".join(failures) or f"checked {checked} launches, expected 16")
        return 1
    print(f"vector accesses checked in {checked} compiled launches for sm_{arch}")
    return 0
