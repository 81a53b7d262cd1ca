import pytest
import torch

from fastopt.benchmark import timing
from fastopt.benchmark.workloads import SIZES


def pytest_addoption(parser):
    group = parser.getgroup("fastopt bench")
    group.addoption("--bench-compile", action="store_true", help="also time torch.compile of the step (slow)")
    group.addoption(
        "--bench-size", choices=SIZES, help="full: docs/design.md's sizes; cpu: scaled down (default: by device)"
    )
    group.addoption("--bench-min-time", type=float, default=0.2, help="seconds of timed calls per benchmark")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def copy_bandwidth(device) -> float:
    """Bytes / s of a large tensor copy, measured once per session: the memory floor's yardstick."""
    return timing.copy_bandwidth(device)


@pytest.fixture(scope="session")
def cache_bytes(device) -> int:
    return timing.cache_bytes(device)
