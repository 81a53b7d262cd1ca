import pathlib
import sys
import time

import pytest
import torch

from fastopt.benchmark import default_workloads, flag_rows, groups, measure_group, plan, timing
from fastopt.benchmark.workloads import SIZES

GROUPS = pytest.StashKey[dict]()  # (workload key, op) -> the plan items timed together
SKIPPED = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("fastopt bench")
    group.addoption("--bench-compile", action="store_true", help="also time torch.compile of the step (slow)")
    group.addoption(
        "--bench-size", choices=SIZES, help="full: docs/design.md's sizes; cpu: scaled down (default: by device)"
    )
    group.addoption("--bench-min-time", type=float, default=0.2, help="seconds of rounds per implementation")
    group.addoption("--bench-min-rounds", type=int, default=15, help="rounds per row group, at least")
    group.addoption("--bench-out", help="folder for the bench's JSON, markdown and PNG of the rows measured")


def _id(*parts: str) -> str:
    return "/".join(parts).replace(" ", "-")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workloads = default_workloads(device, size=metafunc.config.getoption("--bench-size"))
    items, skipped = plan(workloads, device, compile=metafunc.config.getoption("--bench-compile"))
    metafunc.config.stash[GROUPS] = {(g[0].workload.key, g[0].op): g for g in groups(items)}
    metafunc.config.stash[SKIPPED] = skipped
    params = [pytest.param(case, id=_id(case.workload.key, case.op, case.implementation.name)) for case in items]
    params += [
        pytest.param(None, id=_id("skipped", s.implementation, op), marks=pytest.mark.skip(reason=s.reason))
        for s in skipped
        for op in s.ops
    ]
    metafunc.parametrize("case", params)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MeasuredGroups(dict):
    """Rows of each measured (workload, op), measured once per session by ``python -m fastopt
    bench``'s own ``measure_group``."""

    def __init__(self, config, device):
        super().__init__()
        self.config, self.device = config, device
        self.cache = timing.cache_bytes(device)
        self.started = None

    def rows_of(self, case):
        key = (case.workload.key, case.op)
        if key not in self:
            self[key] = self.measure(self.config.stash[GROUPS][key])
        return self[key]

    def measure(self, items):
        self.started = self.started or time.perf_counter()
        rows = measure_group(
            items,
            self.device,
            self.cache,
            min_run_time=self.config.getoption("--bench-min-time"),
            min_rounds=self.config.getoption("--bench-min-rounds"),
            graphs=self.device.type == "cuda",
        )
        flag_rows(rows)  # the row's own flags now; the whole session's (parts and wholes) in the summary
        return rows


MEASURED = pytest.StashKey[MeasuredGroups]()


@pytest.fixture(scope="session")
def measured_groups(request, device) -> MeasuredGroups:
    request.config.stash[MEASURED] = MeasuredGroups(request.config, device)
    return request.config.stash[MEASURED]


def pytest_terminal_summary(terminalreporter, config):
    """The bench's own tables over every row measured in this session: the same report as
    ``python -m fastopt bench``, flags across row groups included."""
    measured = config.stash.get(MEASURED, None)
    if not measured:
        return
    from fastopt.benchmark import report
    from fastopt.benchmark.runner import Results

    rows = [row for group in measured.values() for row in group]
    flag_rows(rows)
    results = Results(
        measured.device.type,
        timing.copy_bandwidth(measured.device),
        measured.cache,
        rows,
        config.stash.get(SKIPPED, []),
        {"min_run_time_s": config.getoption("--bench-min-time"), "min_rounds": config.getoption("--bench-min-rounds")},
        time.perf_counter() - measured.started,
    )
    env = report.environment(measured.device, "pytest " + " ".join(sys.argv[1:]))
    terminalreporter.write_sep("=", "fastopt bench: the same rows as python -m fastopt bench")
    terminalreporter.write_line(report.markdown(results, env))
    if config.getoption("--bench-out"):
        written = report.write_all(results, env, pathlib.Path(config.getoption("--bench-out")))
        terminalreporter.write_line("Wrote " + "; ".join(f"{kind}: {path}" for kind, path in written.items()))
