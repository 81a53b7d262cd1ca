"""torch's generic optimizer contract, run against fastopt.optim.AdamW, Adam and SGD.

torch's own checks live in test/test_optim.py, which the wheel does not ship; their machinery does
(``torch.testing._internal.common_optimizers``: ``OptimizerInfo``, ``optim_db``, the input and
error-input generators). Each fastopt optimizer's ``OptimizerInfo`` is built from torch's entry for
the optimizer it replaces (AdamW -> torch.optim.AdamW, Adam -> torch.optim.Adam, SGD ->
torch.optim.SGD), and the checks of test_optim.py that concern an optimizer's contract are written
here against each pair: error inputs, every optimizer input against torch's optimizer, state_dict
round trips (with ``weights_only`` loading, checkpoints moved between fastopt and torch, and old
checkpoints), step / state_dict / load_state_dict hooks (global ones too), the schedulers of the
entry, deepcopy of all public attributes, param groups, no-op steps, printing.

Where fastopt's entries differ from torch's, they say why (``Case`` below):

- all: no complex params (fastopt's ops take real floating tensors) and no ``differentiable=True``;
  ``foreach`` / ``fused`` are accepted and ignored (every backend is multi-tensor).
- AdamW, Adam: torch's two errors for a tensor lr / tensor betas with ``foreach=True`` do not apply
  (those configurations step, tested below); and the CPU inputs include tensor lr and tensor betas,
  which torch's CPU path supports too without foreach.
- SGD: torch's inputs (a tensor lr among them) and error inputs apply as they are; fastopt's add
  dampening with a tensor lr and maximize, and Nesterov with maximize.
"""

from __future__ import annotations

import copy
import dataclasses
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
from fastopt.optim import SGD, Adam, AdamW
from tests.helpers import active_backend

DEVICE = "cpu"
DTYPES = [torch.float32, torch.float64]


def _adam_family_inputs(device):
    """fastopt's Adam / AdamW inputs beyond torch's CPU ones: tensor lr / tensor betas, which
    fastopt (and torch's single-tensor path) supports on every device."""
    if co._get_device_type(device) != "cpu":
        return []
    return [
        co.OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.001)}, desc="Tensor lr"),
        co.OptimizerInput(
            params=None, kwargs={"lr": torch.tensor(0.001), "betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]])),
                                 "amsgrad": True},
            desc="Tensor lr, Tensor betas, amsgrad",
        ),
    ]  # fmt: skip


def _sgd_inputs(device):
    """fastopt's SGD inputs beyond torch's: the combinations torch's list leaves out."""
    return [
        co.OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01), "momentum": 0.9, "dampening": 0.5,
                                               "weight_decay": 0.1, "maximize": True},
                          desc="tensor lr, dampening, maximize"),  # fmt: skip
        co.OptimizerInput(params=None, kwargs={"momentum": 0.5, "nesterov": True, "maximize": True},
                          desc="nesterov, maximize"),  # fmt: skip
    ]


# torch's Adam / AdamW error inputs that fastopt does not raise, and why.
_ADAM_NOT_RAISED = {
    "lr as Tensor doesn't work with foreach & not capturable": "foreach is ignored: a tensor lr steps",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True": "foreach is ignored: tensor betas step",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """A fastopt optimizer, the torch optimizer it replaces, and how fastopt's entry differs."""

    name: str
    ours: type
    theirs: type
    not_raised: dict  # torch's error inputs (desc) that fastopt does not raise -> why
    extra_inputs: object  # device -> fastopt's inputs beyond torch's
    has_step: bool  # a per-param "step" counter in the state (torch's Adam family)
    sgd_like: bool = False  # trajectories bit for bit on the cpu backend too (fastopt.optim.SGD's docstring)

    @property
    def torch_info(self) -> co.OptimizerInfo:
        return next(info for info in co.optim_db if info.optim_cls is self.theirs)

    def inputs(self, device, dtype=None):
        return self.torch_info.optim_inputs_func(device, dtype) + self.extra_inputs(device)

    def error_inputs(self, device, dtype):
        errors = self.torch_info.optim_error_inputs_func(device, dtype)
        return [e for e in errors if e.optimizer_error_input.desc not in self.not_raised]

    @property
    def info(self) -> co.OptimizerInfo:
        """fastopt's OptimizerInfo, built from torch's entry."""
        torch_info = self.torch_info
        return co.OptimizerInfo(
            self.ours,
            optim_inputs_func=self.inputs,
            optim_error_inputs_func=self.error_inputs,
            scheduler_inputs=torch_info.scheduler_inputs,
            supported_impls=("foreach", "fused"),  # accepted, ignored; differentiable=True is refused
            not_og_supported_flags=torch_info.not_og_supported_flags,
            supports_fused_on=("cpu", "cuda"),
            has_capturable_arg=torch_info.has_capturable_arg,
            supports_complex=False,
        )

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("AdamW", AdamW, torch.optim.AdamW, _ADAM_NOT_RAISED, _adam_family_inputs, has_step=True),
    Case("Adam", Adam, torch.optim.Adam, _ADAM_NOT_RAISED, _adam_family_inputs, has_step=True),
    Case("SGD", SGD, torch.optim.SGD, {}, _sgd_inputs, has_step=False, sgd_like=True),
]
CASE_IDS = [case.name for case in CASES]
STEP_CASES = [case for case in CASES if case.has_step]


def _all_inputs(case):
    return co._get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, case.info)


# (case, input): every input of every case, with torch's foreach / fused flags (accepted, ignored).
INPUTS = [pytest.param(case, i, id=f"{case.name}-{i.desc}".replace(" ", "_")) for case in CASES for i in _all_inputs(case)]
# The base inputs only (flags False): for the slower checks, the flags change nothing in fastopt.
BASE_INPUTS = [
    pytest.param(case, i, id=f"{case.name}-{i.desc}".replace(" ", "_"))
    for case in CASES for i in _all_inputs(case)
    if not any(i.kwargs.get(flag) for flag in ("foreach", "fused"))
]  # fmt: skip
ERROR_INPUTS = [
    pytest.param(case, e, id=f"{case.name}-{e.optimizer_error_input.desc}")
    for case in CASES for e in case.error_inputs(DEVICE, torch.float32)
]  # fmt: skip
NOT_RAISED = [pytest.param(case, desc, id=f"{case.name}-{desc}") for case in CASES for desc in case.not_raised]


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


def run_steps(optimizer, params, steps, start=0, schedulers=()):
    losses = []
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss = loss_of(params, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        for scheduler in schedulers:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss.item())
            else:
                scheduler.step()
    return losses


def clone_kwargs(kwargs):
    return copy.deepcopy(kwargs)


def torch_kwargs(kwargs):
    """The kwargs for torch's optimizer, which runs its single-tensor path (foreach=False)."""
    return {k: v for k, v in clone_kwargs(kwargs).items() if k not in ("foreach", "fused")}


def exact_against_torch(case, kwargs, dtype) -> bool:
    """Where fastopt's trajectories equal torch's (foreach=False) bit for bit: fp32 with float
    hyperparameters, on the torch backend (the reference follows fp32 addcdiv's order of
    evaluation; fp64's differs in the last bit), and for SGD on the cpu backend too (its kernel
    rounds torch's ``add(x, alpha=a)`` as one fused multiply-add, as torch's CPU kernel does; a
    tensor lr included, which torch's SGD reads as that alpha). Within rounding otherwise (torch's
    Adam computes tensor-lr / tensor-beta terms in the tensors' precision)."""
    backends = ("torch", "cpu") if case.sgd_like else ("torch",)
    tensor_hyper = any(isinstance(v, torch.Tensor) for v in (kwargs.get("lr"), *kwargs.get("betas", ())))
    # SGD's tensor lr is torch's float lr (torch's add reads it as alpha): bit for bit too.
    return active_backend() in backends and dtype == torch.float32 and (case.sgd_like or not tensor_hyper)


def assert_same_tensors(ours, theirs, exact, **close):
    for a, b in zip(ours, theirs):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **({"rtol": 1e-5, "atol": 1e-6} | close))


def assert_same_state_layout(case, ours, ours_params, theirs, torch_params):
    """The same keys per param, the same dtypes and shapes (a state dict on both sides or on
    neither: torch's SGD without momentum keeps none)."""
    for p_ours, p_torch in zip(ours_params, torch_params):
        assert (p_ours in ours.state) == (p_torch in theirs.state)
        s, t = ours.state.get(p_ours, {}), theirs.state.get(p_torch, {})
        assert s.keys() == t.keys()
        for key in s:
            if isinstance(t[key], torch.Tensor):
                assert s[key].dtype == t[key].dtype and s[key].shape == t[key].shape, key
            else:
                assert s[key] == t[key], key


# --------------------------------------------------------------------------- constructor errors


@pytest.mark.parametrize("case, error_input", ERROR_INPUTS)
def test_errors(case, error_input):
    """test_optim.py's test_errors, on torch's error inputs (the ones fastopt shares)."""
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else make_params(torch.float32)[:1]
    if error_input.error_on != co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        pytest.fail(f"{case.name}'s error inputs are all construction errors")
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            case.ours(params, **optim_input.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            case.ours(params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):  # torch raises the same
            case.theirs(params, **optim_input.kwargs)


@pytest.mark.parametrize("case, desc", NOT_RAISED)
def test_what_torch_refuses_with_foreach_steps(case, desc):
    errors = case.torch_info.optim_error_inputs_func(DEVICE, torch.float32)
    error_input = next(e for e in errors if e.optimizer_error_input.desc == desc)
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    optimizer = case.ours(params, **error_input.optimizer_error_input.kwargs)
    run_steps(optimizer, params, 2)
    assert not torch.equal(params[0], before[0])
    if case.has_step:
        assert optimizer.state[params[0]]["step"].item() == 2


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_differentiable_is_refused(case):
    with pytest.raises(ValueError, match="differentiable"):
        case.ours(make_params(torch.float32), differentiable=True)


# --------------------------------------------------------------------------- every input against torch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, optim_input", INPUTS)
def test_matches_torch(case, optim_input, dtype):
    """Each input, 5 steps, against torch's optimizer (foreach=False) with the same kwargs: bit
    for bit where ``exact_against_torch`` says so, within rounding otherwise. The states have
    torch's keys, dtypes and shapes (SGD's momentum buffer only with momentum, as torch's)."""
    kwargs = clone_kwargs(optim_input.kwargs)
    ours_params, torch_params = make_params(dtype), make_params(dtype)
    ours = case.ours(ours_params, **kwargs)
    theirs = case.theirs(torch_params, foreach=False, **torch_kwargs(kwargs))
    run_steps(ours, ours_params, 5)
    run_steps(theirs, torch_params, 5)
    exact = exact_against_torch(case, kwargs, dtype)
    assert_same_tensors(ours_params, torch_params, exact)
    assert_same_state_layout(case, ours, ours_params, theirs, torch_params)
    for p_ours, p_torch in zip(ours_params, torch_params):
        for key, value in theirs.state.get(p_torch, {}).items():
            assert_same_tensors([ours.state[p_ours][key]], [value], exact)


@pytest.mark.parametrize("case, optim_input", BASE_INPUTS)
def test_forloop_goes_right_direction(case, optim_input):
    """test_optim.py's: the loss goes down, alone and under each of the entry's scheduler
    combinations (all schedulers of a combination stepped together, as test_optim.py does),
    and the lr the schedulers set equals the lr they set on torch's optimizer."""
    for make_schedulers in [(), *case.torch_info.scheduler_inputs]:
        params, torch_params = make_params(torch.float64), make_params(torch.float64)
        kwargs = {**clone_kwargs(optim_input.kwargs), "maximize": False}
        if not isinstance(kwargs.get("lr", 0.001), torch.Tensor):
            kwargs["lr"] = 0.01
        optimizer = case.ours(params[:2], **kwargs)
        theirs = case.theirs(torch_params[:2], foreach=False, **torch_kwargs(kwargs))
        schedulers = [make(optimizer) for make in make_schedulers]
        torch_schedulers = [make(theirs) for make in make_schedulers]
        weight, bias = params[:2]
        x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

        def loss_fn(weight=weight, bias=bias):
            return (weight.mv(x) + bias).pow(2).sum()

        initial = loss_fn().item()
        for opt, opt_schedulers, (w, b) in ((optimizer, schedulers, params[:2]), (theirs, torch_schedulers, torch_params[:2])):
            for _ in range(12):
                opt.zero_grad()
                loss = loss_fn(w, b)
                loss.backward()
                opt.step()
                for scheduler in opt_schedulers:
                    if isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(loss.item())
                    else:
                        scheduler.step()
        assert loss_fn().item() < initial
        assert optimizer.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
        torch.testing.assert_close(weight, torch_params[0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("case, optim_input", INPUTS)
def test_state_dict_round_trip(case, optim_input):
    """test_optim.py's test_state_dict_deterministic / test_save_load_equality_with_weights_only:
    the state_dict, saved with torch.save and loaded with weights_only=True into a new optimizer,
    continues exactly as the original."""
    params, copied_params = make_params(torch.float32), make_params(torch.float32)
    ours = case.ours(params, **clone_kwargs(optim_input.kwargs))
    run_steps(ours, params, 3)
    with torch.no_grad():
        for a, b in zip(copied_params, params):
            a.copy_(b)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded = case.ours(copied_params, **clone_kwargs(optim_input.kwargs))
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.state_dict()["param_groups"] == ours.state_dict()["param_groups"]
    run_steps(ours, params, 3, start=3)
    run_steps(loaded, copied_params, 3, start=3)
    for a, b in zip(params, copied_params):
        assert torch.equal(a, b)


def weights_only_roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["fastopt-to-torch", "torch-to-fastopt"])
@pytest.mark.parametrize("case, optim_input", BASE_INPUTS)
def test_checkpoints_move_between_fastopt_and_torch(case, optim_input, direction):
    """3 steps on one side, its state_dict loaded (weights_only=True) into the other's optimizer
    with fresh params copied over, 3 more steps there: the run of torch's optimizer alone, within
    the same bounds as test_matches_torch. The state dicts have the same keys and layout."""
    kwargs = clone_kwargs(optim_input.kwargs)
    make_ours = lambda params: case.ours(params, **clone_kwargs(kwargs))  # noqa: E731
    make_theirs = lambda params: case.theirs(params, foreach=False, **torch_kwargs(kwargs))  # noqa: E731
    make_first, make_second = (make_ours, make_theirs) if direction == "fastopt-to-torch" else (make_theirs, make_ours)
    first_params, second_params, reference_params = (make_params(torch.float32) for _ in range(3))
    first = make_first(first_params)
    run_steps(first, first_params, 3)
    with torch.no_grad():
        for a, b in zip(second_params, first_params):
            a.copy_(b)
    second = make_second(second_params)
    saved = first.state_dict()
    second.load_state_dict(weights_only_roundtrip(saved))
    assert second.state_dict()["state"].keys() == saved["state"].keys()
    for i, state in saved["state"].items():
        assert second.state_dict()["state"][i].keys() == state.keys()
    run_steps(second, second_params, 3, start=3)
    reference = make_theirs(reference_params)
    run_steps(reference, reference_params, 6)
    assert_same_tensors(second_params, reference_params, exact_against_torch(case, kwargs, torch.float32))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_before_the_first_step_is_torchs(case):
    """No per-param state before a step (SGD's momentum_buffer is absent, as torch's), and the
    param groups have torch's keys and values (plus fastopt's own)."""
    ours, theirs = case.ours(make_params(torch.float32)), case.theirs(make_params(torch.float32))
    ours_sd, torch_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd["state"] == torch_sd["state"] == {}
    for ours_group, torch_group in zip(ours_sd["param_groups"], torch_sd["param_groups"]):
        assert {k: ours_group[k] for k in torch_group} == torch_group
        assert set(ours_group) - set(torch_group) == {"agc_clip_factor", "agc_eps"}


@pytest.mark.parametrize("case", STEP_CASES, ids=[c.name for c in STEP_CASES])
def test_state_dict_with_float64_default_dtype_keeps_float64_steps(case):
    """Issue 17, item 4: torch keeps state['step'] in float64 under a float64 default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params, torch_params = make_params(torch.float64), make_params(torch.float64)
        ours, theirs = case.ours(params), case.theirs(torch_params)
        run_steps(ours, params, 2)
        run_steps(theirs, torch_params, 2)
        assert ours.state[params[0]]["step"].dtype == theirs.state[torch_params[0]]["step"].dtype == torch.float64
        reloaded = case.ours(make_params(torch.float64))
        reloaded.load_state_dict(theirs.state_dict())
        assert next(iter(reloaded.state.values()))["step"].dtype == torch.float64
    finally:
        torch.set_default_dtype(default)
    run_steps(ours, params, 1, start=2)  # a float64 counter keeps stepping under a float32 default
    assert ours.state[params[0]]["step"].item() == 3


@pytest.mark.parametrize("case", STEP_CASES, ids=[c.name for c in STEP_CASES])
def test_can_load_older_state_dict(case):
    """test_optim.py's: steps saved as Python numbers (before torch 1.12) load and step."""
    params = make_params(torch.float32)
    ours = case.ours(params)
    run_steps(ours, params, 2)
    old = copy.deepcopy(ours.state_dict())
    for state in old["state"].values():
        state["step"] = state["step"].item()
    fresh = case.ours(params)
    fresh.load_state_dict(old)
    run_steps(fresh, params, 1, start=2)
    assert fresh.state[params[0]]["step"].item() == 3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_can_load_older_state_dict_with_none_buffers(momentum):
    """torch before 2.0 saved ``momentum_buffer: None`` for every param that stepped, momentum or
    not (and a None buffer is what torch's SGD starts from). It loads into fastopt's SGD and steps
    as torch's: with momentum, a None buffer takes torch's first step (the buffer is the grad)."""
    ours_params, torch_params = make_params(torch.float32), make_params(torch.float32)
    ours = SGD(ours_params, lr=0.01, momentum=momentum, dampening=0.3 if momentum else 0.0)
    theirs = torch.optim.SGD(torch_params, lr=0.01, momentum=momentum, dampening=0.3 if momentum else 0.0, foreach=False)
    old = copy.deepcopy(theirs.state_dict())
    old["state"] = {i: {"momentum_buffer": None} for i in range(3)}
    ours.load_state_dict(copy.deepcopy(old))
    theirs.load_state_dict(old)
    run_steps(ours, ours_params, 3)
    run_steps(theirs, torch_params, 3)
    assert_same_tensors(ours_params, torch_params, exact_against_torch(CASES[2], {}, torch.float32))
    assert_same_state_layout(CASES[2], ours, ours_params, theirs, torch_params)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_hooks(case):
    """test_optim.py's state_dict / load_state_dict pre- and post-hooks."""
    params = make_params(torch.float32)
    ours = case.ours(params)
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


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_hooks_local_and_global(case):
    """test_optim.py's test_step_pre_hook / test_step_post_hook / test_step_all_hooks."""
    params = make_params(torch.float32)
    ours = case.ours(params)
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


@pytest.mark.parametrize("case, optim_input", BASE_INPUTS)
def test_deepcopy_copies_all_public_attrs(case, optim_input):
    """test_optim.py's test: every public attribute of the copy equals the original's (issue 17,
    item 1: fastopt's own settings were lost), and so do pickle and torch.save(optimizer)."""
    params = make_params(torch.float32)
    kwargs = {**clone_kwargs(optim_input.kwargs), "max_grad_norm": 1.0, "spike_guard": 8.0, "spike_warmup": 1,
              "spike_ema_decay": 0.5, "state_dtype": torch.float32}  # fmt: skip
    ours = case.ours(params, **kwargs)
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


@pytest.mark.parametrize("case, optim_input", BASE_INPUTS)
def test_param_groups_lr_and_weight_decay(case, optim_input):
    """test_optim.py's test_param_groups_weight_decay / test_param_groups_lr: per-group settings
    against torch's optimizer with the same groups."""
    kwargs = torch_kwargs(optim_input.kwargs)

    def groups(params):
        return [{"params": params[:1], "weight_decay": 0.5, "lr": 0.05}, {"params": params[1:]}]

    ours_params, torch_params = make_params(torch.float64), make_params(torch.float64)
    ours, theirs = case.ours(groups(ours_params), **kwargs), case.theirs(groups(torch_params), foreach=False, **kwargs)
    run_steps(ours, ours_params, 4)
    run_steps(theirs, torch_params, 4)
    assert_same_tensors(ours_params, torch_params, exact=False, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_is_noop_when_params_have_no_grad(case):
    params = make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    ours = case.ours(params, weight_decay=0.1)
    ours.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not ours.state


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_empty_state_after_a_step_for_params_with_grads_only(case):
    params = make_params(torch.float32)
    kwargs = {"momentum": 0.9} if case.ours is SGD else {}  # SGD keeps a state only with momentum
    ours = case.ours(params, **kwargs)
    run_steps(ours, params, 1)
    assert all(ours.state[p] for p in params[:3]) and not ours.state.get(params[3])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_optimizer_can_be_printed(case):
    text = repr(case.ours(make_params(torch.float32), max_grad_norm=1.0))
    assert text.startswith(case.name + " (") and "lr: " in text


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fastopt_info_is_built_from_torchs_entry(case):
    info = case.info
    assert info.scheduler_inputs == case.torch_info.scheduler_inputs
    assert len([i for i in BASE_INPUTS if i.values[0] is case]) == len(case.inputs(DEVICE))  # with the flags off
    assert len(_all_inputs(case)) > len(case.inputs(DEVICE))  # and with fused=True (foreach: on devices with its kernels)
    assert len(case.inputs(DEVICE)) >= len(case.torch_info.optim_inputs_func(DEVICE))
    assert getattr(fastopt.optim, case.name) is info.optim_cls
