"""pytest-benchmark suite: each op and step, fastopt (per available backend) vs torch's own path.

    pytest bench/ --benchmark-only --benchmark-group-by=param:workload,param:op

Rows of one group are the same work on the same tensors; compare them with each other only.
"""

import pytest
import torch

from fastopt import backends, benchmark
from fastopt.benchmark import make_cases

WORKLOADS = {w.describe(): w for w in benchmark.default_workloads(torch.device("cuda" if torch.cuda.is_available() else "cpu"))}
OPS = ["multi_tensor_norm", "clip_grad_norm_", "unscale_and_check_", "adamw step", "clip + adamw step"]
IMPLEMENTATIONS = ["torch"] + [f"fastopt-{name}" for name in backends.available_backends()]


def measure(benchmark, fn, device):
    """Warm up (first calls compile / allocate), then time calls that end with the device idle."""

    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        run()
    benchmark(run)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_bench(benchmark, device, workload, op, implementation):
    cases = {case.op: case for case in make_cases(WORKLOADS[workload], device)}
    if op not in cases:
        pytest.skip(f"torch has no equivalent of {op} for {workload}")
    case = cases[op]
    if implementation == "torch":
        measure(benchmark, case.torch, device)
        return
    backend_name = implementation.removeprefix("fastopt-")
    if not backends.status(backend_name).runs_on(device):
        pytest.skip(f"backend {backend_name} does not run on {device.type}")
    with backends.use_backend(backend_name):
        measure(benchmark, case.fastopt, device)
