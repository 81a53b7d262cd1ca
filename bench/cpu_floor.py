"""`python -m fastopt bench` on a CPU with the in-place-add floor of the same run.

    python bench/cpu_floor.py --workloads gpt-like --dtypes fp32 bf16-grads --no-peers --quiet

Takes `python -m fastopt bench`'s arguments (``--device cpu`` is added) and runs it in this process,
between two measurements of the in-place-add bandwidth: ``x.add_(y)`` on fp32 buffers as large as
the GPT-like layout (read x and y, write x: 12 bytes per element; one buffer, so one parallel
region per call), a fresh pair per call beyond the cache, as the bench rotates its tensor sets.
That is what a CPU streams in a read-read-write pattern, so it is the floor of a step: the bench's
own floor columns use a copy's bandwidth, which an in-place step can pass. Then, for every
fastopt[cpu] row, its bytes (the bench's ``floor_bytes``) over the faster of the two bandwidths:
the fraction of the floor the row reached (the rows are medians, so on a shared machine this
understates it). The two bandwidths show how much the machine moved in the run.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import torch

from fastopt.__main__ import main as fastopt_main
from fastopt.benchmark import timing, workloads

REPS = 30


def add_bandwidth() -> float:
    """Bytes per second of x += y on buffers of the GPT-like layout's size, from the fastest of REPS
    calls: on a shared machine the median is the other jobs' doing, the fastest call is what the
    memory does (and the floor it gives is the hardest to reach)."""
    numel = sum(torch.Size(shape).numel() for shape in workloads.family_shapes("gpt-like", "cpu"))
    copies = timing.copies_to_rotate(12 * numel, timing.cache_bytes(torch.device("cpu")))
    pairs = [(torch.randn(numel), torch.randn(numel)) for _ in range(copies)]
    seconds = []
    for rep in range(REPS):
        x, y = pairs[rep % copies]
        start = time.perf_counter()
        x.add_(y)
        seconds.append(time.perf_counter() - start)
    return 12 * numel / min(seconds)


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[argv.index("--out") + 1] if "--out" in argv else "bench-results")
    before = add_bandwidth()
    status = fastopt_main(["bench", "--device", "cpu", *argv])
    after = add_bandwidth()
    result = json.loads(max(out.glob("bench-cpu-*.json"), key=lambda p: p.stat().st_mtime).read_text())
    floor_bandwidth = max(before, after)
    print(f"\nIn-place-add bandwidth before / after the bench: {before / 1e9:.1f} / {after / 1e9:.1f} GB/s;"
          f" CPU contention reported by the bench: {result.get('cpu_contention')}\n")  # fmt: skip
    print("| workload | op | fastopt[cpu] ms | vs torch best | add floor ms | fastopt at add floor |")
    print("|---|---|---:|---:|---:|---:|")
    for row in result["rows"]:
        if row["implementation"] != "fastopt[cpu]" or row["median_ms"] is None:
            continue
        floor_ms = row["floor_bytes"] / floor_bandwidth * 1e3
        print(f"| {row['workload']} | {row['op']} | {row['median_ms']:.3g} | {row['vs_torch_best']:.2f}x |"
              f" {floor_ms:.3g} | {floor_ms / row['median_ms']:.0%} |")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
