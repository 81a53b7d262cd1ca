"""Benchmarks of fastopt against torch and peers, shared by ``python -m fastopt bench`` and the
pytest-benchmark suites in ``bench/``.

- ``workloads``: parameter layouts named after what users train (GPT-like, many small tensors,
  ResNet-50-like), in fp32, bf16, and fp32 params with bf16 grads.
- ``cases``: each op and full step (AdamW's, and SGD's, Adam's and Lion's) as done by torch, by
  each fastopt backend and by peers, and the bytes each op's math must move (its memory floor).
- ``timing``: rounds over the implementations of a row beside an in-place-add bandwidth
  reference, the statistics of their samples, host time, launches per step, CUDA-graph replay.
- ``runner``: plans a run, measures each row group, computes ratios to torch's best path and
  flags rows (wide spread, contention, a part slower than its whole, a floor fraction over 100%).
- ``report``: markdown tables, JSON and a PNG chart, each with date, device, versions, command.

Every speed figure is a ratio to torch measured in the same run, on the same data.
"""

from fastopt.benchmark.cases import OPS, Implementation, Skipped, TensorSet, floor_bytes, implementations
from fastopt.benchmark.runner import PlanItem, Results, Row, flag_rows, groups, measure_group, plan, prepare, run
from fastopt.benchmark.workloads import (
    AGC_OPS,
    ALL_OPS,
    DTYPES,
    FAMILIES,
    NORM_CLIP_OPS,
    OPTIMIZER_OPS,
    Workload,
    default_workloads,
    family_shapes,
    gpt_shapes,
    many_small_shapes,
    resnet50_shapes,
)

__all__ = [
    "AGC_OPS",
    "ALL_OPS",
    "DTYPES",
    "FAMILIES",
    "NORM_CLIP_OPS",
    "OPS",
    "OPTIMIZER_OPS",
    "Implementation",
    "PlanItem",
    "Results",
    "Row",
    "Skipped",
    "TensorSet",
    "Workload",
    "default_workloads",
    "family_shapes",
    "flag_rows",
    "floor_bytes",
    "gpt_shapes",
    "groups",
    "implementations",
    "many_small_shapes",
    "measure_group",
    "plan",
    "prepare",
    "resnet50_shapes",
    "run",
]
