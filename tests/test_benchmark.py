"""The benchmark harness behind `python -m fastopt bench` and bench/: workloads, the bytes each
op must move, that every implementation of an op does the same work, timing mechanics, and the
files a run writes. Fast, on CPU, on tiny workloads (timings themselves live in bench/)."""

import json
import math

import pytest
import torch

from fastopt import __main__ as cli
from fastopt import benchmark
from fastopt.benchmark import cases, report, timing

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
    assert all(w.ops == benchmark.AGC_OPS for w in workloads if w.name == "resnet50-like")
    assert all(w.numel < 10e6 for w in workloads)  # scaled down on a CPU
    full = benchmark.default_workloads(CPU, ["gpt-like"], ["bf16"], size="full")
    assert [w.describe() for w in full] == ["gpt-like (292 tensors, 1.3 B params, bf16)"]


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


def _row(op, implementation, role, median_ms, floor_ms=1.0, workload="w/fp32", **extra):
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
        floor_ms=floor_ms,
        launch_unit="aten ops",
        median_ms=median_ms,
        **extra,
    )


def test_ratios_are_against_torchs_best_eager_path_and_floor_fraction_is_floor_over_time():
    rows = [
        _row("adamw step", "torch foreach", "torch", 8.0),
        _row("adamw step", "torch fused", "torch", 4.0),
        _row("adamw step", "torch.compile foreach", "torch.compile", 2.0),  # not a baseline
        _row("adamw step", "fastopt[torch]", "fastopt", 16.0),
        _row("adamw step", "fastopt[broken]", "fastopt", None, error="RuntimeError: x"),
        _row("adamw step", "torch fused", "torch", 1.0, workload="other/fp32"),  # another group
    ]
    benchmark.fill_ratios(rows)
    assert [r.vs_torch_best for r in rows] == [0.5, 1.0, 2.0, 0.25, None, 1.0]
    assert rows[3].floor_fraction == 1.0 / 16.0 and rows[4].floor_fraction is None
    compiled = _row("clip + adamw step", "torch.compile foreach", "torch.compile", 2.0, first_call_ms=60_002.0)
    assert compiled.compile_s == 60.0 and rows[0].compile_s is None


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


def test_absent_peers_are_listed_with_reasons(monkeypatch):
    real_find_spec = cases.importlib.util.find_spec
    absent = {p.package for p in cases.PEERS} | {"timm"}
    monkeypatch.setattr(
        cases.importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a)
    )
    cases.peer_unavailable.cache_clear()
    try:
        found, skipped = benchmark.implementations(CPU, ["torch"])
    finally:
        cases.peer_unavailable.cache_clear()
    reasons = {s.implementation: s.reason for s in skipped}
    assert reasons["DeepSpeed FusedAdam"] == "deepspeed is not installed"
    assert reasons["TransformerEngine FusedAdam"] == "transformer_engine is not installed"
    assert reasons["torchao AdamW"] == "torchao is not installed"
    assert reasons["timm adaptive_clip_grad"] == "timm is not installed"
    assert reasons["torch.compile foreach"].startswith("opt-in")
    assert not any(impl.role == "peer" for impl in found)
    # A peer that is installed but runs only on CUDA says so on a CPU.
    monkeypatch.setattr(cases.importlib.util, "find_spec", lambda name, *a: object() if name == "apex" else None)
    assert cases.peer_unavailable("apex FusedAdam", "cpu") == "apex FusedAdam runs on CUDA tensors only"
    cases.peer_unavailable.cache_clear()


def test_run_writes_json_markdown_and_png(tmp_path):
    workloads = [benchmark.Workload("tiny", ((6, 4), (5,)), ops=("multi_tensor_norm", "AGC + adamw step"))]
    results = benchmark.run(workloads, CPU, ["torch"], peers=False, min_run_time=0.001)
    assert {r.op for r in results.rows} == {"multi_tensor_norm", "AGC + adamw step"}
    assert all(r.error is None and r.median_ms > 0 and r.launches > 0 for r in results.rows)
    norm_torch = next(r for r in results.rows if r.op == "multi_tensor_norm" and r.role == "torch")
    assert norm_torch.vs_torch_best == 1.0 and norm_torch.floor_bytes == 4 * 29
    assert math.isclose(norm_torch.floor_ms, norm_torch.floor_bytes / results.copy_bandwidth * 1e3)

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
