"""fastopt.optim.Lion against a float64 reference written from the paper's update rule (issue 19,
item 3; Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):

    c = beta1 * m + (1 - beta1) * g
    p = p - lr * (sign(c) + weight_decay * p)
    m = beta2 * m + (1 - beta2) * g

sign() is discontinuous: where c is within rounding of 0, a correct fp32 implementation may take
either sign (or 0). So steps are compared one at a time from a shared state (the params, moments
and grads before the step), with those elements allowed any of the three directions and every
other element held to fp32 rounding. What Lion shares with every fastopt optimizer is checked by
tests/optim_cases.py's ``SharedOptimizerChecks``, run here as ``TestShared``."""

import io

import pytest
import torch

from fastopt.optim import Lion
from tests.helpers import MIXED_SHAPES, random_tensors
from tests.models import loss_of, make_model, train
from tests.optim_cases import SPECS, SharedOptimizerChecks, all_params

SPEC = SPECS["lion"]


class TestShared(SharedOptimizerChecks):
    spec = SPEC


def paper_step(p, g, m, *, lr, beta1, beta2, weight_decay, maximize=False):
    """One step of the paper's rule in float64: (new param, new moment, c)."""
    p, g, m = (t.detach().double() for t in (p, g, m))
    lr = float(lr)
    if maximize:
        g = -g
    c = beta1 * m + (1 - beta1) * g
    new_p = p - lr * (torch.sign(c) + weight_decay * p)
    new_m = beta2 * m + (1 - beta2) * g
    return new_p, new_m, c


def assert_step_follows_the_paper(p_before, g, m_before, p_after, m_after, **hyper):
    """fastopt's step (p_after, m_after, in the params' dtype) against the paper's in float64."""
    eps = torch.finfo(p_after.dtype).eps
    lr, beta1, weight_decay = float(hyper["lr"]), hyper["beta1"], hyper["weight_decay"]
    expected_p, expected_m, c = paper_step(p_before, g, m_before, **hyper)
    p64, m_before64, g64 = p_before.detach().double(), m_before.detach().double(), g.detach().double()
    # Within rounding of 0: the rounding of c's two terms (and of c itself), a few ulps of each.
    ambiguous = c.abs() <= 4 * eps * (beta1 * m_before64.abs() + (1 - beta1) * g64.abs())
    decayed = p64 - lr * weight_decay * p64
    error = (p_after.double() - expected_p).abs()
    bound = 3 * eps * (p64.abs() + lr) + 1e-3 * eps * lr  # the decay's and the step's roundings
    assert (error[~ambiguous] <= bound[~ambiguous]).all(), f"max error {error[~ambiguous].max()}"
    if ambiguous.any():  # any of the three directions
        candidates = torch.stack([decayed - lr, decayed, decayed + lr])
        near = (p_after.double() - candidates).abs().amin(0) <= bound
        assert near[ambiguous].all()
    m_error = (m_after.double() - expected_m).abs()
    assert (m_error <= 4 * eps * (m_before64.abs() + g64.abs()) + torch.finfo(m_after.dtype).tiny).all()


OPTIONS = {
    "default": {},
    "weight-decay": {"weight_decay": 0.5},
    "maximize": {"maximize": True, "weight_decay": 0.1},
    "betas": {"betas": (0.5, 0.95), "weight_decay": 0.1},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("option", OPTIONS)
def test_one_step_from_a_shared_state_follows_the_papers_rule(option, dtype):
    """Params of every shape (0-d, empty, odd sizes, strided ones), a moment with history."""
    kwargs = {"lr": 1e-2, **OPTIONS[option]}
    params = [torch.nn.Parameter(t) for t in random_tensors(MIXED_SHAPES, dtype, seed=0)]
    grads = random_tensors(MIXED_SHAPES, dtype, seed=1, non_contiguous=True)
    moments = random_tensors(MIXED_SHAPES, dtype, seed=2, scale=0.5)
    optimizer = Lion(params, **kwargs)
    for p, g, m in zip(params, grads, moments):
        p.grad = g
        optimizer.state[p]["exp_avg"] = m.clone()
    before = [p.detach().clone() for p in params]
    optimizer.step()
    beta1, beta2 = kwargs.get("betas", (0.9, 0.99))
    hyper = dict(lr=kwargs["lr"], beta1=beta1, beta2=beta2, weight_decay=kwargs.get("weight_decay", 0.0),
                 maximize=kwargs.get("maximize", False))  # fmt: skip
    for p, g, m, old in zip(params, grads, moments, before):
        assert_step_follows_the_paper(old, g, m, p, optimizer.state[p]["exp_avg"], **hyper)


def test_a_direction_of_exactly_zero_moves_by_the_decay_only():
    """sign(0) = 0 (the paper's, torch.sign's): with beta1 = 0.5 and m = -g, c is exactly 0 in
    any rounding, and the param only decays."""
    p = torch.nn.Parameter(torch.randn(33))
    g = torch.randn(33)
    optimizer = Lion([p], lr=0.1, betas=(0.5, 0.99), weight_decay=0.5)
    optimizer.state[p]["exp_avg"] = -g.clone()
    p.grad = g.clone()
    before = p.detach().clone()
    optimizer.step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5), rtol=4e-7, atol=0)  # p - lr * wd * p, or so


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_each_step_of_a_training_run_follows_the_papers_rule(lr_kind):
    """The MLP trained for a few steps with two param groups (their own betas and decay) and a
    scheduler; each step checked from the state before it. The loss goes down."""
    model = make_model("mlp")
    lr = 3e-3 if lr_kind == "float" else torch.tensor(3e-3)
    groups = [{"params": model[0].parameters(), "betas": (0.8, 0.9), "weight_decay": 0.0},
              {"params": list(model[2].parameters()) + list(model[4].parameters())}]  # fmt: skip
    optimizer = Lion(groups, lr=lr, weight_decay=0.3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss = loss_of("mlp", model, step % 2)
        loss.backward()
        before = {p: (p.detach().clone(), p.grad.clone(), optimizer.state[p].get("exp_avg", torch.zeros_like(p)).clone())
                  for p in all_params(optimizer)}  # fmt: skip
        optimizer.step()
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            for p in group["params"]:
                old, g, m = before[p]
                assert_step_follows_the_paper(old, g, m, p, optimizer.state[p]["exp_avg"], **hyper)
        scheduler.step()
        losses.append(loss.item())
    assert losses[-2] < losses[0] and losses[-1] < losses[1]  # the same batches, later


class Float64Lion(torch.optim.Optimizer):
    """The paper's rule as a plain torch optimizer, in float64 (the oracle of a fp64 run)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                new_p, new_m, _ = paper_step(p, p.grad, m, lr=group["lr"], beta1=beta1, beta2=beta2,
                                             weight_decay=group["weight_decay"])  # fmt: skip
                p.copy_(new_p)
                m.copy_(new_m)


def test_a_float64_run_tracks_the_float64_reference():
    """In fp64 the ambiguous elements are rare enough for whole trajectories to agree."""
    ours_model, reference_model = make_model("mlp", dtype=torch.float64), make_model("mlp", dtype=torch.float64)
    ours = Lion(ours_model.parameters(), lr=1e-3, weight_decay=0.1)
    reference = Float64Lion(reference_model.parameters(), lr=1e-3, weight_decay=0.1)
    train("mlp", ours_model, ours, 6)
    train("mlp", reference_model, reference, 6)
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(all_params(ours), all_params(reference)):
        torch.testing.assert_close(ours.state[a]["exp_avg"], reference.state[b]["exp_avg"], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- state_dict and constructor


def test_state_dict_has_exp_avg_per_param_and_round_trips_weights_only():
    model = make_model("mlp")
    optimizer = Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    assert optimizer.state_dict()["state"] == {}
    model[0].weight.requires_grad_(False)  # no grad, no state
    train("mlp", model, optimizer, 2)
    state_dict = optimizer.state_dict()
    assert sorted(state_dict["state"]) == [1, 2, 3, 4, 5]
    assert all(type(s) is dict and s.keys() == {"exp_avg"} for s in state_dict["state"].values())
    assert set(state_dict["param_groups"][0]) == {"params", "lr", "betas", "weight_decay", "maximize", "foreach",
                                                  "differentiable", "fused", "agc_clip_factor", "agc_eps"}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    copy_model = make_model("mlp")
    copy_model.load_state_dict(model.state_dict())
    copy_model[0].weight.requires_grad_(False)
    resumed = Lion(copy_model.parameters())
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["lr"] == 1e-3 and resumed.param_groups[0]["betas"] == (0.9, 0.99)
    train("mlp", model, optimizer, 2, start=2)
    train("mlp", copy_model, resumed, 2, start=2)
    for a, b in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(a, b)


def test_defaults_and_constructor_checks():
    params = [torch.nn.Parameter(torch.randn(3))]
    defaults = Lion(params).defaults
    assert (defaults["lr"], defaults["betas"], defaults["weight_decay"], defaults["maximize"]) == (1e-4, (0.9, 0.99), 0.0, False)
    for kwargs, message in [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"differentiable": True}, "differentiable"),
    ]:
        with pytest.raises(ValueError, match=message):
            Lion(params, **kwargs)


def test_a_group_edited_into_something_invalid_is_refused_before_anything_changes():
    model = make_model("mlp")
    optimizer = Lion(model.parameters(), lr=1e-3)
    train("mlp", model, optimizer, 1)
    optimizer.zero_grad()
    loss_of("mlp", model, 1).backward()
    optimizer.param_groups[0]["betas"] = (0.9, 1.5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="betas"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_torchs_error_inputs_for_every_optimizer_apply_to_lion():
    """torch's optim_db has no Lion; the error inputs it checks for every optimizer apply as they
    are (params of a wrong type, duplicates, a tensor lr of several elements, names mixed)."""
    from tests.test_torch_optim_contract import co

    errors = co.get_error_inputs_for_all_optims("cpu", torch.float32)
    assert errors
    for error_input in errors:
        optim_input = error_input.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else [torch.nn.Parameter(torch.randn(2))]
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                Lion(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                Lion(params, **optim_input.kwargs)
    assert repr(Lion([torch.nn.Parameter(torch.randn(2))])).startswith("Lion (")
