"""fastopt.optim.Adam against torch.optim.Adam(foreach=False) running the same steps (issue 19,
item 2): L2 weight decay added to the grad, as torch's Adam; ``decoupled_weight_decay=True`` is
AdamW. Trajectories as AdamW's (tests/test_optim_adamw.py): bit for bit on the torch backend,
within fp32 rounding on the others. What Adam shares with every fastopt optimizer is checked by
tests/optim_cases.py's ``SharedOptimizerChecks``, run here as ``TestShared``."""

import io

import pytest
import torch

from fastopt.optim import Adam, AdamW
from tests.helpers import assert_bitwise_equal
from tests.models import make_model, train, twin
from tests.optim_cases import SPECS, SharedOptimizerChecks, assert_same_params, assert_same_states
from tests.test_optim_adamw import skip_noise_driven_model_off_torch

SPEC = SPECS["adam"]
STEPS = 6


class TestShared(SharedOptimizerChecks):
    spec = SPEC


def torch_adam(params, **kwargs):
    return torch.optim.Adam(params, foreach=False, **kwargs)


OPTIONS = {
    "default": {},
    "l2-weight-decay": {"weight_decay": 0.1},
    "amsgrad": {"amsgrad": True, "weight_decay": 1e-2},
    "maximize": {"maximize": True, "weight_decay": 1e-2},
    "betas-eps": {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    "decoupled": {"decoupled_weight_decay": True, "weight_decay": 0.1},
}
RUNS = [("mlp", option) for option in OPTIONS] + [("convnet", "l2-weight-decay")]  # transformer: AdamW's tests


@pytest.mark.parametrize("model_name, option", RUNS, ids=[f"{m}-{o}" for m, o in RUNS])
def test_trajectory_equals_torch(model_name, option):
    skip_noise_driven_model_off_torch(model_name)
    ours_model = make_model(model_name)
    torch_model = twin(ours_model)
    kwargs = {"lr": 3e-3, **OPTIONS[option]}
    ours, theirs = Adam(ours_model.parameters(), **kwargs), torch_adam(torch_model.parameters(), **kwargs)
    ours_losses = train(model_name, ours_model, ours, STEPS)
    torch_losses = train(model_name, torch_model, theirs, STEPS)
    assert ours_losses[-1] != ours_losses[0]
    SPEC.assert_close(torch.stack(ours_losses), torch.stack(torch_losses))
    assert_same_params(SPEC, ours_model, torch_model)
    assert_same_states(SPEC, ours, theirs)


def test_decoupled_weight_decay_is_adamw():
    """Adam(decoupled_weight_decay=True) steps as torch's AdamW (and torch's Adam with the same
    flag), and as fastopt's AdamW bit for bit on every backend (the same op)."""
    models = [make_model("mlp") for _ in range(4)]
    kwargs = {"lr": 3e-3, "weight_decay": 0.1}
    optimizers = [
        Adam(models[0].parameters(), decoupled_weight_decay=True, **kwargs),
        AdamW(models[1].parameters(), **kwargs),
        torch.optim.AdamW(models[2].parameters(), foreach=False, **kwargs),
        torch_adam(models[3].parameters(), decoupled_weight_decay=True, **kwargs),
    ]
    for model, optimizer in zip(models, optimizers):
        train("mlp", model, optimizer, STEPS)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert_bitwise_equal(a, b)
    assert_same_params(SPEC, models[0], models[2])
    assert_same_params(SPEC, models[0], models[3])
    assert optimizers[0].param_groups[0]["decoupled_weight_decay"] is True
    assert optimizers[1].param_groups[0]["decoupled_weight_decay"] is True


def test_l2_decay_differs_from_decoupled_decay():
    """The flag matters: the same run with L2 decay ends elsewhere (a test that would pass for an
    Adam that ignored it would be no test)."""
    l2_model, decoupled_model = make_model("mlp"), make_model("mlp")
    train("mlp", l2_model, Adam(l2_model.parameters(), lr=3e-3, weight_decay=0.5), 3)
    train("mlp", decoupled_model, Adam(decoupled_model.parameters(), lr=3e-3, weight_decay=0.5, decoupled_weight_decay=True), 3)
    assert not torch.equal(l2_model[0].weight, decoupled_model[0].weight)


def test_param_groups_with_their_own_decay_kind():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)

    def groups(model):
        return [{"params": model[0].parameters(), "weight_decay": 0.1, "decoupled_weight_decay": True},
                {"params": model[2].parameters(), "weight_decay": 0.2, "amsgrad": True},
                {"params": model[4].parameters(), "lr": 1e-2}]  # fmt: skip

    ours, theirs = Adam(groups(ours_model), lr=3e-3), torch_adam(groups(torch_model), lr=3e-3)
    train("mlp", ours_model, ours, STEPS)
    train("mlp", torch_model, theirs, STEPS)
    assert_same_params(SPEC, ours_model, torch_model)
    assert_same_states(SPEC, ours, theirs)


# --------------------------------------------------------------------------- state_dict and checkpoints


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["fastopt-to-torch", "torch-to-fastopt"])
def test_checkpoint_moves_between_fastopt_and_torch(direction):
    kwargs = {"lr": 3e-3, "weight_decay": 1e-2, "amsgrad": True}
    first_model = make_model("mlp")
    reference_model = twin(first_model)
    make_first, make_second = (Adam, torch_adam) if direction == "fastopt-to-torch" else (torch_adam, Adam)
    first = make_first(first_model.parameters(), **kwargs)
    train("mlp", first_model, first, 3)
    second_model = twin(first_model)
    second = make_second(second_model.parameters(), **kwargs)
    second.load_state_dict(roundtrip(first.state_dict()))
    train("mlp", second_model, second, 3, start=3)
    reference = torch_adam(reference_model.parameters(), **kwargs)
    train("mlp", reference_model, reference, 6)
    assert_same_params(SPEC, second_model, reference_model)
    assert_same_states(SPEC, second, reference)


def test_state_dict_has_torchs_layout():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours, theirs = Adam(ours_model.parameters(), amsgrad=True), torch_adam(torch_model.parameters(), amsgrad=True)
    assert ours.state_dict()["state"] == theirs.state_dict()["state"] == {}
    train("mlp", ours_model, ours, 2)
    train("mlp", torch_model, theirs, 2)
    ours_sd, torch_sd = ours.state_dict(), theirs.state_dict()
    torch_group = {k: v for k, v in torch_sd["param_groups"][0].items() if k != "foreach"}  # torch's: False here
    assert {k: ours_sd["param_groups"][0][k] for k in torch_group} == torch_group
    assert ours_sd["state"].keys() == torch_sd["state"].keys()
    for i, state in torch_sd["state"].items():
        assert ours_sd["state"][i].keys() == state.keys() == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert ours_sd["state"][i]["step"].dtype == state["step"].dtype and ours_sd["state"][i]["step"].shape == ()


def test_a_checkpoint_without_the_decoupled_flag_loads_as_torchs_adam():
    """A torch.optim.Adam checkpoint from before the flag lacks it: L2 decay, as torch's Adam
    loads it (its __setstate__ defaults it to False), whatever the constructor said. (fastopt
    took the constructor's value: the keys torch's checkpoints may lack now get torch's defaults.)"""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    theirs = torch_adam(torch_model.parameters(), lr=3e-3, weight_decay=0.1)
    train("mlp", torch_model, theirs, 2)
    saved = roundtrip(theirs.state_dict())
    for group in saved["param_groups"]:
        del group["decoupled_weight_decay"]
    ours_model.load_state_dict(torch_model.state_dict())
    ours = Adam(ours_model.parameters(), lr=1.0, decoupled_weight_decay=True)  # all taken from the checkpoint
    ours.load_state_dict(saved)
    assert ours.param_groups[0]["decoupled_weight_decay"] is False and ours.param_groups[0]["lr"] == 3e-3
    train("mlp", ours_model, ours, 2, start=2)
    train("mlp", torch_model, theirs, 2, start=2)
    assert_same_params(SPEC, ours_model, torch_model)


# --------------------------------------------------------------------------- constructor


def test_constructor_checks_like_torch():
    params = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, message in [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"eps": -1.0}, "Invalid epsilon value"),
        ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
        ({"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
        ({"betas": (0.9, torch.tensor(0.99))}, "betas must be either both floats or both Tensors"),
    ]:
        for cls in (Adam, torch.optim.Adam):
            with pytest.raises(ValueError, match=message):
                cls(params, **kwargs)
    for kwargs, message in [({"max_grad_norm": -1.0}, "max_grad_norm"), ({"agc_clip_factor": 0.0}, "agc_clip_factor"),
                            ({"differentiable": True}, "differentiable")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Adam(params, **kwargs)


def test_defaults_are_torchs():
    ours, theirs = Adam([torch.nn.Parameter(torch.randn(3))]), torch.optim.Adam([torch.nn.Parameter(torch.randn(3))])
    assert {k: ours.defaults[k] for k in theirs.defaults} == theirs.defaults
    assert ours.defaults["weight_decay"] == 0.0 and AdamW([torch.nn.Parameter(torch.randn(3))]).defaults["weight_decay"] == 1e-2
