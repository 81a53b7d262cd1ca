"""Host time of fastopt.optim.AdamW.step alone: what the Python side costs per step, whatever the
device, with the backend replaced by one that launches nothing.

    python bench/host_overhead.py [--params 5000] [--steps 20]

Prints the median host milliseconds of a step with in-step clipping, the first step (full
validation of every list) apart from the later ones (the reused step plan: only the new grads are
checked). Grads are re-made every step, as zero_grad(set_to_none=True) + backward make them.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

import fastopt
from fastopt import backends


def no_op_backend() -> types.SimpleNamespace:
    def multi_tensor_norm(tensors, norm_type, per_tensor, found_inf=None):
        total = torch.zeros(())
        return (total, torch.zeros(len(tensors))) if per_tensor else total

    return types.SimpleNamespace(multi_tensor_norm=multi_tensor_norm, adamw_=lambda *args, **kwargs: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    backends.select = lambda device: no_op_backend()  # this process only
    params = [torch.nn.Parameter(torch.randn(17)) for _ in range(args.params)]
    optimizer = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0)
    times = []
    for _ in range(args.steps + 1):
        for p in params:
            p.grad = torch.ones(17)
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    print(f"fastopt {fastopt.__version__}, torch {torch.__version__}, {args.params} params")
    print(f"first step (full validation): {times[0] * 1e3:.1f} ms host")
    print(f"later steps (reused plan):    {statistics.median(times[1:]) * 1e3:.2f} ms host (median of {args.steps})")


if __name__ == "__main__":
    main()
