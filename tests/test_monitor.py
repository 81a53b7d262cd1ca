"""The device-side monitor and the spike guard: numbers equal direct computations; spikes and
NaNs leave the params untouched and training recovers."""

import io

import pytest
import torch

import fastopt
from fastopt.monitor import TrainingMonitor
from fastopt.optim import AdamW
from tests.helpers import assert_bitwise_equal
from tests.models import loss_of, make_model, twin
from tests.test_no_sync import ForbidHostReads


def test_monitor_records_what_a_direct_computation_gives():
    model = make_model("mlp")
    names = [n for n, _ in model.named_parameters()]
    monitor = TrainingMonitor(history=4, names=names)
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.45, monitor=monitor)
    norms, per_tensor = [], None
    for step in range(6):
        optimizer.zero_grad()
        loss_of("mlp", model, step).backward()
        grads = [p.grad for p in model.parameters()]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        per_tensor = torch.stack([g.norm() for g in grads])
        with ForbidHostReads():
            optimizer.step()

    history = monitor.history()
    torch.testing.assert_close(history["grad_norm"], torch.stack(norms[-4:]))  # the ring keeps the last 4
    assert not history["skipped"].any()
    summary = monitor.summary(top=3)
    clipped = sum(bool(n > 0.45) for n in norms)
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    assert summary["clip_rate"] == pytest.approx(clipped / 6) and 0 < clipped < 6
    assert summary["grad_norm"] == pytest.approx(norms[-1].item())
    top = per_tensor.topk(3)
    assert list(summary["largest_grad_norms"]) == [names[i] for i in top.indices.tolist()]
    assert list(summary["largest_grad_norms"].values()) == pytest.approx(top.values.tolist())


def test_monitor_names_follow_params_that_have_grads():
    model = make_model("mlp")
    names = [n for n, _ in model.named_parameters()]
    monitor = TrainingMonitor(names=names)
    optimizer = AdamW(model.parameters(), monitor=monitor)
    loss_of("mlp", model, 0).backward()
    model[0].weight.grad = None  # this param takes no part in the step
    model[4].bias.grad.mul_(1e3)  # the largest grad norm by far
    optimizer.step()
    summary = monitor.summary(top=1)
    assert list(summary["largest_grad_norms"]) == ["4.bias"]


def spiky_run(spike_guard, *, spike_at=8, nan_at=11, steps=16):
    """Train with a 1000x loss spike at one step and a NaN grad at another."""
    model = make_model("mlp")
    optimizer = AdamW(model.parameters(), lr=1e-2, spike_guard=spike_guard, spike_warmup=5)
    losses, untouched = [], []
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_of("mlp", model, step)
        (loss * (1000.0 if step == spike_at else 1.0)).backward()
        if step == nan_at:
            next(model.parameters()).grad.view(-1)[3] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        untouched.append(all(torch.equal(p, b) for p, b in zip(model.parameters(), before)))
        losses.append(loss.item())
    return model, optimizer, losses, untouched


def test_spike_guard_skips_the_spike_and_the_nan_and_training_recovers():
    model, optimizer, losses, untouched = spiky_run(spike_guard=10.0)
    assert [i for i, u in enumerate(untouched) if u] == [8, 11]
    assert optimizer.stats["spikes"].item() == 2 and optimizer.stats["skipped_steps"].item() == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_without_the_guard_the_nan_destroys_the_run():
    model, _, _, untouched = spiky_run(spike_guard=None)
    assert not any(untouched[:11])
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_spike_guard_waits_for_its_warmup():
    _, optimizer, _, untouched = spiky_run(spike_guard=10.0, spike_at=2, nan_at=99)
    assert not any(untouched)  # the spike at step 2 came before 5 accepted steps: not judged
    assert optimizer.stats["spikes"].item() == 0


def test_spike_guard_state_is_checkpointed_and_resume_is_bit_exact():
    model = make_model("mlp")
    resumed_model = twin(model)
    optimizer = AdamW(model.parameters(), lr=1e-2, spike_guard=3.0, spike_warmup=2)
    for step in range(6):
        optimizer.zero_grad()
        loss_of("mlp", model, step).backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = AdamW(resumed_model.parameters(), lr=1e-2, spike_guard=3.0, spike_warmup=2)
    resumed.load_state_dict(checkpoint["optimizer"])
    for step in range(6, 12):
        for m, o in ((model, optimizer), (resumed_model, resumed)):
            o.zero_grad()
            (loss_of("mlp", m, step) * (50.0 if step == 9 else 1.0)).backward()
            o.step()
    assert resumed.stats["spikes"].item() == optimizer.stats["spikes"].item() == 1
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert_bitwise_equal(p, q)


def test_spike_guard_leaves_overflows_to_the_scaler():
    model = make_model("mlp")
    optimizer = AdamW(model.parameters(), spike_guard=10.0)
    scaler = fastopt.amp.GradScaler("cpu", init_scale=2.0**24)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_of("mlp", model, 0)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.step_skipped.item() and optimizer.stats["spikes"].item() == 0
    assert optimizer.stats["skipped_steps"].item() == 1 and scaler.get_scale() == 2.0**23
