"""sgd_ against torch.optim.SGD(foreach=False) and against float64 math.

Written against the public op only, so it runs on whichever backend the lane forces
(FASTOPT_BACKEND). fp32 trajectories are bit-identical to torch's on the ``torch`` backend (torch's
own ops in torch's order) and on the ``cpu`` backend (csrc/common/element_math.h's ``sgd_update_fused``
rounds as torch's CPU kernels do); the fused kernels of other backends agree within fp32 rounding.
"""

import itertools
import math

import pytest
import torch

import fastopt
from tests.helpers import (
    active_backend,
    assert_bitwise_equal,
    clone_layout,
    describe_dtype,
    devices,
    inject_nonfinite,
    random_tensors,
    tolerance,
)
from tests.test_adamw import DTYPE_COMBOS
from tests.test_validation import changed, snapshot

SHAPES = [(), (1,), (7,), (3, 5), (33, 17), (4, 3, 3, 3), (0,), (129,), (2, 0, 3)]
NAN = math.nan

# (momentum, dampening, nesterov): the configurations torch.optim.SGD accepts.
MOMENTUM_CONFIGS = {
    "plain": (0.0, 0.0, False),
    "momentum": (0.9, 0.0, False),
    "dampened": (0.9, 0.1, False),
    "nesterov": (0.9, 0.0, True),
}


def bit_exact_with_torch(device) -> bool:
    """Whether this lane must reproduce torch's CPU (or, on the reference, any device's) rounding
    bit for bit: the reference runs torch's own ops; the cpu backend's kernels round as torch's
    CPU kernels. Fused kernels elsewhere (triton, cuda) round otherwise: within fp32 rounding."""
    backend = active_backend()
    return backend == "torch" or (backend == "cpu" and torch.device(device).type == "cpu")


def assert_same(actual, expected, device, msg=""):
    if bit_exact_with_torch(device):
        assert_bitwise_equal(actual, expected, msg)
    else:
        torch.testing.assert_close(actual, expected, msg=msg or None, **tolerance(torch.float32))


def nan_buffers(params, dtype=None):
    """Momentum buffers before torch's first step: they hold nothing, so poison them (nan) to see
    that the first step writes them without reading them."""
    return [torch.full_like(p, NAN, dtype=dtype or p.dtype) for p in params]


def random_buffers(params, dtype=None, seed=123):
    """Momentum buffers as after some steps: random, non-zero."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.device, dtype or p.dtype) for p in params]


def sgd_float64(param, grad, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                grad_scale=1.0, clip_coef=1.0):  # fmt: skip
    """One step of torch.optim.SGD's documented algorithm in float64: (new param, new buffer)."""
    p, g = (t.detach().to("cpu", torch.float64, copy=True) for t in (param, grad))
    g = g / grad_scale * clip_coef
    g = -g if maximize else g
    if weight_decay != 0:
        g = g + weight_decay * p
    b = None
    if momentum != 0:
        b = g.clone() if first_step else momentum * buf.detach().to("cpu", torch.float64) + (1 - dampening) * g
        g = g + momentum * b if nesterov else b
    return p - lr * g, b


# --------------------------------------------------------------------------- against torch.optim.SGD


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("config", MOMENTUM_CONFIGS)
@pytest.mark.parametrize(
    "weight_decay, maximize, lr_tensor",
    list(itertools.product([0.0, 1e-2], [False, True], [False, True])),
    ids=lambda v: str(v),
)
def test_trajectory_matches_torch_sgd(device, config, weight_decay, maximize, lr_tensor):
    momentum, dampening, nesterov = MOMENTUM_CONFIGS[config]
    params = random_tensors(SHAPES, torch.float32, device, seed=1)
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    lr = torch.tensor(0.05, device=device) if lr_tensor else 0.05
    torch_opt = torch.optim.SGD(
        reference, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, maximize=maximize, foreach=False,
    )  # fmt: skip
    # torch has no buffer before its first step; fastopt's first step writes one without reading it.
    buffers = nan_buffers(params) if momentum else None
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize)  # fmt: skip

    for k in range(20):
        grads = random_tensors(SHAPES, torch.float32, device, seed=100 + k)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch_opt.step()
        fastopt.sgd_(params, grads, buffers, first_step=(k == 0), **hyper)
        if k == 0 and momentum:  # the buffers are torch's after the first step already
            for buf, p in zip(buffers, reference):
                assert_same(buf, torch_opt.state[p]["momentum_buffer"], device, "first step's buffer")

    for i, p in enumerate(reference):
        assert_same(params[i], p.detach(), device, f"params[{i}] (shape {SHAPES[i]})")
        if momentum:
            assert_same(buffers[i], torch_opt.state[p]["momentum_buffer"], device, f"momentum_buffers[{i}]")
        else:
            assert torch_opt.state[p].get("momentum_buffer") is None
    moved = [not torch.equal(p, q) for p, q in zip(params, random_tensors(SHAPES, torch.float32, device, seed=1))]
    assert all(m for m, shape in zip(moved, SHAPES) if math.prod(shape) > 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("config", ["momentum", "dampened", "nesterov"])
def test_first_step_sets_buffer_to_grad_without_reading_it(device, config):
    """torch's first step: buf = grad (with weight decay, not dampened); poisoned buffers (nan,
    -inf) are overwritten, never read, and the param moves as torch's does."""
    momentum, dampening, nesterov = MOMENTUM_CONFIGS[config]
    params = random_tensors(SHAPES, torch.float32, device, seed=20)
    grads = random_tensors(SHAPES, torch.float32, device, seed=21)
    buffers = nan_buffers(params)
    for b in buffers[1::2]:
        b.fill_(-math.inf)
    hyper = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=1e-2, nesterov=nesterov)
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    torch_opt = torch.optim.SGD(reference, foreach=False, **hyper)
    torch_opt.step()

    fastopt.sgd_(params, grads, buffers, first_step=True, **hyper)

    originals = random_tensors(SHAPES, torch.float32, device, seed=20)
    for p, ref, b, g, before in zip(params, reference, buffers, grads, originals):
        assert torch.isfinite(p).all() and torch.isfinite(b).all()
        assert_same(p, ref.detach(), device)
        assert_same(b, torch_opt.state[ref]["momentum_buffer"], device)
        # undampened: the grad with weight decay, g + 1e-2 * p
        torch.testing.assert_close(b, g + 1e-2 * before, **tolerance(torch.float32))


# --------------------------------------------------------------------------- against float64 math


# Every momentum configuration on a later step, and those with buffers on their first step too.
STEP_KINDS = [(c, False) for c in MOMENTUM_CONFIGS] + [(c, True) for c in MOMENTUM_CONFIGS if MOMENTUM_CONFIGS[c][0]]
STEP_KIND_IDS = [f"{c}-{'first' if first else 'later'}-step" for c, first in STEP_KINDS]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("config, first_step", STEP_KINDS, ids=STEP_KIND_IDS)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_one_step_matches_float64(device, combo, config, first_step, non_contiguous):
    momentum, dampening, nesterov = MOMENTUM_CONFIGS[config]
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(SHAPES, param_dtype, device, seed=2, non_contiguous=non_contiguous)
    grads = random_tensors(SHAPES, grad_dtype, device, seed=3, non_contiguous=non_contiguous)
    buffers = None
    if momentum:
        buffers = nan_buffers(params, state_dtype) if first_step else random_buffers(params, state_dtype)
    hyper = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=1e-2, nesterov=nesterov, maximize=False)
    expected = [
        sgd_float64(p, g, b, first_step=first_step, grad_scale=4.0, clip_coef=0.5, **hyper)
        for p, g, b in zip(params, grads, buffers or [None] * len(params))
    ]
    grads_before = [g.clone() for g in grads]

    fastopt.sgd_(params, grads, buffers, first_step=first_step, grad_scale=torch.tensor(4.0, device=device),
                 clip_coef=0.5, **hyper)  # fmt: skip

    for i, (p, b) in enumerate(expected):
        # The math runs in fp32 (fp64 for fp64 params); results round once to their storage dtype.
        param_tol = tolerance(param_dtype)
        compute_tol = tolerance(torch.float32 if param_dtype != torch.float64 else torch.float64)
        state_tol = tolerance(state_dtype) if state_dtype != torch.float32 else compute_tol
        assert params[i].dtype == param_dtype
        torch.testing.assert_close(params[i].double().cpu(), p, **param_tol)
        if b is not None:
            assert buffers[i].dtype == state_dtype
            torch.testing.assert_close(buffers[i].double().cpu(), b, **state_tol)
        assert_bitwise_equal(grads[i], grads_before[i])  # grads are read, never written


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
def test_maximize_and_lr_tensor_match_float64(device, maximize):
    params = random_tensors(SHAPES, torch.float32, device, seed=30)
    grads = random_tensors(SHAPES, torch.float32, device, seed=31)
    buffers = random_buffers(params)
    hyper = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=maximize)
    expected = [sgd_float64(p, g, b, lr=0.25, first_step=False, **hyper) for p, g, b in zip(params, grads, buffers)]
    fastopt.sgd_(params, grads, buffers, lr=torch.tensor([0.25], device=device), first_step=False, **hyper)
    for p, b, (p64, b64) in zip(params, buffers, expected):
        torch.testing.assert_close(p.double().cpu(), p64, **tolerance(torch.float32))
        torch.testing.assert_close(b.double().cpu(), b64, **tolerance(torch.float32))


# --------------------------------------------------------------------------- found_inf, grad_scale, clip_coef


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("found", [1.0, 2.0], ids=["found_inf=1", "found_inf=2"])
@pytest.mark.parametrize("config", MOMENTUM_CONFIGS)
@pytest.mark.parametrize("first_step", [False, True], ids=["later-step", "first-step"])
def test_found_inf_changes_nothing(device, found, config, first_step):
    momentum, dampening, nesterov = MOMENTUM_CONFIGS[config]
    params = random_tensors(SHAPES, torch.float32, device, seed=4, non_contiguous=True)
    grads = random_tensors(SHAPES, torch.float32, device, seed=5)
    inject_nonfinite(grads, seed=6)
    buffers = (nan_buffers(params) if first_step else random_buffers(params)) if momentum else None
    tensors = [params] + ([buffers] if buffers else [])
    before = [[clone_layout(t) for t in ts] for ts in tensors]
    grads_before = [g.clone() for g in grads]
    found_inf = torch.tensor([found], device=device)  # torch sums found_inf over devices: 2 happens

    fastopt.sgd_(params, grads, buffers, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=1e-2,
                 nesterov=nesterov, first_step=first_step, found_inf=found_inf,
                 grad_scale=torch.tensor(65536.0, device=device))  # fmt: skip

    for ts, snapshots in zip(tensors, before):
        for t, s in zip(ts, snapshots):
            assert_bitwise_equal(t, s)
    for g, s in zip(grads, grads_before):
        assert_bitwise_equal(g, s)
    assert found_inf.item() == found


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("first_step", [False, True], ids=["later-step", "first-step"])
def test_zero_found_inf_steps_as_without_it(device, first_step):
    params = random_tensors(SHAPES, torch.bfloat16, device, seed=7)
    grads = random_tensors(SHAPES, torch.bfloat16, device, seed=8)
    make = nan_buffers if first_step else random_buffers
    with_flag = ([p.clone() for p in params], make(params, torch.float32))
    without = ([p.clone() for p in params], make(params, torch.float32))
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, first_step=first_step)
    fastopt.sgd_(with_flag[0], grads, with_flag[1], found_inf=torch.zeros(1, device=device), **hyper)
    fastopt.sgd_(without[0], grads, without[1], **hyper)
    for ts, us in zip(with_flag, without):
        for t, u in zip(ts, us):
            assert_bitwise_equal(t, u)
    assert not torch.equal(with_flag[0][2], params[2])  # the step did move the params


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("config", MOMENTUM_CONFIGS)
def test_grad_scale_and_clip_coef_equal_prescaled_grads(device, config):
    momentum, dampening, nesterov = MOMENTUM_CONFIGS[config]
    params = random_tensors(SHAPES, torch.float32, device, seed=9)
    grads = random_tensors(SHAPES, torch.float32, device, seed=10, scale=1024.0)
    fused = ([p.clone() for p in params], random_buffers(params) if momentum else None)
    plain = ([p.clone() for p in params], random_buffers(params) if momentum else None)
    hyper = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=1e-2, nesterov=nesterov)
    fastopt.sgd_(fused[0], grads, fused[1], grad_scale=torch.tensor([1024.0], device=device),
                 clip_coef=torch.tensor(0.25, device=device), **hyper)  # fmt: skip
    fastopt.sgd_(plain[0], [g / 1024.0 * 0.25 for g in grads], plain[1], **hyper)
    for t, u in zip(fused[0] + (fused[1] or []), plain[0] + (plain[1] or [])):
        torch.testing.assert_close(t, u, rtol=0, atol=0)


# --------------------------------------------------------------------------- many tensors, edge cases


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("config", ["dampened", "nesterov"])
def test_five_thousand_small_tensors_match_the_reference(device, config):
    """Many small tensors (several per kernel launch on fused backends, chunk edges everywhere)."""
    momentum, dampening, nesterov = MOMENTUM_CONFIGS[config]
    gen = torch.Generator().manual_seed(40)
    shapes = [tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(0, 3, (1,), generator=gen)),),
                                                  generator=gen)) for _ in range(5000)]  # fmt: skip
    params = random_tensors(shapes, torch.float32, device, seed=41)
    expected_params = [p.clone() for p in params]
    buffers, expected_buffers = nan_buffers(params), nan_buffers(params)
    hyper = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=1e-2, nesterov=nesterov,
                 maximize=True)  # fmt: skip
    for k in range(2):
        grads = random_tensors(shapes, torch.float32, device, seed=42 + k)
        fastopt.sgd_(params, grads, buffers, first_step=(k == 0), **hyper)
        with fastopt.use_backend("torch"):
            fastopt.sgd_(expected_params, grads, expected_buffers, first_step=(k == 0), **hyper)
    for ts, us in ((params, expected_params), (buffers, expected_buffers)):
        for i, (t, u) in enumerate(zip(ts, us)):
            assert_same(t, u, device, f"tensor {i} of 5000 (shape {shapes[i]})")


def test_lr_zero_leaves_params_and_empty_lists_are_fine():
    params = random_tensors([(5,)], seed=11)
    mine = [params[0].clone()]
    buffers = random_buffers(mine)
    fastopt.sgd_(mine, random_tensors([(5,)], seed=12), buffers, lr=0.0, momentum=0.9, weight_decay=0.1)
    assert_bitwise_equal(mine[0], params[0])
    fastopt.sgd_([], [], lr=0.1)  # nothing to do, no error
    fastopt.sgd_([], [], [], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_params_requiring_grad_update_in_place_without_autograd_error(dtype):
    param = torch.nn.Parameter(torch.randn(4, 4, dtype=dtype))
    before = param.detach().clone()
    fastopt.sgd_([param], [torch.randn(4, 4, dtype=dtype)], [torch.randn(4, 4)], lr=0.1, momentum=0.9)
    assert not torch.equal(param.detach(), before) and param.requires_grad and param.grad_fn is None


# --------------------------------------------------------------------------- bad inputs


def sgd_call(n=2, edit=None, **overrides):
    """A valid sgd_ call (with momentum) on n params of shape (3, 4), as (args, kwargs);
    ``overrides`` replace keyword arguments, then ``edit(kwargs)`` may alias tensors."""
    kwargs = {
        "params": [torch.randn(3, 4) for _ in range(n)],
        "grads": [torch.randn(3, 4) for _ in range(n)],
        "momentum_buffers": [torch.randn(3, 4) for _ in range(n)],
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-2,
        **overrides,
    }
    if edit is not None:
        edit(kwargs)
    return kwargs


def _set(name, i, make):
    return lambda kwargs: kwargs[name].__setitem__(i, make(kwargs))


def _overlapping_slices(kwargs):
    base = torch.randn(30)
    kwargs["params"] = [base[:12].view(3, 4), base[8:20].view(3, 4)]


def _lr_is_a_param(kwargs):
    kwargs["lr"] = kwargs["params"][1][0, 0]


BAD_SGD = {
    "nesterov-without-momentum": (dict(momentum=0.0, momentum_buffers=None, nesterov=True), ValueError,
                                  r"Nesterov momentum requires a momentum and zero dampening"),
    "nesterov-with-dampening": (dict(nesterov=True, dampening=0.1), ValueError,
                                r"Nesterov momentum requires a momentum and zero dampening"),
    "momentum-without-buffers": (dict(momentum_buffers=None), ValueError, r"momentum needs momentum_buffers"),
    "buffers-with-momentum-0": (dict(momentum=0.0), ValueError, r"momentum_buffers were given but momentum is 0"),
    "momentum-negative": (dict(momentum=-0.9), ValueError, r"momentum must be >= 0"),
    "dampening-nan": (dict(dampening=NAN), ValueError, r"dampening"),
    "weight_decay-negative": (dict(weight_decay=-1e-2), ValueError, r"weight_decay must be >= 0"),
    "lr-negative": (dict(lr=-0.1), ValueError, r"lr must be >= 0"),
    "lr-nan": (dict(lr=NAN), ValueError, r"lr must be a number"),
    "lr-2-elements": (dict(lr=torch.full((2,), 0.1)), ValueError, r"lr must hold exactly one element"),
    "lr-int-tensor": (dict(lr=torch.tensor(1)), TypeError, r"lr must be a floating-point tensor"),
    "grad_scale-0": (dict(grad_scale=0.0), ValueError, r"grad_scale must be > 0"),
    "clip_coef-negative": (dict(clip_coef=-0.5), ValueError, r"clip_coef must be >= 0"),
    "found_inf-float16": (dict(found_inf=torch.zeros(1, dtype=torch.float16)), TypeError, r"found_inf"),
    "found_inf-not-a-tensor": (dict(found_inf=0.0), TypeError, r"found_inf"),
    "grads-length": (dict(edit=lambda kw: kw["grads"].pop()), ValueError, r"grads has 1 tensors but params has 2"),
    "buffers-length": (dict(edit=lambda kw: kw["momentum_buffers"].pop()), ValueError,
                       r"momentum_buffers has 1 tensors but params has 2"),
    "grads-shape": (dict(edit=_set("grads", 1, lambda kw: torch.randn(4, 3))), ValueError,
                    r"grads\[1\] has shape \(4, 3\) but params\[1\] has shape \(3, 4\)"),
    "buffers-shape": (dict(edit=_set("momentum_buffers", 0, lambda kw: torch.randn(12))), ValueError,
                      r"momentum_buffers\[0\] has shape \(12,\)"),
    "params-int64": (dict(edit=_set("params", 1, lambda kw: torch.randint(1, 9, (3, 4)))), TypeError,
                     r"params\[1\] has dtype torch.int64"),
    "grads-sparse": (dict(edit=_set("grads", 0, lambda kw: torch.randn(3, 4).to_sparse())), TypeError,
                     r"grads\[0\] is a torch.sparse_coo tensor"),
    "grads-on-meta": (dict(edit=_set("grads", 1, lambda kw: torch.empty(3, 4, device="meta"))), ValueError,
                      r"grads\[1\] is on meta"),
    "same-param-twice": (dict(edit=_set("params", 1, lambda kw: kw["params"][0])), ValueError,
                         r"params\[1\] and params\[0\] share memory"),
    "buffer-is-a-param": (dict(edit=_set("momentum_buffers", 1, lambda kw: kw["params"][0])), ValueError,
                          r"momentum_buffers\[1\] and params\[0\] share memory"),
    "grad-is-its-buffer": (dict(edit=_set("grads", 0, lambda kw: kw["momentum_buffers"][0])), ValueError,
                           r"grads\[0\] shares memory with momentum_buffers\[0\]"),
    "grad-is-its-param": (dict(edit=_set("grads", 1, lambda kw: kw["params"][1])), ValueError,
                          r"grads\[1\] shares memory with params\[1\]"),
    "overlapping-param-slices": (dict(edit=_overlapping_slices), ValueError,
                                 r"params\[1\] and params\[0\] share memory"),
    "expanded-buffer": (dict(edit=_set("momentum_buffers", 0, lambda kw: torch.randn(3, 1).expand(3, 4))),
                        ValueError, r"momentum_buffers\[0\] has elements that share memory"),
    "lr-is-a-param": (dict(edit=_lr_is_a_param), ValueError, r"lr shares memory with params\[1\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SGD)
def test_bad_input_is_rejected_and_changes_nothing(case):
    torch.manual_seed(0)
    overrides, error, match = BAD_SGD[case]
    kwargs = sgd_call(**overrides)
    before = snapshot(kwargs)

    with pytest.raises(error, match=match):
        fastopt.sgd_(**kwargs)

    assert not changed(before), f"a rejected call changed tensors {changed(before)} of {len(before)}"


def test_the_call_the_bad_inputs_vary_is_valid():
    """Each bad input above is this call with one thing made bad: so that thing is what is rejected."""
    torch.manual_seed(0)
    kwargs = sgd_call()
    before = snapshot(kwargs)
    fastopt.sgd_(**kwargs, grad_scale=2.0, clip_coef=torch.tensor([0.5]), found_inf=torch.zeros(1), dampening=0.1)
    assert changed(before)
    fastopt.sgd_(**sgd_call(momentum=0.0, momentum_buffers=None))
    fastopt.sgd_(**sgd_call(nesterov=True, lr=torch.tensor(0.1)))
