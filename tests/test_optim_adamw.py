"""fastopt.optim.AdamW against torch.optim.AdamW(foreach=False) running the same steps."""

import io
import math

import pytest
import torch

import fastopt
from fastopt.optim import AdamW
from tests.helpers import active_backend, assert_bitwise_equal, assert_matches_torch, no_host_sync, tolerance
from tests.models import MODELS, loss_of, make_model, train, twin
from tests.test_no_sync import ForbidHostReads

STEPS = 12

# Models with params whose gradient is zero up to rounding (attention key biases, conv biases
# before BatchNorm): Adam divides that noise by sqrt(v) + eps and moves them by up to ~lr a step,
# differently for any two ways of rounding. Only the torch backend (torch's own rounding, bit for
# bit) tracks torch on them; other backends are compared with torch on the MLP.
NOISE_DRIVEN_MODELS = ("transformer", "convnet")


def skip_noise_driven_model_off_torch(model_name):
    if model_name in NOISE_DRIVEN_MODELS and active_backend() != "torch":
        pytest.skip(f"{model_name}'s zero-gradient params follow rounding noise; {active_backend()} rounds differently")


def assert_same_params(model_a, model_b, exact=True, *, against_torch=True, **tol):
    """exact: bit for bit (against torch: on the torch backend; within fp32 rounding on others)."""
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        if exact and against_torch:
            assert_matches_torch(a, b, name)
        elif exact:
            assert_bitwise_equal(a, b, name)
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)


def assert_same_states(ours: AdamW, theirs: torch.optim.Optimizer, exact=True, *, against_torch=True):
    for p_ours, p_theirs in zip(
        [p for g in ours.param_groups for p in g["params"]], [p for g in theirs.param_groups for p in g["params"]]
    ):
        s, t = ours.state[p_ours], theirs.state[p_theirs]
        assert s.keys() == t.keys()
        for key in s:
            if exact and against_torch:
                assert_matches_torch(s[key].cpu(), t[key].cpu(), key)
            elif exact:
                assert_bitwise_equal(s[key].cpu(), t[key].cpu(), key)
            else:
                torch.testing.assert_close(s[key].cpu(), t[key].cpu())


OPTIONS = {
    "default": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "no-weight-decay": {"weight_decay": 0.0},
    "betas-eps": {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("option", OPTIONS)
def test_trajectory_equals_torch_bitwise(model_name, option):
    skip_noise_driven_model_off_torch(model_name)
    ours_model = make_model(model_name)
    torch_model = twin(ours_model)
    kwargs = {"lr": 3e-3, **OPTIONS[option]}
    ours = AdamW(ours_model.parameters(), **kwargs)
    theirs = torch.optim.AdamW(torch_model.parameters(), foreach=False, **kwargs)

    ours_losses = train(model_name, ours_model, ours, STEPS)
    torch_losses = train(model_name, torch_model, theirs, STEPS)

    assert ours_losses[-1] != ours_losses[0]  # it trained
    assert_matches_torch(torch.stack(ours_losses), torch.stack(torch_losses))
    assert_same_params(ours_model, torch_model)
    assert_same_states(ours, theirs)


def test_tensor_lr_matches_torch_within_fp32_rounding():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=torch.tensor(3e-3))
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=torch.tensor(3e-3), foreach=False)
    train("mlp", ours_model, ours, STEPS)
    train("mlp", torch_model, theirs, STEPS)
    assert_same_params(ours_model, torch_model, exact=False, rtol=1e-5, atol=1e-6)


def param_groups(model):
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return [
        {"params": layers[0].parameters(), "lr": 1e-2, "weight_decay": 0.0},
        {"params": layers[1].parameters(), "betas": (0.5, 0.9), "amsgrad": True},
    ]


def test_param_groups_and_add_param_group():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(param_groups(ours_model), lr=1e-3)
    theirs = torch.optim.AdamW(param_groups(torch_model), lr=1e-3, foreach=False)
    train("mlp", ours_model, ours, 4)
    train("mlp", torch_model, theirs, 4)
    # The last layer joins later, with its own hyperparameters, as in progressive unfreezing.
    ours.add_param_group({"params": ours_model[-1].parameters(), "lr": 5e-3, "maximize": True})
    theirs.add_param_group({"params": torch_model[-1].parameters(), "lr": 5e-3, "maximize": True})
    train("mlp", ours_model, ours, 4, start=4)
    train("mlp", torch_model, theirs, 4, start=4)
    assert_same_params(ours_model, torch_model)
    assert_same_states(ours, theirs)


def test_params_without_grads_or_frozen_are_untouched():
    model = make_model("mlp")
    model[0].requires_grad_(False)  # frozen: never gets a grad
    frozen = [p.detach().clone() for p in model[0].parameters()]
    optimizer = AdamW(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    loss_of("mlp", model, 0).backward()
    model[2].bias.grad = None  # trainable, but no grad this step
    bias_before = model[2].bias.detach().clone()
    optimizer.step()
    for p, before in zip(model[0].parameters(), frozen):
        assert_bitwise_equal(p.detach(), before)
        assert p not in optimizer.state
    assert_bitwise_equal(model[2].bias.detach(), bias_before)
    assert model[2].bias not in optimizer.state


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = make_model("mlp")
    optimizer = AdamW(model.parameters())
    loss_of("mlp", model, 0).backward()
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours, theirs = AdamW(ours_model.parameters(), lr=1e-2), torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)

    def closure_for(model, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = loss_of("mlp", model, 0)
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        ours_loss = ours.step(closure_for(ours_model, ours))
        torch_loss = theirs.step(closure_for(torch_model, theirs))
        assert_matches_torch(ours_loss, torch_loss)
    assert_same_params(ours_model, torch_model)


SCHEDULERS = {
    "warmup-cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=4),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)],
        milestones=[4],
    ),  # fmt: skip
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lr_schedulers_drive_it_as_they_drive_torch(scheduler):
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=1e-3)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, foreach=False)
    train("mlp", ours_model, ours, STEPS, scheduler=SCHEDULERS[scheduler](ours))
    train("mlp", torch_model, theirs, STEPS, scheduler=SCHEDULERS[scheduler](theirs))
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[0]["betas"] == theirs.param_groups[0]["betas"]  # OneCycleLR cycles beta1
    assert_same_params(ours_model, torch_model)


def test_reduce_lr_on_plateau():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=1e-2)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    plateau_ours = torch.optim.lr_scheduler.ReduceLROnPlateau(ours, patience=0, factor=0.5)
    plateau_theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, patience=0, factor=0.5)
    for step in range(STEPS):
        for model, optimizer, plateau in ((ours_model, ours, plateau_ours), (torch_model, theirs, plateau_theirs)):
            optimizer.zero_grad()
            loss = loss_of("mlp", model, step % 2)  # two batches: the loss plateaus quickly
            loss.backward()
            optimizer.step()
            plateau.step(loss.item())
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] < 1e-2
    assert_same_params(ours_model, torch_model)


# --------------------------------------------------------------------------- low precision


def test_bf16_params_track_torch():
    ours_model = make_model("mlp", dtype=torch.bfloat16)
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=1e-3)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, foreach=False)
    train("mlp", ours_model, ours, 6)
    train("mlp", torch_model, theirs, 6)
    # torch rounds every intermediate to bf16; fastopt computes in fp32 and rounds once. (fp16
    # states are not compared with torch: (1 - beta2) * g^2 underflows fp16 for typical grads, and
    # where torch's step then divides by eps alone, fastopt's uses the fp32 value before rounding.)
    assert_same_params(ours_model, torch_model, exact=False, **tolerance(torch.bfloat16))
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in ours.state.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_states_for_low_precision_params_follow_an_fp32_master_copy(dtype):
    model = make_model("mlp", dtype=dtype)
    master = twin(model).float()
    ours = AdamW(model.parameters(), lr=1e-3, state_dtype=torch.float32)
    reference = torch.optim.AdamW(master.parameters(), lr=1e-3, foreach=False)
    for step in range(4):  # same grads for both: the bf16 model's, cast up
        ours.zero_grad()
        loss_of("mlp", model, step).backward()
        for p, q in zip(model.parameters(), master.parameters()):
            q.data.copy_(p.data)  # re-sync the master to the bf16 weights: one step's drift only
            q.grad = p.grad.float()
        ours.step()
        reference.step()
        for p, q in zip(model.parameters(), master.parameters()):
            torch.testing.assert_close(p.float(), q.detach(), **tolerance(dtype))
    assert all(s["exp_avg"].dtype == torch.float32 for s in ours.state.values())


# --------------------------------------------------------------------------- clipping in the step


@pytest.mark.parametrize("model_name", MODELS)
def test_max_grad_norm_equals_clip_then_step_bitwise(model_name):
    skip_noise_driven_model_off_torch(model_name)
    ours_model = make_model(model_name)
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=3e-3, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)
    norms = []

    def clip(model, _):
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=False))

    for step in range(STEPS):
        train(model_name, ours_model, ours, 1, start=step)
        train(model_name, torch_model, theirs, 1, start=step, before_step=clip)
        assert_matches_torch(ours.stats["grad_norm"], norms[-1])
        expected_coef = torch.clamp(0.5 / (norms[-1] + 1e-6), max=1.0)
        assert_matches_torch(ours.stats["clip_coef"], expected_coef)
    assert_same_params(ours_model, torch_model)
    assert ours.stats["skipped_steps"].item() == 0 and ours.stats["found_inf"].item() == 0


def test_agc_equals_agc_then_step_with_a_per_group_opt_out():
    skip_noise_driven_model_off_torch("convnet")
    ours_model = make_model("convnet")
    torch_model = twin(ours_model)
    head, body = list(ours_model[-1].parameters()), list(ours_model[:-1].parameters())
    ours = AdamW([{"params": body}, {"params": head, "agc_clip_factor": None}], lr=3e-3, agc_clip_factor=0.01)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)

    def agc_body_only(model, _):
        fastopt.adaptive_clip_grad_(list(model[:-1].parameters()), clip_factor=0.01, eps=1e-3)

    train("convnet", ours_model, ours, STEPS)
    train("convnet", torch_model, theirs, STEPS, before_step=agc_body_only)
    assert_same_params(ours_model, torch_model)


# --------------------------------------------------------------------------- checkpoints


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_has_torchs_layout():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), amsgrad=True)
    theirs = torch.optim.AdamW(torch_model.parameters(), amsgrad=True, foreach=False)
    train("mlp", ours_model, ours, 2)
    train("mlp", torch_model, theirs, 2)
    ours_sd, torch_sd = ours.state_dict(), theirs.state_dict()
    assert set(torch_sd["param_groups"][0]) <= set(ours_sd["param_groups"][0])
    for i, torch_state in torch_sd["state"].items():
        assert ours_sd["state"][i].keys() == torch_state.keys()
        assert ours_sd["state"][i]["step"].shape == () and ours_sd["state"][i]["step"].dtype == torch.float32


@pytest.mark.parametrize("direction", ["fastopt-to-torch", "torch-to-fastopt"])
def test_checkpoint_moves_between_fastopt_and_torch(direction):
    skip_noise_driven_model_off_torch("transformer")
    first_model = make_model("transformer")
    reference_model = twin(first_model)
    make_first = AdamW if direction == "fastopt-to-torch" else lambda *a, **k: torch.optim.AdamW(*a, foreach=False, **k)
    make_second = (lambda *a, **k: torch.optim.AdamW(*a, foreach=False, **k)) if direction == "fastopt-to-torch" else AdamW
    first = make_first(first_model.parameters(), lr=2e-3, amsgrad=True)
    train("transformer", first_model, first, 5)

    second_model = twin(first_model)
    second = make_second(second_model.parameters(), lr=2e-3, amsgrad=True)
    second.load_state_dict(roundtrip(first.state_dict()))
    train("transformer", second_model, second, 5, start=5)

    reference = torch.optim.AdamW(reference_model.parameters(), lr=2e-3, amsgrad=True, foreach=False)
    train("transformer", reference_model, reference, 10)
    assert_same_params(second_model, reference_model)


def test_resume_is_bit_exact():
    model = make_model("convnet")
    resumed_model = twin(model)
    optimizer = AdamW(model.parameters(), lr=3e-3, max_grad_norm=1.0, amsgrad=True)
    train("convnet", model, optimizer, 4)
    checkpoint = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train("convnet", model, optimizer, 4, start=4)

    resumed_model.load_state_dict(checkpoint["model"])
    resumed = AdamW(resumed_model.parameters(), lr=3e-3, max_grad_norm=1.0, amsgrad=True)
    resumed.load_state_dict(checkpoint["optimizer"])
    train("convnet", resumed_model, resumed, 4, start=4)
    assert_same_params(model, resumed_model, against_torch=False)
    assert_same_states(optimizer, resumed, against_torch=False)


def test_loading_never_downcasts_fp32_states():
    model = make_model("mlp", dtype=torch.bfloat16)
    optimizer = AdamW(model.parameters(), state_dtype=torch.float32)
    train("mlp", model, optimizer, 2)
    saved = roundtrip(optimizer.state_dict())
    reloaded = AdamW(twin(model).parameters())  # default state dtype would be bf16
    reloaded.load_state_dict(saved)
    for state, saved_state in zip(reloaded.state.values(), saved["state"].values()):
        assert state["exp_avg"].dtype == torch.float32
        assert_bitwise_equal(state["exp_avg_sq"], saved_state["exp_avg_sq"])


# --------------------------------------------------------------------------- AMP and skipped steps


def snapshot(model, optimizer):
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [t.clone() for s in optimizer.state.values() for t in s.values()]
    return tensors


@pytest.mark.parametrize("found", [1.0, 2.0])
def test_found_inf_skips_everything(found):
    model = make_model("mlp")
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, amsgrad=True)
    train("mlp", model, optimizer, 2)
    before = snapshot(model, optimizer)
    optimizer.zero_grad()
    loss_of("mlp", model, 2).backward()
    optimizer.grad_scale = torch.tensor(1024.0)
    optimizer.found_inf = torch.tensor(found)  # torch's scaler sums found_inf over devices: 2 happens
    optimizer.step()
    for now, then in zip(snapshot(model, optimizer), before):
        assert_bitwise_equal(now, then)
    assert optimizer.stats["skipped_steps"].item() == 1 and optimizer.stats["found_inf"].item() == found


@pytest.mark.parametrize("scaler_kind", ["torch", "fastopt"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "max_grad_norm"])
def test_under_grad_scaler_equals_torch(scaler_kind, clip):
    """fp16 autocast with a scale that overflows at first: the same steps are skipped, the scale
    backs off and grows the same way, and the params match torch's scaler + AdamW."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=1e-2, max_grad_norm=1.0 if clip else None)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    scaler_cls = fastopt.amp.GradScaler if scaler_kind == "fastopt" else torch.amp.GradScaler
    ours_scaler = scaler_cls("cpu", init_scale=2.0**60, growth_interval=3)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, growth_interval=3)
    for step in range(10):
        for model, optimizer, scaler in ((ours_model, ours, ours_scaler), (torch_model, theirs, torch_scaler)):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_of("mlp", model, step)
            scaler.scale(loss).backward()
            if clip and optimizer is theirs:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            scaler.step(optimizer)
            scaler.update()
        assert ours_scaler.get_scale() == torch_scaler.get_scale()
        assert_same_params(ours_model, torch_model, exact=False, rtol=1e-6, atol=1e-7)
    if scaler_kind == "fastopt" or ours._step_supports_amp_scaling:  # the step skipped it, on the device
        assert ours.stats["skipped_steps"].item() >= 1  # the huge initial scale overflowed
    else:  # torch's scaler unscaled, read the flag and never called step() (as for torch's AdamW)
        assert not ours._step_supports_amp_scaling
    assert ours_scaler.get_scale() < 2.0**60


def test_user_unscale_then_own_clip_under_grad_scaler():
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=1e-2)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, foreach=False)
    scalers = fastopt.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(5):
        for model, optimizer, scaler in zip((ours_model, torch_model), (ours, theirs), scalers):
            optimizer.zero_grad()
            scaler.scale(loss_of("mlp", model, step)).backward()
            scaler.unscale_(optimizer)
            clip = fastopt.clip_grad_norm_ if optimizer is ours else torch.nn.utils.clip_grad_norm_
            clip(model.parameters(), 0.5)
            scaler.step(optimizer)
            scaler.update()
    assert_same_params(ours_model, torch_model)


def test_step_never_reads_the_device():
    model = make_model("convnet")
    head, body = list(model[-1].parameters()), list(model[:-1].parameters())
    optimizer = AdamW(
        [{"params": body}, {"params": head, "agc_clip_factor": None}],
        lr=torch.tensor(1e-3), max_grad_norm=1.0, agc_clip_factor=0.02, amsgrad=True,
    )  # fmt: skip
    scaler = fastopt.amp.GradScaler("cpu", init_scale=256.0)
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(loss_of("convnet", model, step)).backward()
        with ForbidHostReads():
            scaler.step(optimizer)
            scaler.update()
    assert scaler.step_skipped is not None and not scaler.step_skipped
    assert math.isfinite(optimizer.stats["grad_norm"].item())


def test_constructor_checks_like_torch():
    params = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, message in [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"eps": -1.0}, "Invalid epsilon value"),
        ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
        ({"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"agc_clip_factor": 0.0}, "agc_clip_factor"),
        ({"differentiable": True}, "differentiable"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdamW(params, **kwargs)


# --------------------------------------------------------------------------- issue 17: drop-in where users put it


def fastopt_settings(optimizer):
    return {name: getattr(optimizer, name) for name in ("max_grad_norm", "spike_guard", "spike_warmup",
                                                         "spike_ema_decay", "state_dtype", "process_group")}  # fmt: skip


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_fastopts_settings_and_train_as_the_original(how):
    """Item 1: copies came back with fastopt's settings at their defaults (the copy trained
    without clipping)."""
    import copy
    import pickle

    model = make_model("mlp")
    kwargs = dict(lr=1e-2, max_grad_norm=0.05, spike_guard=4.0, spike_warmup=2, spike_ema_decay=0.8, state_dtype=torch.float64)
    optimizer = AdamW(model.parameters(), **kwargs)
    train("mlp", model, optimizer, 3)
    if how == "deepcopy":
        copied_model, copied = copy.deepcopy((model, optimizer))
    elif how == "pickle":
        copied_model, copied = pickle.loads(pickle.dumps((model, optimizer)))
    else:
        buffer = io.BytesIO()
        torch.save((model, optimizer), buffer)
        buffer.seek(0)
        copied_model, copied = torch.load(buffer, weights_only=False)
    assert fastopt_settings(copied) == fastopt_settings(optimizer)
    assert copied.spike_state.keys() == optimizer.spike_state.keys() and copied._step_plan is None
    assert [p for g in copied.param_groups for p in g["params"]] == list(copied_model.parameters())
    train("mlp", model, optimizer, 3, start=3)
    train("mlp", copied_model, copied, 3, start=3)
    assert copied.stats["clip_coef"].item() < 1.0  # it clips
    assert_same_params(copied_model, model, against_torch=False)
    for key in optimizer.spike_state:
        assert_bitwise_equal(copied.spike_state[key], optimizer.spike_state[key])


def test_deepcopy_shares_the_process_group():
    """A process group is a communicator, not data: a deep copy uses the same one."""
    import copy

    group = object()  # stands for a torch.distributed ProcessGroup (never used without grads)
    optimizer = AdamW(make_model("mlp").parameters(), process_group=group)
    assert copy.deepcopy(optimizer).process_group is group


@pytest.mark.parametrize("betas", [(torch.tensor(0.8), torch.tensor(0.95)), (torch.tensor([0.8]), torch.tensor([[0.95]]))],
                         ids=["0-d", "1-element"])  # fmt: skip
def test_tensor_betas_step_as_torch(betas):
    """Item 2: torch 2.13 steps with tensor betas (read on the host here: free for CPU tensors)."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=3e-3, betas=betas, max_grad_norm=1.0)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, betas=betas, foreach=False)
    assert all(b.dim() == 0 for b in ours.param_groups[0]["betas"])  # squeezed, as torch does
    train("mlp", ours_model, ours, STEPS)
    train("mlp", torch_model, theirs, STEPS,
          before_step=lambda model, _: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False))  # fmt: skip
    # torch forms tensor-beta bias corrections in fp32, fastopt in fp64 from the same fp32 betas.
    assert_same_params(ours_model, torch_model, exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)])
def test_mixed_float_and_tensor_betas_raise_torchs_value_error(betas):
    params = [torch.nn.Parameter(torch.randn(3))]
    for cls in (AdamW, torch.optim.AdamW):
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            cls(params, betas=betas)


@pytest.mark.parametrize(
    "kwargs, declared",
    [({}, False), ({"max_grad_norm": 1.0}, True), ({"spike_guard": 5.0}, True), ({"agc_clip_factor": 0.01}, True),
     ({"fused": True}, True)],
    ids=["plain", "max_grad_norm", "spike_guard", "agc", "fused"],
)  # fmt: skip
def test_step_supports_amp_scaling_only_when_the_step_needs_the_scale(kwargs, declared):
    """Item 3: Lightning refuses gradient_clip_val for optimizers that declare it (they unscale
    inside the step); torch's AdamW declares it only with fused=True. fastopt declares it when the
    step clips or guards itself, or with fused=True; assigning it overrides."""
    optimizer = AdamW(make_model("mlp").parameters(), **kwargs)
    assert optimizer._step_supports_amp_scaling is declared
    optimizer._step_supports_amp_scaling = not declared
    assert optimizer._step_supports_amp_scaling is (not declared)


def test_agc_in_a_later_group_declares_amp_scaling():
    model = make_model("mlp")
    optimizer = AdamW(model[0].parameters())
    assert not optimizer._step_supports_amp_scaling
    optimizer.add_param_group({"params": model[-1].parameters(), "agc_clip_factor": 0.01})
    assert optimizer._step_supports_amp_scaling


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "max_grad_norm"])
def test_torch_grad_scaler_overflow_either_way(clip):
    """Item 6: a plain optimizer lets torch.amp.GradScaler skip an overflowing step on the host
    (step() is never called: accelerate sees it); with in-step clipping the scaler hands the step
    its found_inf, the step is called and skips on the device, and only the device counter
    ``stats["skipped_steps"]`` (or fastopt.amp.GradScaler.step_skipped) tells."""
    model = make_model("mlp")
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0 if clip else None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append(1))
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_of("mlp", model, 0)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**60  # it overflowed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # and nothing moved
    assert len(calls) == (1 if clip else 0)
    if clip:
        assert optimizer.stats["skipped_steps"].item() == 1


def test_in_step_norm_sums_in_the_optimizers_param_order():
    """Item 5: with groups in another order than the model's, the in-step norm equals
    clip_grad_norm_ over the optimizer's params (bit for bit on the torch backend) and
    clip_grad_norm_(model.parameters()) within fp32 rounding (the sum's order differs)."""
    model = make_model("mlp")
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    groups = [{"params": [layers[-1].weight, layers[0].bias]}, {"params": [layers[0].weight, layers[-1].bias]}]
    groups += [{"params": [p for layer in layers[1:-1] for p in layer.parameters()]}] if len(layers) > 2 else []
    optimizer = AdamW(groups, lr=1e-3, max_grad_norm=1e9)
    loss_of("mlp", model, 0).backward()
    optimizer_order = [p for g in optimizer.param_groups for p in g["params"]]
    by_optimizer_order = torch.nn.utils.get_total_norm([p.grad for p in optimizer_order], foreach=False)
    by_model_order = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=False)
    optimizer.step()
    assert_matches_torch(optimizer.stats["grad_norm"], by_optimizer_order)
    torch.testing.assert_close(optimizer.stats["grad_norm"], by_model_order, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_step_is_graph_capturable_and_sync_free_on_gpu():
    model = make_model("mlp").cuda()
    optimizer = AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), max_grad_norm=1.0)
    inputs, targets = (t.cuda() for t in (torch.randn(16, 20), torch.randint(0, 5, (16,))))
    for _ in range(3):  # warm up on a side stream, as CUDA graph capture requires
        optimizer.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    with no_host_sync():
        optimizer.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("scaler_kind", ["torch", "fastopt"])
def test_agc_under_grad_scaler_equals_unscale_then_agc_then_step(scaler_kind):
    skip_noise_driven_model_off_torch("convnet")
    ours_model = make_model("convnet")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=3e-3, agc_clip_factor=0.01, max_grad_norm=2.0)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)
    scaler_cls = fastopt.amp.GradScaler if scaler_kind == "fastopt" else torch.amp.GradScaler
    ours_scaler, torch_scaler = scaler_cls("cpu", init_scale=512.0), torch.amp.GradScaler("cpu", init_scale=512.0)
    for step in range(6):
        ours.zero_grad()
        ours_scaler.scale(loss_of("convnet", ours_model, step)).backward()
        ours_scaler.step(ours)
        ours_scaler.update()

        theirs.zero_grad()
        torch_scaler.scale(loss_of("convnet", torch_model, step)).backward()
        torch_scaler.unscale_(theirs)
        fastopt.adaptive_clip_grad_(torch_model.parameters(), clip_factor=0.01)
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 2.0, foreach=False)
        torch_scaler.step(theirs)
        torch_scaler.update()
    assert_same_params(ours_model, torch_model)


# --------------------------------------------------------------------------- the cached step plan
# After one step, later steps with the same params having grads reuse the validated lists and
# check only the new grads (host cost; docs/design.md section 1). These tests hold it to the same
# results and the same refusals as the full path.


def params_and_states_copy(optimizer: AdamW) -> list[torch.Tensor]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    states = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
    return [t.detach().clone() for t in params + states]


def test_later_steps_skip_the_full_validation_and_still_equal_torch(monkeypatch):
    from fastopt import ops

    full_checks = []  # the full checks: in one C++ pass (with the CPU extension) or in Python
    for name in ("check_writable", "_lists_in_one_pass"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **k: full_checks.append(1) or _real(*a, **k))
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=3e-3, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)

    def clip(model, optimizer):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)

    train("mlp", ours_model, ours, 1)
    checks_of_first_step = len(full_checks)
    assert checks_of_first_step > 0
    train("mlp", ours_model, ours, STEPS - 1, start=1)
    assert len(full_checks) == checks_of_first_step  # the plan was reused: no full validation again
    train("mlp", torch_model, theirs, STEPS, before_step=clip)
    assert_same_params(ours_model, torch_model)
    assert_same_states(ours, theirs)


@pytest.mark.parametrize(
    "bad_grad, error, match",
    [
        ("wrong-shape", ValueError, r"grads\[\d+\] has shape \(3,\) but its param has shape"),
        ("integer", TypeError, r"grads\[\d+\] has dtype torch.int64"),
        ("aliases-its-param", ValueError, r"grads\[\d+\] shares memory with a param or state"),
        ("sparse", RuntimeError, "optimizers do not support sparse gradients"),
    ],
)
def test_a_bad_grad_on_a_later_step_is_refused_and_changes_nothing(bad_grad, error, match):
    model = make_model("mlp")
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    train("mlp", model, optimizer, 2)  # the plan is in place
    loss_of("mlp", model, 2).backward()
    target = model[2].bias
    # torch's .grad setter refuses a wrong shape or dtype; .grad.data = ... does not.
    if bad_grad == "wrong-shape":
        target.grad.data = torch.randn(3)
    elif bad_grad == "integer":
        target.grad.data = torch.ones_like(target, dtype=torch.int64)
    elif bad_grad == "aliases-its-param":
        target.grad = target.detach()
    else:
        target.grad = torch.randn_like(target).to_sparse()
    before = params_and_states_copy(optimizer)
    with pytest.raises(error, match=match):
        optimizer.step()
    for old, new in zip(before, params_and_states_copy(optimizer)):
        assert_bitwise_equal(new, old)


def test_params_gaining_and_losing_grads_and_a_reload_between_steps_track_torch():
    """Freezing and unfreezing a layer changes which params have grads (a new plan), and a
    checkpoint load replaces every state tensor (the plan must not update the old ones)."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=3e-3, amsgrad=True)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, amsgrad=True, foreach=False)

    def drop_first_layer_grads(model, optimizer):
        for p in model[0].parameters():
            p.grad = None

    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        train("mlp", model, optimizer, 3)
        train("mlp", model, optimizer, 3, start=3, before_step=drop_first_layer_grads)
        train("mlp", model, optimizer, 2, start=6)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    replaced = [s["exp_avg"] for s in ours.state.values()]
    replaced_values = [t.clone() for t in replaced]
    ours.load_state_dict(torch.load(buffer))
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        train("mlp", model, optimizer, 4, start=8)
    assert_same_params(ours_model, torch_model)
    assert_same_states(ours, theirs)
    for old, value in zip(replaced, replaced_values):  # the states from before the load are left alone
        assert_bitwise_equal(old, value)


def test_states_reset_by_hand_between_steps_are_noticed():
    """Some training scripts reset the moments of some params (optimizer.state[p] = {} or a new
    tensor): the reused plan must not keep updating the old tensors."""
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    ours = AdamW(ours_model.parameters(), lr=3e-3)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        train("mlp", model, optimizer, 3)
        first, second = list(model.parameters())[:2]
        del optimizer.state[first]  # starts over from step 0
        optimizer.state[second]["exp_avg"] = torch.zeros_like(second)  # a new tensor
        train("mlp", model, optimizer, 3, start=3)
    assert_same_params(ours_model, torch_model)
    assert_same_states(ours, theirs)
