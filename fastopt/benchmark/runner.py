"""Plan a run (which implementation times which op on which workload), measure it, and keep
the results with what is needed to read them: copy bandwidth, rotation, skipped rows."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Callable

import torch

from fastopt import backends
from fastopt.benchmark import timing
from fastopt.benchmark.cases import OPS, Implementation, Skipped, TensorSet, bytes_touched, floor_bytes, implementations
from fastopt.benchmark.cases import mixed_grads_unsupported
from fastopt.benchmark.workloads import Workload


@dataclasses.dataclass(frozen=True)
class PlanItem:
    workload: Workload
    implementation: Implementation

    @property
    def op(self) -> str:
        return self.implementation.op

    def describe(self) -> str:
        return f"{self.workload.key}: {self.op} [{self.implementation.name}]"


@dataclasses.dataclass
class Row:
    workload: str  # Workload.key, e.g. "gpt-like/bf16"
    workload_description: str
    op: str
    implementation: str
    role: str
    backend: str | None
    plotted: bool
    copies: int  # tensor sets rotated over
    floor_bytes: int
    floor_ms: float
    launch_unit: str
    median_ms: float | None = None
    reps: int = 0
    host_ms: float | None = None
    first_call_ms: float | None = None
    launches: int | None = None
    graph_ms: float | None = None
    graph_note: str = ""
    vs_torch_best: float | None = None  # torch's best eager median over this row's: >1 is faster
    notes: str = ""
    error: str | None = None

    @property
    def floor_fraction(self) -> float | None:
        """How close to the memory floor: floor time over measured time (1.0 = at copy bandwidth)."""
        return self.floor_ms / self.median_ms if self.median_ms else None

    @property
    def compile_s(self) -> float | None:
        """Compilation time: the first call's excess over a steady call (torch.compile rows)."""
        if self.role != "torch.compile" or self.first_call_ms is None or self.median_ms is None:
            return None
        return (self.first_call_ms - self.median_ms) / 1e3

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "floor_fraction": self.floor_fraction, "compile_s": self.compile_s}


@dataclasses.dataclass
class Results:
    device: str  # torch device type
    copy_bandwidth: float  # bytes / s, measured in this run
    cache_bytes: int
    rows: list[Row]
    skipped: list[Skipped]
    settings: dict
    wall_s: float = 0.0  # the whole run
    cpu_contention: float | None = None  # fraction of the run during which some task waited for a CPU
    read_bandwidth: float | None = None  # bytes / s of a large reduction (GPU runs), the norm's yardstick

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "copy_bandwidth_GBps": self.copy_bandwidth / 1e9,
            "read_bandwidth_GBps": None if self.read_bandwidth is None else self.read_bandwidth / 1e9,
            "cache_bytes": self.cache_bytes,
            "wall_s": self.wall_s,
            "cpu_contention": self.cpu_contention,
            "settings": self.settings,
            "rows": [r.to_dict() for r in self.rows],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }


def runnable_backends(device: torch.device) -> list[str]:
    return [name for name in backends.available_backends() if backends.status(name).runs_on(device)]


def plan(
    workloads: list[Workload],
    device: torch.device,
    backend_names: list[str] | None = None,
    *,
    ops: list[str] | None = None,
    peers: bool = True,
    compile: bool = False,
) -> tuple[list[PlanItem], list[Skipped]]:
    """Which implementation times which op on which workload, and what is skipped and why."""
    backend_names = runnable_backends(device) if backend_names is None else backend_names
    found, skipped = implementations(device, backend_names, peers=peers, compile=compile)
    for name in backends.unavailable_backends():
        if name not in backend_names:
            skipped.append(Skipped(f"fastopt[{name}]", tuple(OPS), backends.unavailable_backends()[name]))
    items = []
    for workload in workloads:
        if workload.grad_dtype != workload.param_dtype and (reason := mixed_grads_unsupported()):
            skipped.append(Skipped(f"every implementation on {workload.key}", workload.ops, reason))
            continue
        for op in workload.ops:
            if ops and op not in ops:
                continue
            items += [PlanItem(workload, impl) for impl in found if impl.op == op]
    return items, skipped


@dataclasses.dataclass
class Prepared:
    """A measured step ready to run: one callable per rotated copy of the tensors."""

    steps: list[Callable[[], object]]
    after: timing.After  # restores a copy's grads after a call (untimed), for ops that change them
    sets: list[TensorSet]


def _forcing_backend(step: Callable[[], object], backend: str) -> Callable[[], object]:
    def forced():
        with backends.use_backend(backend):
            return step()

    return forced


def prepare(item: PlanItem, device: torch.device, copies: int = 1, seed: int = 0) -> Prepared:
    """Fresh random tensors (the same seeds for every implementation) and the step built on them."""
    op = OPS[item.op]
    sets = [TensorSet.random(item.workload, device, seed + copy, op.writes_grads) for copy in range(copies)]
    steps = [item.implementation.build(item.workload, tensors) for tensors in sets]
    if item.implementation.backend is not None:
        steps = [_forcing_backend(step, item.implementation.backend) for step in steps]
    after = (lambda copy: sets[copy].restore_grads()) if op.writes_grads else None
    return Prepared(steps, after, sets)


def _notes(item: PlanItem) -> str:
    notes = [item.implementation.notes] if item.implementation.notes else []
    workload, role = item.workload, item.implementation.role
    if workload.grad_dtype != workload.param_dtype and role != "fastopt" and "step" in item.op:
        notes.append(f"grads cast to {str(workload.param_dtype).removeprefix('torch.')} first")
    return "; ".join(notes)


def _short_error(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}"[:300]


def measure(
    item: PlanItem,
    device: torch.device,
    copy_bandwidth: float,
    cache_bytes: int,
    *,
    min_run_time: float = 0.2,
    graphs: bool = False,
) -> Row:
    """Time one plan item. A failure becomes a row with an error, never the end of the run."""
    implementation = item.implementation
    touched = bytes_touched(item.op, item.workload)
    copies = 1 if implementation.one_copy else timing.copies_to_rotate(touched, cache_bytes)
    moved = floor_bytes(item.op, item.workload)
    row = Row(
        workload=item.workload.key,
        workload_description=item.workload.describe(),
        op=item.op,
        implementation=implementation.name,
        role=implementation.role,
        backend=implementation.backend,
        plotted=implementation.plotted,
        copies=copies,
        floor_bytes=moved,
        floor_ms=moved / copy_bandwidth * 1e3,
        launch_unit=timing.launch_unit(device),
        notes=_notes(item),
    )
    prepared = None
    try:
        prepared = prepare(item, device, copies)
        measured = timing.time_steps(prepared.steps, prepared.after, device, min_run_time)
        row.median_ms, row.reps = measured.median_ms, measured.reps
        row.host_ms, row.first_call_ms = measured.host_ms, measured.first_call_ms
        if implementation.role == "torch.compile" and device.type != "cuda":
            row.notes = "; ".join(filter(None, [row.notes, "launches not counted: inductor's CPU code is no aten op"]))
        else:
            try:
                row.launches = timing.count_launches(prepared.steps[0], device)
            except Exception as exc:  # noqa: BLE001 - the timing stands without the count
                row.notes = "; ".join(filter(None, [row.notes, f"launches not counted: {_short_error(exc)}"]))
            if prepared.after is not None:
                prepared.after(0)
        if device.type != "cuda":
            row.graph_note = "CUDA graphs: GPU only"
        elif graphs:
            try:
                row.graph_ms = timing.graph_replay_ms(prepared.steps, prepared.after, device)
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a finding
                row.graph_note = f"not capturable: {_short_error(exc)}"
                with contextlib.suppress(Exception):  # a failed capture may leave an error to clear
                    torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - one broken implementation must not end the run
        row.error = _short_error(exc)
    finally:
        del prepared
        if implementation.role == "torch.compile":
            torch._dynamo.reset()  # free the compiled graphs that hold this workload's tensors
        if device.type == "cuda":  # give this row's memory back before the next row allocates
            gc.collect()
            torch.cuda.empty_cache()
    return row


def fill_ratios(rows: list[Row]) -> None:
    """Each row's speed relative to torch's best eager path for the same op on the same workload."""
    best: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.role == "torch" and row.median_ms is not None:
            key = (row.workload, row.op)
            best[key] = min(best.get(key, float("inf")), row.median_ms)
    for row in rows:
        baseline = best.get((row.workload, row.op))
        row.vs_torch_best = baseline / row.median_ms if baseline is not None and row.median_ms else None


def run(
    workloads: list[Workload],
    device: torch.device,
    backend_names: list[str] | None = None,
    *,
    ops: list[str] | None = None,
    peers: bool = True,
    compile: bool = False,
    graphs: bool | None = None,
    min_run_time: float = 0.2,
    progress: Callable[[int, int, str], None] | None = None,
) -> Results:
    """Measure every planned row. ``progress(done, total, description)`` is called before each.
    Interrupted (Ctrl-C, or ``timeout -s INT``), it keeps the rows measured so far and says so in
    ``settings["interrupted"]``: a run cut short by a time limit still reports what it has."""
    graphs = device.type == "cuda" if graphs is None else graphs
    items, skipped = plan(workloads, device, backend_names, ops=ops, peers=peers, compile=compile)
    started, stalled_before = time.perf_counter(), timing.cpu_stall_us()
    bandwidth = timing.copy_bandwidth(device, min_run_time=min_run_time)
    read_bandwidth = timing.read_bandwidth(device, min_run_time=min_run_time) if device.type == "cuda" else None
    cache = timing.cache_bytes(device)
    rows = []
    interrupted = None
    for done, item in enumerate(items):
        if progress is not None:
            progress(done, len(items), item.describe())
        try:
            rows.append(measure(item, device, bandwidth, cache, min_run_time=min_run_time, graphs=graphs))
        except KeyboardInterrupt:
            interrupted = f"interrupted after {done} of {len(items)} rows, during {item.describe()}"
            break
    if progress is not None:
        progress(len(items), len(items), "done" if interrupted is None else "interrupted")
    fill_ratios(rows)
    settings = {"min_run_time_s": min_run_time, "compile": compile, "peers": peers, "cuda_graphs": graphs}
    if interrupted is not None:
        settings["interrupted"] = interrupted
    stalled_after, wall_s = timing.cpu_stall_us(), time.perf_counter() - started
    # Other jobs on the same cores make CPU timings noisy: say how much they were there.
    contention = None
    if stalled_before is not None and stalled_after is not None:
        contention = (stalled_after - stalled_before) / (wall_s * 1e6)
    return Results(device.type, bandwidth, cache, rows, skipped, settings, wall_s, contention, read_bandwidth)
