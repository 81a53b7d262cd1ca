"""torch's generic optimizer contract, run against fastopt.optim.AdamW.

torch's own checks live in test/test_optim.py, which the wheel does not ship; their machinery does
(``torch.testing._internal.common_optimizers``: ``OptimizerInfo``, ``optim_db``, the input and
error-input generators). fastopt's ``OptimizerInfo`` is built from torch's AdamW entry, and the
checks of test_optim.py that concern an optimizer's contract are written here against it: error
inputs, every optimizer input against torch's AdamW, state_dict round trips (with
``weights_only`` loading and old checkpoints), step / state_dict / load_state_dict hooks (global
ones too), the schedulers of the entry, deepcopy of all public attributes, param groups, no-op
steps, printing.

Where fastopt's entry differs from torch's, it says why: no complex params (fastopt's ops take
real floating tensors) and no ``differentiable=True``; ``foreach`` / ``fused`` are accepted and
ignored (every backend is multi-tensor), so torch's two errors for a tensor lr / tensor betas
with ``foreach=True`` do not apply (those configurations step, tested below); and the CPU inputs
include tensor betas, which torch's CPU path supports too without foreach.
"""

from __future__ import annotations

import copy
import io
import sys
import types
import unittest

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

try:
    import expecttest  # noqa: F401  (torch.testing._internal.common_utils imports it)
except ImportError:  # not a fastopt test dependency: its TestCase base is all the import needs
    sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase, ACCEPT=False)
from torch.testing._internal import common_optimizers as co  # noqa: E402

import fastopt
from fastopt.optim import AdamW
from tests.helpers import active_backend

TORCH_INFO = next(info for info in co.optim_db if info.optim_cls is torch.optim.AdamW)

# torch's error inputs that fastopt does not raise, and why.
NOT_RAISED = {
    "lr as Tensor doesn't work with foreach & not capturable": "foreach is ignored: a tensor lr steps",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True": "foreach is ignored: tensor betas step",
}


def fastopt_inputs(device, dtype=None):
    """torch's AdamW inputs for the device, plus tensor lr / tensor betas, which fastopt (and
    torch's single-tensor path) supports on every device."""
    inputs = TORCH_INFO.optim_inputs_func(device, dtype)
    if co._get_device_type(device) == "cpu":
        inputs.append(co.OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.001)}, desc="Tensor lr"))
        inputs.append(co.OptimizerInput(
            params=None, kwargs={"lr": torch.tensor(0.001), "betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]])),
                                 "amsgrad": True},
            desc="Tensor lr, Tensor betas, amsgrad",
        ))  # fmt: skip
    return inputs


def fastopt_error_inputs(device, dtype):
    return [e for e in TORCH_INFO.optim_error_inputs_func(device, dtype) if e.optimizer_error_input.desc not in NOT_RAISED]


FASTOPT_INFO = co.OptimizerInfo(
    AdamW,
    optim_inputs_func=fastopt_inputs,
    optim_error_inputs_func=fastopt_error_inputs,
    scheduler_inputs=TORCH_INFO.scheduler_inputs,
    supported_impls=("foreach", "fused"),  # accepted, ignored; differentiable=True is refused
    not_og_supported_flags=TORCH_INFO.not_og_supported_flags,
    supports_fused_on=("cpu", "cuda"),
    has_capturable_arg=True,
    supports_complex=False,
)

DEVICE = "cpu"
DTYPES = [torch.float32, torch.float64]
INPUTS = co._get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, FASTOPT_INFO)
INPUT_IDS = [i.desc.replace(" ", "_") for i in INPUTS]


def make_params(dtype, seed=0):
    """A weight, a bias, a 0-d param and one that never gets a grad (as test_optim.py uses)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(10, 5, generator=generator, dtype=dtype))
    bias = torch.nn.Parameter(torch.randn(10, generator=generator, dtype=dtype))
    scalar = torch.nn.Parameter(torch.randn((), generator=generator, dtype=dtype))
    frozen = torch.nn.Parameter(torch.randn(3, generator=generator, dtype=dtype))
    return [weight, bias, scalar, frozen]


def loss_of(params, step):
    weight, bias, scalar, _ = params
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(5, generator=generator, dtype=weight.dtype)
    return (weight.mv(x) + bias).pow(2).sum() * scalar.pow(2) + scalar


def run_steps(optimizer, params, steps, start=0, scheduler=None):
    losses = []
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss = loss_of(params, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss.item())
        elif scheduler is not None:
            scheduler.step()
    return losses


def clone_kwargs(kwargs):
    return copy.deepcopy(kwargs)


# --------------------------------------------------------------------------- constructor errors


@pytest.mark.parametrize("error_input", fastopt_error_inputs(DEVICE, torch.float32), ids=lambda e: e.optimizer_error_input.desc)
def test_errors(error_input):
    """test_optim.py's test_errors, on torch's AdamW error inputs (the ones fastopt shares)."""
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else make_params(torch.float32)[:1]
    if error_input.error_on != co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        pytest.fail("AdamW's error inputs are all construction errors")
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            AdamW(params, **optim_input.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            AdamW(params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):  # torch raises the same
            torch.optim.AdamW(params, **optim_input.kwargs)


@pytest.mark.parametrize("desc", list(NOT_RAISED))
def test_what_torch_refuses_with_foreach_steps(desc):
    error_input = next(e for e in TORCH_INFO.optim_error_inputs_func(DEVICE, torch.float32) if e.optimizer_error_input.desc == desc)
    params = make_params(torch.float32)
    optimizer = AdamW(params, **error_input.optimizer_error_input.kwargs)
    run_steps(optimizer, params, 2)
    assert optimizer.state[params[0]]["step"].item() == 2


def test_differentiable_is_refused():
    with pytest.raises(ValueError, match="differentiable"):
        AdamW(make_params(torch.float32), differentiable=True)


# --------------------------------------------------------------------------- every input against torch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optim_input", INPUTS, ids=INPUT_IDS)
def test_matches_torch_adamw(optim_input, dtype):
    """Each input, 5 steps, against torch's AdamW (foreach=False) with the same kwargs: bit for bit
    on the torch backend in fp32 with float hyperparameters (the reference follows fp32 addcdiv's
    order of evaluation; fp64's differs in the last bit); within rounding otherwise (torch computes
    tensor-lr / tensor-beta bias corrections in the tensors' precision)."""
    kwargs = clone_kwargs(optim_input.kwargs)
    torch_kwargs = {k: v for k, v in clone_kwargs(kwargs).items() if k not in ("foreach", "fused")}
    ours_params, torch_params = make_params(dtype), make_params(dtype)
    ours = AdamW(ours_params, **kwargs)
    theirs = torch.optim.AdamW(torch_params, foreach=False, **torch_kwargs)
    run_steps(ours, ours_params, 5)
    run_steps(theirs, torch_params, 5)
    tensor_hyper = any(isinstance(v, torch.Tensor) for v in (kwargs.get("lr"), *kwargs.get("betas", ())))
    exact = active_backend() == "torch" and dtype == torch.float32 and not tensor_hyper
    for a, b in zip(ours_params, torch_params):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p_ours, p_torch in zip(ours_params, torch_params):
        assert ours.state[p_ours].keys() == theirs.state[p_torch].keys()
        if ours.state[p_ours]:
            assert ours.state[p_ours]["step"].dtype == theirs.state[p_torch]["step"].dtype


@pytest.mark.parametrize("optim_input", INPUTS, ids=INPUT_IDS)
def test_forloop_goes_right_direction(optim_input):
    """test_optim.py's: the loss goes down, with each of the entry's schedulers too."""
    for make_schedulers in [None, *TORCH_INFO.scheduler_inputs[0]]:
        params = make_params(torch.float64)
        kwargs = {**clone_kwargs(optim_input.kwargs), "maximize": False}
        if not isinstance(kwargs.get("lr", 0.001), torch.Tensor):
            kwargs["lr"] = 0.01
        optimizer = AdamW(params[:2], **kwargs)
        scheduler = make_schedulers(optimizer) if make_schedulers else None
        weight, bias = params[:2]
        x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            optimizer.step()
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss.item())
            elif scheduler is not None:
                scheduler.step()
        assert (weight.mv(x) + bias).pow(2).sum().item() < initial


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("optim_input", INPUTS, ids=INPUT_IDS)
def test_state_dict_round_trip(optim_input):
    """test_optim.py's test_state_dict_deterministic / test_save_load_equality_with_weights_only:
    the state_dict, saved with torch.save and loaded with weights_only=True into a new optimizer,
    continues exactly as the original."""
    params, copied_params = make_params(torch.float32), make_params(torch.float32)
    ours = AdamW(params, **clone_kwargs(optim_input.kwargs))
    run_steps(ours, params, 3)
    with torch.no_grad():
        for a, b in zip(copied_params, params):
            a.copy_(b)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded = AdamW(copied_params, **clone_kwargs(optim_input.kwargs))
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.state_dict()["param_groups"] == ours.state_dict()["param_groups"]
    run_steps(ours, params, 3, start=3)
    run_steps(loaded, copied_params, 3, start=3)
    for a, b in zip(params, copied_params):
        assert torch.equal(a, b)


def test_state_dict_with_float64_default_dtype_keeps_float64_steps():
    """Issue 17, item 4: torch keeps state['step'] in float64 under a float64 default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params, torch_params = make_params(torch.float64), make_params(torch.float64)
        ours, theirs = AdamW(params), torch.optim.AdamW(torch_params)
        run_steps(ours, params, 2)
        run_steps(theirs, torch_params, 2)
        assert ours.state[params[0]]["step"].dtype == theirs.state[torch_params[0]]["step"].dtype == torch.float64
        reloaded = AdamW(make_params(torch.float64))
        reloaded.load_state_dict(theirs.state_dict())
        assert next(iter(reloaded.state.values()))["step"].dtype == torch.float64
    finally:
        torch.set_default_dtype(default)
    run_steps(ours, params, 1, start=2)  # a float64 counter keeps stepping under a float32 default
    assert ours.state[params[0]]["step"].item() == 3


def test_can_load_older_state_dict():
    """test_optim.py's: steps saved as Python numbers (before torch 1.12) load and step."""
    params = make_params(torch.float32)
    ours = AdamW(params)
    run_steps(ours, params, 2)
    old = copy.deepcopy(ours.state_dict())
    for state in old["state"].values():
        state["step"] = state["step"].item()
    fresh = AdamW(params)
    fresh.load_state_dict(old)
    run_steps(fresh, params, 1, start=2)
    assert fresh.state[params[0]]["step"].item() == 3


def test_state_dict_hooks():
    """test_optim.py's state_dict / load_state_dict pre- and post-hooks."""
    params = make_params(torch.float32)
    ours = AdamW(params)
    run_steps(ours, params, 1)
    calls = []
    ours.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    ours.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    state_dict = ours.state_dict()
    assert calls == ["pre"] and state_dict["extra"] == 1

    def load_pre(opt, sd):
        calls.append("load-pre")
        sd = dict(sd)
        sd.pop("extra")
        return sd

    ours.register_load_state_dict_pre_hook(load_pre)
    ours.register_load_state_dict_post_hook(lambda opt: calls.append("load-post"))
    ours.load_state_dict(state_dict)
    assert calls == ["pre", "load-pre", "load-post"]


# --------------------------------------------------------------------------- hooks, copies, groups


def test_step_hooks_local_and_global():
    """test_optim.py's test_step_pre_hook / test_step_post_hook / test_step_all_hooks."""
    params = make_params(torch.float32)
    ours = AdamW(params)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda opt, a, k: calls.append("global-pre")),
        ours.register_step_pre_hook(lambda opt, a, k: calls.append("pre")),
        ours.register_step_post_hook(lambda opt, a, k: calls.append("post")),
        register_optimizer_step_post_hook(lambda opt, a, k: calls.append("global-post")),
    ]
    try:
        run_steps(ours, params, 2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global-pre", "pre", "post", "global-post"] * 2
    run_steps(ours, params, 1, start=2)
    assert len(calls) == 8  # removed


@pytest.mark.parametrize("optim_input", INPUTS, ids=INPUT_IDS)
def test_deepcopy_copies_all_public_attrs(optim_input):
    """test_optim.py's test: every public attribute of the copy equals the original's (issue 17,
    item 1: fastopt's own settings were lost), and so do pickle and torch.save(optimizer)."""
    params = make_params(torch.float32)
    kwargs = {**clone_kwargs(optim_input.kwargs), "max_grad_norm": 1.0, "spike_guard": 8.0, "spike_warmup": 1,
              "spike_ema_decay": 0.5, "state_dtype": torch.float32}  # fmt: skip
    ours = AdamW(params, **kwargs)
    run_steps(ours, params, 2)

    def public(opt):
        return {k: v for k, v in vars(opt).items() if not k.startswith("_")}

    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(ours), torch.load(buffer, weights_only=False)):
        assert public(copied).keys() == public(ours).keys()
        for key, value in public(ours).items():
            if key in ("state", "param_groups"):
                continue
            if isinstance(value, dict):
                assert value.keys() == public(copied)[key].keys(), key
                for k, v in value.items():
                    assert (torch.equal(v, public(copied)[key][k]) if isinstance(v, torch.Tensor) else v == public(copied)[key][k]), (key, k)
            else:
                assert getattr(copied, key) == value, key
        assert copied._step_supports_amp_scaling == ours._step_supports_amp_scaling
        copied_params = [p for g in copied.param_groups for p in g["params"]]
        run_steps(copied, copied_params, 1, start=2)
        assert copied.stats["clip_coef"].item() <= 1.0 and copied.spike_state["accepted"].item() >= 2


@pytest.mark.parametrize("optim_input", INPUTS, ids=INPUT_IDS)
def test_param_groups_lr_and_weight_decay(optim_input):
    """test_optim.py's test_param_groups_weight_decay / test_param_groups_lr: per-group settings
    against torch's AdamW with the same groups."""
    kwargs = {k: v for k, v in clone_kwargs(optim_input.kwargs).items() if k not in ("foreach", "fused")}

    def groups(params):
        return [{"params": params[:1], "weight_decay": 0.5, "lr": 0.05}, {"params": params[1:]}]

    ours_params, torch_params = make_params(torch.float64), make_params(torch.float64)
    ours, theirs = AdamW(groups(ours_params), **kwargs), torch.optim.AdamW(groups(torch_params), foreach=False, **kwargs)
    run_steps(ours, ours_params, 4)
    run_steps(theirs, torch_params, 4)
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_is_noop_when_params_have_no_grad():
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    ours = AdamW(params, weight_decay=0.1)
    ours.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not ours.state


def test_non_empty_state_after_a_step_for_params_with_grads_only():
    params = make_params(torch.float32)
    ours = AdamW(params)
    run_steps(ours, params, 1)
    assert all(ours.state[p] for p in params[:3]) and not ours.state.get(params[3])


def test_optimizer_can_be_printed():
    assert "AdamW" in repr(AdamW(make_params(torch.float32), max_grad_norm=1.0))


def test_fastopt_info_is_built_from_torchs_entry():
    assert FASTOPT_INFO.scheduler_inputs == TORCH_INFO.scheduler_inputs
    assert len(INPUTS) >= len(TORCH_INFO.optim_inputs_func(DEVICE)) + 2  # plus the tensor lr / betas inputs
    assert fastopt.optim.AdamW is FASTOPT_INFO.optim_cls
