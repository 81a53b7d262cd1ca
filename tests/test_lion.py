"""lion_ against the paper's update rule in float64, against lucidrains' lion-pytorch formulation and
against fastopt's reference backend.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * (sign(c) + weight_decay * p)
    m = beta2 * m + (1 - beta2) * g

sign() is discontinuous: where c is within rounding of 0, two correct implementations may move a
param by +lr and -lr. Comparisons from the same state leave such elements out (``near_tie``) and
check them on their own (the param moved by one of -lr, 0, +lr); the momentum never depends on the
param, so trajectories stay comparable everywhere else. fp32 results are bit-identical to torch's
ops on the ``torch`` and ``cpu`` backends (csrc/common/element_math.h: torch's lerp rounding, and
``p * decay - lr * direction`` rounds the same fused or not); other backends agree within fp32
rounding.
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
HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, weight_decay=0.1)
NAN = math.nan


def bit_exact_with_torch(device) -> bool:
    """Whether this lane must reproduce torch's ops bit for bit: the reference runs them; the cpu
    backend's kernels round as torch's CPU kernels. Fused kernels elsewhere: within fp32 rounding."""
    backend = active_backend()
    return backend == "torch" or (backend == "cpu" and torch.device(device).type == "cpu")


def random_exp_avgs(params, dtype=None, seed=123):
    """Momenta as after some steps: random, non-zero, of the grads' magnitude."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.device, dtype or p.dtype) for p in params]


def effective_grads64(grads, *, maximize=False, grad_scale=1.0, clip_coef=1.0):
    out = []
    for g in grads:
        g = g.detach().to("cpu", torch.float64) / grad_scale * clip_coef
        out.append(-g if maximize else g)
    return out


def near_tie(exp_avg, grad64, beta1, rel=1e-5):
    """Elements whose direction beta1 * m + (1 - beta1) * g is within rounding of 0 (relative to the
    terms' sizes), where sign() of a computed direction may go either way."""
    m = exp_avg.detach().to("cpu", torch.float64)
    c = beta1 * m + (1 - beta1) * grad64
    return c.abs() <= rel * (beta1 * m.abs() + (1 - beta1) * grad64.abs())


def lion_paper_float64(param, grad64, exp_avg, *, lr, beta1, beta2, weight_decay):
    """Algorithm 2 of the paper, in float64 (grad64: the grad as the step uses it)."""
    p, m = (t.detach().to("cpu", torch.float64, copy=True) for t in (param, exp_avg))
    c = beta1 * m + (1 - beta1) * grad64
    p = p - lr * (torch.sign(c) + weight_decay * p)
    m = beta2 * m + (1 - beta2) * grad64
    return p, m


def lion_lucidrains_(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False):
    """lucidrains' lion-pytorch ``update_fn`` (the paper's rule in another form), inline, in the
    tensors' own dtype: p *= 1 - lr * wd; p -= lr * sign(lerp(m, g, 1 - beta1)); m = lerp(m, g, 1 - beta2).
    A tensor lr is used as its value (``1 - lr * wd`` formed in double, as fastopt forms it)."""
    lr = float(lr)
    for p, g, m in zip(params, grads, exp_avgs):
        g = -g if maximize else g
        p.mul_(1 - lr * weight_decay)
        update = m.clone().lerp_(g, 1 - beta1).sign_()
        p.add_(update, alpha=-lr)
        m.lerp_(g, 1 - beta2)


def assert_params_match(actual, expected, ambiguous, device, msg=""):
    """Bit for bit where this lane must be; else within fp32 rounding away from near-ties (which
    ``assert_moved_by_a_sign`` checks)."""
    if bit_exact_with_torch(device):
        assert_bitwise_equal(actual, expected, msg)
        return
    keep = ~ambiguous.to(actual.device)
    torch.testing.assert_close(actual[keep], expected[keep], msg=msg or None, **tolerance(torch.float32))


def assert_state_matches(actual, expected, device, msg=""):
    if bit_exact_with_torch(device):
        assert_bitwise_equal(actual, expected, msg)
    else:
        torch.testing.assert_close(actual, expected, msg=msg or None, **tolerance(torch.float32))


def assert_moved_by_a_sign(new_param, old_param, *, lr, weight_decay, close):
    """Each element is old * (1 - lr * wd) - lr * s for some s in {-1, 0, +1}."""
    old = old_param.detach().to("cpu", torch.float64).reshape(-1)
    new = new_param.detach().to("cpu", torch.float64).reshape(-1)
    decayed = old * (1 - lr * weight_decay)
    candidates = torch.stack([decayed - lr * s for s in (-1.0, 0.0, 1.0)])
    bound = close["atol"] + close["rtol"] * candidates.abs()
    assert ((new - candidates).abs() <= bound).any(dim=0).all(), "a near-tie element moved by no sign"


def make_ties(grads, exp_avgs, beta1, *, grad_factor=1.0, every=3):
    """Every ``every``-th element's grad set so that the grad as the step uses it (the stored grad
    divided by ``grad_factor``: grad_scale / clip_coef, negative when maximizing) is -beta1 /
    (1 - beta1) times the momentum, rounded to the grad's dtype: directions within rounding of 0
    (fp32, fp64 grads) or just off it (bf16 / fp16 grads, which the sign must then get right)."""
    for g, m in zip(grads, exp_avgs):
        if g.numel() == 0:
            continue
        assert g.is_contiguous()
        g.view(-1)[::every] = (-beta1 / (1 - beta1) * grad_factor * m.reshape(-1)[::every].double()).to(g.dtype)


# --------------------------------------------------------------------------- against the paper, one step


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("combo", DTYPE_COMBOS)
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_one_step_matches_paper_float64(device, combo, maximize, non_contiguous):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(SHAPES, param_dtype, device, seed=2, non_contiguous=non_contiguous)
    grads = random_tensors(SHAPES, grad_dtype, device, seed=3)
    exp_avgs = random_exp_avgs(params, state_dtype)
    make_ties(grads, exp_avgs, 0.9, grad_factor=-8.0 if maximize else 8.0)
    if non_contiguous:  # the same values through strided views
        grads = [g.t().contiguous().t() if g.ndim == 2 else g for g in grads]
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1)
    grads64 = effective_grads64(grads, maximize=maximize, grad_scale=4.0, clip_coef=0.5)
    ambiguous = [near_tie(m, g, hyper["beta1"]) for m, g in zip(exp_avgs, grads64)]
    before = [p.clone() for p in params]
    expected = [lion_paper_float64(p, g, m, **hyper) for p, g, m in zip(params, grads64, exp_avgs)]
    grads_before = [g.clone() for g in grads]

    fastopt.lion_(params, grads, exp_avgs, maximize=maximize, grad_scale=torch.tensor(4.0, device=device),
                  clip_coef=0.5, **hyper)  # fmt: skip

    param_tol = tolerance(param_dtype)
    compute_tol = tolerance(torch.float32 if param_dtype != torch.float64 else torch.float64)
    state_tol = tolerance(state_dtype) if state_dtype != torch.float32 else compute_tol
    for i, ((p64, m64), tie) in enumerate(zip(expected, ambiguous)):
        assert params[i].dtype == param_dtype and exp_avgs[i].dtype == state_dtype
        got = params[i].double().cpu()
        torch.testing.assert_close(got[~tie], p64[~tie], **param_tol, msg=f"params[{i}]")
        assert_moved_by_a_sign(got[tie], before[i][tie.to(device)], lr=0.1, weight_decay=0.1, close=param_tol)
        torch.testing.assert_close(exp_avgs[i].double().cpu(), m64, **state_tol, msg=f"exp_avgs[{i}]")
        assert_bitwise_equal(grads[i], grads_before[i])  # grads are read, never written
    if grad_dtype in (torch.float32, torch.float64):  # the ties made there are near-ties: some were checked
        assert sum(int(t.sum()) for t in ambiguous) > 100


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=describe_dtype)
def test_param_update_is_bit_exact_on_every_backend_away_from_ties(device, dtype):
    """csrc/common/element_math.h's lion_update: the direction is -1, 0 or +1, so p * (1 - lr * wd) - lr * s
    rounds the same whether or not the last product is fused; from the same direction every
    backend gives the param torch's ops give (p.mul_(decay) then p.add_(s, alpha=-lr)), bit for
    bit. Only the momentum's lerp may round otherwise off the cpu backend."""
    params = random_tensors(SHAPES, dtype, device, seed=80)
    grads = random_tensors(SHAPES, dtype, device, seed=81)
    exp_avgs = random_exp_avgs(params, seed=82)
    ties = [near_tie(m, g, 0.9) for m, g in zip(exp_avgs, effective_grads64(grads))]
    expected, expected_m = [p.clone() for p in params], [m.clone() for m in exp_avgs]
    lion_lucidrains_(expected, grads, expected_m, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)

    fastopt.lion_(params, grads, exp_avgs, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)

    for i, tie in enumerate(ties):
        keep = ~tie.to(device)
        assert_bitwise_equal(params[i][keep], expected[i][keep], f"params[{i}]")
        if dtype == torch.float32:
            assert_state_matches(exp_avgs[i], expected_m[i], device, f"exp_avgs[{i}]")
        else:
            torch.testing.assert_close(exp_avgs[i], expected_m[i], **tolerance(torch.float64))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_zero_direction_moves_param_only_by_weight_decay(device, weight_decay):
    """With beta1 = 0.5 and g = -m the direction is exactly 0 in any evaluation order: sign(0) = 0
    (the paper's, torch's and numpy's sign), so the param is only decayed, bit for bit. An
    implementation through copysign or (c >= 0) would move it by lr."""
    params = random_tensors([(7,), (33, 17), (129,)], torch.float32, device, seed=50)
    exp_avgs = random_exp_avgs(params)
    grads = [-m for m in exp_avgs]
    expected = [p * torch.tensor(1 - 0.1 * weight_decay, dtype=torch.float32) for p in params]
    expected_m = [m.clone().lerp_(g, 0.01) for m, g in zip(exp_avgs, grads)]

    fastopt.lion_(params, grads, exp_avgs, lr=0.1, beta1=0.5, beta2=0.99, weight_decay=weight_decay)

    for p, e in zip(params, expected):
        assert_bitwise_equal(p, e)
    for m, e in zip(exp_avgs, expected_m):
        assert_state_matches(m, e, device)


@pytest.mark.parametrize("device", devices())
def test_nan_direction_moves_param_only_by_weight_decay_as_torch_sign(device):
    """torch.sign(nan) is 0 (its CPU and CUDA kernels: (0 < x) - (x < 0)), so where the momentum
    is nan the reference decays the param and moves it no further; every backend does the same
    (the momentum stays nan). The nans sit at random positions of random data."""
    params = random_tensors([(7,), (33, 17), (2 * 65536 + 5,)], torch.float32, device, seed=51)
    exp_avgs = random_exp_avgs(params, seed=52)
    grads = random_tensors([p.shape for p in params], torch.float32, device, seed=53)
    where = inject_nonfinite(exp_avgs, seed=54, count=6, values=(NAN, -NAN))
    decayed = [p * torch.tensor(1 - 0.1 * 0.1, dtype=torch.float32) for p in params]
    fastopt.lion_(params, grads, exp_avgs, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1)
    for i, flat, _ in where:
        assert params[i].reshape(-1)[flat].item() == decayed[i].reshape(-1)[flat].item(), (i, flat)
        assert math.isnan(exp_avgs[i].reshape(-1)[flat].item())
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_sign_direction_is_exactly_lr_per_element():
    """Without weight decay each element moves by exactly lr (fp64: no rounding left in p - lr * s
    for these values), in the direction opposite to sign(c)."""
    p = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    m = torch.tensor([0.3, -0.3, 1e-3, -4.0], dtype=torch.float64)
    g = torch.tensor([-0.5, 5.0, -1.0, 2.0], dtype=torch.float64)
    # c = 0.9 m + 0.1 g = [0.22, 0.23, -0.0991, -3.4]
    fastopt.lion_([p], [g], [m], lr=0.25, beta1=0.9, beta2=0.99)
    assert p.tolist() == [0.75, -2.25, 0.75, 3.25]


# --------------------------------------------------------------------------- trajectories


def lion_trajectory_case(device, seed):
    params = random_tensors(SHAPES, torch.float32, device, seed=seed)
    return params, random_exp_avgs(params, seed=seed + 1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "weight_decay, maximize, lr_tensor",
    list(itertools.product([0.0, 0.1], [False, True], [False, True])),
    ids=lambda v: str(v),
)
def test_trajectory_matches_lucidrains_formula(device, weight_decay, maximize, lr_tensor):
    params, exp_avgs = lion_trajectory_case(device, seed=1)
    ref_params, ref_exp_avgs = [p.clone() for p in params], [m.clone() for m in exp_avgs]
    lr = torch.tensor(0.01, device=device) if lr_tensor else 0.01
    ever_tied = [torch.zeros(s, dtype=torch.bool) for s in SHAPES]

    for k in range(20):
        grads = random_tensors(SHAPES, torch.float32, device, seed=100 + k)
        grads64 = effective_grads64(grads, maximize=maximize)
        for tied, m, g in zip(ever_tied, ref_exp_avgs, grads64):
            tied |= near_tie(m, g, 0.9)
        lion_lucidrains_(ref_params, grads, ref_exp_avgs, lr=lr, beta1=0.9, beta2=0.99, weight_decay=weight_decay,
                         maximize=maximize)  # fmt: skip
        fastopt.lion_(params, grads, exp_avgs, lr=lr, beta1=0.9, beta2=0.99, weight_decay=weight_decay,
                      maximize=maximize)  # fmt: skip

    for i in range(len(SHAPES)):
        assert_params_match(params[i], ref_params[i], ever_tied[i], device, f"params[{i}] (shape {SHAPES[i]})")
        assert_state_matches(exp_avgs[i], ref_exp_avgs[i], device, f"exp_avgs[{i}]")
    start, _ = lion_trajectory_case(device, seed=1)
    assert all(not torch.equal(p, q) for p, q in zip(params, start) if p.numel())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.1, True)], ids=str)
def test_trajectory_matches_reference_backend(device, weight_decay, maximize):
    if active_backend() == "torch":
        pytest.skip("this lane runs the reference itself (the lucidrains trajectory covers it)")
    params, exp_avgs = lion_trajectory_case(device, seed=60)
    ref_params, ref_exp_avgs = [p.clone() for p in params], [m.clone() for m in exp_avgs]
    ever_tied = [torch.zeros(s, dtype=torch.bool) for s in SHAPES]
    hyper = dict(lr=torch.tensor(0.01, device=device), beta1=0.9, beta2=0.99, weight_decay=weight_decay,
                 maximize=maximize, grad_scale=8.0, clip_coef=torch.tensor(0.5, device=device))  # fmt: skip

    for k in range(20):
        grads = random_tensors(SHAPES, torch.float32, device, seed=200 + k, scale=8.0)
        grads64 = effective_grads64(grads, maximize=maximize, grad_scale=8.0, clip_coef=0.5)
        for tied, m, g in zip(ever_tied, ref_exp_avgs, grads64):
            tied |= near_tie(m, g, 0.9)
        with fastopt.use_backend("torch"):
            fastopt.lion_(ref_params, grads, ref_exp_avgs, **hyper)
        fastopt.lion_(params, grads, exp_avgs, **hyper)

    for i in range(len(SHAPES)):
        assert_params_match(params[i], ref_params[i], ever_tied[i], device, f"params[{i}]")
        assert_state_matches(exp_avgs[i], ref_exp_avgs[i], device, f"exp_avgs[{i}]")


@pytest.mark.parametrize("device", devices())
def test_zero_dim_param_steps_as_a_one_element_param(device):
    """The math is per element: a 0-d param and a 1-element param of the same value, state and grad
    step to the same bits (here with weight decay and a tensor lr, where the decay factor is formed
    on the device)."""
    values = random_tensors([(64,)], torch.float32, device, seed=70)[0]
    grads = random_tensors([(64,)], torch.float32, device, seed=71)[0]
    exp_avgs = random_exp_avgs([values], seed=72)[0]
    zero_dim = ([v.clone().reshape(()) for v in values], [m.clone().reshape(()) for m in exp_avgs])
    one_element = ([v.clone().reshape(1) for v in values], [m.clone().reshape(1) for m in exp_avgs])
    hyper = dict(lr=torch.tensor(0.01, device=device), beta1=0.9, beta2=0.99, weight_decay=0.1)
    fastopt.lion_(zero_dim[0], [g.reshape(()) for g in grads], zero_dim[1], **hyper)
    fastopt.lion_(one_element[0], [g.reshape(1) for g in grads], one_element[1], **hyper)
    assert_bitwise_equal(torch.stack(zero_dim[0]), torch.cat(one_element[0]))
    assert_bitwise_equal(torch.stack(zero_dim[1]), torch.cat(one_element[1]))


# --------------------------------------------------------------------------- found_inf, grad_scale, clip_coef


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("found", [1.0, 2.0], ids=["found_inf=1", "found_inf=2"])
@pytest.mark.parametrize("combo", ["fp32", "bf16-params-fp32-states"])
def test_found_inf_changes_nothing(device, found, combo):
    param_dtype, grad_dtype, state_dtype = DTYPE_COMBOS[combo]
    params = random_tensors(SHAPES, param_dtype, device, seed=4, non_contiguous=True)
    grads = random_tensors(SHAPES, grad_dtype, device, seed=5)
    inject_nonfinite(grads, seed=6)
    exp_avgs = random_exp_avgs(params, state_dtype)
    before = [[clone_layout(t) for t in ts] for ts in (params, exp_avgs)]
    grads_before = [g.clone() for g in grads]
    found_inf = torch.tensor([found], device=device)

    fastopt.lion_(params, grads, exp_avgs, found_inf=found_inf, grad_scale=torch.tensor(65536.0, device=device),
                  **HYPER)  # fmt: skip

    for ts, snapshots in zip((params, exp_avgs), before):
        for t, s in zip(ts, snapshots):
            assert_bitwise_equal(t, s)
    for g, s in zip(grads, grads_before):
        assert_bitwise_equal(g, s)
    assert found_inf.item() == found


@pytest.mark.parametrize("device", devices())
def test_zero_found_inf_steps_as_without_it(device):
    params = random_tensors(SHAPES, torch.bfloat16, device, seed=7)
    grads = random_tensors(SHAPES, torch.bfloat16, device, seed=8)
    with_flag = ([p.clone() for p in params], random_exp_avgs(params, torch.float32))
    without = ([p.clone() for p in params], random_exp_avgs(params, torch.float32))
    fastopt.lion_(with_flag[0], grads, with_flag[1], found_inf=torch.zeros(1, device=device), **HYPER)
    fastopt.lion_(without[0], grads, without[1], **HYPER)
    for ts, us in zip(with_flag, without):
        for t, u in zip(ts, us):
            assert_bitwise_equal(t, u)
    assert not torch.equal(with_flag[0][2], params[2])


@pytest.mark.parametrize("device", devices())
def test_grad_scale_and_clip_coef_equal_prescaled_grads(device):
    params = random_tensors(SHAPES, torch.float32, device, seed=9)
    grads = random_tensors(SHAPES, torch.float32, device, seed=10, scale=1024.0)
    fused = ([p.clone() for p in params], random_exp_avgs(params))
    plain = ([p.clone() for p in params], random_exp_avgs(params))
    fastopt.lion_(fused[0], grads, fused[1], grad_scale=torch.tensor([1024.0], device=device),
                  clip_coef=torch.tensor(0.25, device=device), **HYPER)  # fmt: skip
    fastopt.lion_(plain[0], [g / 1024.0 * 0.25 for g in grads], plain[1], **HYPER)
    for t, u in zip(fused[0] + fused[1], plain[0] + plain[1]):
        torch.testing.assert_close(t, u, rtol=0, atol=0)


# --------------------------------------------------------------------------- many tensors, edge cases


@pytest.mark.parametrize("device", devices())
def test_five_thousand_small_tensors_match_the_reference(device):
    gen = torch.Generator().manual_seed(40)
    shapes = [tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(0, 3, (1,), generator=gen)),),
                                                  generator=gen)) for _ in range(5000)]  # fmt: skip
    params = random_tensors(shapes, torch.float32, device, seed=41)
    exp_avgs = random_exp_avgs(params, seed=42)
    expected_params, expected_exp_avgs = [p.clone() for p in params], [m.clone() for m in exp_avgs]
    grads = random_tensors(shapes, torch.float32, device, seed=43)
    ties = [near_tie(m, g, 0.9) for m, g in zip(exp_avgs, effective_grads64(grads, maximize=True))]
    hyper = dict(HYPER, maximize=True)

    fastopt.lion_(params, grads, exp_avgs, **hyper)
    with fastopt.use_backend("torch"):
        fastopt.lion_(expected_params, grads, expected_exp_avgs, **hyper)

    for i in range(len(shapes)):
        assert_params_match(params[i], expected_params[i], ties[i], device, f"params[{i}] of 5000")
        assert_state_matches(exp_avgs[i], expected_exp_avgs[i], device, f"exp_avgs[{i}] of 5000")


def test_lr_zero_without_decay_leaves_params_and_empty_lists_are_fine():
    params = random_tensors([(5,)], seed=11)
    mine, exp_avgs = [params[0].clone()], random_exp_avgs(params)
    m_before = exp_avgs[0].clone()
    fastopt.lion_(mine, random_tensors([(5,)], seed=12), exp_avgs, lr=0.0, weight_decay=0.1)
    assert_bitwise_equal(mine[0], params[0])
    assert not torch.equal(exp_avgs[0], m_before)  # the momentum still moves
    fastopt.lion_([], [], [], lr=0.1)  # nothing to do, no error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_params_requiring_grad_update_in_place_without_autograd_error(dtype):
    param = torch.nn.Parameter(torch.randn(4, 4, dtype=dtype))
    before = param.detach().clone()
    fastopt.lion_([param], [torch.randn(4, 4, dtype=dtype)], [torch.randn(4, 4)], lr=0.1)
    assert not torch.equal(param.detach(), before) and param.requires_grad and param.grad_fn is None


# --------------------------------------------------------------------------- bad inputs


def lion_call(n=2, edit=None, **overrides):
    """A valid lion_ call on n params of shape (3, 4); ``overrides`` replace keyword arguments,
    then ``edit(kwargs)`` may alias tensors."""
    kwargs = {
        "params": [torch.randn(3, 4) for _ in range(n)],
        "grads": [torch.randn(3, 4) for _ in range(n)],
        "exp_avgs": [torch.randn(3, 4) for _ in range(n)],
        "lr": 1e-4,
        "weight_decay": 0.1,
        **overrides,
    }
    if edit is not None:
        edit(kwargs)
    return kwargs


def _set(name, i, make):
    return lambda kwargs: kwargs[name].__setitem__(i, make(kwargs))


def _lr_is_an_exp_avg(kwargs):
    kwargs["lr"] = kwargs["exp_avgs"][0][1, 2]


def _overlapping_exp_avgs(kwargs):
    base = torch.randn(30)
    kwargs["exp_avgs"] = [base[:12].view(3, 4), base[6:18].view(3, 4)]


BAD_LION = {
    "lr-negative": (dict(lr=-1e-4), ValueError, r"lr must be >= 0"),
    "lr-inf": (dict(lr=math.inf), ValueError, r"lr must be finite"),
    "lr-2-elements": (dict(lr=torch.full((2,), 1e-4)), ValueError, r"lr must hold exactly one element"),
    "lr-on-meta": (dict(lr=torch.empty((), device="meta")), ValueError, r"lr is on meta"),
    "beta1-1": (dict(beta1=1.0), ValueError, r"beta1 must be < 1"),
    "beta1-negative": (dict(beta1=-0.1), ValueError, r"beta1 must be >= 0"),
    "beta2-nan": (dict(beta2=NAN), ValueError, r"beta2"),
    "beta2-tensor": (dict(beta2=torch.tensor(0.99)), TypeError, r"beta2 must be a real number"),
    "weight_decay-negative": (dict(weight_decay=-0.1), ValueError, r"weight_decay must be >= 0"),
    "weight_decay-bool": (dict(weight_decay=True), TypeError, r"weight_decay"),
    "grad_scale-negative": (dict(grad_scale=-2.0), ValueError, r"grad_scale must be > 0"),
    "clip_coef-nan": (dict(clip_coef=NAN), ValueError, r"clip_coef"),
    "found_inf-int": (dict(found_inf=torch.zeros(1, dtype=torch.int32)), TypeError, r"found_inf"),
    "found_inf-2-elements": (dict(found_inf=torch.zeros(2)), ValueError, r"found_inf"),
    "exp_avgs-missing-one": (dict(edit=lambda kw: kw["exp_avgs"].pop()), ValueError,
                             r"exp_avgs has 1 tensors but params has 2"),
    "grads-length": (dict(edit=lambda kw: kw["grads"].append(torch.randn(3, 4))), ValueError,
                     r"grads has 3 tensors but params has 2"),
    "exp_avgs-shape": (dict(edit=_set("exp_avgs", 1, lambda kw: torch.randn(4, 3))), ValueError,
                       r"exp_avgs\[1\] has shape \(4, 3\) but params\[1\] has shape \(3, 4\)"),
    "grads-shape-0-d": (dict(edit=_set("grads", 0, lambda kw: torch.randn(()))), ValueError,
                        r"grads\[0\] has shape \(\)"),
    "exp_avgs-complex": (dict(edit=_set("exp_avgs", 0, lambda kw: torch.randn(3, 4, dtype=torch.complex64))),
                         TypeError, r"exp_avgs\[0\] has dtype torch.complex64"),
    "params-not-a-list": (dict(params={"w": torch.randn(3, 4)}), TypeError, r"params must be a list"),
    "exp_avg-is-a-param": (dict(edit=_set("exp_avgs", 0, lambda kw: kw["params"][1])), ValueError,
                           r"exp_avgs\[0\] and params\[1\] share memory"),
    "grad-is-its-exp_avg": (dict(edit=_set("grads", 1, lambda kw: kw["exp_avgs"][1])), ValueError,
                            r"grads\[1\] shares memory with exp_avgs\[1\]"),
    "overlapping-exp_avgs": (dict(edit=_overlapping_exp_avgs), ValueError,
                             r"exp_avgs\[1\] and exp_avgs\[0\] share memory"),
    "expanded-param": (dict(edit=_set("params", 1, lambda kw: torch.randn(1, 4).expand(3, 4))), ValueError,
                       r"params\[1\] has elements that share memory"),
    "lr-is-an-exp_avg-element": (dict(edit=_lr_is_an_exp_avg), ValueError, r"lr shares memory with exp_avgs\[0\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_LION)
def test_bad_input_is_rejected_and_changes_nothing(case):
    torch.manual_seed(0)
    overrides, error, match = BAD_LION[case]
    kwargs = lion_call(**overrides)
    before = snapshot(kwargs)

    with pytest.raises(error, match=match):
        fastopt.lion_(**kwargs)

    assert not changed(before), f"a rejected call changed tensors {changed(before)} of {len(before)}"


def test_the_call_the_bad_inputs_vary_is_valid():
    """Each bad input above is this call with one thing made bad: so that thing is what is rejected."""
    torch.manual_seed(0)
    kwargs = lion_call()
    before = snapshot(kwargs)
    fastopt.lion_(**kwargs, beta1=0.95, beta2=0.98, grad_scale=2.0, clip_coef=torch.tensor([0.5]),
                  found_inf=torch.zeros(1))  # fmt: skip
    assert changed(before)
    fastopt.lion_(**lion_call(lr=torch.tensor(1e-4)))
