import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs one worker per core), each worker takes its share of
    the cores for torch's threads, but at least 2: the cpu backend's kernels split their work
    between threads, and the suite must run that split, not only the one-thread path."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(2, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_status():
    """Backend availability is cached; tests that change the environment must not leak."""
    from fastopt import backends

    backends.refresh()
    yield
    backends.refresh()


def skip_summary(reports) -> str:
    """One line counting skipped tests by reason, most frequent first: "skipped 490: 312 needs a
    CUDA GPU; 120 timm is not installed; ...". Empty when nothing was skipped."""
    counts: dict[str, int] = {}
    for report in reports:
        longrepr = report.longrepr
        # a skip's longrepr is (path, line, "Skipped: reason")
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return ""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return f"skipped {sum(counts.values())}: " + "; ".join(f"{n} {reason}" for reason, n in ranked)


def pytest_terminal_summary(terminalreporter):
    """`make test` ends with why tests were skipped, counted by reason."""
    line = skip_summary(terminalreporter.stats.get("skipped", []))
    if line:
        terminalreporter.write_line(line)
