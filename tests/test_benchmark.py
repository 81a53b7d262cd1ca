"""The benchmark harness behind `python -m fastopt bench` and bench/: workloads, the bytes each
op must move, that every implementation of an op does the same work, timing mechanics, and the
files a run writes. Fast, on CPU, on tiny workloads (timings themselves live in bench/)."""

import json
import math
import statistics

import pytest
import torch

from fastopt import __main__ as cli
from fastopt import benchmark
from fastopt.benchmark import cases, report, runner, timing

CPU = torch.device("cpu")


def test_gpt_shapes_reproduce_the_design_anchor():
    shapes = benchmark.gpt_shapes(layers=24, width=2048, vocab=50257, context=2048)
    workload = benchmark.Workload("gpt-like", shapes)
    assert len(shapes) == 292 and 1.30e9 < workload.numel < 1.32e9


def test_many_small_shapes_are_in_range_and_reproducible():
    shapes = benchmark.many_small_shapes(5000, 256, 65536)
    sizes = [s[0] for s in shapes]
    assert len(sizes) == 5000 and min(sizes) >= 256 and max(sizes) <= 65536
    assert shapes == benchmark.many_small_shapes(5000, 256, 65536)
    assert 1.60e8 < sum(sizes) < 1.68e8  # docs/design.md's 164 M params


def test_resnet50_shapes_match_torchvision():
    shapes = benchmark.resnet50_shapes()
    convs = [s for s in shapes if len(s) == 4]
    assert len(shapes) == 161 and len(convs) == 53
    assert sum(math.prod(s) for s in shapes) == 25_557_032  # torchvision.models.resnet50()
    assert shapes[0] == (64, 3, 7, 7) and shapes[-2:] == ((1000, 2048), (1000,))
    assert (512, 512, 3, 3) in shapes and (2048, 1024, 1, 1) in shapes  # last stage, projection shortcut


def test_default_workloads_cover_families_and_dtypes():
    workloads = benchmark.default_workloads(CPU)
    assert {w.key for w in workloads} == {f"{f}/{d}" for f in benchmark.FAMILIES for d in benchmark.DTYPES}
    mixed = next(w for w in workloads if w.key == "gpt-like/bf16-grads")
    assert (mixed.param_dtype, mixed.grad_dtype, mixed.state_dtype) == (torch.float32, torch.bfloat16, torch.float32)
    resnet = {w.dtype_name: w.ops for w in workloads if w.name == "resnet50-like"}
    assert resnet == {"fp32": benchmark.AGC_OPS + ("sgd step",), "bf16": benchmark.AGC_OPS,
                      "bf16-grads": benchmark.AGC_OPS}  # fmt: skip
    # SGD, Adam and Lion steps: on fp32 only by default (make bench's time), in any dtype when named
    gpt = {w.dtype_name: w.ops for w in workloads if w.name == "gpt-like"}
    assert gpt["fp32"] == benchmark.NORM_CLIP_OPS + benchmark.OPTIMIZER_OPS and gpt["bf16"] == benchmark.NORM_CLIP_OPS
    named = benchmark.default_workloads(CPU, dtypes=["bf16"], ops=["lion step", "multi_tensor_norm"])
    assert [(w.name, w.ops) for w in named] == [("gpt-like", ("multi_tensor_norm", "lion step")),
                                                ("many-small", ("multi_tensor_norm", "lion step"))]  # fmt: skip
    assert all(w.numel < 10e6 for w in workloads)  # scaled down on a CPU
    full = benchmark.default_workloads(CPU, ["gpt-like"], ["bf16"], size="full")
    assert [w.describe() for w in full] == ["gpt-like (292 tensors, 1.3 B params, bf16)"]


def test_default_run_grows_by_the_optimizer_steps_on_fp32_only():
    """The row groups of `make bench` on a CPU: 42 before the SGD, Adam and Lion steps, 11 more
    (5 steps on gpt-like and many-small fp32, SGD on resnet50-like fp32), which keeps its time."""
    workloads = benchmark.default_workloads(CPU)
    counts = {op: sum(op in w.ops for w in workloads) for op in benchmark.ALL_OPS}
    assert sum(n for op, n in counts.items() if op not in benchmark.OPTIMIZER_OPS) == 42
    assert {op: counts[op] for op in benchmark.OPTIMIZER_OPS} == {
        "sgd step": 3, "clip + sgd step": 2, "adam step": 2, "lion step": 2, "clip + lion step": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    "op, dtype, bytes_per_element",
    [
        ("multi_tensor_norm", "fp32", 4),
        ("unscale_and_check_", "bf16", 4),
        ("clip_grad_norm_", "fp32", 12),
        ("adaptive_clip_grad_", "bf16-grads", 4 + 2 * 2),
        ("adamw step", "fp32", 28),
        ("clip + adamw step", "fp32", 32),  # docs/design.md section 1: the two-pass floor
        ("AMP step", "fp32", 32),
        ("AMP step", "bf16", 16),
        ("clip + adamw step", "bf16-grads", 2 * 4 + 2 * 2 + 4 * 4),
        ("AGC + adamw step", "fp32", 28),
        ("sgd step", "fp32", 20),  # read p, g, buf; write p, buf
        ("clip + sgd step", "fp32", 24),  # plus one read of g for the norm
        ("adam step", "fp32", 28),  # as AdamW: the L2 term rides on the grad's load
        ("lion step", "fp32", 20),  # read p, g, m; write p, m
        ("clip + lion step", "fp32", 24),
        ("lion step", "bf16", 10),
        ("sgd step", "bf16-grads", 2 * 4 + 2 + 2 * 4),
    ],
)
def test_floor_bytes(op, dtype, bytes_per_element):
    param_dtype, grad_dtype = benchmark.DTYPES[dtype]
    workload = benchmark.Workload("w", ((10, 3), (7,)), param_dtype, grad_dtype)
    assert benchmark.floor_bytes(op, workload) == 37 * bytes_per_element


def test_bytes_touched_counts_each_tensor_once():
    workload = benchmark.Workload("w", ((100,),))
    assert cases.bytes_touched("clip_grad_norm_", workload) == 400  # grads only, though read twice
    assert cases.bytes_touched("adamw step", workload) == 100 * (4 + 4 + 2 * 4)
    assert cases.bytes_touched("adam step", workload) == 100 * (4 + 4 + 2 * 4)
    assert cases.bytes_touched("clip + sgd step", workload) == 100 * (4 + 4 + 4)  # one momentum buffer
    assert cases.bytes_touched("lion step", workload) == 100 * (4 + 4 + 4)  # one exp_avg


def _row(op, implementation, role, median_ms, floor_ms=1.0, workload="w/fp32", **extra):
    fields = dict(q1_ms=median_ms, q3_ms=median_ms, min_ms=median_ms) if median_ms is not None else {}
    fields.update(extra)
    return benchmark.Row(
        workload=workload,
        workload_description=workload,
        op=op,
        implementation=implementation,
        role=role,
        backend=None,
        plotted=True,
        copies=1,
        floor_bytes=int(floor_ms * 1e6),
        launch_unit="aten ops",
        floor_ms=floor_ms,
        median_ms=median_ms,
        **fields,
    )


def test_ratio_is_the_median_of_per_round_ratios_and_the_floor_that_of_the_rounds_reference():
    """Synthetic rounds where the ratio of medians (3 / 6 = 0.5) is not the median of per-round
    ratios: a slow round (contention) hits both, so per round the contender is 2x slower... or not."""
    baseline = [1.0, 2.0, 3.0, 4.0, 100.0]
    contender = [2.0, 4.0, 6.0, 8.0, 1.0]
    second_baseline = [0.5, 9.0, 9.0, 9.0, 9.0]  # the fastest baseline of each round counts
    reference_ms = [1.0, 1.0, 2.0, 2.0, 2.0]
    ratios, floors, fractions = timing.per_round_figures(
        [baseline, contender, second_baseline], [True, False, True], reference_ms, reference_bytes=100, floor_bytes=50
    )
    assert ratios[1] == [0.25, 0.5, 0.5, 0.5, 9.0]  # min(baselines) / contender, round by round
    assert ratios[0] == [0.5, 1.0, 1.0, 1.0, 0.09]
    assert floors == [0.5, 0.5, 1.0, 1.0, 1.0]  # 50 bytes at 100 bytes per reference time
    assert fractions[1] == [0.25, 0.125, 1.0 / 6.0, 0.125, 1.0]
    assert timing.per_round_figures([contender], [False], reference_ms, 100, 50)[0] == [[None] * 5]
    with pytest.raises(ValueError, match="one sample per round"):
        timing.per_round_figures([baseline, contender[:3]], [True, False], reference_ms, 100, 50)


def test_spread_gives_quartiles_of_the_samples():
    stats = timing.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.min_ms, stats.q1_ms, stats.median_ms, stats.q3_ms) == (1.0, 2.0, 3.0, 4.0)
    assert stats.relative_iqr == pytest.approx(2.0 / 3.0)
    assert timing.spread([7.0]).relative_iqr == 0.0
    with pytest.raises(ValueError):
        timing.spread([])


@pytest.mark.parametrize(
    "value, text",
    [(0.002, "0.0020"), (0.00204, "0.0020"), (15.07, "15"), (1.0, "1.0"), (0.999, "1.0"), (0.4449, "0.44"),
     (9.96, "10"), (123.4, "120"), (1.04, "1.0"), (1.05, "1.1"), (2.5e-5, "0.000025")],
)  # fmt: skip
def test_ratios_print_with_two_significant_digits(value, text):
    assert report.significant(value) == text
    assert report.ratio_text(value) == text + "x"


def test_flags_mark_spread_contention_floor_and_a_part_slower_than_its_whole():
    rows = [
        # the run: torch foreach's adamw step at 1026 ms, its clip + adamw step at 70.4 ms
        _row("adamw step", "torch foreach", "torch", 1026.0, q1_ms=900.0, q3_ms=1100.0),
        _row("clip + adamw step", "torch foreach", "torch", 70.4, q1_ms=69.0, q3_ms=72.0),
        # a part a little slower than its whole, within noise (quartiles overlap): no flag
        _row("adamw step", "fastopt[cpu]", "fastopt", 10.5, q1_ms=10.0, q3_ms=12.0),
        _row("clip + adamw step", "fastopt[cpu]", "fastopt", 10.0, q1_ms=9.5, q3_ms=11.0),
        _row("multi_tensor_norm", "fastopt[cpu]", "fastopt", 1.0, q1_ms=0.6, q3_ms=1.4),  # IQR 80%
        _row("multi_tensor_norm", "torch foreach", "torch", 2.0, q1_ms=1.9, q3_ms=2.1, contention=0.79),
        _row("clip_grad_norm_", "torch foreach", "torch", 3.0, floor_fraction=9.17),
        _row("clip_grad_norm_", "fastopt[cpu]", "fastopt", 3.0, floor_fraction=0.8, contention=0.05),
        _row("adamw step", "broken", "fastopt", None, error="RuntimeError: x"),
    ]
    benchmark.flag_rows(rows)
    flags = [row.flags for row in rows]
    assert flags[0] == ["slower than its whole (clip + adamw step: 70.4 ms)"]
    assert flags[1] == ["faster than its part (adamw step: 1.03e+03 ms)"]
    assert flags[2] == [] and flags[3] == []
    assert flags[4] == ["wide spread (IQR 80% of median)"]
    assert flags[5] == ["contention (79% of the row)"]
    assert flags[6] == ["beats the floor (917%)"]
    assert flags[7] == [] and flags[8] == []
    benchmark.flag_rows(rows)  # flagging again does not pile the flags up
    assert rows[0].flags == flags[0] and len(rows[1].flags) == 1


def test_rounds_call_every_contender_once_in_rotating_order():
    calls, restored = [], []

    def contender(name, copies):
        steps = [lambda c=c: calls.append((name, c)) for c in range(copies)]
        return timing.Contender(steps, lambda copy, name=name: restored.append((name, copy)))

    contenders = [contender("a", 2), contender("b", 3), contender("c", 1)]
    rounds = timing.time_rounds(contenders, CPU, min_run_time=0.0, min_rounds=4, warmup_rounds=1)
    assert [len(s) for s in rounds.samples_ms] == [4, 4, 4] and rounds.wall_s > 0
    assert calls == restored  # each call is followed by its own copy's restore
    warmup, timed = calls[:3], calls[3:]
    assert [name for name, _ in warmup] == ["a", "b", "c"]
    assert [name for name, _ in timed] == list("abc" "bca" "cab" "abc")  # round r starts with contender r mod 3
    assert [c for name, c in calls if name == "b"] == [0, 1, 2, 0, 1]  # each contender rotates its copies
    assert rounds.host_ms == [statistics.median(s) for s in rounds.samples_ms]


def test_a_group_too_big_for_memory_is_split_with_torch_in_every_chunk():
    workload = benchmark.Workload("w", ((10,),))
    found, _ = benchmark.implementations(CPU, ["torch"], peers=False)
    items = [benchmark.PlanItem(workload, impl) for impl in found if impl.op == "adamw step"]
    baselines = [i for i, item in enumerate(items) if item.implementation.role == "torch"]
    assert len(baselines) == 2 and len(items) == 4
    assert runner._chunks(items, [10] * 4, budget=40) == [[0, 1, 2, 3]]
    chunks = runner._chunks(items, [10] * 4, budget=30)
    assert chunks == [baselines + [2], baselines + [3]]


def test_measure_group_times_every_implementation_in_the_same_rounds():
    workload = benchmark.Workload("tiny", ((6, 4), (5,)), ops=("clip + adamw step",))
    items, _ = benchmark.plan([workload], CPU, ["torch"], peers=False)
    rows = benchmark.measure_group(items, CPU, cache_bytes=1 << 20, min_run_time=0.0, min_rounds=7)
    assert [r.implementation for r in rows] == ["torch foreach", "torch fused", "fastopt[torch]"]
    assert all(r.error is None and r.rounds == 7 and len(r.samples_ms) == 7 for r in rows)
    assert all(r.min_ms <= r.q1_ms <= r.median_ms <= r.q3_ms and r.floor_ms > 0 for r in rows)
    assert all(r.vs_torch_best <= 1.0 for r in rows if r.role == "torch")  # a baseline never beats the best
    assert max(r.vs_torch_best for r in rows if r.role == "torch") > 0.5
    with pytest.raises(ValueError, match="one workload and op"):
        other = benchmark.Workload("other", ((3,),), ops=("clip + adamw step",))
        benchmark.measure_group(items + benchmark.plan([other], CPU, ["torch"], peers=False)[0], CPU, 1 << 20)


def test_copies_to_rotate_cover_twice_the_cache():
    assert timing.copies_to_rotate(300 << 20, cache=32 << 20) == 1  # dwarfs the cache: evicts itself
    assert timing.copies_to_rotate(100 << 20, cache=32 << 20) == 2
    assert timing.copies_to_rotate(16 << 20, cache=32 << 20) == 5  # 4 others x 16 MiB = 2 x cache
    assert timing.copies_to_rotate(1 << 10, cache=32 << 20) == 8  # capped


def test_time_steps_rotates_copies_and_restores_after_each_call():
    calls, restored = [], []
    steps = [lambda i=i: calls.append(i) for i in range(3)]
    result = timing.time_steps(steps, restored.append, CPU, min_run_time=0.0, min_reps=7, warmup_calls=2)
    assert calls == restored  # every call, warm-up included, is followed by its copy's restore
    assert calls[:5] == [0, 1, 2, 0, 1] and calls[5:] == [2, 0, 1, 2, 0, 1, 2]  # first calls, warm-up, timed
    assert result.reps == 7 and result.median_ms >= 0 and result.host_ms == result.median_ms


def test_count_launches_counts_top_level_aten_ops_on_cpu():
    tensors = [torch.randn(10) for _ in range(5)]
    assert timing.count_launches(lambda: torch._foreach_add_(tensors, 1.0), CPU) == 1
    norm = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))  # noqa: E731
    assert timing.count_launches(norm, CPU) == 3  # _foreach_norm, stack, linalg_vector_norm


TINY = {
    "fp32": benchmark.Workload("tiny", ((8, 4), (5,), (3, 3, 2, 2)), torch.float32, torch.float32),
    "bf16-grads": benchmark.Workload("tiny", ((8, 4), (5,), (3, 3, 2, 2)), torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("dtype", list(TINY))
@pytest.mark.parametrize("op", benchmark.ALL_OPS)
def test_every_implementation_does_the_same_work(op, dtype):
    """Every implementation of an op, run on the same data, gives what torch's first path gives:
    the value (norm), the grads (grad ops) or the params (steps), after two calls."""
    workload = TINY[dtype]
    found, _ = benchmark.implementations(CPU, ["torch"], peers=True)
    implementations = [impl for impl in found if impl.op == op]
    assert implementations[0].role == "torch" and any(impl.role == "fastopt" for impl in implementations)
    outcomes = {}
    for impl in implementations:
        prepared = benchmark.prepare(benchmark.PlanItem(workload, impl), CPU, copies=1, seed=3)
        tensors = prepared.sets[0]
        result = None
        for call in range(2):
            if call and prepared.after is not None:
                prepared.after(0)
            result = prepared.steps[0]()
        compares = benchmark.OPS[op].compares
        outcomes[impl.name] = {"value": result, "grads": tensors.grads, "params": tensors.params}[compares]
    expected = outcomes.pop(implementations[0].name)
    for name, outcome in outcomes.items():
        pairs = [(outcome, expected)] if isinstance(expected, torch.Tensor) else list(zip(outcome, expected))
        for got, want in pairs:
            # torch rounds bf16 norms (and so clip coefficients) to bf16; fastopt keeps them in fp32
            rtol = 1.6e-2 if want.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_each_optimizer_step_is_timed_against_torchs_fastest_path_for_it():
    """SGD and Adam against torch.optim's foreach and fused (torch's CPU has fused SGD and Adam
    since 2.4), clip variants behind clip_grad_norm_(foreach=True); Lion against a foreach Lion."""
    found, _ = benchmark.implementations(CPU, ["torch"], peers=False)
    names = {op: [impl.name for impl in found if impl.op == op] for op in benchmark.OPTIMIZER_OPS}
    fused = ["torch fused"] if torch.__version__ >= "2.4" else []
    if fused:
        assert [cases.torch_fused_unsupported(name, "cpu") for name in ("SGD", "Adam")] == [None, None]
    for op in ("sgd step", "clip + sgd step", "adam step"):
        assert names[op] == ["torch foreach", *fused, "fastopt[torch]"]
    assert names["lion step"] == names["clip + lion step"] == ["torch _foreach Lion", "fastopt[torch]"]
    param = torch.nn.Parameter(torch.randn(3))
    sgd = cases._torch_optimizer("SGD", "fused")([param])
    assert type(sgd) is torch.optim.SGD and sgd.defaults["fused"] and sgd.defaults["momentum"] == cases.SGD_MOMENTUM
    adam = cases._torch_optimizer("Adam", "foreach")([param])
    assert type(adam) is torch.optim.Adam and adam.defaults["foreach"] and adam.defaults["weight_decay"] > 0
    assert not adam.defaults.get("decoupled_weight_decay", False)  # L2, the grad's weight decay


def test_a_device_without_torchs_fused_path_times_foreach_and_says_why(monkeypatch):
    monkeypatch.setattr(cases, "torch_fused_unsupported", lambda name, device_type: f"no fused {name} here")
    found, skipped = benchmark.implementations(CPU, ["torch"], peers=False)
    assert not any(impl.name == "torch fused" and impl.op in benchmark.OPTIMIZER_OPS for impl in found)
    assert any(impl.name == "torch fused" and impl.op == "adamw step" for impl in found)  # AdamW's rows as before
    reasons = {(s.implementation, s.ops): s.reason for s in skipped}
    assert reasons[("torch fused", ("sgd step", "clip + sgd step"))] == "no fused SGD here"
    assert reasons[("torch fused", ("adam step",))] == "no fused Adam here"


def test_foreach_lion_is_the_papers_lion():
    """The Lion baseline (and the example's torch side) against Lion's per-tensor formula, over
    param groups with their own hyper-parameters, and a param without a grad left alone."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((5, 3), (7,), (2,))]
    expected = [p.detach().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.5, "weight_decay": 0.0}]
    optimizer = cases.ForeachLion(groups, lr=0.1, betas=(0.8, 0.9), weight_decay=0.3)
    for step in range(3):
        for k, p in enumerate(params):
            p.grad = torch.randn_like(p) if k != 1 or step == 0 else None  # params[1] gets a grad once
        optimizer.step()
        for k, (p, m) in enumerate(zip(params, momenta)):
            if p.grad is None:
                continue
            lr, decay = (0.5, 0.0) if k == 2 else (0.1, 0.3)
            update = (0.8 * m + 0.2 * p.grad).sign()
            expected[k] = expected[k] * (1 - lr * decay) - lr * update
            m.mul_(0.9).add_(p.grad, alpha=0.1)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="betas"):
        cases.ForeachLion(params, betas=(0.9, 1.0))


def test_a_clip_step_is_flagged_when_faster_than_its_optimizer_step():
    rows = [_row("lion step", "fastopt[cpu]", "fastopt", 10.0, q1_ms=9.5, q3_ms=10.5),
            _row("clip + lion step", "fastopt[cpu]", "fastopt", 5.0, q1_ms=4.8, q3_ms=5.2),
            _row("clip_grad_norm_", "torch foreach", "torch", 8.0, q1_ms=7.9, q3_ms=8.1),
            _row("clip + sgd step", "torch foreach", "torch", 6.0, q1_ms=5.9, q3_ms=6.1)]  # fmt: skip
    benchmark.flag_rows(rows)
    assert rows[0].flags == ["slower than its whole (clip + lion step: 5 ms)"]
    assert rows[2].flags == ["slower than its whole (clip + sgd step: 6 ms)"]


def _implementations_and_skip_reasons():
    """What runs and why the rest does not, with peers detected afresh (their cache cleared)."""
    cases.peer_unavailable.cache_clear()
    try:
        found, skipped = benchmark.implementations(CPU, ["torch"])
    finally:
        cases.peer_unavailable.cache_clear()
    return found, {s.implementation: s.reason for s in skipped}


def test_absent_peers_are_listed_with_reasons(monkeypatch):
    real_find_spec = cases.importlib.util.find_spec
    absent = {p.package for p in cases.PEERS} | {"timm"}
    monkeypatch.setattr(
        cases.importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a)
    )
    found, reasons = _implementations_and_skip_reasons()
    assert reasons["DeepSpeed FusedAdam"] == "deepspeed is not installed (pip install deepspeed)"
    assert reasons["DeepSpeed CPUAdam"].startswith("deepspeed is not installed (pip install deepspeed")
    assert reasons["TransformerEngine FusedAdam"] == "transformer_engine is not installed"
    assert reasons["torchao AdamW"] == "torchao is not installed (pip install torchao)"
    assert reasons["timm adaptive_clip_grad"] == "timm is not installed"
    assert reasons["torch.compile foreach"].startswith("opt-in")
    assert not any(impl.role == "peer" for impl in found)
    # A peer that is installed but runs only on CUDA says so on a CPU.
    monkeypatch.setattr(cases.importlib.util, "find_spec", lambda name, *a: object() if name == "apex" else None)
    assert cases.peer_unavailable("apex FusedAdam", "cpu") == "apex FusedAdam runs on CUDA tensors only"
    monkeypatch.setattr(cases.importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else None)
    assert cases.peer_unavailable("DeepSpeed CPUAdam", "cuda") == "DeepSpeed CPUAdam runs on CPU tensors only"
    cases.peer_unavailable.cache_clear()


class _BrokenAdam(torch.optim.Optimizer):
    """Imports fine, fails on its first step (as a peer whose C++ op does not build)."""

    def __init__(self, params, **_options):
        super().__init__(params, {})

    def step(self, closure=None):
        raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped")


def test_a_peer_that_imports_but_cannot_step_is_skipped_with_why(monkeypatch):
    peer = cases.Peer("Broken Adam", "torch", lambda: _BrokenAdam, cases.CPU)
    working = cases.Peer("Plain Adam", "torch", lambda: torch.optim.AdamW, cases.CPU)
    monkeypatch.setattr(cases, "PEERS", (peer, working))
    found, reasons = _implementations_and_skip_reasons()
    assert reasons["Broken Adam"] == (
        "installed, but a step on cpu tensors failed: RuntimeError: Error building extension 'cpu_adam'"
    )
    plain = [impl for impl in found if impl.name == "Plain Adam"]
    assert [impl.op for impl in plain] == list(cases.PEER_OPS) and plain[1].notes == "clip by torch"


def test_run_writes_json_markdown_and_png(tmp_path):
    workloads = [benchmark.Workload("tiny", ((6, 4), (5,)), ops=("multi_tensor_norm", "AGC + adamw step"))]
    results = benchmark.run(workloads, CPU, ["torch"], peers=False, min_run_time=0.001)
    assert {r.op for r in results.rows} == {"multi_tensor_norm", "AGC + adamw step"}
    assert all(r.error is None and r.median_ms > 0 and r.launches > 0 for r in results.rows)
    norm_torch = next(r for r in results.rows if r.op == "multi_tensor_norm" and r.role == "torch")
    assert norm_torch.vs_torch_best == 1.0 and norm_torch.floor_bytes == 4 * 29
    assert len({r.floor_ms for r in results.rows if r.op == "multi_tensor_norm"}) == 1  # one reference per group
    assert norm_torch.floor_ms > 0 and norm_torch.floor_fraction > 0

    env = report.environment(CPU, "python -m fastopt bench --test")
    written = report.write_all(results, env, tmp_path / "out")
    payload = json.loads(written["json"].read_text())
    assert payload["environment"]["command"] == "python -m fastopt bench --test"
    assert payload["copy_bandwidth_GBps"] > 0 and len(payload["rows"]) == len(results.rows)
    assert payload["wall_s"] > 0 and (payload["cpu_contention"] is None or payload["cpu_contention"] >= 0)
    assert {"floor_fraction", "vs_torch_best", "host_ms", "launches"} <= payload["rows"][0].keys()
    again, again_env = report.read_json(written["json"])  # a run renders again from its JSON
    assert again_env == env and report.markdown(again, again_env) == report.markdown(results, env)
    text = written["markdown"].read_text()
    assert text.startswith(env["date"][:10]) and "`python -m fastopt bench --test`" in text.splitlines()[0]
    assert "| multi_tensor_norm | fastopt[torch] |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in written["png"]
    else:
        assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_prints_the_command_first_and_writes_results(tmp_path, capsys):
    argv = ["bench", "--size", "tiny", "--workloads", "many-small", "--dtypes", "bf16-grads", "--ops",
            "clip_grad_norm_", "AMP step", "--min-run-time", "0.001", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "cpu" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert "`python -m fastopt bench --size tiny" in lines[0] and "--ops clip_grad_norm_ 'AMP step'" in lines[0]
    assert any(line.startswith("| many-small/bf16-grads | AMP step | torch") for line in lines)
    assert any("grads cast to float32 first" in line for line in lines)
    assert any(line.startswith("- DeepSpeed FusedAdam") for line in lines)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == sorted([".json", ".md"] + [".png"] * _has_matplotlib())


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_progress_falls_back_to_plain_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # import tqdm now raises ImportError
    report_progress = cli._progress(quiet=False)
    report_progress(0, 2, "gpt-like/fp32: adamw step [torch fused]")
    report_progress(2, 2, "done")
    assert capsys.readouterr().err == "  [1/2] gpt-like/fp32: adamw step [torch fused]\n"
    assert cli._progress(quiet=True) is None


def test_installed_users_are_not_sent_to_a_file_the_wheel_lacks(capsys, monkeypatch):
    reason = "torch 2.13.0+cpu is a CPU-only build; the CUDA extension fastopt._C is not built (see csrc/README.md)"
    assert report.in_source_checkout()  # the tests run from the repository, which has the file
    assert report.for_installed_users(reason, checkout=True) == reason
    installed = report.for_installed_users(reason, checkout=False)
    assert "csrc/README.md" not in installed and "pip install -v --no-build-isolation ." in installed
    monkeypatch.setattr(report, "in_source_checkout", lambda: False)
    monkeypatch.setattr(cli.backends, "unavailable_backends", lambda: {"cuda": reason})
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cuda    missing: torch 2.13.0+cpu" in out and "csrc/README.md" not in out


def test_bench_help_cites_the_design_document_in_the_repository(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "docs/design.md" in text and "DESIGN.md" not in text


def test_report_rerenders_a_run_and_updates_marked_blocks(tmp_path, capsys):
    workloads = [benchmark.Workload("tiny", ((6, 4), (5,)), ops=("multi_tensor_norm",))]
    results = benchmark.run(workloads, CPU, ["torch"], peers=False, min_run_time=0.0, min_rounds=3)
    env = report.environment(CPU, "python -m fastopt bench --test")
    written = report.write_all(results, env, tmp_path / "run")
    readme, notes = tmp_path / "README.md", tmp_path / "RESULTS.md"
    for path in (readme, notes):
        path.write_text(f"intro\n{cli.BEGIN}\nold figures\n{cli.END}\noutro\n")
    assert cli.main(["report", str(tmp_path / "run"), "--update", str(readme), str(notes)]) == 0
    updated = readme.read_text()
    assert updated.startswith(f"intro\n{cli.BEGIN}\n") and updated.endswith(f"\n{cli.END}\noutro\n")
    assert "old figures" not in updated and report.readme_block(results, env) in updated
    assert report.markdown(results, env) in notes.read_text()
    assert cli.main(["report", str(written["json"]), "--brief"]) == 0
    assert capsys.readouterr().out.strip() == report.readme_block(results, env)
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one pair of lines"):
        cli.main(["report", str(written["json"]), "--update", str(tmp_path / "bare.md")])
    assert (tmp_path / "bare.md").read_text() == "no markers\n"


def test_flags_reach_the_table_the_json_and_the_chart(tmp_path):
    rows = [_row("multi_tensor_norm", "torch foreach", "torch", 2.0, vs_torch_best=1.0),
            _row("multi_tensor_norm", "fastopt[cpu]", "fastopt", 1.0, q1_ms=0.5, q3_ms=1.5, min_ms=0.5,
                 vs_torch_best=2.0, floor_fraction=0.5, samples_ms=[0.5, 1.0, 1.5], rounds=3)]  # fmt: skip
    benchmark.flag_rows(rows)
    results = benchmark.Results("cpu", 1e10, 1 << 20, rows, [], {"min_rounds": 3}, 1.0, 0.0)
    env = report.environment(CPU, "python -m fastopt bench --test")
    text = report.markdown(results, env)
    assert "| multi_tensor_norm | fastopt[cpu] | 1.00 | 0.500 | 100% | 3 | 2.0x |" in text
    assert "wide spread (IQR 100% of median)" in text and "Rows flagged: 1 of 2" in text
    assert "fastopt[cpu]: wide spread" in report.summary_table(results)
    written = report.write_all(results, env, tmp_path)
    payload = json.loads(written["json"].read_text())
    assert payload["rows"][1]["flags"] == ["wide spread (IQR 100% of median)"] and payload["rows"][0]["flags"] == []
    assert payload["rows"][1]["spread"] == 1.0 and payload["rows"][1]["samples_ms"] == [0.5, 1.0, 1.5]
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    drawn = {}
    real_savefig = plt.Figure.savefig

    def keep_texts(figure, path, **kwargs):
        drawn["texts"] = [t.get_text() for ax in figure.axes for t in ax.texts] + [figure._suptitle.get_text()]
        return real_savefig(figure, path, **kwargs)

    plt.Figure.savefig = keep_texts
    try:
        report.plot(results, env, tmp_path / "chart.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert "2.0x!" in drawn["texts"] and any("1 of 2 rows flagged" in t for t in drawn["texts"])


def test_make_test_counts_skips_by_reason():
    """tests/conftest.py's last line of `make test` (the suite's own skips, not the bench's)."""
    from types import SimpleNamespace

    from tests.conftest import skip_summary

    reports = [SimpleNamespace(longrepr=("t.py", 1, "Skipped: needs a CUDA GPU"))] * 3
    reports += [SimpleNamespace(longrepr=("t.py", 9, "Skipped: timm is not installed"))]
    reports += [SimpleNamespace(longrepr=("t.py", 5, "Skipped: apex is not installed"))] * 2
    assert skip_summary(reports) == (
        "skipped 6: 3 needs a CUDA GPU; 2 apex is not installed; 1 timm is not installed"
    )
    assert skip_summary([]) == ""
