"""fastopt.optim.SGD against torch.optim.SGD(foreach=False) running the same steps (issue 19, item 1):
bit for bit in fp32 on the torch and cpu backends, within fp32 rounding per step on the others.
What SGD shares with every fastopt optimizer (clipping, AGC, AMP, spike guard, monitor, copies)
is checked by tests/optim_cases.py's ``SharedOptimizerChecks``, run here as ``TestShared``."""

import io

import pytest
import torch

from fastopt.optim import SGD
from tests.helpers import active_backend, tolerance
from tests.models import loss_of, make_model, train, twin
from tests.optim_cases import SPECS, SharedOptimizerChecks, all_params, assert_same_params, assert_same_states

SPEC = SPECS["sgd"]
STEPS = 6


class TestShared(SharedOptimizerChecks):
    spec = SPEC


def torch_sgd(params, **kwargs):
    return torch.optim.SGD(params, foreach=False, **kwargs)


OPTIONS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "weight-decay-maximize": {"weight_decay": 1e-2, "maximize": True},
    "everything": {"momentum": 0.5, "dampening": 0.5, "weight_decay": 1e-2, "maximize": True},
}
# Every option on the MLP; momentum on the other models (SGD moves zero-gradient params by their
# rounding noise times lr only: every backend can follow torch on them).
RUNS = [("mlp", option) for option in OPTIONS] + [("transformer", "momentum"), ("convnet", "nesterov")]


@pytest.mark.parametrize("model_name, option", RUNS, ids=[f"{m}-{o}" for m, o in RUNS])
def test_trajectory_equals_torch(model_name, option):
    ours_model = make_model(model_name)
    torch_model = twin(ours_model)
    kwargs = {"lr": 1e-2, **OPTIONS[option]}
    ours, theirs = SGD(ours_model.parameters(), **kwargs), torch_sgd(torch_model.parameters(), **kwargs)
    ours_losses = train(model_name, ours_model, ours, STEPS)
    torch_losses = train(model_name, torch_model, theirs, STEPS)
    assert ours_losses[-1] != ours_losses[0]  # it trained
    SPEC.assert_close(torch.stack(ours_losses), torch.stack(torch_losses))
    assert_same_params(SPEC, ours_model, torch_model)
    assert_same_states(SPEC, ours, theirs)


def test_param_groups_add_param_group_and_params_stepped_for_the_first_time_later():
    """Groups with their own momentum / dampening; a layer that gets its first grad at step 3
    (its buffer is new beside others that hold history: torch's first step for it alone); a group
    added later."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)

    def groups(model):
        return [{"params": model[0].parameters(), "lr": 2e-2, "dampening": 0.5},
                {"params": model[2].parameters(), "momentum": 0.5, "nesterov": True}]  # fmt: skip

    ours, theirs = SGD(groups(ours_model), lr=1e-2, momentum=0.9), torch_sgd(groups(torch_model), lr=1e-2, momentum=0.9)

    def no_grad_for_first_layer(model, _):
        for p in model[0].parameters():
            p.grad = None

    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        train("mlp", model, optimizer, 3, before_step=no_grad_for_first_layer)
        train("mlp", model, optimizer, 2, start=3)
        optimizer.add_param_group({"params": model[-1].parameters(), "momentum": 0.8, "dampening": 0.1, "maximize": True})
        train("mlp", model, optimizer, 3, start=5)
    assert_same_params(SPEC, ours_model, torch_model)
    assert_same_states(SPEC, ours, theirs)


def test_tensor_lr_and_lr_schedulers_drive_it_as_they_drive_torch():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = SGD(ours_model.parameters(), lr=torch.tensor(0.05), momentum=0.9)
    theirs = torch_sgd(torch_model.parameters(), lr=torch.tensor(0.05), momentum=0.9)
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=STEPS)
        train("mlp", model, optimizer, STEPS, scheduler=scheduler)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[0]["momentum"] == theirs.param_groups[0]["momentum"]  # OneCycleLR cycles momentum
    assert_same_params(SPEC, ours_model, torch_model)  # torch's SGD reads a tensor lr as a float: bit for bit


# --------------------------------------------------------------------------- state_dict and checkpoints


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_has_torchs_layout(momentum):
    """``momentum_buffer`` per param that stepped, with momentum; absent before the first step,
    and no state at all without momentum, as torch's."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours, theirs = SGD(ours_model.parameters(), momentum=momentum), torch_sgd(torch_model.parameters(), momentum=momentum)
    assert ours.state_dict()["state"] == theirs.state_dict()["state"] == {}
    ours_model[0].weight.grad = torch.ones_like(ours_model[0].weight)  # one param with a grad
    torch_model[0].weight.grad = torch.ones_like(torch_model[0].weight)
    ours.step()
    theirs.step()
    ours_sd, torch_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd["state"].keys() == torch_sd["state"].keys() == ({0} if momentum else set())
    for i, state in torch_sd["state"].items():
        assert ours_sd["state"][i].keys() == state.keys() == {"momentum_buffer"}
        assert type(ours_sd["state"][i]) is dict
    assert set(torch_sd["param_groups"][0]) <= set(ours_sd["param_groups"][0])
    assert ours_model[2].weight not in ours.state  # no grad: no state, as torch


@pytest.mark.parametrize("direction", ["fastopt-to-torch", "torch-to-fastopt"])
def test_checkpoint_moves_between_fastopt_and_torch(direction):
    kwargs = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.2, "weight_decay": 1e-3}
    first_model = make_model("mlp")
    reference_model = twin(first_model)
    make_first, make_second = (SGD, torch_sgd) if direction == "fastopt-to-torch" else (torch_sgd, SGD)
    first = make_first(first_model.parameters(), **kwargs)
    train("mlp", first_model, first, 4)
    second_model = twin(first_model)
    second = make_second(second_model.parameters(), **kwargs)
    second.load_state_dict(roundtrip(first.state_dict()))
    train("mlp", second_model, second, 4, start=4)
    reference = torch_sgd(reference_model.parameters(), **kwargs)
    train("mlp", reference_model, reference, 8)
    assert_same_params(SPEC, second_model, reference_model)
    assert_same_states(SPEC, second, reference)


# --------------------------------------------------------------------------- the documented deviation


def skipped_first_step(model, optimizer, step=0):
    """A first step skipped on the device: the overflow verdict handed over as a GradScaler does."""
    optimizer.zero_grad()
    loss_of("mlp", model, step).backward()
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf


def test_a_skipped_first_step_without_dampening_is_as_if_torch_had_not_stepped():
    """fastopt.optim.SGD's docstring: the skipped step leaves a zero buffer, and the next step
    forms momentum * 0 + g: torch's first step, when dampening is 0."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours, theirs = SGD(ours_model.parameters(), lr=1e-2, momentum=0.9), torch_sgd(torch_model.parameters(), lr=1e-2, momentum=0.9)
    before = [p.detach().clone() for p in ours_model.parameters()]
    skipped_first_step(ours_model, ours)
    assert all(torch.equal(p, b) for p, b in zip(ours_model.parameters(), before))
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in ours.state.values())  # made, zero
    assert ours.stats["skipped_steps"].item() == 1
    train("mlp", ours_model, ours, 4, start=1)
    train("mlp", torch_model, theirs, 4, start=1)  # torch never ran the skipped step
    assert_same_params(SPEC, ours_model, torch_model)
    # Bit for bit where SGD is, but for the sign of zeros: momentum * 0 + g is +0.0 where g is -0.0.
    close = {"rtol": 0, "atol": 0} if active_backend() in SPEC.exact_backends else tolerance(torch.float32)
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], **close)


def test_a_skipped_first_step_with_dampening_leaves_one_minus_dampening_times_the_grad():
    """With dampening d != 0 the step after a skipped first step sets the buffer to (1 - d) * g
    (torch would have set g): what the docstring says, exactly."""
    model = make_model("mlp")
    optimizer = SGD(model.parameters(), lr=1e-2, momentum=0.9, dampening=0.5)
    skipped_first_step(model, optimizer)
    optimizer.zero_grad()
    loss_of("mlp", model, 1).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    for p, old in zip(model.parameters(), before):
        expected_buffer = p.grad * 0.5
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], expected_buffer, rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), old - 1e-2 * expected_buffer, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- constructor and groups


def test_constructor_checks_like_torch():
    params = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, error, message in [
        ({"lr": -1.0}, ValueError, "Invalid learning rate"),
        ({"momentum": -0.5}, ValueError, "Invalid momentum value"),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value"),
        ({"nesterov": True}, ValueError, "Nesterov momentum requires a momentum and zero dampening"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "Nesterov momentum requires"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element"),
    ]:
        for cls in (SGD, torch.optim.SGD):
            with pytest.raises(error, match=message):
                cls(params, **kwargs)
    for kwargs, message in [({"max_grad_norm": -1.0}, "max_grad_norm"), ({"agc_clip_factor": 0.0}, "agc_clip_factor"),
                            ({"differentiable": True}, "differentiable")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SGD(params, **kwargs)


def test_defaults_are_torchs():
    ours, theirs = SGD([torch.nn.Parameter(torch.randn(3))]), torch.optim.SGD([torch.nn.Parameter(torch.randn(3))])
    assert {k: ours.defaults[k] for k in theirs.defaults} == theirs.defaults


@pytest.mark.parametrize("edit, message", [({"momentum": -1.0}, "momentum"), ({"nesterov": True, "dampening": 0.5},
                                           "Nesterov"), ({"weight_decay": -1.0}, "weight_decay")])  # fmt: skip
def test_a_group_edited_into_something_invalid_is_refused_before_anything_changes(edit, message):
    model = make_model("mlp")
    optimizer = SGD(model.parameters(), lr=1e-2, momentum=0.9)
    train("mlp", model, optimizer, 1)
    optimizer.zero_grad()
    loss_of("mlp", model, 1).backward()
    optimizer.param_groups[0].update(edit)
    before = [t.clone() for t in [*model.parameters(), *(s["momentum_buffer"] for s in optimizer.state.values())]]
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    after = [*model.parameters(), *(s["momentum_buffer"] for s in optimizer.state.values())]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_flat_states_first_step_with_dampening_is_torchs():
    """flat_states moves new buffers into one buffer after they are made: the first step must
    still be torch's first step (buffer = g), not (1 - dampening) * g. (It was: the move made
    the buffers look as if they held history.)"""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    kwargs = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.5}
    ours, theirs = SGD(ours_model.parameters(), flat_states=True, **kwargs), torch_sgd(torch_model.parameters(), **kwargs)
    train("mlp", ours_model, ours, 3)
    train("mlp", torch_model, theirs, 3)
    assert_same_params(SPEC, ours_model, torch_model)
    assert_same_states(SPEC, ours, theirs)
    buffers = [ours.state[p]["momentum_buffer"] for p in all_params(ours)]
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1
