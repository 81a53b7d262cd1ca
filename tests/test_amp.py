"""fastopt.amp.GradScaler against torch.amp.GradScaler, side by side."""

import pytest
import torch

import fastopt
from fastopt import ops
from fastopt.optim import SGD, Adam, AdamW, Lion
from tests.helpers import assert_bitwise_equal
from tests.models import loss_of, make_model, twin


def scaled_step(model, optimizer, scaler, step, *, autocast_dtype=torch.float16):
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = loss_of("mlp", model, step)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def test_with_a_torch_optimizer_it_behaves_as_torchs_scaler():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-2, foreach=False)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    ours = fastopt.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
    skipped = []
    for step in range(12):
        scaled_step(ours_model, ours_opt, ours, step)
        scaled_step(torch_model, torch_opt, theirs, step)
        skipped.append(bool(ours.step_skipped))
        assert ours.get_scale() == theirs.get_scale()
        assert ours._get_growth_tracker() == theirs._get_growth_tracker()
    assert skipped[0] and not all(skipped)  # fp16 overflows at 2^24; the scale backs off, then grows
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        assert_bitwise_equal(p, q)


# Every fastopt optimizer: the overflow check rides on the step's read pass.
FASTOPT_OPTIMIZERS = {
    "AdamW": AdamW,
    "Adam": Adam,
    "SGD": lambda params, **kwargs: SGD(params, momentum=0.9, **kwargs),
    "Lion": Lion,
}


@pytest.mark.parametrize("name", FASTOPT_OPTIMIZERS)
def test_with_a_fastopt_optimizer_the_check_rides_on_the_optimizers_read_pass(monkeypatch, name):
    model = make_model("mlp")
    optimizer = FASTOPT_OPTIMIZERS[name](model.parameters(), lr=1e-2)
    scaler = fastopt.amp.GradScaler("cpu", init_scale=2.0**60)
    calls = {"unscale_and_check_": 0, "norm_with_flag": 0}
    real_unscale, real_norm = ops.unscale_and_check_, ops.multi_tensor_norm

    def counting_unscale(*args, **kwargs):
        calls["unscale_and_check_"] += 1
        return real_unscale(*args, **kwargs)

    def counting_norm(*args, **kwargs):
        calls["norm_with_flag"] += kwargs.get("found_inf") is not None
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(ops, "unscale_and_check_", counting_unscale)
    monkeypatch.setattr(ops, "multi_tensor_norm", counting_norm)
    before = [p.detach().clone() for p in model.parameters()]
    scaled_step(model, optimizer, scaler, 0)

    assert calls == {"unscale_and_check_": 0, "norm_with_flag": 1}  # no separate read+write pass
    assert scaler.step_skipped.item() and optimizer.stats["skipped_steps"].item() == 1
    assert scaler.get_scale() == 2.0**59
    for p, b in zip(model.parameters(), before):
        assert_bitwise_equal(p.detach(), b)


@pytest.mark.parametrize("name", FASTOPT_OPTIMIZERS)
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_unscale_handles_low_precision_grads(grad_dtype, name):
    model = make_model("mlp", dtype=grad_dtype)
    optimizer = FASTOPT_OPTIMIZERS[name](model.parameters(), lr=1e-3, state_dtype=torch.float32)
    scaler = fastopt.amp.GradScaler("cpu", init_scale=256.0)
    optimizer.zero_grad()
    scaler.scale(loss_of("mlp", model, 0)).backward()
    scaled = [p.grad.float() for p in model.parameters()]
    scaler.unscale_(optimizer)  # torch's scaler raises "Attempting to unscale FP16 gradients."
    for p, g in zip(model.parameters(), scaled):
        torch.testing.assert_close(p.grad.float(), g / 256.0)
    scaler.step(optimizer)
    scaler.update()
    assert not scaler.step_skipped


def test_torch_scaler_refuses_fp16_grads_which_is_why_ours_exists():
    model = make_model("mlp", dtype=torch.float16)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of("mlp", model, 0)).backward()
    with pytest.raises(ValueError, match="FP16"):
        scaler.unscale_(optimizer)


def test_disabled_scaler_just_steps():
    model = make_model("mlp")
    optimizer = AdamW(model.parameters())
    scaler = fastopt.amp.GradScaler("cpu", enabled=False)
    loss = loss_of("mlp", model, 0)
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.step_skipped is None and optimizer.state


def test_state_dict_round_trips_with_torchs_scaler():
    ours = fastopt.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    model = make_model("mlp")
    scaled_step(model, AdamW(model.parameters()), ours, 0)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    assert theirs.get_scale() == ours.get_scale() and theirs.get_growth_interval() == 7


def test_step_twice_without_update_is_an_error_as_in_torch():
    model = make_model("mlp")
    optimizer = AdamW(model.parameters())
    scaler = fastopt.amp.GradScaler("cpu")
    scaler.scale(loss_of("mlp", model, 0)).backward()
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(optimizer)
