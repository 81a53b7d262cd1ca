"""Workloads and timings for fastopt vs torch, shared by ``python -m fastopt bench`` and the
pytest-benchmark suites in ``bench/``.

Every row times fastopt and torch's own path for the same work on the same tensors, in the same
run, with ``torch.utils.benchmark`` (which synchronises CUDA around each measurement). Speed is
reported only as a ratio measured that way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch.utils import benchmark as torch_benchmark

import fastopt
from fastopt import backends


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    param_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def describe(self) -> str:
        dtypes = str(self.param_dtype).removeprefix("torch.")
        if self.grad_dtype != self.param_dtype:
            dtypes += "/" + str(self.grad_dtype).removeprefix("torch.") + " grads"
        return f"{self.name} ({len(self.shapes)} tensors, {self.numel / 1e6:.1f} M, {dtypes})"


def gpt_shapes(layers: int, width: int, vocab: int, context: int) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a GPT-2-style transformer (12 tensors per block)."""
    block = [
        (width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
        (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,),
    ]  # fmt: skip
    return ((vocab, width), (context, width), *block * layers, (width,), (width,))


def many_small_shapes(count: int, smallest: int, largest: int, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """``count`` 1-D tensors with sizes log-uniform in [smallest, largest] (biases, norms, LoRA)."""
    generator = torch.Generator().manual_seed(seed)
    logs = torch.empty(count).uniform_(math.log(smallest), math.log(largest), generator=generator)
    return tuple((int(n),) for n in logs.exp().round().tolist())


def default_workloads(device: torch.device) -> list[Workload]:
    if device.type == "cuda":  # DESIGN.md's anchors: GPT-like 1.3 B in 292 tensors; 5,000 small tensors
        gpt = gpt_shapes(layers=24, width=2048, vocab=50257, context=2048)
        small = many_small_shapes(5000, 256, 65536)
    else:  # the same layouts scaled down so a CPU run takes seconds
        gpt = gpt_shapes(layers=4, width=256, vocab=8192, context=256)
        small = many_small_shapes(1000, 64, 4096)
    return [
        Workload("gpt-like", gpt),
        Workload("many-small", small),
        Workload("gpt-like", gpt, torch.bfloat16, torch.bfloat16),
    ]


@dataclasses.dataclass
class Row:
    workload: str
    op: str
    backend: str
    torch_ms: float
    fastopt_ms: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.fastopt_ms


@dataclasses.dataclass
class Case:
    """One op on one workload: the fastopt call and torch's own path for the same work."""

    op: str
    fastopt: Callable[[], object]
    torch: Callable[[], object]
    tensors: list = dataclasses.field(default_factory=list)  # what the calls read and write


def make_cases(workload: Workload, device: torch.device, seed: int = 0) -> list[Case]:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(shape, dtype):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    params = [torch.nn.Parameter(randn(s, workload.param_dtype)) for s in workload.shapes]
    for p in params:
        p.grad = randn(p.shape, workload.grad_dtype)
    grads = [p.grad for p in params]
    state_dtype = torch.float32 if workload.param_dtype != torch.float64 else torch.float64
    exp_avgs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    exp_avg_sqs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    found_inf = torch.zeros(1, device=device)
    inv_scale = torch.ones(1, device=device)  # 1.0 keeps the grads stable across repeats
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    same_dtype = workload.param_dtype == workload.grad_dtype
    # torch's fastest AdamW (fused: one kernel per group of tensors, on CPU and CUDA).
    torch_adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)

    def fastopt_step():
        fastopt.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)

    def fastopt_clip_step():
        total = fastopt.multi_tensor_norm(grads)
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        fastopt.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, clip_coef=coef, **hyper)

    def torch_clip_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        torch_adamw.step()

    cases = [
        Case("multi_tensor_norm", lambda: fastopt.multi_tensor_norm(grads),
             lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))),
        Case("clip_grad_norm_", lambda: fastopt.clip_grad_norm_(params, 1.0),
             lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)),
        Case("unscale_and_check_", lambda: fastopt.unscale_and_check_(grads, inv_scale, found_inf),
             lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)),
    ]  # fmt: skip
    if same_dtype:  # torch's AdamW needs states in the params' dtype; fastopt does not
        cases += [
            Case("adamw step", fastopt_step, torch_adamw.step),
            Case("clip + adamw step", fastopt_clip_step, torch_clip_step),
            Case("AMP step (drop-ins)", *amp_steps(params, device)),
        ]
    for case in cases:
        case.tensors = [*params, *grads, found_inf]
    return cases


def amp_steps(params, device) -> tuple[Callable[[], None], Callable[[], None]]:
    """The full AMP step through the drop-ins: GradScaler + clip by norm + AdamW + scaler update.
    torch: unscale_, clip_grad_norm_(foreach=True), fused AdamW; fastopt: its scaler and AdamW
    with max_grad_norm. A scale of 1.0 that never grows keeps the grads stable across repeats."""

    def scaler(cls):
        s = cls(device.type, init_scale=1.0, growth_interval=2**30)
        s.scale(torch.ones((), device=device))  # creates the scale tensor
        return s

    ours, ours_scaler = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0), scaler(fastopt.amp.GradScaler)
    theirs, torch_scaler = torch.optim.AdamW(params, lr=1e-3, fused=True), scaler(torch.amp.GradScaler)

    def fastopt_amp_step():
        ours_scaler.step(ours)
        ours_scaler.update()

    def torch_amp_step():
        torch_scaler.unscale_(theirs)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        torch_scaler.step(theirs)
        torch_scaler.update()

    return fastopt_amp_step, torch_amp_step


def _median_ms(fn: Callable[[], object], min_run_time: float) -> float:
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def run(
    workloads: list[Workload],
    device: torch.device,
    backend_names: list[str],
    min_run_time: float = 0.2,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    rows = []
    for workload in workloads:
        for case in make_cases(workload, device):
            torch_ms = _median_ms(case.torch, min_run_time)
            for name in backend_names:
                if progress:
                    progress(f"{workload.describe()}: {case.op} [{name}]")
                with backends.use_backend(name):
                    fastopt_ms = _median_ms(case.fastopt, min_run_time)
                rows.append(Row(workload.describe(), case.op, name, torch_ms, fastopt_ms))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| workload | op | backend | torch ms | fastopt ms | speedup vs torch |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.op} | {r.backend} | {r.torch_ms:.3f} | {r.fastopt_ms:.3f} | {r.speedup:.2f}x |"
        )
    return "\n".join(lines)
