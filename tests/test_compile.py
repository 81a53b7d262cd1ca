"""fastopt under torch.compile: a compiled training step (zero_grad, forward, backward, clipping,
``optimizer.step()``) gives the eager results; its graph breaks are counted; ``optimizer.step``
compiles with ``fullgraph=True`` (torch's own AdamW cannot: its step graph-breaks on purpose).

How it works (fastopt/optim/optimizer.py): under torch.compile dynamo runs ``FusedOptimizer._init_group``
eagerly, as for torch's optimizers, so the states are real tensors at static addresses, and the
step traces fastopt's reference formulas (torch ops) that Inductor fuses; ``fastopt.clip_grad_norm_``
does the same. What cannot be traced (a process group, a monitor, params on several devices,
tensor betas) runs eagerly behind one graph break.
"""

import copy

import pytest
import torch
import torch._dynamo

import fastopt
from fastopt.optim import AdamW
from fastopt.monitor import TrainingMonitor

# Compiling takes tens of seconds on a 2-core CPU machine: a small model, few steps.
STEPS = 3
CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # Inductor's fused kernels round differently from eager


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


DATA = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),
        torch.randn(4, 1, generator=torch.Generator().manual_seed(2)))  # fmt: skip


def train_step(model, optimizer, clip):
    optimizer.zero_grad()
    x, y = DATA
    loss = torch.nn.functional.mse_loss(model(x), y) * 10  # large enough grads to be clipped
    loss.backward()
    if clip == "clip_grad_norm_":
        fastopt.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def options(clip):
    return {"lr": 1e-2, "max_grad_norm": 1.0 if clip == "max_grad_norm" else None}


def assert_same_run(model, optimizer, eager_model, eager_optimizer):
    for (name, a), b in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, **CLOSE, msg=name)
        state, eager_state = optimizer.state[a], eager_optimizer.state[b]
        assert state.keys() == eager_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], eager_state[key], **CLOSE, msg=f"{name} {key}")
    for key, value in eager_optimizer.stats.items():
        torch.testing.assert_close(optimizer.stats[key], value, **CLOSE, msg=key)


@pytest.mark.parametrize("clip", ["max_grad_norm", "clip_grad_norm_"])
def test_compiled_training_step_gives_the_eager_results(clip):
    """The issue's repro: this crashed in dynamo (NameError from the step plan's comprehension)."""
    model, eager_model = make_model(), make_model()
    optimizer, eager_optimizer = AdamW(model.parameters(), **options(clip)), AdamW(eager_model.parameters(), **options(clip))
    compiled = torch.compile(train_step)
    for _ in range(STEPS):
        loss = compiled(model, optimizer, clip)
        eager_loss = train_step(eager_model, eager_optimizer, clip)
        torch.testing.assert_close(loss, eager_loss, **CLOSE)
    assert eager_optimizer.stats["clip_coef"].item() < 1.0 or clip == "clip_grad_norm_"  # it clipped
    assert optimizer.state[next(model.parameters())]["step"].item() == STEPS
    assert_same_run(model, optimizer, eager_model, eager_optimizer)


def explain(fn, *args):
    """(graph count, the first line of each graph-break reason) of one call of ``fn``."""
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_count, [str(reason.reason).split("\n")[0] for reason in explanation.break_reasons]


def break_reasons(fn, *args):
    return explain(fn, *args)[1]


@pytest.mark.parametrize("clip", ["max_grad_norm", "clip_grad_norm_"])
def test_the_only_graph_break_is_backward(clip):
    """One graph break, at ``loss.backward()`` (dynamo does not trace backward); torch's AdamW
    with torch's clip_grad_norm_ adds the one its step makes on purpose (_use_grad_for_differentiable)."""
    model = make_model()
    graphs, reasons = explain(train_step, model, AdamW(model.parameters(), **options(clip)), clip)
    assert len(reasons) == 1 and "backward" in reasons[0], reasons
    assert graphs == 2  # forward; then clipping and the step


def test_what_is_not_traced_runs_eagerly_behind_one_graph_break():
    """A monitor (or a process group, params on several devices, tensor betas) keeps the eager
    step: one more graph break, the same results."""
    model, eager_model = make_model(), make_model()
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, monitor=TrainingMonitor(history=4))
    eager_optimizer = AdamW(eager_model.parameters(), lr=1e-2, max_grad_norm=1.0, monitor=TrainingMonitor(history=4))
    graphs, reasons = explain(train_step, model, optimizer, None)
    # The forward graph only: after backward's break, the step ran outside any graph.
    assert graphs == 1 and len(reasons) == 1 and "backward" in reasons[0], (graphs, reasons)
    train_step(eager_model, eager_optimizer, None)  # explain ran the function once
    torch.testing.assert_close(optimizer.monitor.history()["grad_norm"], eager_optimizer.monitor.history()["grad_norm"])
    assert optimizer.monitor.steps == 1
    assert_same_run(model, optimizer, eager_model, eager_optimizer)


def test_step_compiles_with_fullgraph():
    """``torch.compile(optimizer.step, fullgraph=True)``: one graph, the eager results. torch's
    own AdamW refuses fullgraph here (its step calls torch._dynamo.graph_break() so that AOT sees
    a no_grad graph), so fastopt goes further than "where torch allows it"."""
    model, eager_model = make_model(), make_model()
    kwargs = {"lr": 1e-2, "max_grad_norm": 1.0, "spike_guard": 10.0, "spike_warmup": 1, "agc_clip_factor": 0.05}
    optimizer, eager_optimizer = AdamW(model.parameters(), **kwargs), AdamW(eager_model.parameters(), **kwargs)
    step = torch.compile(optimizer.step, fullgraph=True)
    for _ in range(STEPS):
        for m in (model, eager_model):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(DATA[0]), DATA[1]).mul(10).backward()
        step()
        eager_optimizer.step()
    assert_same_run(model, optimizer, eager_model, eager_optimizer)
    assert model[0].weight.grad is not None  # grads are read, not changed

    torch_model = make_model()
    torch_optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-2)
    torch.nn.functional.mse_loss(torch_model(DATA[0]), DATA[1]).backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(torch_optimizer.step, fullgraph=True)()


def test_compiled_step_keeps_working_after_a_copy():
    """A deepcopy (what some trainers do for EMA / SWA models) compiles as its own optimizer."""
    model = make_model()
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    twin_model = copy.deepcopy(model)
    twin = copy.deepcopy(optimizer)
    twin.param_groups[0]["params"] = list(twin_model.parameters())
    assert twin.max_grad_norm == 0.5
    reasons = break_reasons(train_step, twin_model, twin, None)
    assert len(reasons) == 1, reasons


def test_sgd_and_lion_steps_compile_with_fullgraph():
    """SGD (Nesterov momentum: its first step traced as ``momentum * 0 + g``) and Lion (with
    in-step clipping) stepped in one function compiled with ``fullgraph=True`` (one compilation
    for both, by ``aot_eager``: dynamo's tracing without Inductor's codegen, which the tests above
    run): the eager results. (Adam runs AdamW's op, compiled above.)"""
    from fastopt.optim import SGD, Lion

    makers = [
        lambda params: SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda params: Lion(params, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0),
    ]
    models, eager_models = [make_model() for _ in makers], [make_model() for _ in makers]
    optimizers = [make(m.parameters()) for make, m in zip(makers, models)]
    eager_optimizers = [make(m.parameters()) for make, m in zip(makers, eager_models)]

    def step_all():
        for optimizer in optimizers:
            optimizer.step()

    compiled = torch.compile(step_all, fullgraph=True, backend="aot_eager")  # tracing is the point: no codegen
    for _ in range(STEPS):
        for m in models + eager_models:
            m.zero_grad()
            torch.nn.functional.mse_loss(m(DATA[0]), DATA[1]).mul(10).backward()
        compiled()
        for optimizer in eager_optimizers:
            optimizer.step()
    for model, optimizer, eager_model, eager_optimizer in zip(models, optimizers, eager_models, eager_optimizers):
        assert_same_run(model, optimizer, eager_model, eager_optimizer)
    assert eager_optimizers[1].stats["clip_coef"].item() < 1.0
