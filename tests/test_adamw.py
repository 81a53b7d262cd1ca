"""adamw_ against torch.optim.AdamW(foreach=False) and against float64 math; with
decoupled_weight_decay=False (Adam's L2 weight decay), against torch.optim.Adam(foreach=False)."""

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

SHAPES = [(), (1,), (7,), (3, 5), (33, 17), (4, 3, 3, 3), (0,), (129,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


class AdamWState:
    """fastopt.adamw_'s inputs for a list of params, with states as torch.optim.AdamW keeps them."""

    def __init__(self, params, state_dtype=None, amsgrad=False):
        self.params = params
        dtype = lambda p: state_dtype or p.dtype  # noqa: E731
        # Non-zero states, as after some steps, so every term of the update matters.
        gen = torch.Generator().manual_seed(123)
        self.exp_avgs = [(torch.randn(p.shape, generator=gen) * 0.1).to(p.device, dtype(p)) for p in params]
        self.exp_avg_sqs = [(torch.rand(p.shape, generator=gen) * 0.01).to(p.device, dtype(p)) for p in params]
        self.max_exp_avg_sqs = [v * 1.5 for v in self.exp_avg_sqs] if amsgrad else None
        self.steps = [torch.tensor(3.0, device=p.device) for p in params]

    def tensors(self):
        return [self.params, self.exp_avgs, self.exp_avg_sqs, self.steps] + (
            [self.max_exp_avg_sqs] if self.max_exp_avg_sqs is not None else []
        )

    def step(self, grads, **kwargs):
        fastopt.adamw_(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
            max_exp_avg_sqs=self.max_exp_avg_sqs, **kwargs,
        )  # fmt: skip


def adamw_float64(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay,
                  maximize=False, max_exp_avg_sq=None, grad_scale=1.0, clip_coef=1.0, decoupled=True):  # fmt: skip
    """One AdamW step (Loshchilov & Hutter; torch.optim.AdamW's form) in float64; with
    ``decoupled=False``, Adam's (Kingma & Ba; torch.optim.Adam's L2 term: weight_decay * param
    added to the grad, the param not decayed)."""
    p, g, m, v = (t.detach().to("cpu", torch.float64, copy=True) for t in (param, grad, exp_avg, exp_avg_sq))
    g = g / grad_scale * clip_coef
    g = -g if maximize else g
    step = float(step) + 1
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    vmax = None if max_exp_avg_sq is None else torch.maximum(max_exp_avg_sq.double().cpu(), v)
    second = v if vmax is None else vmax
    denom = second.sqrt() / math.sqrt(1 - beta2**step) + eps
    p = p - lr / (1 - beta1**step) * m / denom
    return p, m, v, step, vmax


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "weight_decay, amsgrad, maximize, lr_tensor",
    list(itertools.product([0.0, 0.1], [False, True], [False, True], [False, True])),
    ids=lambda v: str(v),
)
def test_trajectory_matches_torch_adamw(device, weight_decay, amsgrad, maximize, lr_tensor):
    params = random_tensors(SHAPES, torch.float32, device, seed=1)
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = torch.optim.AdamW(
        reference, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, foreach=False,
    )  # fmt: skip
    state = AdamWState(params, amsgrad=amsgrad)
    for p in reference:  # start torch from the same states
        torch_opt.state[p]["step"] = torch.tensor(3.0)
    for i, p in enumerate(reference):
        torch_opt.state[p].update(exp_avg=state.exp_avgs[i].clone(), exp_avg_sq=state.exp_avg_sqs[i].clone())
        if amsgrad:
            torch_opt.state[p]["max_exp_avg_sq"] = state.max_exp_avg_sqs[i].clone()
    lr = torch.tensor(1e-2, device=device) if lr_tensor else 1e-2

    for k in range(8):
        grads = random_tensors(SHAPES, torch.float32, device, seed=100 + k)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch_opt.step()
        state.step(grads, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=weight_decay, maximize=maximize)

    for i, p in enumerate(reference):
        torch_state = torch_opt.state[p]
        # Same formula and evaluation order as torch: bit-identical with a float lr. torch reads a
        # tensor lr through other ops (its rounding differs by an ulp or so).
        close = dict(rtol=2e-6, atol=1e-7) if lr_tensor else dict(rtol=0, atol=0)
        if active_backend() != "torch":  # fused kernels round differently: within fp32 rounding
            close = tolerance(torch.float32)
        torch.testing.assert_close(state.params[i], p.detach(), **close)
        torch.testing.assert_close(state.exp_avgs[i], torch_state["exp_avg"], **close)
        torch.testing.assert_close(state.exp_avg_sqs[i], torch_state["exp_avg_sq"], **close)
        if amsgrad:
            torch.testing.assert_close(state.max_exp_avg_sqs[i], torch_state["max_exp_avg_sq"], **close)
        assert state.steps[i].item() == torch_state["step"].item() == 11.0


DTYPE_COMBOS = {  # (param, grad, state) dtypes
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16, torch.float16),
    "fp32-params-bf16-grads": (torch.float32, torch.bfloat16, torch.float32),
    "bf16-params-fp32-states": (torch.bfloat16, torch.bfloat16, torch.float32),
    "fp64": (torch.float64, torch.float64, torch.float64),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_one_step_matches_float64(device, combo, amsgrad, non_contiguous):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(SHAPES, param_dtype, device, seed=2, non_contiguous=non_contiguous)
    grads = random_tensors(SHAPES, grad_dtype, device, seed=3, non_contiguous=non_contiguous)
    state = AdamWState(params, state_dtype, amsgrad)
    steps_before = [3.0, 0.0, 1.0, 7.0, 3.0, 20.0, 3.0, 3.0]  # each param at its own step
    for s, value in zip(state.steps, steps_before):
        s.fill_(value)
    expected = [
        adamw_float64(p, g, m, v, s, max_exp_avg_sq=vm, grad_scale=4.0, clip_coef=0.5, **HYPER)
        for p, g, m, v, s, vm in zip(params, grads, state.exp_avgs, state.exp_avg_sqs, steps_before,
                                     state.max_exp_avg_sqs or [None] * len(params))
    ]  # fmt: skip
    grads_before = [g.clone() for g in grads]

    state.step(grads, grad_scale=torch.tensor(4.0, device=device), clip_coef=0.5, **HYPER)

    for i, (p, m, v, step, vmax) in enumerate(expected):
        # The math runs in fp32 (fp64 for fp64 params); results round once to their storage dtype.
        param_tol = tolerance(param_dtype if param_dtype != torch.float64 else torch.float64)
        compute_tol = tolerance(torch.float32 if param_dtype != torch.float64 else torch.float64)
        state_tol = tolerance(state_dtype) if state_dtype != torch.float32 else compute_tol
        torch.testing.assert_close(state.params[i].double().cpu(), p, **param_tol)
        torch.testing.assert_close(state.exp_avgs[i].double().cpu(), m, **state_tol)
        torch.testing.assert_close(state.exp_avg_sqs[i].double().cpu(), v, **state_tol)
        if vmax is not None:
            torch.testing.assert_close(state.max_exp_avg_sqs[i].double().cpu(), vmax, **state_tol)
        assert state.steps[i].item() == step
        assert_bitwise_equal(grads[i], grads_before[i])  # grads are read, never written


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("found", [1.0, 2.0], ids=["found_inf=1", "found_inf=2"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_found_inf_changes_nothing(device, found, amsgrad):
    params = random_tensors(SHAPES, torch.float32, device, seed=4, non_contiguous=True)
    grads = random_tensors(SHAPES, torch.float32, device, seed=5)
    inject_nonfinite(grads, seed=6)
    state = AdamWState(params, amsgrad=amsgrad)
    before = [[clone_layout(t) for t in ts] for ts in state.tensors()]
    grads_before = [g.clone() for g in grads]
    found_inf = torch.tensor([found], device=device)  # torch sums found_inf over devices: 2 happens

    state.step(grads, found_inf=found_inf, grad_scale=torch.tensor(65536.0, device=device), **HYPER)

    for tensors, snapshots in zip(state.tensors(), before):
        for t, snapshot in zip(tensors, snapshots):
            assert_bitwise_equal(t, snapshot)
    for g, snapshot in zip(grads, grads_before):
        assert_bitwise_equal(g, snapshot)
    assert found_inf.item() == found


@pytest.mark.parametrize("device", devices())
def test_zero_found_inf_steps_as_without_it(device):
    params = random_tensors(SHAPES, torch.bfloat16, device, seed=7)
    grads = random_tensors(SHAPES, torch.bfloat16, device, seed=8)
    with_flag = AdamWState([p.clone() for p in params], torch.float32)
    without = AdamWState([p.clone() for p in params], torch.float32)
    with_flag.step(grads, found_inf=torch.zeros(1, device=device), **HYPER)
    without.step(grads, **HYPER)
    for ts, us in zip(with_flag.tensors(), without.tensors()):
        for t, u in zip(ts, us):
            assert_bitwise_equal(t, u)


@pytest.mark.parametrize("device", devices())
def test_grad_scale_and_clip_coef_equal_prescaled_grads(device):
    params = random_tensors(SHAPES, torch.float32, device, seed=9)
    grads = random_tensors(SHAPES, torch.float32, device, seed=10, scale=1024.0)
    fused = AdamWState([p.clone() for p in params])
    plain = AdamWState([p.clone() for p in params])
    fused.step(grads, grad_scale=torch.tensor([1024.0], device=device), clip_coef=torch.tensor(0.25, device=device),
               **HYPER)  # fmt: skip
    plain.step([g / 1024.0 * 0.25 for g in grads], **HYPER)
    for ts, us in zip(fused.tensors(), plain.tensors()):
        for t, u in zip(ts, us):
            torch.testing.assert_close(t, u, rtol=0, atol=0)


def test_lr_zero_and_empty_lists():
    params = random_tensors([(5,)], seed=11)
    state = AdamWState([p.clone() for p in params])
    state.step(random_tensors([(5,)], seed=12), lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    assert_bitwise_equal(state.params[0], params[0])
    fastopt.adamw_([], [], [], [], [], **HYPER)  # nothing to do, no error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_params_requiring_grad_update_in_place_without_autograd_error(dtype):
    param = torch.nn.Parameter(torch.randn(4, 4, dtype=dtype))
    state = AdamWState([param], torch.float32)
    before = param.detach().clone()
    state.step([torch.randn(4, 4, dtype=dtype)], **HYPER)
    assert not torch.equal(param.detach(), before) and param.requires_grad and param.grad_fn is None


# --------------------------------------------------------------------------- Adam: decoupled_weight_decay=False


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "amsgrad, maximize, lr_tensor", list(itertools.product([False, True], [False, True], [False, True])),
    ids=lambda v: str(v),
)
def test_trajectory_with_l2_weight_decay_matches_torch_adam(device, amsgrad, maximize, lr_tensor):
    params = random_tensors(SHAPES, torch.float32, device, seed=31)
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = torch.optim.Adam(
        reference, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
        amsgrad=amsgrad, maximize=maximize, foreach=False,
    )  # fmt: skip
    state = AdamWState(params, amsgrad=amsgrad)
    for i, p in enumerate(reference):  # start torch from the same states
        torch_opt.state[p].update(step=torch.tensor(3.0), exp_avg=state.exp_avgs[i].clone(),
                                  exp_avg_sq=state.exp_avg_sqs[i].clone())  # fmt: skip
        if amsgrad:
            torch_opt.state[p]["max_exp_avg_sq"] = state.max_exp_avg_sqs[i].clone()
    lr = torch.tensor(1e-2, device=device) if lr_tensor else 1e-2

    for k in range(8):
        grads = random_tensors(SHAPES, torch.float32, device, seed=300 + k)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch_opt.step()
        state.step(grads, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=maximize,
                   decoupled_weight_decay=False)  # fmt: skip

    for i, p in enumerate(reference):
        torch_state = torch_opt.state[p]
        # As AdamW's trajectory above: bit-identical on the reference with a float lr.
        close = dict(rtol=2e-6, atol=1e-7) if lr_tensor else dict(rtol=0, atol=0)
        if active_backend() != "torch":  # fused kernels round differently: within fp32 rounding
            close = tolerance(torch.float32)
        torch.testing.assert_close(state.params[i], p.detach(), **close)
        torch.testing.assert_close(state.exp_avgs[i], torch_state["exp_avg"], **close)
        torch.testing.assert_close(state.exp_avg_sqs[i], torch_state["exp_avg_sq"], **close)
        if amsgrad:
            torch.testing.assert_close(state.max_exp_avg_sqs[i], torch_state["max_exp_avg_sq"], **close)
        assert state.steps[i].item() == torch_state["step"].item() == 11.0


@pytest.mark.parametrize("device", devices())
def test_l2_weight_decay_is_not_adamw_decay(device):
    """The flag changes the math: Adam's L2 term goes through the moments (and is normalised by
    them), AdamW's decays the param directly; from the same state the two differ."""
    params = random_tensors(SHAPES, torch.float32, device, seed=32)
    grads = random_tensors(SHAPES, torch.float32, device, seed=33)
    adam, adamw = AdamWState([p.clone() for p in params]), AdamWState([p.clone() for p in params])
    adam.step(grads, decoupled_weight_decay=False, **HYPER)
    adamw.step(grads, decoupled_weight_decay=True, **HYPER)
    for a, b in zip(adam.params + adam.exp_avgs, adamw.params + adamw.exp_avgs):
        if a.numel():
            assert not torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_one_step_with_l2_weight_decay_matches_float64(device, combo, amsgrad, non_contiguous):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(SHAPES, param_dtype, device, seed=34, non_contiguous=non_contiguous)
    grads = random_tensors(SHAPES, grad_dtype, device, seed=35, non_contiguous=non_contiguous)
    state = AdamWState(params, state_dtype, amsgrad)
    steps_before = [3.0, 0.0, 1.0, 7.0, 3.0, 20.0, 3.0, 3.0]
    for s, value in zip(state.steps, steps_before):
        s.fill_(value)
    hyper = dict(HYPER, weight_decay=0.5)  # through the moments: a large decay to be seen in bf16
    expected = [
        adamw_float64(p, g, m, v, s, max_exp_avg_sq=vm, grad_scale=4.0, clip_coef=0.5, maximize=True,
                      decoupled=False, **hyper)
        for p, g, m, v, s, vm in zip(params, grads, state.exp_avgs, state.exp_avg_sqs, steps_before,
                                     state.max_exp_avg_sqs or [None] * len(params))
    ]  # fmt: skip
    grads_before = [g.clone() for g in grads]

    state.step(grads, grad_scale=torch.tensor(4.0, device=device), clip_coef=0.5, maximize=True,
               decoupled_weight_decay=False, **hyper)  # fmt: skip

    for i, (p, m, v, step, vmax) in enumerate(expected):
        param_tol = tolerance(param_dtype)
        compute_tol = tolerance(torch.float32 if param_dtype != torch.float64 else torch.float64)
        state_tol = tolerance(state_dtype) if state_dtype != torch.float32 else compute_tol
        torch.testing.assert_close(state.params[i].double().cpu(), p, **param_tol)
        torch.testing.assert_close(state.exp_avgs[i].double().cpu(), m, **state_tol)
        torch.testing.assert_close(state.exp_avg_sqs[i].double().cpu(), v, **state_tol)
        if vmax is not None:
            torch.testing.assert_close(state.max_exp_avg_sqs[i].double().cpu(), vmax, **state_tol)
        assert state.steps[i].item() == step
        assert_bitwise_equal(grads[i], grads_before[i])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("found", [1.0, 2.0], ids=["found_inf=1", "found_inf=2"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_found_inf_with_l2_weight_decay_changes_nothing(device, found, amsgrad):
    params = random_tensors(SHAPES, torch.bfloat16, device, seed=36, non_contiguous=True)
    grads = random_tensors(SHAPES, torch.bfloat16, device, seed=37)
    inject_nonfinite(grads, seed=38)
    state = AdamWState(params, torch.float32, amsgrad=amsgrad)
    before = [[clone_layout(t) for t in ts] for ts in state.tensors()]
    grads_before = [g.clone() for g in grads]
    found_inf = torch.tensor([found], device=device)

    state.step(grads, found_inf=found_inf, grad_scale=torch.tensor(65536.0, device=device),
               decoupled_weight_decay=False, **HYPER)  # fmt: skip

    for tensors, snapshots in zip(state.tensors(), before):
        for t, snapshot in zip(tensors, snapshots):
            assert_bitwise_equal(t, snapshot)
    for g, snapshot in zip(grads, grads_before):
        assert_bitwise_equal(g, snapshot)
    assert found_inf.item() == found


@pytest.mark.parametrize("device", devices())
def test_zero_found_inf_with_l2_weight_decay_steps_as_without_it(device):
    params = random_tensors(SHAPES, torch.bfloat16, device, seed=39)
    grads = random_tensors(SHAPES, torch.bfloat16, device, seed=40)
    with_flag = AdamWState([p.clone() for p in params], torch.float32, amsgrad=True)
    without = AdamWState([p.clone() for p in params], torch.float32, amsgrad=True)
    with_flag.step(grads, found_inf=torch.zeros(1, device=device), decoupled_weight_decay=False, **HYPER)
    without.step(grads, decoupled_weight_decay=False, **HYPER)
    for ts, us in zip(with_flag.tensors(), without.tensors()):
        for t, u in zip(ts, us):
            assert_bitwise_equal(t, u)


@pytest.mark.parametrize("device", devices())
def test_zero_dim_param_steps_as_a_one_element_param(device):
    """The math is per element: a 0-d param and a 1-element param of the same value, states and
    grad step to the same bits (here with a tensor lr, whose decay factor is formed on the device)."""
    values = random_tensors([(64,)], torch.float32, device, seed=41)[0]
    grads = random_tensors([(64,)], torch.float32, device, seed=42)[0]
    results = []
    for shape in [(), (1,)]:
        state = AdamWState([v.clone().reshape(shape) for v in values])
        state.step([g.reshape(shape) for g in grads], **dict(HYPER, lr=torch.tensor(1e-2, device=device)))
        results.append([torch.stack([t.reshape(()) for t in ts]) for ts in state.tensors()])
    for zero_dim, one_element in zip(*results):
        assert_bitwise_equal(zero_dim, one_element)
