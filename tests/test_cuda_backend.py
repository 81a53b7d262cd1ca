"""The CUDA backend (kernels in csrc/cuda/, extension fastopt._C, wrapper fastopt/backends/cuda.py) on a GPU.

Every op runs under ``fastopt.use_backend("cuda")`` on CUDA tensors and is compared with
``fastopt.backends.reference`` (the oracle) run on copies of the same inputs, within the per-dtype
tolerances of tests/helpers.py, on random data. Tensors live inside larger buffers filled with a
sentinel before, between and after them (nan around what an op only reads, so that a stray read
poisons the result; 123.0 around what it writes, so that a stray write shows), at storage offsets
of every alignment, contiguous and not; the sentinels are checked after each op.

Covered: every op and AdamW dtype combination (incl. one without a kernel build, which falls back
to the reference); mixed, odd and zero-element shapes; lists of 5,000 tensors; tensors of more
than 2**31 elements; inf / nan; bit-identical norms from run to run; one kernel launch per pass
(torch.profiler); the device-side table cache (pointer refresh, other layouts); no host sync
(``torch.cuda.set_sync_debug_mode("error")``) and CUDA graph capture of an optimizer step;
``torch.library.opcheck`` of every ``torch.ops.fastopt`` op and ``torch.compile``; the norm that
``torch.ops.fastopt.unscale_and_check_`` returns; one layout on two streams at once, arrival
counters poisoned between calls, the first call for a layout inside a graph capture (and the
tables released with the graph), and a tensor of more chunks than a warp folds.

``make gpu-check`` runs this file on a GPU machine. Without a GPU every test is skipped (the
``cuda`` mark, tests/conftest.py); with a GPU but without the backend (extension not built) each
test skips with the backend's reason.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import math
import os
import time

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fastopt
from fastopt import backends, ops
from fastopt.backends import reference
from tests.helpers import MIXED_SHAPES, assert_bitwise_equal, inject_nonfinite, no_host_sync, tolerance

# FASTOPT_CUDA_EMULATION=1 (make test-cuda-emulated): the same tests on CPU tensors, the kernels and
# their host side built for the host emulation of the device (csrc/emulation, torch.ops.fastopt_emulated);
# the tests that need a GPU's streams, graphs, profiler or memory skip there.
EMULATED = os.environ.get("FASTOPT_CUDA_EMULATION") == "1"
DEVICE = "cpu" if EMULATED else "cuda"
OPS = torch.ops.fastopt_emulated if EMULATED else torch.ops.fastopt
needs_gpu = pytest.mark.skipif(EMULATED, reason="needs a GPU (streams, graphs, the profiler or GBs of memory)")
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = [F32, BF16, F16, F64]
NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]
INF, NAN = math.inf, math.nan

READ_SENTINEL = NAN  # around tensors an op only reads: a read out of bounds makes the result nan
WRITTEN_SENTINEL = 123.0  # around tensors an op writes: a write out of bounds changes it
# Where each tensor starts in its buffer: at least one sentinel after the previous tensor, then
# the next multiple of ALIGN elements (16 bytes or more for every dtype) plus a shift, cycled over
# the tensors: 0 and 8 keep 16-byte alignment (the vectorised path), odd shifts break it.
ALIGN = 16
SHIFTS = (0, 1, 0, 3, 8, 5)
TRAILING_GAP = 7

# MIXED_SHAPES (0-d, zero-element, 1, 7, 129, 33x17, a conv weight, ...) and tensors of more than
# one chunk (32768 elements), odd sizes included, so that scalar tails and multi-chunk tensors meet.
EDGE_SHAPES = [*MIXED_SHAPES, (40000,), (3, 32771), (5, 33), (64,), (16, 16)]

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}

pytestmark = [*([] if EMULATED else [pytest.mark.cuda]), pytest.mark.usefixtures("cuda_backend")]


@pytest.fixture
def cuda_backend():
    """Force the cuda backend, or skip with the reason it is unavailable."""
    reason = backends.unavailable_backends().get("cuda")
    if reason is not None:
        pytest.skip(f"the cuda backend is unavailable: {reason}")
    with fastopt.use_backend("cuda"):
        yield


@pytest.fixture
def release_gpu_memory():
    """For the tests with tensors of several GB: hand the cached blocks back afterwards."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def synchronize() -> None:
    if not EMULATED:  # the emulated device completes each launch before it returns
        torch.cuda.synchronize()


def extension():
    """fastopt._C (fastopt._C_emulated under the emulation): its test hooks."""
    return importlib.import_module("fastopt._C_emulated" if EMULATED else "fastopt._C")


# --------------------------------------------------------------------------- helpers


def on_reference(op, *args, **kwargs):
    """The same public op on the torch backend (fastopt.backends.reference): the oracle."""
    with fastopt.use_backend("torch"):
        return op(*args, **kwargs)


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def random_values(shapes, dtype=F32, *, seed: int, scale: float = 1.0, positive: bool = False) -> list[torch.Tensor]:
    """Random normal tensors (absolute values when positive), drawn in fp32 and rounded to dtype."""
    gen = generator(seed)
    values = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen, device=DEVICE) * scale
        values.append((t.abs() if positive else t).to(dtype))
    return values


def _view(region: torch.Tensor, shape, non_contiguous: bool) -> torch.Tensor:
    if non_contiguous and len(shape) >= 2:
        return region.view(*reversed(shape)).permute(*reversed(range(len(shape))))
    if non_contiguous and len(shape) == 1:
        return region[::2]
    return region.view(shape)


def _starts(spans) -> tuple[list[int], int]:
    """Start offsets of tensors of these spans in a guarded buffer, and the buffer's length."""
    starts, end = [], 0
    for i, span in enumerate(spans):
        starts.append((end + ALIGN) // ALIGN * ALIGN + SHIFTS[i % len(SHIFTS)])  # (end + 1) rounded up, shifted
        end = starts[-1] + span
    return starts, end + TRAILING_GAP


def in_guarded_buffer(values, sentinel: float, *, non_contiguous: bool = False) -> list[torch.Tensor]:
    """Copies of ``values``, each a view into one buffer per dtype filled with ``sentinel``, before,
    between and after them, at storage offsets of varying alignment (see SHIFTS). non_contiguous:
    >= 2-D tensors are permuted views and 1-D tensors every other element (the elements between
    them are sentinels too). assert_sentinels_intact checks the sentinels afterwards."""
    dtypes = {v.dtype for v in values}
    if len(dtypes) > 1:
        views = [None] * len(values)
        for dtype in dtypes:
            indices = [i for i, v in enumerate(values) if v.dtype == dtype]
            same = in_guarded_buffer([values[i] for i in indices], sentinel, non_contiguous=non_contiguous)
            for i, view in zip(indices, same):
                views[i] = view
        return views
    spans = [2 * v.numel() if non_contiguous and v.ndim == 1 else v.numel() for v in values]
    starts, length = _starts(spans)
    buffer = torch.full((length,), sentinel, dtype=values[0].dtype, device=DEVICE)
    views = []
    for value, start, span in zip(values, starts, spans):
        view = _view(buffer[start : start + span], value.shape, non_contiguous)
        view.copy_(value)
        views.append(view)
    return views


def assert_sentinels_intact(tensors, sentinel: float) -> None:
    """Every element of the tensors' buffers that belongs to none of them still holds the
    sentinel, bit for bit: nothing was written out of bounds."""
    bases = {id(t._base): t._base for t in tensors}
    assert None not in bases.values(), "assert_sentinels_intact takes views made by in_guarded_buffer"
    for base in bases.values():
        outside = torch.ones(base.numel(), dtype=torch.bool, device=base.device)
        for t in tensors:
            if t._base is base:
                outside.as_strided(t.size(), t.stride(), t.storage_offset()).fill_(False)
        untouched = base[outside]
        assert_bitwise_equal(
            untouched, torch.full_like(untouched, sentinel), "a write out of bounds changed a sentinel"
        )


def clone_all(tensors) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def assert_lists_close(actual, expected, what: str, **close) -> None:
    """Each tensor close to its expected one within its dtype's tolerance. Compared per dtype all
    at once (lists of thousands of tensors); on a mismatch, the first bad tensor is named."""
    assert len(actual) == len(expected), what
    for dtype in {a.dtype for a in actual}:
        indices = [i for i, a in enumerate(actual) if a.dtype == dtype]
        options = {**tolerance(dtype), **close}
        try:
            torch.testing.assert_close(
                torch.cat([actual[i].reshape(-1) for i in indices]),
                torch.cat([expected[i].reshape(-1) for i in indices]),
                **options,
            )
        except AssertionError:
            for i in indices:
                torch.testing.assert_close(
                    actual[i], expected[i], **options,
                    msg=lambda m, i=i, dtype=dtype: f"{what}[{i}] (shape {tuple(actual[i].shape)}, {dtype}): {m}",
                )  # fmt: skip
            raise


def reference_norm(tensors, norm_type: float, per_tensor: bool):
    """fastopt.backends.reference's norm of float64 copies: the norms as exactly as float32 can hold them
    (an fp32 accumulation over many elements is itself off by more than fp32's tolerance)."""
    return reference.multi_tensor_norm([t.double() for t in tensors], norm_type, per_tensor)


def float64_norm_in_slices(t: torch.Tensor, norm_type: float, slice_numel: int = 2**28) -> torch.Tensor:
    """torch.linalg.vector_norm of a huge 1-D tensor in float64, a slice at a time."""
    parts = [torch.linalg.vector_norm(part, norm_type, dtype=F64) for part in t.split(slice_numel)]
    return torch.linalg.vector_norm(torch.stack(parts), norm_type)


def many_shapes(count: int = 5000, max_numel: int = 1500 if EMULATED else 65536, seed: int = 0) -> list[tuple[int]]:
    """1-D shapes of random sizes in [0, max_numel] (some zero-element, most odd)."""
    sizes = torch.randint(0, max_numel + 1, (count,), generator=torch.Generator().manual_seed(seed))
    return [(n,) for n in sizes.tolist()]


# --------------------------------------------------------------------------- AdamW inputs

# (params, grads, states) dtypes, per tensor (cycled over the shapes).
ADAMW_COMBOS = {
    "fp32": [(F32, F32, F32)],
    "bf16": [(BF16, BF16, BF16)],
    "fp16": [(F16, F16, F16)],
    "fp32_params_bf16_grads": [(F32, BF16, F32)],
    "bf16_params_fp32_states": [(BF16, BF16, F32)],
    "fp64": [(F64, F64, F64)],
    # No kernel build (host_runtime.cpp raises NotImplementedError): fastopt/backends/cuda.py runs the reference.
    "unsupported_fp16_params_bf16_grads": [(F16, BF16, F16)],
    "one_unsupported_tensor_in_a_mixed_list": [(F32, F32, F32), (BF16, BF16, F32), (F16, BF16, F16)],
}


def adamw_inputs(shapes, combos, *, seed: int, amsgrad=False, steps_dtype=F32, non_contiguous=False) -> dict:
    """adamw_'s lists by name, in guarded buffers: random params and grads, non-zero states
    (as after some steps), step counts 0..4."""
    combos = [combos[i % len(combos)] for i in range(len(shapes))]

    def values(k, position, **kwargs):
        return [v.to(c[position]) for v, c in zip(random_values(shapes, seed=seed + k, **kwargs), combos)]

    lists = {
        "params": in_guarded_buffer(values(0, 0), WRITTEN_SENTINEL, non_contiguous=non_contiguous),
        "grads": in_guarded_buffer(values(1, 1), READ_SENTINEL, non_contiguous=non_contiguous),
        "exp_avgs": in_guarded_buffer(values(2, 2, scale=0.1), WRITTEN_SENTINEL, non_contiguous=non_contiguous),
        "exp_avg_sqs": in_guarded_buffer(
            values(3, 2, scale=0.01, positive=True), WRITTEN_SENTINEL, non_contiguous=non_contiguous
        ),
        "steps": in_guarded_buffer(
            [torch.tensor(float(i % 5), dtype=steps_dtype, device=DEVICE) for i in range(len(shapes))],
            WRITTEN_SENTINEL,
        ),
    }
    if amsgrad:
        lists["max_exp_avg_sqs"] = in_guarded_buffer(
            values(4, 2, scale=0.01, positive=True), WRITTEN_SENTINEL, non_contiguous=non_contiguous
        )
    return lists


def run_adamw(lists: dict, **options) -> None:
    fastopt.adamw_(
        lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["steps"],
        max_exp_avg_sqs=lists.get("max_exp_avg_sqs"), **options,
    )  # fmt: skip


def clone_lists(lists: dict) -> dict:
    return {name: clone_all(tensors) for name, tensors in lists.items()}


def assert_adamw_sentinels_intact(lists: dict) -> None:
    for name, tensors in lists.items():
        assert_sentinels_intact(tensors, READ_SENTINEL if name == "grads" else WRITTEN_SENTINEL)


class DeviceScalar(float):
    """A hyperparameter passed as a 0-d float32 GPU tensor (made when the test runs)."""


def on_device(options: dict) -> dict:
    return {k: torch.tensor(float(v), device=DEVICE) if isinstance(v, DeviceScalar) else v for k, v in options.items()}


# name: (adamw_inputs options, adamw_ options on top of HYPER)
ADAMW_CASES = {
    "defaults": ({}, {}),
    "amsgrad_maximize_tensor_lr": ({"amsgrad": True}, {"maximize": True, "lr": DeviceScalar(1e-2)}),
    "tensor_grad_scale_and_clip_coef_found_inf_0_float64_steps_non_contiguous": (
        {"steps_dtype": F64, "non_contiguous": True},
        {"grad_scale": DeviceScalar(1024.0), "clip_coef": DeviceScalar(0.3), "found_inf": DeviceScalar(0.0)},
    ),
    "float_grad_scale_and_clip_coef_amsgrad_no_weight_decay_float64_steps": (
        {"amsgrad": True, "steps_dtype": F64},
        {"grad_scale": 8.0, "clip_coef": 0.5, "weight_decay": 0.0, "lr": 3e-3},
    ),
    # torch.optim.Adam's L2 weight decay (the kernel's L2 build); without weight decay, the plain one.
    "adam_l2_amsgrad_maximize_tensor_lr": (
        {"amsgrad": True}, {"decoupled_weight_decay": False, "maximize": True, "lr": DeviceScalar(1e-2)},
    ),
    "adam_l2_no_weight_decay_device_grad_scale": (
        {}, {"decoupled_weight_decay": False, "weight_decay": 0.0, "grad_scale": DeviceScalar(64.0)},
    ),
}


# --------------------------------------------------------------------------- SGD and Lion inputs
# The same dtype combinations as AdamW's (the state: SGD's momentum buffer, Lion's exp_avg).


def update_inputs(shapes, combos, *, seed: int, states: str | None, non_contiguous=False) -> dict:
    """sgd_'s (states="momentum_buffers", or None without momentum) or lion_'s ("exp_avgs") lists
    by name, in guarded buffers: random params and grads, non-zero states."""
    combos = [combos[i % len(combos)] for i in range(len(shapes))]

    def values(k, position, **kwargs):
        return [v.to(c[position]) for v, c in zip(random_values(shapes, seed=seed + k, **kwargs), combos)]

    lists = {
        "params": in_guarded_buffer(values(0, 0), WRITTEN_SENTINEL, non_contiguous=non_contiguous),
        "grads": in_guarded_buffer(values(1, 1), READ_SENTINEL, non_contiguous=non_contiguous),
    }
    if states is not None:
        lists[states] = in_guarded_buffer(values(2, 2, scale=0.1), WRITTEN_SENTINEL, non_contiguous=non_contiguous)
    return lists


def run_sgd(lists: dict, **options) -> None:
    fastopt.sgd_(lists["params"], lists["grads"], lists.get("momentum_buffers"), **options)


def run_lion(lists: dict, **options) -> None:
    fastopt.lion_(lists["params"], lists["grads"], lists["exp_avgs"], **options)


# name: (momentum buffers?, non-contiguous?, sgd_ options)
SGD_CASES = {
    "plain": (False, False, {"lr": 1e-2}),
    "weight_decay_maximize_tensor_lr": (False, False, {"lr": DeviceScalar(1e-2), "weight_decay": 0.1, "maximize": True}),
    "momentum_dampening_weight_decay": (True, False, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
    "nesterov_device_scalars_found_inf_0_non_contiguous": (
        True, True,
        {"lr": DeviceScalar(1e-2), "momentum": 0.9, "nesterov": True, "grad_scale": DeviceScalar(1024.0),
         "clip_coef": DeviceScalar(0.3), "found_inf": DeviceScalar(0.0)},
    ),
    "nesterov_weight_decay_float_grad_scale_and_clip_coef": (
        True, False, {"lr": 3e-3, "momentum": 0.5, "nesterov": True, "weight_decay": 0.01, "grad_scale": 8.0,
                      "clip_coef": 0.5},
    ),
}  # fmt: skip

# name: (non-contiguous?, lion_ options)
LION_CASES = {
    "defaults": (False, {"lr": 1e-3}),
    "weight_decay_maximize_tensor_lr": (False, {"lr": DeviceScalar(1e-3), "weight_decay": 0.1, "maximize": True}),
    "device_scalars_found_inf_0_non_contiguous": (
        True, {"lr": 1e-3, "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.5, "grad_scale": DeviceScalar(1024.0),
               "clip_coef": DeviceScalar(0.3), "found_inf": DeviceScalar(0.0)},
    ),
}  # fmt: skip


# --------------------------------------------------------------------------- every op


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["total", "per_tensor"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tensor_norm_matches_reference(dtype, norm_type, per_tensor, non_contiguous):
    tensors = in_guarded_buffer(random_values(EDGE_SHAPES, dtype, seed=1), READ_SENTINEL, non_contiguous=non_contiguous)
    found_inf = torch.zeros(1, device=DEVICE)
    result = fastopt.multi_tensor_norm(tensors, norm_type, per_tensor=per_tensor, found_inf=found_inf)
    expected = reference_norm(tensors, norm_type, per_tensor)
    if per_tensor:
        (total, norms), (expected_total, expected_norms) = result, expected
        assert norms.shape == (len(tensors),) and norms.dtype == F32
        torch.testing.assert_close(norms, expected_norms, **tolerance(F32))
    else:
        total, expected_total = result, expected
    assert total.shape == () and total.dtype == F32
    torch.testing.assert_close(total, expected_total, **tolerance(F32))
    assert found_inf.item() == 0.0
    assert_sentinels_intact(tensors, READ_SENTINEL)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("inv_scale_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_and_check_matches_reference(dtype, inv_scale_kind, non_contiguous):
    tensors = in_guarded_buffer(
        random_values(EDGE_SHAPES, dtype, seed=2, scale=1024.0), WRITTEN_SENTINEL, non_contiguous=non_contiguous
    )
    expected = clone_all(tensors)
    inv_scale = 0.37 / 1024 if inv_scale_kind == "float" else torch.full((1,), 0.37 / 1024, device=DEVICE)
    found_inf, expected_found_inf = torch.zeros(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    fastopt.unscale_and_check_(tensors, inv_scale, found_inf)
    on_reference(fastopt.unscale_and_check_, expected, inv_scale, expected_found_inf)
    assert_lists_close(tensors, expected, "tensors")
    assert found_inf.item() == expected_found_inf.item() == 0.0
    assert_sentinels_intact(tensors, WRITTEN_SENTINEL)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("coef_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_matches_reference(dtype, coef_kind, non_contiguous):
    tensors = in_guarded_buffer(
        random_values(EDGE_SHAPES, dtype, seed=3), WRITTEN_SENTINEL, non_contiguous=non_contiguous
    )
    expected = clone_all(tensors)
    coef = 0.37 if coef_kind == "float" else torch.tensor(0.37, device=DEVICE)
    fastopt.scale_(tensors, coef)
    on_reference(fastopt.scale_, expected, coef)
    assert_lists_close(tensors, expected, "tensors")
    assert_sentinels_intact(tensors, WRITTEN_SENTINEL)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_matches_reference(dtype, non_contiguous):
    tensors = in_guarded_buffer(
        random_values(EDGE_SHAPES, dtype, seed=4), WRITTEN_SENTINEL, non_contiguous=non_contiguous
    )
    expected = clone_all(tensors)
    ops.clamp_(tensors, 0.5)
    on_reference(ops.clamp_, expected, 0.5)
    assert_lists_close(tensors, expected, "tensors")
    assert_sentinels_intact(tensors, WRITTEN_SENTINEL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_value_matches_torch(dtype):
    grads = in_guarded_buffer(random_values(EDGE_SHAPES, dtype, seed=5), WRITTEN_SENTINEL)
    params = [torch.nn.Parameter(torch.empty(g.shape, dtype=dtype, device=DEVICE)) for g in grads]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, twin, g in zip(params, twins, grads):
        p.grad, twin.grad = g, g.clone()
    fastopt.clip_grad_value_(params, 0.5)
    torch.nn.utils.clip_grad_value_(twins, 0.5)
    assert_lists_close(grads, [t.grad for t in twins], "grads")
    assert_sentinels_intact(grads, WRITTEN_SENTINEL)


# 1-D, 2-D and conv weights, rows longer than a chunk, zero-element ones, and two zero-initialised
# weights (the last two), whose limit comes from eps.
AGC_SHAPES = [(), (7,), (129,), (33, 17), (16, 8, 3, 3), (4, 40000), (0,), (2, 0, 3), (5, 3), (6,)]
AGC_ZERO_WEIGHTS = (8, 9)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("unitwise", [True, False], ids=["unitwise", "whole_tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_clip_matches_reference(dtype, unitwise, norm_type):
    weights = random_values(AGC_SHAPES, dtype, seed=6, scale=100.0)
    for i in AGC_ZERO_WEIGHTS:
        weights[i].zero_()
    grad_values = random_values(AGC_SHAPES, dtype, seed=7, scale=0.1)
    for g in grad_values:  # one unit far over its limit (x100), the others mostly under theirs
        if g.ndim and g.numel():
            g[0] *= 100
    params = in_guarded_buffer(weights, READ_SENTINEL)
    grads = in_guarded_buffer(grad_values, WRITTEN_SENTINEL)
    # eps = 10: zero-initialised units may move up to clip_factor * eps = 0.1.
    expected = [g.double() for g in grads]
    reference.adaptive_clip_([p.double() for p in params], expected, 0.01, 10.0, norm_type, unitwise)
    ops.adaptive_clip_(params, grads, 0.01, 10.0, norm_type, unitwise=unitwise)
    assert_lists_close(grads, [e.to(dtype) for e in expected], "grads")
    assert_sentinels_intact(params, READ_SENTINEL)
    assert_sentinels_intact(grads, WRITTEN_SENTINEL)


@pytest.mark.parametrize("case", list(ADAMW_CASES))
@pytest.mark.parametrize("combo", list(ADAMW_COMBOS))
def test_adamw_matches_reference(combo, case):
    build, options = ADAMW_CASES[case]
    options = {**HYPER, **on_device(options)}
    lists = adamw_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=10, **build)
    expected = clone_lists(lists)
    for _ in range(2):  # the second call reuses the cached table (and AdamW's per-tensor arrival counters)
        run_adamw(lists, **options)
        on_reference(run_adamw, expected, **options)
    for name in lists:
        assert_lists_close(lists[name], expected[name], name)
    assert_adamw_sentinels_intact(lists)


@pytest.mark.parametrize("found_inf, steps_dtype", [(1.0, F32), (2.0, F64)])  # torch sums flags over devices: 2
@pytest.mark.parametrize("combo", list(ADAMW_COMBOS))
def test_adamw_changes_nothing_when_found_inf_is_set(combo, found_inf, steps_dtype):
    lists = adamw_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=20, amsgrad=True, steps_dtype=steps_dtype)
    before = clone_lists(lists)
    options = on_device(
        {"lr": DeviceScalar(1e-2), "clip_coef": DeviceScalar(0.5), "found_inf": DeviceScalar(found_inf)}
    )
    run_adamw(lists, **{**HYPER, **options, "grad_scale": 8.0})
    for name in lists:
        for i, (after, old) in enumerate(zip(lists[name], before[name])):
            assert_bitwise_equal(after, old, f"{name}[{i}] changed on a skipped step")
    assert_adamw_sentinels_intact(lists)


@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("combo", list(ADAMW_COMBOS))
def test_sgd_matches_reference(combo, case):
    momentum, non_contiguous, options = SGD_CASES[case]
    options = on_device(options)
    lists = update_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=12, non_contiguous=non_contiguous,
                          states="momentum_buffers" if momentum else None)  # fmt: skip
    expected = clone_lists(lists)
    # With momentum: the first step (buffers only written), then steps that read them; the later
    # calls reuse the cached table.
    for first_step in [True, False, False] if momentum else [False, False]:
        run_sgd(lists, **options, first_step=first_step)
        on_reference(run_sgd, expected, **options, first_step=first_step)
    for name in lists:
        assert_lists_close(lists[name], expected[name], name)
    assert_adamw_sentinels_intact(lists)


@pytest.mark.parametrize("case", list(LION_CASES))
@pytest.mark.parametrize("combo", list(ADAMW_COMBOS))
def test_lion_matches_reference(combo, case):
    non_contiguous, options = LION_CASES[case]
    options = on_device(options)
    lists = update_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=14, states="exp_avgs", non_contiguous=non_contiguous)
    expected = clone_lists(lists)
    for _ in range(2):
        run_lion(lists, **options)
        on_reference(run_lion, expected, **options)
    for name in lists:
        assert_lists_close(lists[name], expected[name], name)
    assert_adamw_sentinels_intact(lists)


@pytest.mark.parametrize("first_step", [False, True], ids=["running", "first_step"])
@pytest.mark.parametrize("combo", list(ADAMW_COMBOS))
def test_sgd_and_lion_change_nothing_when_found_inf_is_set(combo, first_step):
    sgd_lists = update_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=22, states="momentum_buffers")
    lion_lists = update_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=24, states="exp_avgs")
    before = {"sgd": clone_lists(sgd_lists), "lion": clone_lists(lion_lists)}
    options = on_device({"lr": DeviceScalar(1e-2), "clip_coef": DeviceScalar(0.5), "found_inf": DeviceScalar(1.0)})
    run_sgd(sgd_lists, **options, momentum=0.9, weight_decay=0.1, nesterov=True, first_step=first_step, grad_scale=8.0)
    run_lion(lion_lists, **options, weight_decay=0.1, grad_scale=8.0)
    for op, lists in (("sgd", sgd_lists), ("lion", lion_lists)):
        for name in lists:
            for i, (after, old) in enumerate(zip(lists[name], before[op][name])):
                assert_bitwise_equal(after, old, f"{op}: {name}[{i}] changed on a skipped step")
        assert_adamw_sentinels_intact(lists)


def test_sgd_and_lion_take_the_reference_rounding():
    """fp32 and fp64: SGD (each add with alpha one fma) and Lion (torch's lerp as one fma, the
    decayed param rounded before the signed step is added) bit for bit as the reference: the
    kernels round as torch's own kernels do (with a power-of-two grad_scale, as GradScaler's: the
    kernels multiply by its exact inverse)."""
    for dtype in (F32, F64):
        combo = [(dtype, dtype, dtype)]
        sgd_lists = update_inputs(EDGE_SHAPES, combo, seed=26, states="momentum_buffers")
        expected_sgd = clone_lists(sgd_lists)
        options = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1, "nesterov": True, "grad_scale": 4.0,
                   "clip_coef": 0.5}  # fmt: skip
        for first_step in (True, False):
            run_sgd(sgd_lists, **options, first_step=first_step)
            on_reference(run_sgd, expected_sgd, **options, first_step=first_step)
        lion_lists = update_inputs(EDGE_SHAPES, combo, seed=28, states="exp_avgs")
        expected_lion = clone_lists(lion_lists)
        options = {"lr": 1e-2, "weight_decay": 0.3, "grad_scale": 4.0, "clip_coef": 0.5}
        for _ in range(2):
            run_lion(lion_lists, **options)
            on_reference(run_lion, expected_lion, **options)
        for op, lists, expected in (("sgd", sgd_lists, expected_sgd), ("lion", lion_lists, expected_lion)):
            for name in lists:
                for i, (actual, want) in enumerate(zip(lists[name], expected[name])):
                    assert_bitwise_equal(actual, want, f"{op} {name}[{i}] ({dtype})")


# --------------------------------------------------------------------------- 5,000 tensors


def test_in_place_ops_bump_the_versions_of_what_they_write():
    """As torch's in-place ops do (autograd refuses a backward through a tensor changed since it was
    saved): every tensor an op writes, contiguous or strided, has a new version after it; what it
    only reads keeps its own."""
    shapes = [(5,), (4, 6), (0,)]
    params, grads, exp_avgs, exp_avg_sqs = (random_values(shapes, seed=seed, positive=seed == 4) for seed in (1, 2, 3, 4))
    grads[1] = grads[1].t().contiguous().t()  # strided: written back through a copy
    steps = [torch.zeros((), device=DEVICE) for _ in shapes]
    found_inf = torch.zeros((), device=DEVICE)
    calls = {
        "scale_": (lambda: ops.scale_(grads, 0.5), grads),
        "clamp_": (lambda: ops.clamp_(grads, 1.0), grads),
        "unscale_and_check_": (lambda: ops.unscale_and_check_(grads, torch.ones((), device=DEVICE), found_inf), grads),
        "adaptive_clip_": (lambda: ops.adaptive_clip_(params, grads, 0.01, 1e-3), grads),
        "adamw_": (lambda: ops.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **HYPER),
                   params + exp_avgs + exp_avg_sqs + steps),
        "sgd_": (lambda: ops.sgd_(params, grads, exp_avgs, lr=0.1, momentum=0.9), params + exp_avgs),
        "lion_": (lambda: ops.lion_(params, grads, exp_avgs, lr=0.1), params + exp_avgs),
    }  # fmt: skip
    everything = params + grads + exp_avgs + exp_avg_sqs + steps
    for name, (call, written) in calls.items():
        before = [t._version for t in everything]
        call()
        for t, version in zip(everything, before):
            changed = any(t is w for w in written)
            assert (t._version > version) == changed, f"{name}: a tensor {'written' if changed else 'read'}"


def test_eager_calls_skip_the_dispatcher_and_traced_ones_go_through_torch_ops():
    """An eager call takes the extension's eager entry (its lists read in place, no boxing), under
    the op's name in the profiler; a call under a dispatch mode, or with a tensor subclass that
    dispatches to Python, goes through torch.ops, which they must see. Same results either way."""
    from torch.testing._internal.logging_tensor import LoggingTensor, capture_logs
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastopt.backends import cuda

    grads = random_values([(7,), (33, 17), (0,)], seed=80)
    expected = [g * 0.5 for g in grads]

    class NoDispatcher:  # torch.ops.fastopt.*, made unreachable
        def __getattr__(self, name):
            raise AssertionError(f"torch.ops.fastopt.{name} called for an eager call")

    eager, ops_before = cuda._EAGER, cuda._OPS
    assert eager is not None, "the extension has no eager entries"
    cuda._OPS = NoDispatcher()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            fastopt.scale_(grads, 0.5)
    finally:
        cuda._OPS = ops_before
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e)
    assert "fastopt::scale_" in {event.name for event in profiler.events()}

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recording() as mode:
        cuda.scale_(grads, 2.0)
    assert any(name.endswith("scale_.default") for name in mode.seen), mode.seen
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e * 2.0)

    wrapped = [LoggingTensor(g) for g in grads]  # a subclass that dispatches to Python
    with pytest.raises(TypeError, match="subclass"):
        eager.scale_(wrapped, 0.5, None)
    with capture_logs() as logs:
        cuda.scale_(wrapped, 0.25)
    assert any("scale_" in line for line in logs), logs
    for g, e in zip(grads, expected):
        assert_bitwise_equal(g, e * 0.5)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_5000_tensors_norm_unscale_and_scale_match_reference(dtype):
    tensors = in_guarded_buffer(random_values(many_shapes(seed=30), dtype, seed=31), WRITTEN_SENTINEL)

    total, norms = fastopt.multi_tensor_norm(tensors, per_tensor=True)
    expected_total, expected_norms = reference_norm(tensors, 2.0, True)
    torch.testing.assert_close(total, expected_total, **tolerance(F32))
    torch.testing.assert_close(norms, expected_norms, **tolerance(F32))

    expected = clone_all(tensors)
    found_inf, expected_found_inf = torch.zeros(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    fastopt.unscale_and_check_(tensors, 0.37, found_inf)
    on_reference(fastopt.unscale_and_check_, expected, 0.37, expected_found_inf)
    assert_lists_close(tensors, expected, "unscaled")
    assert found_inf.item() == expected_found_inf.item() == 0.0

    coef = torch.tensor(0.37, device=DEVICE)
    fastopt.scale_(tensors, coef)
    on_reference(fastopt.scale_, expected, coef)
    assert_lists_close(tensors, expected, "scaled")
    assert_sentinels_intact(tensors, WRITTEN_SENTINEL)


@pytest.mark.parametrize("combo", ["fp32", "bf16_params_fp32_states"])
def test_5000_tensors_adamw_matches_reference(combo):
    lists = adamw_inputs(many_shapes(seed=32), ADAMW_COMBOS[combo], seed=33)
    expected = clone_lists(lists)
    options = {**HYPER, **on_device({"lr": DeviceScalar(1e-2), "found_inf": DeviceScalar(0.0)}), "clip_coef": 0.5}
    run_adamw(lists, **options)
    on_reference(run_adamw, expected, **options)
    for name in lists:
        assert_lists_close(lists[name], expected[name], name)
    assert_adamw_sentinels_intact(lists)


@pytest.mark.parametrize("combo", ["fp32", "bf16_params_fp32_states"])
def test_5000_tensors_sgd_and_lion_match_reference(combo):
    options = {**on_device({"lr": DeviceScalar(1e-2), "found_inf": DeviceScalar(0.0)}), "clip_coef": 0.5}
    sgd_lists = update_inputs(many_shapes(seed=34), ADAMW_COMBOS[combo], seed=35, states="momentum_buffers")
    lion_lists = update_inputs(many_shapes(seed=36), ADAMW_COMBOS[combo], seed=37, states="exp_avgs")
    expected_sgd, expected_lion = clone_lists(sgd_lists), clone_lists(lion_lists)
    sgd_options = {**options, "momentum": 0.9, "weight_decay": 0.01}
    run_sgd(sgd_lists, **sgd_options)
    on_reference(run_sgd, expected_sgd, **sgd_options)
    run_lion(lion_lists, **options, weight_decay=0.1)
    on_reference(run_lion, expected_lion, **options, weight_decay=0.1)
    for lists, expected in ((sgd_lists, expected_sgd), (lion_lists, expected_lion)):
        for name in lists:
            assert_lists_close(lists[name], expected[name], name)
        assert_adamw_sentinels_intact(lists)


# --------------------------------------------------------------------------- more than 2**31 elements

BIG_NUMEL = 2**31 + 5
# (start, length) of the stretches of a big tensor checked element by element: the start, the
# middle, both sides of 2**31 (up to the end: the last, partial chunk).
BIG_WINDOWS = [(0, 8), (2**30 - 3, 8), (2**31 - 8, 8), (2**31, BIG_NUMEL - 2**31)]


def big_tensor(dtype, seed: int, *, mean=0.0, std=1.0, uniform_to=None) -> torch.Tensor:
    """A random 1-D tensor of BIG_NUMEL elements, drawn in place (no temporary of its size)."""
    t = torch.empty(BIG_NUMEL, dtype=dtype, device=DEVICE)
    if uniform_to is not None:
        return t.uniform_(0.0, uniform_to, generator=generator(seed))
    return t.normal_(mean, std, generator=generator(seed))


@needs_gpu
@pytest.mark.slow
@pytest.mark.usefixtures("release_gpu_memory")
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_norm_of_more_than_2_to_the_31_elements(dtype):
    small = random_values([(7,)], dtype, seed=40)[0]
    big = big_tensor(dtype, seed=41)
    found_inf = torch.zeros(1, device=DEVICE)
    for norm_type in (2.0, math.inf):
        total, norms = fastopt.multi_tensor_norm([small, big], norm_type, per_tensor=True, found_inf=found_inf)
        expected_big = float64_norm_in_slices(big, norm_type)
        expected_small = torch.linalg.vector_norm(small, norm_type, dtype=F64)
        expected_total = torch.linalg.vector_norm(torch.stack([expected_small, expected_big]), norm_type)
        torch.testing.assert_close(norms.double(), torch.stack([expected_small, expected_big]), **tolerance(F32))
        torch.testing.assert_close(total.double(), expected_total, **tolerance(F32))
    assert found_inf.item() == 0.0


@needs_gpu
@pytest.mark.slow
@pytest.mark.usefixtures("release_gpu_memory")
def test_scale_of_more_than_2_to_the_31_elements():
    big = big_tensor(BF16, seed=42)
    before = big.clone()
    fastopt.scale_([big], 0.37)
    for after, old in zip(big.split(2**28), before.split(2**28)):  # every element, a slice at a time
        expected = old.clone()
        on_reference(fastopt.scale_, [expected], 0.37)
        torch.testing.assert_close(after, expected, **tolerance(BF16))


@needs_gpu
@pytest.mark.slow
@pytest.mark.usefixtures("release_gpu_memory")
def test_adamw_on_more_than_2_to_the_31_elements():
    lists = {
        "params": [big_tensor(BF16, seed=43)],
        "grads": [big_tensor(BF16, seed=44)],
        "exp_avgs": [big_tensor(BF16, seed=45, std=0.1)],
        "exp_avg_sqs": [big_tensor(BF16, seed=46, uniform_to=0.01)],
        "steps": [torch.tensor(3.0, device=DEVICE)],
    }
    # The same elements as short tensors, stepped by the reference from the same step count.
    windows = [
        {name: [t[0][start : start + length].clone() if name != "steps" else t[0].clone()] for name, t in lists.items()}
        for start, length in BIG_WINDOWS
    ]
    run_adamw(lists, **HYPER)
    assert lists["steps"][0].item() == 4.0
    for (start, length), expected in zip(BIG_WINDOWS, windows):
        on_reference(run_adamw, expected, **HYPER)
        for name in ("params", "exp_avgs", "exp_avg_sqs"):
            torch.testing.assert_close(
                lists[name][0][start : start + length], expected[name][0], **tolerance(BF16),
                msg=lambda m, name=name, start=start: f"{name}[{start}:]: {m}",
            )  # fmt: skip


# --------------------------------------------------------------------------- inf and nan

NONFINITE = {"inf": (INF, -INF), "nan": (NAN,), "inf_and_nan": (INF, -INF, NAN)}


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("kind", list(NONFINITE))
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_norm_with_inf_or_nan_matches_reference_and_sets_found_inf(dtype, kind, norm_type):
    tensors = in_guarded_buffer(random_values(EDGE_SHAPES, dtype, seed=50), READ_SENTINEL)
    inject_nonfinite(tensors, seed=51, count=3, values=NONFINITE[kind])
    found_inf = torch.zeros(1, device=DEVICE)
    total, norms = fastopt.multi_tensor_norm(tensors, norm_type, per_tensor=True, found_inf=found_inf)
    expected_total, expected_norms = reference_norm(tensors, norm_type, True)
    assert found_inf.item() == 1.0
    assert not torch.isfinite(total).item()
    torch.testing.assert_close(total, expected_total, equal_nan=True, **tolerance(F32))
    torch.testing.assert_close(norms, expected_norms, equal_nan=True, **tolerance(F32))


@pytest.mark.parametrize("kind", list(NONFINITE))
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_unscale_with_inf_or_nan_sets_found_inf_and_still_writes(dtype, kind):
    tensors = in_guarded_buffer(random_values(EDGE_SHAPES, dtype, seed=52, scale=1024.0), WRITTEN_SENTINEL)
    inject_nonfinite(tensors, seed=53, count=3, values=NONFINITE[kind])
    expected = clone_all(tensors)
    found_inf, expected_found_inf = torch.zeros(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    fastopt.unscale_and_check_(tensors, 1.0 / 1024, found_inf)
    on_reference(fastopt.unscale_and_check_, expected, 1.0 / 1024, expected_found_inf)
    assert found_inf.item() == expected_found_inf.item() == 1.0
    assert_lists_close(tensors, expected, "tensors", equal_nan=True)  # the finite elements are unscaled all the same
    assert_sentinels_intact(tensors, WRITTEN_SENTINEL)


@pytest.mark.parametrize("kind", list(NONFINITE))
def test_adamw_skips_when_the_norm_pass_finds_inf_or_nan(kind):
    lists = adamw_inputs(EDGE_SHAPES, ADAMW_COMBOS["fp32_params_bf16_grads"], seed=54, amsgrad=True)
    inject_nonfinite(lists["grads"], seed=55, count=3, values=NONFINITE[kind])
    before = clone_lists(lists)
    found_inf = torch.zeros(1, device=DEVICE)
    total = fastopt.multi_tensor_norm(lists["grads"], found_inf=found_inf)
    run_adamw(lists, **HYPER, found_inf=found_inf, clip_coef=torch.clamp(1.0 / (total + 1e-6), max=1.0))
    assert found_inf.item() == 1.0
    for name in lists:
        for i, (after, old) in enumerate(zip(lists[name], before[name])):
            assert_bitwise_equal(after, old, f"{name}[{i}] changed on a skipped step")


# --------------------------------------------------------------------------- determinism, launches, tables


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norm_is_bit_identical_from_run_to_run(norm_type):
    tensors = random_values(many_shapes(count=1000, seed=60) + [(3_000_000,)], F32, seed=61)
    first_total, first_norms = fastopt.multi_tensor_norm(tensors, norm_type, per_tensor=True)
    for _ in range(3):
        total, norms = fastopt.multi_tensor_norm(tensors, norm_type, per_tensor=True)
        assert_bitwise_equal(total, first_total)
        assert_bitwise_equal(norms, first_norms)


def fastopt_kernel_launches(call) -> int:
    """How many fastopt kernels one call launches, once a first call has built its tables."""
    call()
    if EMULATED:  # the emulated device counts its launches
        before = extension()._launch_count()
        call()
        return extension()._launch_count() - before
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        call()
        torch.cuda.synchronize()
    return sum(1 for e in profiler.events() if e.device_type == DeviceType.CUDA and "fastopt" in e.name)


@pytest.mark.skipif(not EMULATED, reason="a hook of the emulated device")
def test_skipped_grids_leave_only_the_host_work():
    """bench/host_overhead.py times host_runtime.cpp's host work with the emulation's grids skipped: a
    launch is then counted and returns, no kernel writes, and the table still follows the tensors
    (the next call, grids running, scales the right ones)."""
    tensors = random_values([(7,), (33, 17), (40000,)], seed=75)
    expected = [t.clone() for t in tensors]
    fastopt.scale_(tensors, 0.5)  # builds the table
    expected = [e * 0.5 for e in expected]
    moved = [t.clone() for t in tensors]  # the same layout at new addresses: the address column changes
    try:
        extension()._skip_grids(True)
        before = extension()._launch_count()
        fastopt.scale_(moved, 0.25)
        assert extension()._launch_count() == before + 1
    finally:
        extension()._skip_grids(False)
    for m, e in zip(moved, expected):
        assert_bitwise_equal(m, e)
    fastopt.scale_(moved, 0.25)
    for m, e in zip(moved, expected):
        assert_bitwise_equal(m, e * 0.25)


def test_one_launch_per_pass_at_5000_tensors():
    shapes = many_shapes(seed=70)
    grads = random_values(shapes, seed=71)
    params = random_values(shapes, seed=72)
    exp_avgs = random_values(shapes, seed=73, scale=0.1)
    exp_avg_sqs = random_values(shapes, seed=74, scale=0.01, positive=True)
    steps = [torch.zeros((), device=DEVICE) for _ in shapes]
    found_inf = torch.zeros(1, device=DEVICE)
    calls = {  # name: (call, launches: one per pass)
        "multi_tensor_norm": (lambda: fastopt.multi_tensor_norm(grads, per_tensor=True, found_inf=found_inf), 2),
        "unscale_and_check_": (lambda: ops.unscale_and_check_(grads, 1.0, found_inf), 1),
        "scale_": (lambda: ops.scale_(grads, 1.0), 1),
        "clamp_": (lambda: ops.clamp_(grads, 10.0), 1),
        "adaptive_clip_": (lambda: ops.adaptive_clip_(params, grads), 3),
        "adamw_": (lambda: ops.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **HYPER), 1),
        "adam_l2": (lambda: ops.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **HYPER,
                                           decoupled_weight_decay=False), 1),  # fmt: skip
        "sgd_": (lambda: ops.sgd_(params, grads, lr=1e-2, weight_decay=0.1), 1),
        "sgd_momentum": (lambda: ops.sgd_(params, grads, exp_avgs, lr=1e-2, momentum=0.9, nesterov=True), 1),
        "lion_": (lambda: ops.lion_(params, grads, exp_avgs, lr=1e-3, weight_decay=0.1), 1),
    }
    launches = {name: fastopt_kernel_launches(call) for name, (call, _) in calls.items()}
    assert launches == {name: expected for name, (_, expected) in calls.items()}


def test_table_cache_refreshes_pointers_and_tells_layouts_apart():
    """adamw_ and the norm with new grads at every call (zero_grad(set_to_none=True)): the same
    layout reuses its table with the address column refreshed; another layout (a sub-list) gets
    its own; then the first layout again."""
    lists = adamw_inputs(EDGE_SHAPES, ADAMW_COMBOS["fp32"], seed=80)
    expected = clone_lists(lists)
    kept = []  # every call's grads stay alive, so each call's grads get new addresses
    for call, subset in enumerate([slice(None), slice(None), slice(2, None), slice(None)]):
        grads = in_guarded_buffer(random_values(EDGE_SHAPES[subset], seed=81 + call), READ_SENTINEL)
        assert grads[0].data_ptr() not in {old[0].data_ptr() for old in kept}
        kept.append(grads)

        total = fastopt.multi_tensor_norm(grads)
        torch.testing.assert_close(total, reference_norm(grads, 2.0, False), **tolerance(F32))

        actual = {**{name: tensors[subset] for name, tensors in lists.items()}, "grads": grads}
        want = {**{name: tensors[subset] for name, tensors in expected.items()}, "grads": grads}
        run_adamw(actual, **HYPER)
        on_reference(run_adamw, want, **HYPER)
        for name in lists:
            assert_lists_close(lists[name], expected[name], f"{name} after call {call}")
    assert_adamw_sentinels_intact(lists)


# --------------------------------------------------------------------------- no host sync, CUDA graphs

SYNC_FREE_OPS = [
    "multi_tensor_norm",
    "unscale_and_check_",
    "unscale_and_check_op_with_norm",
    "scale_",
    "clamp_",
    "adaptive_clip_",
    "adamw_",
    "adamw_fallback",
    "adam_l2",
    "sgd_",
    "sgd_fallback",
    "lion_",
    "lion_fallback",
]


def sync_free_calls() -> dict:
    """Every op, with device scalars wherever the API allows them."""
    grads = random_values(EDGE_SHAPES, BF16, seed=90)
    params = random_values(EDGE_SHAPES, seed=91)
    flag = torch.zeros(1, device=DEVICE)
    half = torch.tensor(0.5, device=DEVICE)
    adamw_options = {
        **HYPER,
        "lr": torch.tensor(1e-2, device=DEVICE),
        "grad_scale": torch.tensor(2.0, device=DEVICE),
        "clip_coef": half,
        "found_inf": flag,
    }
    supported = adamw_inputs(EDGE_SHAPES, ADAMW_COMBOS["fp32_params_bf16_grads"], seed=92, amsgrad=True)
    unsupported = adamw_inputs(EDGE_SHAPES, ADAMW_COMBOS["unsupported_fp16_params_bf16_grads"], seed=93)
    update_options = {key: adamw_options[key] for key in ("lr", "grad_scale", "clip_coef", "found_inf")}
    sgd_options = {**update_options, "momentum": 0.9, "weight_decay": 0.1}
    sgd_supported, lion_supported, sgd_unsupported, lion_unsupported = (
        update_inputs(EDGE_SHAPES, ADAMW_COMBOS[combo], seed=94 + i, states=states)
        for i, (combo, states) in enumerate([("fp32_params_bf16_grads", "momentum_buffers"),
                                             ("fp32_params_bf16_grads", "exp_avgs"),
                                             ("unsupported_fp16_params_bf16_grads", "momentum_buffers"),
                                             ("unsupported_fp16_params_bf16_grads", "exp_avgs")])
    )  # fmt: skip
    return {
        "multi_tensor_norm": lambda: fastopt.multi_tensor_norm(grads, per_tensor=True, found_inf=flag),
        "unscale_and_check_": lambda: fastopt.unscale_and_check_(grads, torch.ones(1, device=DEVICE), flag),
        "unscale_and_check_op_with_norm": lambda: OPS.unscale_and_check_(
            grads, 1.0, None, flag, 2.0, True
        ),
        "scale_": lambda: fastopt.scale_(grads, half),
        "clamp_": lambda: ops.clamp_(grads, 1.0),
        "adaptive_clip_": lambda: ops.adaptive_clip_(params, grads),
        "adamw_": lambda: run_adamw(supported, **adamw_options),
        "adamw_fallback": lambda: run_adamw(unsupported, **adamw_options),
        "adam_l2": lambda: run_adamw(supported, **adamw_options, decoupled_weight_decay=False),
        "sgd_": lambda: run_sgd(sgd_supported, **sgd_options),
        "sgd_fallback": lambda: run_sgd(sgd_unsupported, **sgd_options),
        "lion_": lambda: run_lion(lion_supported, **update_options),
        "lion_fallback": lambda: run_lion(lion_unsupported, **update_options),
    }


@needs_gpu
@pytest.mark.parametrize("name", SYNC_FREE_OPS)
def test_ops_do_not_sync(name):
    call = sync_free_calls()[name]
    call()  # the first call builds the tables
    with no_host_sync():
        call()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).to(DEVICE)


@needs_gpu
def test_optimizer_step_with_grad_scaler_does_not_sync():
    model = small_model()
    optimizer = fastopt.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=DEVICE), max_grad_norm=1.0)
    scaler = fastopt.amp.GradScaler("cuda", init_scale=1024.0)
    inputs, targets = torch.randn(16, 20, device=DEVICE), torch.randint(0, 5, (16,), device=DEVICE)
    for step in range(3):
        optimizer.zero_grad()  # set_to_none: new grads, at new addresses, at every step
        scaler.scale(torch.nn.functional.cross_entropy(model(inputs), targets)).backward()
        with no_host_sync() if step == 2 else contextlib.nullcontext():
            scaler.step(optimizer)
            scaler.update()
    assert not scaler.step_skipped.item()
    assert torch.isfinite(optimizer.stats["grad_norm"]).item()


@needs_gpu
def test_optimizer_step_captured_in_a_cuda_graph_matches_eager():
    eager_model = small_model()
    graph_model = copy.deepcopy(eager_model)
    initial = [p.detach().clone() for p in eager_model.parameters()]
    grads = random_values([p.shape for p in initial], seed=100)  # static, as a graph needs them
    optimizers = []
    for model in (eager_model, graph_model):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        lr = torch.tensor(1e-3, device=DEVICE)
        optimizers.append(fastopt.optim.AdamW(model.parameters(), lr=lr, max_grad_norm=1.0))
    eager, captured = optimizers

    side = torch.cuda.Stream()  # warm up on a side stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            captured.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    for _ in range(2):
        graph.replay()
    for _ in range(5):
        eager.step()
    torch.cuda.synchronize()

    for i, (p, q) in enumerate(zip(eager_model.parameters(), graph_model.parameters())):
        assert not torch.equal(p, initial[i])  # (the steps did move the params)
        assert_bitwise_equal(q.detach(), p.detach(), f"param {i}")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_bitwise_equal(captured.state[q][key], eager.state[p][key], f"param {i} {key}")


# --------------------------------------------------------------------------- torch.library, torch.compile

CUSTOM_OP_CASES = [
    "multi_tensor_norm",
    "multi_tensor_norm-inf-found_inf",
    "unscale_and_check_",
    "unscale_and_check_-norm-per_tensor",
    "scale_",
    "scale_-tensor_coef",
    "clamp_",
    "adaptive_clip_",
    "adamw_",
    "adamw_-amsgrad-device_scalars",
    "adamw_-l2",
    "sgd_",
    "sgd_-momentum-device_scalars",
    "sgd_-first_step-nesterov",
    "lion_",
    "lion_-device_scalars",
]


def custom_op_cases() -> dict:
    """(op, arguments) per case, on fresh GPU tensors. Schemas: csrc/cuda/registration.cpp; a
    "float or tensor" argument is a float plus an optional tensor that wins when given."""
    ts = random_values([(3, 5), (7,), ()], seed=110)

    def copies(scale=1.0):
        return [t.clone() * scale for t in ts]

    def positive():
        return [t.abs() * 0.01 for t in ts]

    def scalar(value, shape=()):
        return torch.full(shape, value, device=DEVICE)

    def steps():
        return [scalar(float(i)) for i in range(len(ts))]

    lib = OPS
    return {
        "multi_tensor_norm": (lib.multi_tensor_norm.default, (ts, 2.0, True, None)),
        "multi_tensor_norm-inf-found_inf": (lib.multi_tensor_norm.default, (ts, math.inf, False, scalar(0.0, (1,)))),
        "unscale_and_check_": (lib.unscale_and_check_.default, (copies(), 1.0, scalar(0.5, (1,)), scalar(0.0, (1,)))),
        "unscale_and_check_-norm-per_tensor": (
            lib.unscale_and_check_.default, (copies(), 0.5, None, scalar(0.0, (1,)), 2.0, True)),
        "scale_": (lib.scale_.default, (copies(), 0.5, None)),
        "scale_-tensor_coef": (lib.scale_.default, (copies(), 1.0, scalar(0.5))),
        "clamp_": (lib.clamp_.default, (copies(), 0.5)),
        "adaptive_clip_": (lib.adaptive_clip_.default, (copies(), copies(0.1), 0.01, 1e-3, 2.0, True)),
        # lr, grad_scale and clip_coef as floats; no AMSGrad (an empty list); no found_inf.
        "adamw_": (lib.adamw_.default, (copies(), copies(), copies(0.1), positive(), steps(), 1e-3, None, 0.9, 0.999,
                                        1e-8, 0.01, False, [], 1.0, None, None, 1.0, None)),
        # lr, grad_scale, clip_coef and found_inf as device tensors; AMSGrad; maximize.
        "adamw_-amsgrad-device_scalars": (
            lib.adamw_.default, (copies(), copies(), copies(0.1), positive(), steps(), 0.0, scalar(1e-3), 0.9, 0.999,
                                 1e-8, 0.01, True, positive(), 1.0, scalar(2.0), scalar(0.0, (1,)), 1.0, scalar(0.5))),
        # torch.optim.Adam's L2 weight decay.
        "adamw_-l2": (lib.adamw_.default, (copies(), copies(), copies(0.1), positive(), steps(), 1e-3, None, 0.9, 0.999,
                                           1e-8, 0.01, False, [], 1.0, None, None, 1.0, None, False)),
        # No momentum (no buffers); floats.
        "sgd_": (lib.sgd_.default, (copies(), copies(), [], 1e-3, None, 0.0, 0.0, 0.01, False, False, False, 1.0, None,
                                    None, 1.0, None)),
        "sgd_-momentum-device_scalars": (
            lib.sgd_.default, (copies(), copies(), copies(0.1), 0.0, scalar(1e-3), 0.9, 0.1, 0.01, False, True, False,
                               1.0, scalar(2.0), scalar(0.0, (1,)), 1.0, scalar(0.5))),
        "sgd_-first_step-nesterov": (
            lib.sgd_.default, (copies(), copies(), copies(0.1), 1e-3, None, 0.9, 0.0, 0.0, True, False, True, 1.0, None,
                               None, 1.0, None)),
        "lion_": (lib.lion_.default, (copies(), copies(), copies(0.1), 1e-4, None, 0.9, 0.99, 0.1, False, 1.0, None,
                                      None, 1.0, None)),
        "lion_-device_scalars": (
            lib.lion_.default, (copies(), copies(), copies(0.1), 0.0, scalar(1e-4), 0.9, 0.99, 0.1, True, 1.0,
                                scalar(2.0), scalar(0.0, (1,)), 1.0, scalar(0.5))),
    }  # fmt: skip


@pytest.mark.parametrize("name", CUSTOM_OP_CASES)
def test_custom_ops_pass_opcheck(name):
    op, args = custom_op_cases()[name]
    torch.library.opcheck(op, args)


def clipped_adamw_ops(params, grads, exp_avgs, exp_avg_sqs, steps):
    """A clipped AdamW step written with the registered ops themselves."""
    total, _ = OPS.multi_tensor_norm(grads, 2.0, False, None)
    clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    OPS.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, 1e-2, None, 0.9, 0.99, 1e-8, 0.1, False,
                             [], 1.0, None, None, 1.0, clip_coef)  # fmt: skip
    return total


def clipped_adamw_public(params, grads, exp_avgs, exp_avg_sqs, steps):
    """The same step through the public API."""
    total = fastopt.multi_tensor_norm(grads)
    clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    fastopt.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **HYPER, clip_coef=clip_coef)
    return total


COMPILE_SHAPES = [(64, 32), (32,), (5, 64), (7,)]
ADAMW_ARGUMENTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")


@pytest.mark.parametrize(
    "step, fullgraph",
    # fullgraph through the public API would also need fastopt.ops and fastopt.backends to be
    # traceable (backend selection reads a ContextVar, the overlap check reads data_ptr()).
    [(clipped_adamw_ops, True), (clipped_adamw_public, False)],
    ids=["torch_ops_fullgraph", "public_api"],
)
def test_compiled_clipped_adamw_matches_eager(step, fullgraph):
    # Plain tensors (clones): views into one buffer would be aliased graph inputs.
    lists = clone_lists(adamw_inputs(COMPILE_SHAPES, ADAMW_COMBOS["fp32"], seed=120))
    expected = clone_lists(lists)
    total = torch.compile(step, fullgraph=fullgraph)(*(lists[name] for name in ADAMW_ARGUMENTS))
    expected_total = step(*(expected[name] for name in ADAMW_ARGUMENTS))
    torch.testing.assert_close(total, expected_total, **tolerance(F32))
    for name in ADAMW_ARGUMENTS:
        assert_lists_close(lists[name], expected[name], name)


def clipped_sgd_and_lion_ops(params, grads, momentum_buffers, exp_avgs):
    """Clipped SGD (Nesterov) and Lion steps written with the registered ops themselves."""
    total, _ = OPS.multi_tensor_norm(grads, 2.0, False, None)
    clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    OPS.sgd_(params, grads, momentum_buffers, 1e-2, None, 0.9, 0.0, 0.01, True, False, False, 1.0, None, None, 1.0,
             clip_coef)  # fmt: skip
    OPS.lion_(params, grads, exp_avgs, 1e-3, None, 0.9, 0.99, 0.1, False, 1.0, None, None, 1.0, clip_coef)
    return total


def clipped_sgd_and_lion_public(params, grads, momentum_buffers, exp_avgs):
    """The same steps through the public API (a combination without a kernel build falls back to
    the reference, decided in Python under torch.compile)."""
    total = fastopt.multi_tensor_norm(grads)
    clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    fastopt.sgd_(params, grads, momentum_buffers, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01,
                 clip_coef=clip_coef)  # fmt: skip
    fastopt.lion_(params, grads, exp_avgs, lr=1e-3, weight_decay=0.1, clip_coef=clip_coef)
    return total


@pytest.mark.parametrize(
    "step, fullgraph, combo",
    [(clipped_sgd_and_lion_ops, True, "fp32"), (clipped_sgd_and_lion_public, False, "bf16_params_fp32_states"),
     (clipped_sgd_and_lion_public, False, "unsupported_fp16_params_bf16_grads")],
    ids=["torch_ops_fullgraph", "public_api", "public_api_fallback"],
)  # fmt: skip
def test_compiled_clipped_sgd_and_lion_match_eager(step, fullgraph, combo):
    sgd = update_inputs(COMPILE_SHAPES, ADAMW_COMBOS[combo], seed=121, states="momentum_buffers")
    lists = clone_lists({**sgd, "exp_avgs": update_inputs(COMPILE_SHAPES, ADAMW_COMBOS[combo], seed=122,
                                                          states="exp_avgs")["exp_avgs"]})  # fmt: skip
    expected = clone_lists(lists)
    names = ("params", "grads", "momentum_buffers", "exp_avgs")
    total = torch.compile(step, fullgraph=fullgraph)(*(lists[name] for name in names))
    expected_total = step(*(expected[name] for name in names))
    torch.testing.assert_close(total, expected_total, **tolerance(F32))
    for name in names:
        assert_lists_close(lists[name], expected[name], name)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["total", "per_tensor"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_unscale_and_check_op_returns_the_norm_of_the_unscaled_tensors(dtype, per_tensor):
    tensors = in_guarded_buffer(random_values(EDGE_SHAPES, dtype, seed=130, scale=1024.0), WRITTEN_SENTINEL)
    expected = clone_all(tensors)
    found_inf = torch.zeros(1, device=DEVICE)
    total, norms = OPS.unscale_and_check_(tensors, 1.0 / 1024, None, found_inf, 2.0, per_tensor)
    assert total.shape == () and total.dtype == F32
    assert norms.shape == ((len(tensors),) if per_tensor else (0,))
    on_reference(fastopt.unscale_and_check_, expected, 1.0 / 1024, torch.zeros(1, device=DEVICE))
    assert_lists_close(tensors, expected, "tensors")
    assert found_inf.item() == 0.0
    # The norm of the unscaled values as stored: what the norm pass over the result gives.
    result_total, result_norms = fastopt.multi_tensor_norm(tensors, 2.0, per_tensor=True)
    torch.testing.assert_close(total, result_total, **tolerance(F32))
    if per_tensor:
        torch.testing.assert_close(norms, result_norms, **tolerance(F32))

    # Without norm_type: nothing to return but empty tensors.
    total, norms = OPS.unscale_and_check_(tensors, 1.0, None, found_inf)
    assert total.shape == (0,) and norms.shape == (0,)
    assert_sentinels_intact(tensors, WRITTEN_SENTINEL)


# --------------------------------------------------------------------------- streams, arrival counters, capture
# (csrc/cuda/host_runtime.cpp's TableCache: a table per (layout, stream); counters zeroed before each launch;
# tables of a capture built outside the graph and released with it.)


def table_cache_stats() -> tuple[int, int, int]:
    """(cached tables, tables kept only for live graphs, tables that live graphs read)."""
    return extension()._table_cache_stats()


@needs_gpu
def test_one_layout_on_two_streams_concurrently():
    """The same layout (shapes, dtypes) on two streams at once, with no ordering between them:
    each stream's norm and AdamW steps give exactly what they give alone (each stream has its own
    address column and arrival counters; one shared table would cross the tensors or the counts)."""
    shapes = [(1 << 20,), (3, 32771), (4097,), (64, 64), (5,)] * 3
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    assert streams[0].cuda_stream != streams[1].cuda_stream
    inputs = [clone_lists(adamw_inputs(shapes, ADAMW_COMBOS["fp32"], seed=140 + 10 * k)) for k in range(2)]
    expected = [clone_lists(lists) for lists in inputs]
    steps = 4
    totals = [[], []]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(steps):  # interleaved: each stream's work queued while the other's may still run
        for k, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                total, norms = fastopt.multi_tensor_norm(inputs[k]["grads"], per_tensor=True)
                totals[k].append((total, norms))
                run_adamw(inputs[k], **HYPER)
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    for k in range(2):
        want_total, want_norms = reference_norm(expected[k]["grads"], 2.0, True)
        for total, norms in totals[k]:
            torch.testing.assert_close(total, want_total, **tolerance(F32))
            torch.testing.assert_close(norms, want_norms, **tolerance(F32))
        for _ in range(steps):
            on_reference(run_adamw, expected[k], **HYPER)
        for name in inputs[k]:
            assert_lists_close(inputs[k][name], expected[k][name], f"stream {k} {name}")


@pytest.mark.parametrize("poison", [7, -3, 2**30])
def test_arrival_counters_recover_after_an_aborted_launch(poison):
    """A launch aborted half-way would leave arrival counters non-zero; here they are set so by
    hand (fastopt._C._set_arrival_counters). The next norm and AdamW step are still right: the
    total is written, and each step count goes up by exactly one."""
    shapes = [(3, 32771), (40000,), (7,), (64, 64)]
    grads = random_values(shapes, seed=150)
    lists = clone_lists(adamw_inputs(shapes, ADAMW_COMBOS["fp32"], seed=151))
    expected = clone_lists(lists)
    fastopt.multi_tensor_norm(grads, per_tensor=True)  # builds the tables
    run_adamw(lists, **HYPER)
    on_reference(run_adamw, expected, **HYPER)
    synchronize()

    extension()._set_arrival_counters(poison)
    total, norms = fastopt.multi_tensor_norm(grads, per_tensor=True)
    run_adamw(lists, **HYPER)
    on_reference(run_adamw, expected, **HYPER)
    want_total, want_norms = reference_norm(grads, 2.0, True)
    torch.testing.assert_close(total, want_total, **tolerance(F32))
    torch.testing.assert_close(norms, want_norms, **tolerance(F32))
    for name in lists:
        assert_lists_close(lists[name], expected[name], name)
    assert_bitwise_equal(torch.stack(lists["steps"]), torch.stack(expected["steps"]), "step counts")


def captured_clipped_step(lists):
    total = fastopt.multi_tensor_norm(lists["grads"])
    clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    run_adamw(lists, **HYPER, clip_coef=clip_coef)
    return total


@needs_gpu
def test_first_call_for_a_layout_during_graph_capture():
    """No warm-up: the norm and AdamW tables of this layout are first needed inside the capture
    (built and uploaded outside the graph right then). Replays match eager steps; the tables are
    released when the graph is destroyed."""
    shapes = [(5, 33001), (123,), (7, 9), (2, 3, 5)]  # a layout no other test uses
    lists = clone_lists(adamw_inputs(shapes, ADAMW_COMBOS["fp32"], seed=160))
    expected = clone_lists(lists)
    before = table_cache_stats()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = captured_clipped_step(lists)
    during = table_cache_stats()
    assert during[2] >= before[2] + 2, (before, during)  # the norm's and AdamW's tables, held by the graph
    replays = 3
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()

    for _ in range(replays):
        expected_total = captured_clipped_step(expected)  # eager, the same backend
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    for name in lists:  # the same kernels and fold order: the same bits
        assert_lists_close(lists[name], expected[name], name, rtol=0, atol=0)

    del graph
    gc.collect()
    torch.cuda.synchronize()
    deadline = time.monotonic() + 10.0
    while table_cache_stats()[2] > before[2] and time.monotonic() < deadline:  # user objects may be released late
        time.sleep(0.01)
    after = table_cache_stats()
    assert after[2] <= before[2], f"tables still held for a destroyed graph: {before} -> {during} -> {after}"


@needs_gpu
def test_eager_calls_after_a_capture_leave_the_graph_intact():
    """A captured step keeps its own (frozen) tables: eager calls with the same layout and other
    tensors on the capture's stream and the default stream afterwards change nothing the graph
    reads; a replay still updates the captured tensors."""
    shapes = [(4, 32770), (17,), (3, 3)]
    lists = clone_lists(adamw_inputs(shapes, ADAMW_COMBOS["fp32"], seed=170))
    expected = clone_lists(lists)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured_clipped_step(lists)
    others = clone_lists(adamw_inputs(shapes, ADAMW_COMBOS["fp32"], seed=171))
    others_expected = clone_lists(others)
    stream.wait_stream(torch.cuda.current_stream())  # (others were made on the default stream)
    with torch.cuda.stream(stream):
        captured_clipped_step(others)
    torch.cuda.current_stream().wait_stream(stream)
    captured_clipped_step(others)
    for _ in range(2):
        captured_clipped_step(others_expected)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    captured_clipped_step(expected)
    for name in lists:
        assert_lists_close(lists[name], expected[name], f"captured {name}")
        assert_lists_close(others[name], others_expected[name], f"eager {name}")


def test_per_tensor_norm_and_agc_of_a_tensor_of_more_than_a_warps_share_of_chunks():
    """A tensor of more than 1,024 chunks (csrc/cuda/kernels.h kWarpFoldChunks) is folded by a block,
    the others by a warp each: per-tensor norms and whole-tensor AGC still match the reference."""
    shapes = [(1100 * 32768 + 5,), (7,), (40000,), (33, 17)]
    grads = random_values(shapes, seed=180)
    for norm_type in (2.0, math.inf, 3.0):
        total, norms = fastopt.multi_tensor_norm(grads, norm_type, per_tensor=True)
        want_total, want_norms = reference_norm(grads, norm_type, True)
        torch.testing.assert_close(norms, want_norms, **tolerance(F32))
        torch.testing.assert_close(total, want_total, **tolerance(F32))
    params = random_values(shapes, seed=181)
    clipped, want = clone_all(grads), clone_all(grads)
    ops.adaptive_clip_(params, clipped, clip_factor=1e-3, unitwise=False)
    on_reference(ops.adaptive_clip_, params, want, clip_factor=1e-3, unitwise=False)
    assert_lists_close(clipped, want, "grads")


# --------------------------------------------------------------------------- the fixed fold order


def _warp_tree(values):
    """CUB's warp reduction (shfl.down by 1, 2, 4, 8, 16; lane i adds lane i + offset's value
    while that lane exists): lane 0's result, from 32 float64 values."""
    import numpy as np

    v = np.array(values, dtype=np.float64)
    for offset in (1, 2, 4, 8, 16):
        v[: 32 - offset] = v[: 32 - offset] + v[offset:]
    return v[0]


def _chunk_sum_abs(x, start: int, end: int, address: int):
    """The norm pass's partial of fp64 elements x[start:end] at p=1, as the kernel folds it: a
    scalar head up to 16-byte alignment (thread 0), pairs of elements per thread (thread t takes
    elements start + 2t + 1024k), a scalar tail, each thread in its own order; then CUB's block
    reduction (each warp's tree, then warp 0 + warp 1 + ... in order)."""
    import numpy as np

    acc = np.zeros(kThreadsPerBlock, dtype=np.float64)
    if (address + 8 * start) % 16 != 0 and start < end:
        acc[0] = acc[0] + abs(x[start])
        start += 1
    packed_end = start + (end - start) // 2 * 2
    stride = 2 * kThreadsPerBlock
    for base in range(start, packed_end, stride):
        pairs = np.abs(x[base : min(base + stride, packed_end)]).reshape(-1, 2)
        n = pairs.shape[0]
        acc[:n] = acc[:n] + pairs[:, 0]
        acc[:n] = acc[:n] + pairs[:, 1]
    tail = np.abs(x[packed_end:end])
    acc[: tail.shape[0]] = acc[: tail.shape[0]] + tail
    warps = [_warp_tree(acc[w * 32 : (w + 1) * 32]) for w in range(kThreadsPerBlock // 32)]
    total = warps[0]
    for w in warps[1:]:
        total = total + w
    return total


kThreadsPerBlock = 512
kChunk = 32768


@pytest.mark.skipif(not EMULATED, reason="emulated device only for now (the GPU folds in the same order)")
def test_agc_folds_in_the_documented_order_bit_for_bit():
    """Unit-wise AGC of fp64 tensors at p=1 against a model of the kernels' fixed order (chunk
    partials: per-thread order and CUB's trees; a unit's partials: a lane each, then the warp tree):
    the scaled grads are equal bit for bit. Reversing or regrouping any of these folds changes
    float64 results in their last bits, which the other tests' tolerances (and the float32 norms)
    cannot see; this test does."""
    import numpy as np

    # Units of 1 to 41 chunks (a lane holds up to 2 of a unit's partials), 16-byte aligned or not; 32
    # units of 3 chunks, whose fold (a + b) + c changes bits, in some unit, under any other order.
    shapes = [(32, 2 * kChunk + 7), (3, 40000), (5, 7), (1, 3 * kChunk + 11), (1, 40 * kChunk + 3)]
    gen = torch.Generator().manual_seed(170)
    params, grads = [], []
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        shift = i % 2  # odd starts: the scalar head
        p = torch.empty(numel + shift, dtype=F64, device=DEVICE)[shift:].view(shape)
        g = torch.empty(numel + 1 - shift, dtype=F64, device=DEVICE)[1 - shift :].view(shape)
        p.copy_(torch.randn(shape, generator=gen, dtype=F64) * 1e-3)
        g.copy_(torch.randn(shape, generator=gen, dtype=F64))
        params.append(p)
        grads.append(g)
    clip_factor, eps = 0.01, 1e-3
    expected = []
    for p, g in zip(params, grads):
        rows = p.shape[0]
        per = p.numel() // rows
        pv, gv = p.reshape(-1).cpu().numpy(), g.reshape(-1).cpu().numpy()
        out = gv.copy()
        for r in range(rows):
            starts = list(range(r * per, (r + 1) * per, kChunk))
            weights = [_chunk_sum_abs(pv, s, min(s + kChunk, (r + 1) * per), p.data_ptr()) for s in starts]
            gnorms = [_chunk_sum_abs(gv, s, min(s + kChunk, (r + 1) * per), g.data_ptr()) for s in starts]
            lanes_w, lanes_g = np.zeros(32), np.zeros(32)
            for c, (w, gn) in enumerate(zip(weights, gnorms)):
                lanes_w[c % 32] = lanes_w[c % 32] + w
                lanes_g[c % 32] = lanes_g[c % 32] + gn
            weight, grad = _warp_tree(lanes_w), _warp_tree(lanes_g)
            max_norm = (eps if weight < eps else weight) * clip_factor
            coefficient = max_norm / (1e-6 if grad < 1e-6 else grad) if grad > max_norm else 1.0
            out[r * per : (r + 1) * per] = gv[r * per : (r + 1) * per] * np.float64(coefficient)
        expected.append(torch.from_numpy(out).view(g.shape))
    ops.adaptive_clip_(params, grads, clip_factor, eps, 1.0, unitwise=True)
    for i, (g, want) in enumerate(zip(grads, expected)):
        differ = int((g.cpu() != want).sum())
        assert differ == 0, f"grads[{i}]: {differ} elements differ from the documented fold order's"
