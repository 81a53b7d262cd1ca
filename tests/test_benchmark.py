"""The benchmark driver behind `python -m fastopt bench` (timings themselves live in bench/)."""

import torch

from fastopt import benchmark


def test_gpt_shapes_reproduce_the_design_anchor():
    shapes = benchmark.gpt_shapes(layers=24, width=2048, vocab=50257, context=2048)
    workload = benchmark.Workload("gpt-like", shapes)
    assert len(shapes) == 292 and 1.30e9 < workload.numel < 1.32e9


def test_many_small_shapes_are_in_range_and_reproducible():
    shapes = benchmark.many_small_shapes(5000, 256, 65536)
    sizes = [s[0] for s in shapes]
    assert len(sizes) == 5000 and min(sizes) >= 256 and max(sizes) <= 65536
    assert shapes == benchmark.many_small_shapes(5000, 256, 65536)


def test_cases_do_the_same_work_as_torch():
    """Each case's fastopt call and torch call must compute the same thing on the same tensors."""
    workload = benchmark.Workload("tiny", ((8, 4), (5,), (3, 3, 2)))
    # Two identical sets of tensors (same seed): the calls change them in place.
    ours = benchmark.make_cases(workload, torch.device("cpu"), seed=1)
    theirs = benchmark.make_cases(workload, torch.device("cpu"), seed=1)
    for a, b in zip(ours, theirs):
        for _ in range(2):
            result, expected = a.fastopt(), b.torch()
        if isinstance(result, torch.Tensor):
            torch.testing.assert_close(result, expected.float())
        for x, y in zip(a.tensors, b.tensors):
            torch.testing.assert_close(x, y)


def test_run_produces_a_table():
    workload = benchmark.Workload("tiny", ((8, 4), (5,)))
    rows = benchmark.run([workload], torch.device("cpu"), ["torch"], min_run_time=0.01)
    assert {r.op for r in rows} >= {"multi_tensor_norm", "clip_grad_norm_", "adamw step"}
    assert all(r.torch_ms > 0 and r.fastopt_ms > 0 for r in rows)
    table = benchmark.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "speedup vs torch" in table
