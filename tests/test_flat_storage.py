"""fastopt.optim.AdamW(flat_states=True, flat_grads=True): moments and grads as views of one buffer
per device and dtype, tracking torch.optim.AdamW(foreach=False) bit for bit (on the torch backend;
within fp32 rounding on the others, as every AdamW test). SGD, Adam and Lion at the end."""

import io

import pytest
import torch

from fastopt.optim import AdamW
from tests.models import loss_of, make_model, train, twin
from tests.test_optim_adamw import assert_same_params, assert_same_states

FLAT = [{"flat_states": True}, {"flat_grads": True}, {"flat_states": True, "flat_grads": True}]


def one_buffer(tensors) -> bool:
    """Whether the tensors lie one after the other in one storage."""
    base = tensors[0].data_ptr()
    offset = 0
    for t in tensors:
        if t.untyped_storage().data_ptr() != tensors[0].untyped_storage().data_ptr() or t.data_ptr() != base + offset:
            return False
        offset += t.numel() * t.element_size()
    return True


def pair(flat, **kwargs):
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    kwargs = {"lr": 3e-3, **kwargs}
    return (ours_model, AdamW(ours_model.parameters(), **flat, **kwargs)), (
        torch_model,
        torch.optim.AdamW(torch_model.parameters(), foreach=False, **kwargs),
    )


@pytest.mark.parametrize("flat", FLAT, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_storage_tracks_torch(flat, amsgrad):
    ours, theirs = pair(flat, amsgrad=amsgrad)
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, 6)
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])
    model, optimizer = ours
    params = list(model.parameters())
    if flat.get("flat_states"):
        for key in ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else []):
            assert one_buffer([optimizer.state[p][key] for p in params]), key
    if flat.get("flat_grads"):
        assert one_buffer([p.grad for p in params])


def test_flat_grads_are_accumulated_in_place_and_zeroed_in_one_buffer():
    (model, optimizer), _ = pair({"flat_grads": True})
    views = [p.grad for p in model.parameters()]
    assert all(torch.count_nonzero(v) == 0 for v in views)  # zeroed views from the start
    loss_of("mlp", model, 0).backward()
    loss_of("mlp", model, 1).backward()  # gradient accumulation: into the same views
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    assert all(torch.count_nonzero(v) > 0 for v in views)
    optimizer.step()
    optimizer.zero_grad()  # set_to_none=True by default: the views stay, zeroed
    assert all(p.grad is v and torch.count_nonzero(v) == 0 for p, v in zip(model.parameters(), views))


def test_grads_set_to_none_by_the_model_fall_back_and_get_their_views_back():
    ours, theirs = pair({"flat_grads": True, "flat_states": True})
    views = [p.grad for p in ours[0].parameters()]
    for model, optimizer in (ours, theirs):
        for step in range(6):
            if step in (2, 3):
                model.zero_grad(set_to_none=True)  # grads become ordinary tensors for these steps
            else:
                optimizer.zero_grad()
            loss_of("mlp", model, step).backward()
            optimizer.step()
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])
    ours[1].zero_grad()
    assert all(p.grad is v for p, v in zip(ours[0].parameters(), views))


def test_flat_checkpoints_load_both_ways_with_torch():
    ours, theirs = pair({"flat_states": True, "flat_grads": True})
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, 3)
    for source, target in ((ours[1], theirs[1]), (theirs[1], ours[1])):
        saved = io.BytesIO()
        torch.save(source.state_dict(), saved)
        saved.seek(0)
        target.load_state_dict(torch.load(saved, weights_only=True))
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, 3, start=3)
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])
    params = list(ours[0].parameters())
    assert one_buffer([ours[1].state[p]["exp_avg"] for p in params])  # moved back into one buffer


def test_flat_grads_cover_a_param_group_added_later():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model[0].parameters(), lr=3e-3, flat_grads=True, flat_states=True)
    theirs = torch.optim.AdamW(torch_model[0].parameters(), lr=3e-3, foreach=False)
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        for p in model[1:].parameters():
            p.requires_grad_(False)
        train("mlp", model, optimizer, 2)
        for p in model[1:].parameters():
            p.requires_grad_(True)
        optimizer.add_param_group({"params": list(model[1:].parameters())})
        train("mlp", model, optimizer, 3, start=2)
    assert_same_params(ours_model, torch_model)
    assert_same_states(ours, theirs)
    assert one_buffer([p.grad for p in ours_model.parameters()])


# --------------------------------------------------------------------------- SGD, Adam and Lion

# (spec, extra kwargs): SGD with dampening (its first step must stay torch's when the new buffers
# move into the flat one), Adam with L2 decay and amsgrad, Lion against itself without flat storage.
OTHERS = {"SGD": ("sgd", {"dampening": 0.1}), "Adam": ("adam", {}), "Lion": ("lion", {})}


@pytest.mark.parametrize("flat", FLAT, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("name", OTHERS)
def test_flat_storage_of_other_optimizers_tracks_their_reference(name, flat):
    from tests.optim_cases import SPECS
    from tests.optim_cases import assert_same_params as assert_same_params_of
    from tests.optim_cases import assert_same_states as assert_same_states_of

    spec_name, extra = OTHERS[name]
    spec = SPECS[spec_name]
    ours_model = make_model("mlp")
    ref_model = twin(ours_model)
    ours, theirs = spec.make(ours_model.parameters(), **flat, **extra), spec.reference(ref_model.parameters(), **extra)
    for model, optimizer in ((ours_model, ours), (ref_model, theirs)):
        train("mlp", model, optimizer, 3)
        saved = io.BytesIO()  # a reload (weights_only) in the middle: back into the flat buffers
        torch.save(optimizer.state_dict(), saved)
        saved.seek(0)
        optimizer.load_state_dict(torch.load(saved, weights_only=True))
        train("mlp", model, optimizer, 2, start=3)
    assert_same_params_of(spec, ours_model, ref_model)
    assert_same_states_of(spec, ours, theirs)
    params = list(ours_model.parameters())
    if flat.get("flat_states"):
        for key in type(ours)._FLAT_STATE_KEYS:
            if key in ours.state[params[0]]:
                assert one_buffer([ours.state[p][key] for p in params]), key
    if flat.get("flat_grads"):
        assert one_buffer([p.grad for p in params])
