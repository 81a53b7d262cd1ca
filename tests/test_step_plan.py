"""fastopt.optim.AdamW's step plan: what a later step reuses, and everything that must void it.

Each test runs with the C++ check (the CPU extension's GradWatch) and with the Python one that
runs without the extension, and compares a training run that changes something between steps
with torch.optim.AdamW(foreach=False) doing the same. The last test runs the plan's
invalidations for SGD, Adam (against torch's) and Lion (against its own full path).
"""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch

from fastopt.optim import AdamW, Lion
from fastopt.optim import optimizer as adamw_module
from tests.test_optim_adamw import assert_same_params, assert_same_states
from tests.models import batch as models_batch
from tests.models import loss_of, make_model, train, twin


@pytest.fixture(params=["native", "python"])
def watch(request, monkeypatch):
    """Which check a reused plan runs: the C++ GradWatch, or the Python one."""
    if request.param == "native":
        if adamw_module._grad_watch_type() is None:
            pytest.skip("the CPU extension (its GradWatch) is not built")
    else:
        monkeypatch.setattr(adamw_module, "_grad_watch_type", lambda: None)
    return request.param


def pair(**kwargs):
    ours_model = make_model("mlp")
    torch_model = twin(ours_model)
    kwargs = {"lr": 3e-3, **kwargs}
    return (ours_model, AdamW(ours_model.parameters(), **kwargs)), (
        torch_model,
        torch.optim.AdamW(torch_model.parameters(), foreach=False, **kwargs),
    )


def run_both(ours, theirs, change, steps_before=3, steps_after=3):
    """Train both, apply ``change(model, optimizer)`` to each, train on; then compare."""
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, steps_before)
        change(model, optimizer)
        train("mlp", model, optimizer, steps_after, start=steps_before)
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])


def test_the_plan_is_reused_while_nothing_changes(watch):
    (model, optimizer), _ = pair()
    train("mlp", model, optimizer, 2)
    plan = optimizer._step_plan
    assert plan is not None and (plan.watch is not None) == (watch == "native")
    train("mlp", model, optimizer, 2, start=2)
    assert optimizer._step_plan is plan


def test_a_param_whose_data_is_replaced_is_followed(watch):
    """``p.data = x`` (weight tying, re-initialisation, a loaded tensor) moves the param's storage:
    a plan that kept the old address would update memory the model no longer uses."""

    def replace(model, optimizer):
        weight = model[0].weight
        weight.data = weight.detach().clone() * 0.5

    ours, theirs = pair()
    run_both(ours, theirs, replace)


def test_a_grad_in_the_memory_a_replaced_param_freed_is_not_refused(watch):
    """After ``p.data = x`` the allocator may hand p's old memory to a new grad of an earlier
    param. The plan still lists that memory as written, but it is void (p moved): the step must
    take the full path, whose checks know p's new memory, not refuse the grad. Made certain here by
    giving the earlier param a grad in that very memory."""

    def replace(model, optimizer):
        weight = model[2].weight  # after model[0]'s params in the optimizer's order
        freed = weight.data
        weight.data = weight.detach().clone() * 0.5
        model.freed = freed  # kept, so that the next grad can be placed in it

    def train_with_grad_in_freed_memory(model, optimizer, steps, start):
        for step in range(start, start + steps):
            optimizer.zero_grad()
            loss_of("mlp", model, step).backward()
            first = model[0].weight
            placed = model.freed.reshape(-1)[: first.numel()].view_as(first)
            placed.copy_(first.grad)
            first.grad = placed
            optimizer.step()

    ours, theirs = pair()
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, 3)
        replace(model, optimizer)
        train_with_grad_in_freed_memory(model, optimizer, 2, start=3)
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])


def test_a_reused_plan_refuses_exactly_the_grads_that_reach_into_written_memory(watch):
    """Params are slices of one buffer with a gap after each; the grads are the gaps (touching
    their params' ends, overlapping nothing) or, for one param at a time, a slice reaching one
    element into another param, or a state. The C++ check searches the written spans from where
    its last search ended, so the bad grad moves back and forth across the list; a refused step
    changes nothing, and the plan carries on after it."""
    generator = torch.Generator().manual_seed(0)
    count, size = 40, 6
    buffer = torch.randn(count * 2 * size, generator=generator)
    slots = buffer.view(count, 2, size)
    params = [torch.nn.Parameter(slots[i, 0]) for i in range(count)]
    optimizer = AdamW(params, lr=1e-2, weight_decay=0.1)

    def give_gap_grads():
        for i, p in enumerate(params):
            p.grad = slots[i, 1]
            p.grad.copy_(torch.randn(size, generator=generator))

    for _ in range(2):
        give_gap_grads()
        optimizer.step()
    plan = optimizer._step_plan
    assert plan is not None
    for round, bad in enumerate(torch.randperm(count, generator=generator)[:15].tolist()):
        give_gap_grads()
        target = params[int(torch.randint(count, (), generator=generator))]
        if round % 3 == 0:  # the target's last element, then its gap
            start = target.storage_offset() + size - 1
            params[bad].grad = buffer[start : start + size]
        else:
            params[bad].grad = optimizer.state[target][("exp_avg", "exp_avg_sq")[round % 3 - 1]][:]
        before = [p.detach().clone() for p in params]
        states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
        with pytest.raises(ValueError, match=rf"grads\[{bad}\] shares memory with a param or state"):
            optimizer.step()
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        for p, saved in zip(params, states):
            assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
    give_gap_grads()
    optimizer.step()
    assert optimizer._step_plan is plan


def test_a_param_whose_dtype_changes_voids_the_plan(watch):
    """model.double() between steps: the same Parameter objects, new storage and dtype. The next
    step must go through the full path (its checks, its dtype handling), not the old addresses."""
    (model, optimizer), _ = pair()
    train("mlp", model, optimizer, 2)
    plan = optimizer._step_plan
    model.double()
    assert optimizer._plan_key() == plan.key  # nothing Python sees at once: the per-param check must
    optimizer.zero_grad()
    loss_of("mlp", model, 2).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer._step_plan is not plan
    for p, old in zip(model.parameters(), before):
        assert p.dtype == torch.float64 and torch.isfinite(p).all() and not torch.equal(p, old)


def test_a_params_list_edited_in_place_voids_the_plan(watch):
    """A param appended to (or swapped into) a group's own list is stepped from then on."""

    def edit(model, optimizer):
        group = optimizer.param_groups[0]
        last = group["params"].pop()
        group["params"].insert(0, last)

    ours, theirs = pair()
    run_both(ours, theirs, edit)


def test_a_state_dict_replaced_or_a_state_tensor_reset_voids_the_plan(watch):
    def reset(model, optimizer):
        first, second, third = list(model.parameters())[:3]
        optimizer.state[first] = {}  # starts over
        optimizer.state[second]["exp_avg"] = torch.zeros_like(second)  # a new tensor in its dict
        # Both moments: a zero exp_avg_sq under a kept exp_avg divides rounding noise by ~|g|.
        optimizer.state[third].update(exp_avg=torch.zeros_like(third), exp_avg_sq=torch.zeros_like(third))

    ours, theirs = pair()
    run_both(ours, theirs, reset)


def test_add_param_group_and_load_state_dict_void_the_plan(watch):
    ours, theirs = pair()
    for model, optimizer in (ours, theirs):
        optimizer.param_groups[0]["params"] = list(model[:2].parameters())
        train("mlp", model, optimizer, 2)
        optimizer.add_param_group({"params": list(model[2:].parameters()), "lr": 1e-2})
        train("mlp", model, optimizer, 2, start=2)
        saved = io.BytesIO()
        torch.save(optimizer.state_dict(), saved)
        train("mlp", model, optimizer, 1, start=4)
        saved.seek(0)
        optimizer.load_state_dict(torch.load(saved))
        train("mlp", model, optimizer, 2, start=5)
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])


def test_grads_kept_between_steps_and_grads_remade_both_work(watch):
    """zero_grad(set_to_none=False) keeps the same grad tensors (the plan sees them unchanged);
    set_to_none=True makes new ones every backward."""
    ours, theirs = pair()
    for model, optimizer in (ours, theirs):
        for step in range(6):
            optimizer.zero_grad(set_to_none=step % 3 == 0)
            loss_of("mlp", model, step).backward()
            optimizer.step()
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])


def test_the_plan_does_not_keep_grads_alive_between_steps(watch):
    """zero_grad(set_to_none=True) frees the grads until the next backward, plan or no plan."""
    (model, optimizer), _ = pair()
    train("mlp", model, optimizer, 2)
    loss_of("mlp", model, 2).backward()
    optimizer.step()
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in grads)


def test_state_dicts_pickle_as_torchs(watch):
    """The state table counts changes for the plan, but what is saved is torch's layout: plain
    dicts that torch.optim.AdamW loads, and an optimizer copy keeps counting."""
    (model, optimizer), (torch_model, theirs) = pair()
    train("mlp", model, optimizer, 2)
    state_dict = pickle.loads(pickle.dumps(optimizer.state_dict()))
    assert all(type(state) is dict for state in state_dict["state"].values())
    theirs.load_state_dict(state_dict)
    copied = copy.deepcopy(optimizer)
    assert type(copied.state) is type(optimizer.state) and copied.state.changes >= 0
    assert type(pickle.loads(pickle.dumps(optimizer.state))) is not type(optimizer.state)  # a defaultdict
    copied_model_params = [p for group in copied.param_groups for p in group["params"]]
    for p in copied_model_params:
        p.grad = torch.randn_like(p)
    copied.step()  # the copy builds its own plan over its own tensors
    assert copied._step_plan is not None


def test_a_bad_grad_changes_nothing_and_the_next_good_step_goes_on(watch):
    ours, theirs = pair()
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, 2)
    model, optimizer = ours
    optimizer.zero_grad()
    loss_of("mlp", model, 2).backward()
    model[0].bias.grad.data = torch.randn(3)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(3,\) but its param has shape"):
        optimizer.step()
    for model, optimizer in (ours, theirs):
        train("mlp", model, optimizer, 2, start=2)
    assert_same_params(ours[0], theirs[0])
    assert_same_states(ours[1], theirs[1])


@pytest.mark.cuda
def test_a_whole_training_step_captured_in_a_cuda_graph_tracks_eager_torch():
    """The route to no host time at all: forward, backward and the step in one CUDA graph. Flat
    grads make it capturable as it stands: their buffer is zeroed inside the graph, and backward
    accumulates into the same memory on every replay."""
    model = make_model("mlp").cuda()
    torch_model = twin(model)
    optimizer = AdamW(model.parameters(), lr=torch.tensor(3e-3, device="cuda"), max_grad_norm=1.0, flat_grads=True)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)
    batches = [tuple(t.cuda() for t in models_batch("mlp", step)) for step in range(8)]
    static_inputs, static_targets = (t.clone() for t in batches[0])

    def training_step(net, opt, inputs, targets):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        if opt is theirs:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for inputs, targets in batches[:3]:
            static_inputs.copy_(inputs), static_targets.copy_(targets)
            training_step(model, optimizer, static_inputs, static_targets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        training_step(model, optimizer, static_inputs, static_targets)
    for inputs, targets in batches[3:]:
        static_inputs.copy_(inputs), static_targets.copy_(targets)
        graph.replay()
    for inputs, targets in batches[:3] + batches[3:]:
        training_step(torch_model, theirs, inputs, targets)
    torch.cuda.synchronize()
    for ours, reference in zip(model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- SGD, Adam and Lion
# The same plan serves every optimizer (a params list edited in place concerns only the plan's key: AdamW's tests). SGD and Adam are compared with torch's, doing the same
# changes; Lion with fastopt's Lion on the full path at every step (its plan dropped before each).


class _LionWithoutPlan(Lion):
    def step(self, closure=None):
        self._step_plan = None
        return super().step(closure)


def _others():
    from tests.optim_cases import SPECS

    return {
        "SGD": (SPECS["sgd"], {"dampening": 0.1}, None, ("momentum_buffer",)),
        "Adam": (SPECS["adam"], {}, None, ("exp_avg", "exp_avg_sq")),
        "Lion": (SPECS["lion"], {}, _LionWithoutPlan, ("exp_avg",)),
    }


def _replace_data(model, optimizer, keys):
    model[0].weight.data = model[0].weight.detach().clone() * 0.5


def _reset_states(model, optimizer, keys):
    first, second = list(model.parameters())[:2]
    optimizer.state[first] = {}  # starts over (SGD: torch's first step again)
    optimizer.state[second].update({key: torch.zeros_like(second) for key in keys})


def _drop_first_layer_grads_from_now_on(model, optimizer, keys):
    model[0].requires_grad_(False)
    for p in model[0].parameters():
        p.grad = None


CHANGES = {"data-replaced": _replace_data, "states-reset": _reset_states, "grads-dropped": _drop_first_layer_grads_from_now_on}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "Lion"])
def test_changes_between_steps_are_followed_by_every_optimizer(watch, name, change):
    from tests.optim_cases import assert_same_params as assert_same_params_of
    from tests.optim_cases import assert_same_states as assert_same_states_of

    spec, extra, reference_cls, keys = _others()[name]
    ours_model = make_model("mlp")
    ref_model = twin(ours_model)
    # The first layer joins at step 2: new states beside states with history, on a new plan.
    ours = spec.make(list(ours_model[1:].parameters()), **extra)
    theirs = (reference_cls or spec.theirs)(list(ref_model[1:].parameters()), **{**spec.kwargs, **extra})
    for model, optimizer in ((ours_model, ours), (ref_model, theirs)):
        train("mlp", model, optimizer, 2)
        optimizer.add_param_group({"params": list(model[0].parameters())})
        train("mlp", model, optimizer, 2, start=2)
        CHANGES[change](model, optimizer, keys)
        train("mlp", model, optimizer, 2, start=4)
    assert ours._step_plan is not None
    assert_same_params_of(spec, ours_model, ref_model)
    assert_same_states_of(spec, ours, theirs)
