"""The reference backend's AMP skip (fastopt/backends/reference.py, ``adamw_`` with ``found_inf``).

A CPU ``found_inf`` is read on the host (free on CPU): a non-zero flag returns before any tensor
is touched or allocated; a zero flag steps in place as without it. Elsewhere (a device flag,
torch.compile) the step decides on the device, through ``where``; both ways keep every bit of a
skipped step.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastopt.backends import reference
from tests.helpers import MIXED_SHAPES, assert_bitwise_equal, clone_layout, inject_nonfinite, random_tensors

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "maximize": False}

# (params, grads, states): the mixed precisions the backends support.
DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.float64, torch.float64, torch.float64),
]


def make_step(dtypes, amsgrad, seed):
    """Random params (some non-contiguous), grads with inf / nan at random positions, random
    states (never zeros) and step counts: the arguments of one reference.adamw_ call."""
    param_dtype, grad_dtype, state_dtype = dtypes
    params = random_tensors(MIXED_SHAPES, param_dtype, seed=seed, non_contiguous=True)
    grads = random_tensors(MIXED_SHAPES, grad_dtype, seed=seed + 1)
    inject_nonfinite(grads, seed=seed + 2)
    exp_avgs = random_tensors(MIXED_SHAPES, state_dtype, seed=seed + 3)
    exp_avg_sqs = [t.abs() for t in random_tensors(MIXED_SHAPES, state_dtype, seed=seed + 4)]
    max_exp_avg_sqs = [t.abs() + 1 for t in random_tensors(MIXED_SHAPES, state_dtype, seed=seed + 5)] if amsgrad else None
    steps = [torch.tensor(float(3 + i)) for i in range(len(params))]
    return params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs


def written(args):
    """Every tensor a step may write (params, states, step counts) and the grads it only reads."""
    params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs = args
    return params + grads + exp_avgs + exp_avg_sqs + steps + (max_exp_avg_sqs or [])


def run(args, **scalars):
    params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs = args
    scalars = {"grad_scale": None, "found_inf": None, "clip_coef": None, **scalars}
    reference.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs=max_exp_avg_sqs,
                     **HYPER, **scalars)  # fmt: skip


class RecordOps(TorchDispatchMode):
    """The aten ops dispatched inside, with the largest element count among each op's outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (list, tuple)) else [out]
        self.ops.append((func, max((t.numel() for t in outputs if isinstance(t, torch.Tensor)), default=0)))
        return out


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t).removeprefix("torch.") for t in d))
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("found", [1.0, 2.0, float("nan")], ids=["found_inf=1", "found_inf=2", "found_inf=nan"])
@pytest.mark.parametrize("decided", ["on the host", "on the device"])
def test_skipped_step_changes_no_bit(dtypes, amsgrad, found, decided, monkeypatch):
    if decided == "on the device":  # the path of a GPU flag or a traced step: where(skip, old, new)
        monkeypatch.setattr(reference, "_host_flag", lambda found_inf: None)
    args = make_step(dtypes, amsgrad, seed=11)
    before = [clone_layout(t) for t in written(args)]
    found_inf = torch.tensor([found])

    run(args, found_inf=found_inf, grad_scale=torch.tensor(1024.0), clip_coef=torch.tensor(0.5))

    for i, (t, snapshot) in enumerate(zip(written(args), before)):
        assert_bitwise_equal(t, snapshot, f"tensor {i}")
    assert found_inf.isnan().all() if found != found else found_inf.item() == found


def test_skip_read_on_the_host_touches_and_allocates_nothing():
    """No copy of a param or state and no where: the only op dispatched views the flag."""
    args = make_step(DTYPES[1], True, seed=21)
    before = [clone_layout(t) for t in written(args)]
    recorder = RecordOps()
    with recorder:
        run(args, found_inf=torch.ones(1), grad_scale=torch.tensor(8.0))
    largest = max(t.numel() for t in written(args))
    assert largest > 1 and all(numel <= 1 for _, numel in recorder.ops), recorder.ops
    assert not any(func in (torch.ops.aten.where.self, torch.ops.aten.where.self_out) for func, _ in recorder.ops)
    for t, snapshot in zip(written(args), before):
        assert_bitwise_equal(t, snapshot)


def test_device_decided_skip_copies_what_the_host_read_avoids(monkeypatch):
    """The counterpart of the test above: the device-side path does allocate tensor-sized
    copies, so that test's recorder can see them."""
    monkeypatch.setattr(reference, "_host_flag", lambda found_inf: None)
    args = make_step(DTYPES[1], True, seed=21)
    recorder = RecordOps()
    with recorder:
        run(args, found_inf=torch.ones(1), grad_scale=torch.tensor(8.0))
    assert max(numel for _, numel in recorder.ops) == max(t.numel() for t in written(args))


@pytest.mark.parametrize("dtypes", DTYPES[:3], ids=["fp32", "fp32-bf16grads", "bf16-fp32states"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_zero_flag_read_on_the_host_steps_as_without_it(dtypes, amsgrad):
    with_flag, without = make_step(dtypes, amsgrad, seed=31), make_step(dtypes, amsgrad, seed=31)
    found_inf = torch.zeros(1)
    run(with_flag, found_inf=found_inf, grad_scale=torch.tensor(4.0))
    run(without, grad_scale=torch.tensor(4.0))
    changed = False
    for t, u, original in zip(written(with_flag), written(without), written(make_step(dtypes, amsgrad, seed=31))):
        assert_bitwise_equal(t, u)
        changed |= not torch.equal(t.nan_to_num(), original.nan_to_num())
    assert changed  # it stepped
    assert found_inf.item() == 0.0


def test_flag_on_a_device_or_traced_is_not_read_on_the_host(monkeypatch):
    assert reference._host_flag(torch.zeros(1)) is False
    assert reference._host_flag(torch.tensor([3.0])) is True
    assert reference._host_flag(torch.zeros(1, device="meta")) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert reference._host_flag(torch.ones(1)) is None
