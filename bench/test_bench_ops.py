"""pytest-benchmark suite: each op and full step, by torch, each available fastopt backend and
the peers that import here, on the workloads of ``python -m fastopt bench``.

    pytest bench/ --benchmark-only                      # grouped by workload and op
    pytest bench/ --benchmark-only -k "gpt-like/fp32"   # one workload
    pytest bench/ --benchmark-only --bench-compile      # also torch.compile (slow)

Rows of one group do the same work on the same data; compare them with each other only. Each
round is one call's wall time, ending with a synchronize on a GPU (``python -m fastopt bench``
times the device with CUDA events instead); calls rotate over copies of the tensors and grads
an op changes are restored between rounds, untimed. Implementations that cannot run here (peers
not installed, backends without their device) are listed as skipped tests with the reason.
extra_info carries each row's memory floor, the fraction of it reached, and launches per step.
"""

import pytest
import torch

from fastopt.benchmark import default_workloads, plan, prepare, timing
from fastopt.benchmark.cases import bytes_touched, floor_bytes


def _id(*parts: str) -> str:
    return "/".join(parts).replace(" ", "-")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workloads = default_workloads(device, size=metafunc.config.getoption("--bench-size"))
    items, skipped = plan(workloads, device, compile=metafunc.config.getoption("--bench-compile"))
    params = [pytest.param(case, id=_id(case.workload.key, case.op, case.implementation.name)) for case in items]
    params += [
        pytest.param(None, id=_id("skipped", s.implementation, op), marks=pytest.mark.skip(reason=s.reason))
        for s in skipped
        for op in s.ops
    ]
    metafunc.parametrize("case", params)


def test_bench(benchmark, case, device, copy_bandwidth, cache_bytes, request):
    one_copy = case.implementation.one_copy
    copies = 1 if one_copy else timing.copies_to_rotate(bytes_touched(case.op, case.workload), cache_bytes)
    prepared = prepare(case, device, copies)
    timing.first_calls(prepared.steps, prepared.after, device)  # state creation, compilation

    # Rounds for about --bench-min-time seconds, from one steady call.
    probe = timing.host_time_ms(prepared.steps, prepared.after, device, reps=1)
    rounds = int(min(500, max(5, request.config.getoption("--bench-min-time") * 1e3 / max(probe, 1e-3))))
    state = {"copy": 0, "last": None}

    def setup():  # untimed: restore what the previous call changed, then move to the next copy
        if state["last"] is not None and prepared.after is not None:
            prepared.after(state["last"])
        state["copy"] = (state["copy"] + 1) % copies

    def target():
        prepared.steps[state["copy"]]()
        timing.synchronize(device)
        state["last"] = state["copy"]

    moved = floor_bytes(case.op, case.workload)
    benchmark.group = f"{case.workload.describe()} | {case.op}"
    benchmark.extra_info.update(
        role=case.implementation.role,
        copies=copies,
        floor_bytes=moved,
        floor_ms=moved / copy_bandwidth * 1e3,
        copy_bandwidth_GBps=copy_bandwidth / 1e9,
    )
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=copies)
    if prepared.after is not None and state["last"] is not None:
        prepared.after(state["last"])
    if benchmark.stats is not None:
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["floor_fraction"] = benchmark.extra_info["floor_ms"] / median_ms
    if case.implementation.role != "torch.compile" or device.type == "cuda":  # inductor's CPU code is no aten op
        benchmark.extra_info[timing.launch_unit(device)] = timing.count_launches(prepared.steps[0], device)
