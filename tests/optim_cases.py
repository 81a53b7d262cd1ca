"""What fastopt's optimizers share (issue 19, item 4), checked once for each: in-step clipping,
AGC, AMP unscaling and the skip on overflow, the spike guard, the monitor, ``stats``, no host
read, copies and checkpoints. Each optimizer's test file runs these checks through a subclass of
``SharedOptimizerChecks`` that names its ``Spec`` (tests/test_optim_sgd.py, test_optim_adam.py,
test_optim_lion.py).

A ``Spec`` pairs a fastopt optimizer with the optimizer its results are compared with: torch's
(SGD, Adam: ``foreach=False``), or, for Lion, which torch lacks, fastopt's Lion itself with the
feature under test done outside the step (clip_grad_norm_ before ``step()``, say); Lion's own
math is checked against a float64 reference from the paper in tests/test_optim_lion.py.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle

import pytest
import torch

import fastopt
from fastopt.monitor import TrainingMonitor
from fastopt.optim import SGD, Adam, Lion
from tests.helpers import active_backend, assert_bitwise_equal, inject_nonfinite, tolerance
from tests.models import loss_of, make_model, train, twin
from tests.test_no_sync import ForbidHostReads

STEPS = 5


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    ours: type
    theirs: object  # (params, **kwargs) -> the optimizer compared with
    kwargs: dict  # hyperparameters of the runs (the shared ones: nothing that torch lacks)
    exact_backends: tuple  # backends on which ours equals theirs bit for bit (fp32)
    sign_update: bool = False  # Lion: an element's update is +-lr, so rounding can flip it

    def make(self, params, **kwargs):
        return self.ours(params, **{**self.kwargs, **kwargs})

    def reference(self, params, **kwargs):
        return self.theirs(params, **{**self.kwargs, **kwargs})

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
        """Bit for bit on the exact backends; otherwise within fp32 rounding per step, but for
        Lion, whose update is a sign: there an element whose direction is within rounding of zero
        may step the other way (by 2 lr), so a few elements may differ by up to 2 lr per step."""
        if active_backend() in self.exact_backends:
            assert_bitwise_equal(actual, expected, msg)
            return
        if not self.sign_update:
            torch.testing.assert_close(actual, expected, **tolerance(torch.float32), msg=msg or None)
            return
        assert_close_but_few_sign_flips(actual, expected, lr=self.kwargs["lr"], steps=STEPS, msg=msg)

    def __repr__(self) -> str:
        return self.name


def assert_close_but_few_sign_flips(actual, expected, *, lr, steps, msg="", fraction=0.01):
    """Lion's results from two roundings: equal within fp32 rounding but for at most ``fraction``
    of the elements, which differ by at most 2 lr per step."""
    actual, expected = actual.detach().double(), expected.detach().double()
    close = torch.isclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert (~close).double().mean().item() <= fraction, msg or "too many elements differ"
    assert (actual - expected).abs().max().item() <= 2 * lr * steps * 1.001 + 1e-6, msg


def _torch_sgd(params, **kwargs):
    return torch.optim.SGD(params, foreach=False, **kwargs)


def _torch_adam(params, **kwargs):
    return torch.optim.Adam(params, foreach=False, **kwargs)


SPECS = {
    # Momentum with weight decay, no dampening (the default): a skipped first step is then torch's.
    "sgd": Spec("SGD", SGD, _torch_sgd, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-3}, ("torch", "cpu")),
    # L2 weight decay (torch.optim.Adam's, added to the grad) and amsgrad: all of Adam's states.
    "adam": Spec("Adam", Adam, _torch_adam, {"lr": 3e-3, "weight_decay": 1e-2, "amsgrad": True}, ("torch",)),
    "lion": Spec("Lion", Lion, Lion, {"lr": 1e-3, "weight_decay": 0.1}, ("torch",), sign_update=True),
}


def all_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def assert_same_params(spec, model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        spec.assert_close(a, b, name)


def assert_same_states(spec, ours, theirs):
    """The same keys per param (torch's layout), the same values (as ``assert_close``)."""
    for p_ours, p_theirs in zip(all_params(ours), all_params(theirs)):
        s, t = ours.state.get(p_ours, {}), theirs.state.get(p_theirs, {})
        assert s.keys() == t.keys()
        for key in s:
            spec.assert_close(s[key], t[key], key)


def snapshot(model, optimizer):
    """Every param, per-param state (step counters too) and the spike guard's state, copied."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tensors += [t.clone() for t in optimizer.spike_state.values()]
    return tensors


def scaled_step(model, optimizer, scaler, step, *, inject_seed=None, before_step=None):
    """One GradScaler step on the MLP; ``inject_seed``: inf / -inf / nan at random grad positions."""
    optimizer.zero_grad()
    scaler.scale(loss_of("mlp", model, step)).backward()
    if inject_seed is not None:
        inject_nonfinite([p.grad for p in model.parameters()], seed=inject_seed)
    if before_step is not None:
        before_step(model, optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()


class SharedOptimizerChecks:
    """Issue 19, item 4 for one optimizer: a test file subclasses it as ``TestShared`` with its
    ``spec``. Every check runs on the MLP of tests/models.py: its params all get gradients that
    are not rounding noise, so every backend can be compared."""

    spec: Spec

    # ------------------------------------------------------------------ clipping in the step

    def test_max_grad_norm_equals_clip_grad_norm_then_step(self):
        # The norm is torch's bit for bit on the torch backend only: the others sum in another order
        # (README, "When norms are bit-identical"), and the clipped steps then follow within rounding.
        spec = dataclasses.replace(self.spec, exact_backends=tuple(b for b in self.spec.exact_backends if b == "torch"))
        ours_model = make_model("mlp")
        ref_model = twin(ours_model)
        ours, theirs = spec.make(ours_model.parameters(), max_grad_norm=0.4), spec.reference(ref_model.parameters())
        norms = []

        def clip(model, _):
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.4, foreach=False))

        clipped = 0
        for step in range(STEPS):
            train("mlp", ours_model, ours, 1, start=step)
            train("mlp", ref_model, theirs, 1, start=step, before_step=clip)
            spec.assert_close(ours.stats["grad_norm"], norms[-1], "grad_norm")
            spec.assert_close(ours.stats["clip_coef"], torch.clamp(0.4 / (norms[-1] + 1e-6), max=1.0), "clip_coef")
            clipped += ours.stats["clip_coef"].item() < 1.0
        assert clipped > 0
        assert_same_params(spec, ours_model, ref_model)
        assert_same_states(spec, ours, theirs)
        assert ours.stats["skipped_steps"].item() == 0 and ours.stats["found_inf"].item() == 0

    def test_agc_equals_agc_then_step_with_a_per_group_opt_out(self):
        spec = self.spec
        ours_model = make_model("mlp")
        ref_model = twin(ours_model)
        head, body = list(ours_model[-1].parameters()), list(ours_model[:-1].parameters())
        ours = spec.make([{"params": body}, {"params": head, "agc_clip_factor": None}], agc_clip_factor=0.01)
        theirs = spec.reference(ref_model.parameters())
        assert ours._step_supports_amp_scaling

        def agc_body_only(model, _):
            fastopt.adaptive_clip_grad_(list(model[:-1].parameters()), clip_factor=0.01, eps=1e-3)

        train("mlp", ours_model, ours, STEPS)
        train("mlp", ref_model, theirs, STEPS, before_step=agc_body_only)
        assert_same_params(spec, ours_model, ref_model)

    @pytest.mark.parametrize("scaler_kind", ["fastopt", "torch"])
    def test_agc_and_clipping_under_grad_scaler_equal_unscale_then_agc_then_clip_then_step(self, scaler_kind):
        spec = self.spec
        ours_model = make_model("mlp")
        ref_model = twin(ours_model)
        ours = spec.make(ours_model.parameters(), agc_clip_factor=0.01, max_grad_norm=0.3)
        theirs = spec.reference(ref_model.parameters())
        scaler_cls = fastopt.amp.GradScaler if scaler_kind == "fastopt" else torch.amp.GradScaler
        ours_scaler, ref_scaler = scaler_cls("cpu", init_scale=512.0), torch.amp.GradScaler("cpu", init_scale=512.0)

        def unscale_agc_clip(model, optimizer, scaler):
            scaler.unscale_(optimizer)
            fastopt.adaptive_clip_grad_(model.parameters(), clip_factor=0.01)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3, foreach=False)

        for step in range(STEPS):
            scaled_step(ours_model, ours, ours_scaler, step)
            scaled_step(ref_model, theirs, ref_scaler, step, before_step=unscale_agc_clip)
        assert_same_params(spec, ours_model, ref_model)

    # ------------------------------------------------------------------ AMP and skipped steps

    @pytest.mark.parametrize("seed", [0, 1])
    @pytest.mark.parametrize("scaler_kind", ["fastopt", "torch"])
    def test_an_overflow_changes_no_bit_of_params_states_or_counters(self, scaler_kind, seed):
        """inf / nan at random grad positions under a GradScaler: the step is skipped (on the
        device: the step is called, with in-step clipping for torch's scaler to hand it the
        flag), nothing of the optimizer's changes but the skip counter, and the next step goes on."""
        spec = self.spec
        model = make_model("mlp")
        optimizer = spec.make(model.parameters(), max_grad_norm=1.0, spike_guard=50.0, spike_warmup=1)
        scaler_cls = fastopt.amp.GradScaler if scaler_kind == "fastopt" else torch.amp.GradScaler
        scaler = scaler_cls("cpu", init_scale=256.0)
        for step in range(2):
            scaled_step(model, optimizer, scaler, step)
        before = snapshot(model, optimizer)
        calls = []
        optimizer.register_step_pre_hook(lambda *args: calls.append(1))
        scaled_step(model, optimizer, scaler, 2, inject_seed=seed)
        assert calls == [1]  # the step ran, and skipped on the device
        for now, then in zip(snapshot(model, optimizer), before, strict=True):
            assert_bitwise_equal(now, then)
        assert optimizer.stats["skipped_steps"].item() == 1 and optimizer.stats["found_inf"].item() != 0
        assert optimizer.stats["spikes"].item() == 0 and scaler.get_scale() == 128.0
        scaled_step(model, optimizer, scaler, 3)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert not torch.equal(next(model.parameters()), before[0])

    @pytest.mark.parametrize("scaler_kind", ["fastopt", "torch"])
    @pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "max_grad_norm"])
    def test_under_grad_scaler_equals_unscale_then_step(self, scaler_kind, clip):
        """fp16 autocast with a scale that overflows at first: the same steps skipped, the same
        scales, and the params of torch's scaler unscaling before (clipping and) the reference's step."""
        spec = self.spec
        ours_model = make_model("mlp")
        ref_model = twin(ours_model)
        ours = spec.make(ours_model.parameters(), max_grad_norm=1.0 if clip else None)
        theirs = spec.reference(ref_model.parameters())
        scaler_cls = fastopt.amp.GradScaler if scaler_kind == "fastopt" else torch.amp.GradScaler
        ours_scaler = scaler_cls("cpu", init_scale=2.0**21, growth_interval=2)
        ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**21, growth_interval=2)
        for step in range(STEPS):
            for model, optimizer, scaler in ((ours_model, ours, ours_scaler), (ref_model, theirs, ref_scaler)):
                optimizer.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = loss_of("mlp", model, step)
                scaler.scale(loss).backward()
                if optimizer is theirs:
                    scaler.unscale_(optimizer)
                    if clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
                scaler.step(optimizer)
                scaler.update()
            assert ours_scaler.get_scale() == ref_scaler.get_scale()
        assert ours_scaler.get_scale() < 2.0**21  # it overflowed, and backed off
        if scaler_kind == "fastopt" or clip:  # the step skipped it, on the device
            assert 1 <= ours.stats["skipped_steps"].item() < STEPS
        assert not torch.equal(ours_model[0].weight, make_model("mlp")[0].weight)  # and then stepped
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            # the scaler's unscale (g * (1/s)) and the step's (g / s) may differ in the last bit
            if spec.sign_update:
                assert_close_but_few_sign_flips(a, b, lr=spec.kwargs["lr"], steps=STEPS)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # ------------------------------------------------------------------ spike guard, monitor, stats

    def _spiky_run(self, spike_guard, *, spike_at=6, nan_at=8, steps=10):
        """Train with a 1000x loss spike at one step and a nan grad at another."""
        model = make_model("mlp")
        optimizer = self.spec.make(model.parameters(), spike_guard=spike_guard, spike_warmup=4)
        losses, untouched = [], []
        for step in range(steps):
            optimizer.zero_grad()
            loss = loss_of("mlp", model, step % 4)
            (loss * (1000.0 if step == spike_at else 1.0)).backward()
            if step == nan_at:
                next(model.parameters()).grad.view(-1)[3] = float("nan")
            before = snapshot(model, optimizer)
            optimizer.step()
            untouched.append(all(torch.equal(a, b) for a, b in zip(snapshot(model, optimizer), before, strict=True)))
            losses.append(loss.item())
        return model, optimizer, losses, untouched

    def test_spike_guard_skips_the_spike_and_the_nan_and_training_recovers(self):
        model, optimizer, losses, untouched = self._spiky_run(spike_guard=10.0)
        assert [i for i, u in enumerate(untouched) if u] == [6, 8]
        assert optimizer.stats["spikes"].item() == 2 and optimizer.stats["skipped_steps"].item() == 2
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert losses[9] < losses[1]  # the same batch

    def test_monitor_and_stats_record_what_a_direct_computation_gives(self):
        model = make_model("mlp")
        names = [n for n, _ in model.named_parameters()]
        monitor = TrainingMonitor(history=4, names=names)
        optimizer = self.spec.make(model.parameters(), max_grad_norm=0.4, monitor=monitor)
        norms, per_tensor = [], None
        for step in range(6):
            optimizer.zero_grad()
            loss_of("mlp", model, step).backward()
            per_tensor = torch.stack([p.grad.norm() for p in model.parameters()])
            norms.append(torch.linalg.vector_norm(per_tensor))
            with ForbidHostReads():
                optimizer.step()
            torch.testing.assert_close(optimizer.stats["grad_norm"], norms[-1])
            torch.testing.assert_close(optimizer.stats["clip_coef"], torch.clamp(0.4 / (norms[-1] + 1e-6), max=1.0))
        history = monitor.history()
        torch.testing.assert_close(history["grad_norm"], torch.stack(norms[-4:]))
        summary = monitor.summary(top=2)
        clipped = sum(bool(n > 0.4) for n in norms)
        assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and 0 < clipped
        assert summary["clip_rate"] == pytest.approx(clipped / 6)
        assert list(summary["largest_grad_norms"]) == [names[i] for i in per_tensor.topk(2).indices.tolist()]
        stats = optimizer.stats
        assert stats["found_inf"].item() == 0 and stats["skipped_steps"].item() == 0 and stats["spikes"].item() == 0
        assert stats["skipped_steps"].dtype == torch.int64

    def test_step_never_reads_the_device(self):
        """Every feature at once under fastopt's GradScaler, a tensor lr: no tensor value is read
        on the host (what would be a device sync on a GPU; tests/test_no_sync.py)."""
        model = make_model("mlp")
        head, body = list(model[-1].parameters()), list(model[:-1].parameters())
        optimizer = self.spec.make(
            [{"params": body}, {"params": head, "agc_clip_factor": None}], lr=torch.tensor(1e-3), max_grad_norm=1.0,
            agc_clip_factor=0.02, spike_guard=10.0, spike_warmup=1,
        )  # fmt: skip
        scaler = fastopt.amp.GradScaler("cpu", init_scale=256.0)
        for step in range(3):
            optimizer.zero_grad()
            scaler.scale(loss_of("mlp", model, step)).backward()
            with ForbidHostReads():
                scaler.step(optimizer)
                scaler.update()
        assert scaler.step_skipped is not None and not scaler.step_skipped
        assert math.isfinite(optimizer.stats["grad_norm"].item()) and optimizer.stats["skipped_steps"].item() == 0

    # ------------------------------------------------------------------ copies and checkpoints

    @pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
    def test_copies_keep_fastopts_settings_and_train_as_the_original(self, how):
        model = make_model("mlp")
        kwargs = dict(max_grad_norm=0.05, spike_guard=4.0, spike_warmup=2, spike_ema_decay=0.8, state_dtype=torch.float64)
        optimizer = self.spec.make(model.parameters(), **kwargs)
        train("mlp", model, optimizer, 2)
        if how == "deepcopy":
            copied_model, copied = copy.deepcopy((model, optimizer))
        elif how == "pickle":
            copied_model, copied = pickle.loads(pickle.dumps((model, optimizer)))
        else:
            buffer = io.BytesIO()
            torch.save((model, optimizer), buffer)
            buffer.seek(0)
            copied_model, copied = torch.load(buffer, weights_only=False)
        assert type(copied) is type(optimizer)
        for name in kwargs:
            assert getattr(copied, name) == getattr(optimizer, name), name
        assert copied.param_groups[0].keys() == optimizer.param_groups[0].keys()
        assert all_params(copied) == list(copied_model.parameters())
        train("mlp", model, optimizer, 2, start=2)
        train("mlp", copied_model, copied, 2, start=2)
        assert copied.stats["clip_coef"].item() < 1.0  # it clips
        for a, b in zip(copied_model.parameters(), model.parameters()):
            assert_bitwise_equal(a, b)
        for key in optimizer.spike_state:
            assert_bitwise_equal(copied.spike_state[key], optimizer.spike_state[key])

    def test_resume_from_a_weights_only_checkpoint_is_bit_exact(self):
        model = make_model("mlp")
        resumed_model = twin(model)
        kwargs = dict(max_grad_norm=1.0, spike_guard=10.0, spike_warmup=1)
        optimizer = self.spec.make(model.parameters(), **kwargs)
        train("mlp", model, optimizer, 3)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        train("mlp", model, optimizer, 3, start=3)
        resumed_model.load_state_dict(checkpoint["model"])
        resumed = self.spec.make(resumed_model.parameters(), **kwargs)
        resumed.load_state_dict(checkpoint["optimizer"])
        train("mlp", resumed_model, resumed, 3, start=3)
        for a, b in zip(model.parameters(), resumed_model.parameters()):
            assert_bitwise_equal(a, b)
        for p, q in zip(model.parameters(), resumed_model.parameters()):
            assert optimizer.state[p].keys() == resumed.state[q].keys()
            for key in optimizer.state[p]:
                assert_bitwise_equal(optimizer.state[p][key], resumed.state[q][key], key)

    def test_fp32_states_for_bf16_params(self):
        """``state_dtype=torch.float32``: fp32 states for bf16 params, kept through a reload
        (torch's loader would round them to the param's dtype)."""
        model = make_model("mlp", dtype=torch.bfloat16)
        optimizer = self.spec.make(model.parameters(), state_dtype=torch.float32)
        train("mlp", model, optimizer, 2)
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
        states = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
        assert states and all(t.dtype == torch.float32 for t in states)
        reloaded = self.spec.make(twin(model).parameters())
        reloaded.load_state_dict(optimizer.state_dict())
        assert all(t.dtype == torch.float32 for s in reloaded.state.values() for k, t in s.items() if k != "step")
