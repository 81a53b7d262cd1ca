"""pytest-benchmark suite: each op and full step, by torch, each available fastopt backend and
the peers that import here, on the workloads of ``python -m fastopt bench``, measured and
reported the same way.

    pytest bench/ --benchmark-only                      # grouped by workload and op
    pytest bench/ --benchmark-only -k "gpt-like/fp32"   # one workload
    pytest bench/ --benchmark-only --bench-compile      # also torch.compile (slow)
    pytest bench/ --benchmark-only --bench-out results  # also the JSON, markdown and PNG of the bench

The first test of a row group (one op on one workload) times every implementation of the group
together, in rounds (``fastopt.benchmark.runner.measure_group``: each round calls each of them
once, in rotating order, beside the in-place-add bandwidth reference); each test then hands its
implementation's per-round times to pytest-benchmark, so its table shows them. extra_info
carries what the bench's tables show: the ratio to torch's best (median of per-round ratios),
the floor and the fraction of it reached, the spread, launches per step and the row's flags.
At the end the bench's own tables are printed (flags included). Implementations that cannot run
here (peers not installed, backends without their device) are skipped tests with the reason.
"""

import pytest

from fastopt.benchmark import timing


def test_bench(benchmark, case, device, measured_groups):
    rows = measured_groups.rows_of(case)  # the group's first test times all of its implementations together
    row = next(r for r in rows if r.implementation == case.implementation.name)
    if row.error:
        pytest.fail(f"{case.implementation.name} failed: {row.error}")
    benchmark.group = f"{case.workload.describe()} | {case.op}"
    benchmark.extra_info.update(
        role=row.role,
        copies=row.copies,
        rounds=row.rounds,
        vs_torch_best=row.vs_torch_best,
        floor_bytes=row.floor_bytes,
        floor_ms=row.floor_ms,
        floor_fraction=row.floor_fraction,
        spread=row.spread,
        contention=row.contention,
        flags=row.flags,
        **{timing.launch_unit(device): row.launches},
    )
    if benchmark.disabled:
        return
    # pytest-benchmark times a callable itself; these samples come from the shared rounds, so they
    # go to its statistics directly (the same call its pedantic mode makes per round).
    benchmark._mode = "fastopt rounds"  # what pytest-benchmark records as how the fixture was used
    stats = benchmark._make_stats(1)
    for sample_ms in row.samples_ms:
        stats.update(sample_ms / 1e3)
