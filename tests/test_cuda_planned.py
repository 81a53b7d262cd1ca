"""The CUDA backend's planned updates (``adamw_planned_`` / ``sgd_planned_`` / ``lion_planned_`` in
fastopt/backends/cuda.py, the extension's ``UpdatePlan`` in csrc/cuda/host_runtime.cpp): what
fastopt.optim's step plan calls from an optimizer's second step on.

fastopt.optim.AdamW on the cuda backend is compared with the same optimizer on the reference
backend and with torch.optim.AdamW(foreach=False), on random data, over steps that replace the
grads (new addresses), change a grad's dtype, replace a param's storage (``p.data = ...``: the plan
is rebuilt) and inject inf / nan under a found_inf skip (no bit changes). Bad grads raise the op's
error before anything is written. SGD and Lion are compared with the reference backend.

Runs on a GPU (``make gpu-check``) and, with FASTOPT_CUDA_EMULATION=1, on CPU tensors under the
host emulation of the device (``make test-cuda-emulated``).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fastopt
import fastopt.optim
from fastopt import backends
from fastopt.backends import cuda as cuda_backend_module
from tests.helpers import assert_bitwise_equal, inject_nonfinite, tolerance

EMULATED = os.environ.get("FASTOPT_CUDA_EMULATION") == "1"
DEVICE = "cpu" if EMULATED else "cuda"
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# Zero-element, 0-d, odd and multi-chunk (more than 32768 elements) params.
SHAPES = [(), (0,), (7,), (33, 17), (40000,), (4, 3, 3, 3), (129,), (2, 0, 3)]

pytestmark = [*([] if EMULATED else [pytest.mark.cuda]), pytest.mark.usefixtures("cuda_backend")]


@pytest.fixture
def cuda_backend():
    reason = backends.unavailable_backends().get("cuda")
    if reason is not None:
        pytest.skip(f"the cuda backend is unavailable: {reason}")
    if not hasattr(cuda_backend_module._EXTENSION, "UpdatePlan"):
        pytest.skip("the CUDA extension has no UpdatePlan (built before it)")
    yield


class PlanSpy:
    """Stands in for the extension module in fastopt.backends.cuda: counts the UpdatePlans built
    and the answers of their steps (0 done, 1 plan again, 2 run the op)."""

    def __init__(self, real):
        self.real, self.built, self.answers = real, 0, []

    def __getattr__(self, name):  # the rest of the extension (NormPlan) as it is
        return getattr(self.real, name)

    def UpdatePlan(self, *args):  # noqa: N802 (the extension's name)
        spy, native = self, self.real.UpdatePlan(*args)
        self.built += 1

        class Step:
            def step(self, *step_args):
                answer = native.step(*step_args)
                spy.answers.append(answer)
                return answer

        return Step()


@pytest.fixture
def spy(monkeypatch):
    spy = PlanSpy(cuda_backend_module._EXTENSION)
    monkeypatch.setattr(cuda_backend_module, "_EXTENSION", spy)
    return spy


def make_params(seed: int, dtype=F32, shapes=SHAPES) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=F64).to(dtype).to(DEVICE)) for s in shapes]


def set_grads(groups: list[list[torch.nn.Parameter]], seed: int, dtype=None) -> None:
    """New random grads (fresh tensors, so new addresses), the same values in every copy."""
    generator = torch.Generator().manual_seed(seed)
    for ps in zip(*groups):
        grad = torch.randn(ps[0].shape, generator=generator, dtype=F64)
        for p in ps:
            if dtype is not None and dtype != p.dtype:
                p.grad_dtype = None  # torch otherwise refuses a grad of another dtype than the param's
            p.grad = grad.to(dtype or p.dtype).to(DEVICE)


def clones(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def on_backend(name: str, opt):
    """opt.step as a callable that runs on backend `name`."""

    def step():
        with fastopt.use_backend(name):
            opt.step()

    return step


def assert_close_lists(ours, theirs, dtype=F32):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), **tolerance(dtype))


def assert_same_states(ours_opt, theirs_opt, dtype=F32):
    for a, b in zip(ours_opt.state.values(), theirs_opt.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[key].float().cpu(), b[key].float().cpu(), **tolerance(dtype))


def snapshot(opt, params):
    return [p.detach().clone() for p in params] + [
        v.detach().clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ]


def assert_a_skipped_step_changes_nothing(opt, params, seed: int, count: int) -> None:
    """inf / nan injected into the grads and found_inf set (as a scaler hands it over): the step on
    the cuda backend changes no bit of the params and states."""
    inject_nonfinite([p.grad for p in params], seed=seed, count=count)
    before = snapshot(opt, params)
    opt.grad_scale, opt.found_inf = torch.ones((), device=DEVICE), torch.ones((), device=DEVICE)
    on_backend("cuda", opt)()
    del opt.grad_scale, opt.found_inf
    for a, b in zip(before, snapshot(opt, params)):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_planned_adamw_matches_reference_and_torch(spy, amsgrad):
    """Steps with new grads each time (new addresses), a found_inf skip over injected inf / nan,
    then more steps: the planned path against the reference backend and torch.optim.AdamW."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    ours = make_params(1)
    ref, theirs = clones(ours), clones(ours)
    ours_opt, ref_opt = fastopt.optim.AdamW(ours, **hyper), fastopt.optim.AdamW(ref, **hyper)
    torch_opt = torch.optim.AdamW(theirs, foreach=False, **hyper)
    for step in range(6):
        set_grads([ours, ref, theirs], seed=100 + step)
        if step == 3:  # a skipped step: inf / nan in the grads, found_inf set, nothing changes
            assert_a_skipped_step_changes_nothing(ours_opt, ours, seed=step, count=4)
            continue
        on_backend("cuda", ours_opt)()
        on_backend("torch", ref_opt)()
        torch_opt.step()
        assert_close_lists(ours, ref)
        assert_close_lists(ours, theirs)
        assert_same_states(ours_opt, ref_opt)
    assert spy.built == 1  # planned once, at the second step; every later step done by the plan
    assert spy.answers == [0] * 5


def test_planned_adamw_follows_a_grad_dtype_change_and_a_moved_param(spy):
    """A grad turning bf16 (another kernel build: the plan is rebuilt), then back; a param given
    new storage by ``p.data = ...`` (rebuilt again): every step as on the reference backend."""
    hyper = dict(lr=3e-3, weight_decay=0.05)
    ours = make_params(2)
    ref = clones(ours)
    ours_opt, ref_opt = fastopt.optim.AdamW(ours, **hyper), fastopt.optim.AdamW(ref, **hyper)
    for step in range(7):
        set_grads([ours, ref], seed=200 + step, dtype=BF16 if step in (2, 3) else None)
        if step == 5:
            replacement = torch.randn(ours[3].shape, generator=torch.Generator().manual_seed(5), dtype=F32)
            ours[3].data = replacement.clone().to(DEVICE)
            ref[3].data = replacement.clone().to(DEVICE)
        on_backend("cuda", ours_opt)()
        on_backend("torch", ref_opt)()
        assert_close_lists(ours, ref, BF16 if step in (2, 3) else F32)
        assert_same_states(ours_opt, ref_opt, BF16 if step in (2, 3) else F32)
    assert spy.built >= 3 and spy.answers.count(0) >= 4


@pytest.mark.parametrize("flat_states", [False, True])
def test_planned_adamw_bumps_the_versions_of_what_it_writes(spy, flat_states):
    """As the reference's in-place ops (and the cpu backend's plans) do: autograd sees the writes
    (flat states: views of one buffer, whose shared counter is bumped once per step)."""
    ours = make_params(3)
    opt = fastopt.optim.AdamW(ours, lr=1e-3, flat_states=flat_states)
    set_grads([ours], seed=300)
    on_backend("cuda", opt)()
    for step in range(2):  # planned steps
        set_grads([ours], seed=301 + step)
        written = ours + [v for s in opt.state.values() for v in s.values()]
        versions = [t._version for t in written]
        on_backend("cuda", opt)()
        assert all(t._version > v for t, v in zip(written, versions))
    assert spy.answers == [0, 0]


def planned_inputs(seed: int, shapes=((7,), (33, 17), (40000,))):
    generator = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=generator).to(DEVICE)

    params = [rand(s) for s in shapes]
    lists = {
        "params": params,
        "grads": [rand(s) for s in shapes],
        "exp_avgs": [rand(s) for s in shapes],
        "exp_avg_sqs": [rand(s).abs() for s in shapes],
        "steps": [torch.full((), 3.0, device=DEVICE) for _ in shapes],
    }
    return lists


ADAMW_HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=False, grad_scale=None,
                   found_inf=None, clip_coef=None)  # fmt: skip


def all_tensors(lists):
    return [t for name in ("params", "exp_avgs", "exp_avg_sqs", "steps") for t in lists[name]]


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda g: g.__setitem__(1, torch.zeros(5, device=DEVICE)),
         r"grads\[1\] has 5 elements but params\[1\] has 561"),
        (lambda g: g.__setitem__(2, torch.zeros(40000, device="meta")), r"grads\[2\] is on meta but params\[0\] is on"),
        (lambda g: g.__setitem__(0, 3.0), r"grads\[0\] must be a tensor"),
        (lambda g: g.__setitem__(0, torch.zeros(7, dtype=torch.int32, device=DEVICE)), r"grads must be float16"),
        (lambda g: g.pop(), r"grads has 2 tensors but params has 3"),
    ],
)
@pytest.mark.parametrize("when", ["first call", "planned call"])
def test_bad_grads_raise_before_anything_is_written(bad, error, when):
    """The op's errors, from the plan's construction and from its later calls alike, with the
    params and states untouched."""
    lists, plan = planned_inputs(4), {}
    if when == "planned call":
        cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
        assert ("cuda", "adamw_") in plan
    before = [t.clone() for t in all_tensors(lists)]
    lists["grads"] = list(lists["grads"])
    bad(lists["grads"])
    with pytest.raises((RuntimeError, TypeError), match=error):
        cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    for a, b in zip(before, all_tensors(lists)):
        assert_bitwise_equal(a, b)


def test_bad_scalars_raise_before_anything_is_written():
    lists, plan = planned_inputs(5), {}
    cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    before = [t.clone() for t in all_tensors(lists)]
    with pytest.raises(RuntimeError, match="lr must hold one element"):
        cuda_backend_module.adamw_planned_(lists, plan, **{**ADAMW_HYPER, "lr": torch.ones(2, device=DEVICE)})
    with pytest.raises(RuntimeError, match="found_inf must be a 1-element float32 tensor"):
        cuda_backend_module.adamw_planned_(
            lists, plan, **{**ADAMW_HYPER, "found_inf": torch.zeros((), dtype=F64, device=DEVICE)}
        )
    for a, b in zip(before, all_tensors(lists)):
        assert_bitwise_equal(a, b)


def test_strided_tensors_and_missing_builds_take_the_op(spy):
    """A non-contiguous grad or state cannot be planned, nor a dtype combination without a kernel
    build: the op runs (the reference for the latter), with the same results."""
    lists, plan = planned_inputs(6), {}
    expected = copy.deepcopy(lists)
    lists["grads"][1] = lists["grads"][1].t().contiguous().t()  # the same values, strided
    cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    with fastopt.use_backend("torch"):
        fastopt.adamw_(expected["params"], expected["grads"], expected["exp_avgs"], expected["exp_avg_sqs"],
                       expected["steps"], **{k: v for k, v in ADAMW_HYPER.items() if v is not None})  # fmt: skip
    assert_close_lists(lists["params"], expected["params"])
    assert spy.built == 0 and ("cuda", "adamw_") not in plan
    # f64 params with f32 grads: no kernel build; the reference runs
    lists = {k: [t.double() for t in v] for k, v in planned_inputs(7).items()}
    lists["grads"] = [g.float() for g in lists["grads"]]
    expected = copy.deepcopy(lists)
    cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    with fastopt.use_backend("torch"):
        fastopt.adamw_(expected["params"], expected["grads"], expected["exp_avgs"], expected["exp_avg_sqs"],
                       expected["steps"], **{k: v for k, v in ADAMW_HYPER.items() if v is not None})  # fmt: skip
    assert_close_lists(lists["params"], expected["params"], F64)


@pytest.mark.parametrize("momentum, dampening, nesterov", [(0.0, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)])
def test_planned_sgd_matches_reference(spy, momentum, dampening, nesterov):
    hyper = dict(lr=1e-2, momentum=momentum, dampening=dampening, weight_decay=0.01, nesterov=nesterov)
    ours = make_params(8)
    ref = clones(ours)
    ours_opt, ref_opt = fastopt.optim.SGD(ours, **hyper), fastopt.optim.SGD(ref, **hyper)
    for step in range(4):
        set_grads([ours, ref], seed=800 + step)
        on_backend("cuda", ours_opt)()
        on_backend("torch", ref_opt)()
        assert_close_lists(ours, ref)
    assert spy.built == 1 and spy.answers == [0, 0, 0]


def test_planned_lion_matches_reference(spy):
    hyper = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    ours = make_params(9, dtype=BF16)
    ref = clones(ours)
    ours_opt, ref_opt = fastopt.optim.Lion(ours, **hyper), fastopt.optim.Lion(ref, **hyper)
    for step in range(4):
        set_grads([ours, ref], seed=900 + step)
        on_backend("cuda", ours_opt)()
        on_backend("torch", ref_opt)()
        assert_close_lists(ours, ref, BF16)
    assert spy.built == 1 and spy.answers == [0, 0, 0]


@pytest.mark.skipif(EMULATED, reason="needs a GPU (streams, graphs)")
def test_planned_adamw_on_two_streams_and_in_a_graph_capture():
    """A plan keeps a table per stream; during a capture it hands the call to the op."""
    lists, plan = planned_inputs(10), {}
    expected = copy.deepcopy(lists)
    hyper = {k: v for k, v in ADAMW_HYPER.items() if v is not None}
    cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        fastopt.adamw_(expected["params"], expected["grads"], expected["exp_avgs"], expected["exp_avg_sqs"],
                       expected["steps"], **hyper)  # fmt: skip
    torch.cuda.synchronize()
    assert_close_lists(lists["params"], expected["params"])
    graph = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):
        cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)  # warm-up of the op's table
        with torch.cuda.graph(graph, stream=capture_stream):
            cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
    torch.cuda.current_stream().wait_stream(capture_stream)
    graph.replay()
    for _ in range(2):
        fastopt.adamw_(expected["params"], expected["grads"], expected["exp_avgs"], expected["exp_avg_sqs"],
                       expected["steps"], **hyper)  # fmt: skip
    torch.cuda.synchronize()
    assert_close_lists(lists["params"], expected["params"])


def test_inference_tensors_are_updated_without_a_version_bump():
    """Inference tensors have no version counter: the plan writes them as the op does, and raises
    nothing after its writes."""
    with torch.inference_mode():
        lists = planned_inputs(11)
        expected = {name: [t.clone() for t in tensors] for name, tensors in lists.items()}
    plan = {}
    for _ in range(2):
        cuda_backend_module.adamw_planned_(lists, plan, **ADAMW_HYPER)
        with torch.inference_mode():
            cuda_backend_module.adamw_(expected["params"], expected["grads"], expected["exp_avgs"],
                                       expected["exp_avg_sqs"], expected["steps"], max_exp_avg_sqs=None,
                                       **ADAMW_HYPER)  # fmt: skip
    assert ("cuda", "adamw_") in plan
    for a, b in zip(lists["params"] + lists["steps"], expected["params"] + expected["steps"]):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("flat", [False, True], ids=["grads-made-anew", "flat-grads"])
def test_the_step_plan_hands_the_grads_over_in_its_watch(spy, flat):
    """With the CPU extension, a reused step plan leaves its grads lists unfilled: the norm's
    NormPlan and the update's UpdatePlan get the grads' addresses from its GradWatch. A strided
    grad (the ops run), a bf16 grad (both plans made anew) and an inf under a found_inf skip in
    between; every step against the reference backend, the global norm too."""
    from fastopt.backends import cpu

    if cpu._C is None:
        pytest.skip("the CPU extension (its GradWatch) is not built")
    ours = make_params(12)
    ref = clones(ours)
    make = lambda ps: fastopt.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, flat_grads=flat)  # noqa: E731
    ours_opt, ref_opt = make(ours), make(ref)
    device = torch.device(DEVICE)
    for step in range(8):
        generator = torch.Generator().manual_seed(1200 + step)
        grads = [torch.randn(p.shape, generator=generator, dtype=F64).float().to(DEVICE) for p in ours]
        if step == 4:  # strided, the same values
            grads = [g.t().contiguous().t() if g.dim() == 2 else g for g in grads]
        if step == 5:
            grads[3] = grads[3].bfloat16()
        for p, r, g in zip(ours, ref, grads):
            if g.dtype != p.dtype:
                p.grad_dtype = r.grad_dtype = None
            if flat and step not in (4, 5, 6):
                p.grad.copy_(g)  # into the flat buffer
            else:
                p.grad = g
            r.grad = g.clone()
        if step == 3:  # a skipped step: nothing changes
            assert_a_skipped_step_changes_nothing(ours_opt, ours, seed=step, count=3)
            continue
        on_backend("cuda", ours_opt)()
        on_backend("torch", ref_opt)()
        plan = ours_opt._step_plan
        (lists,) = plan.gathered[0][1].values()
        assert all(g is None for g in lists.grads)  # released after the step, as without a watch
        if step in (1, 2, 7):  # the plans' own tables, following the watch
            native, column = plan.norm_plans[device]["cuda"]
            assert column.layout == plan.watch.layout()
            assert column.addresses.tolist() == [p.grad.data_ptr() if p.numel() else 0 for p in ours]
            assert lists.backend_plan[("cuda", "adamw_", "watched")].layout == plan.watch.layout()
        torch.testing.assert_close(ours_opt.stats["grad_norm"], ref_opt.stats["grad_norm"], rtol=1e-5, atol=0)
        assert_close_lists(ours, ref, BF16 if step == 5 else F32)
    # Steps 1, 2 and 7 by the first plan or its successors; step 4 (strided) by the op.
    assert spy.answers.count(0) >= 4 and spy.built >= 2


def test_norm_plan_checks_what_it_is_given():
    native = cuda_backend_module._EXTENSION.NormPlan([torch.randn(5, device=DEVICE), torch.randn(3, device=DEVICE)])
    with pytest.raises(RuntimeError, match="contiguous CPU int64 tensor of 2 elements"):
        native.norm(torch.zeros(3, dtype=torch.int64), 2.0, False, None)
    with pytest.raises(RuntimeError, match="norm_type must be positive"):
        native.norm(torch.zeros(2, dtype=torch.int64), -1.0, False, None)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is not contiguous"):
        cuda_backend_module._EXTENSION.NormPlan([torch.randn(4, 4, device=DEVICE).t()])
