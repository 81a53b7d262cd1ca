"""Plan a run (which implementation times which op on which workload), measure each row group
(the implementations of one op on one workload) in rounds, flag what a reader must not take at
face value, and keep the results with what is needed to read them: rotation, skipped rows."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch

from fastopt import backends
from fastopt.benchmark import timing
from fastopt.benchmark.cases import OPS, Implementation, Skipped, TensorSet, bytes_touched, floor_bytes, implementations
from fastopt.benchmark.cases import mixed_grads_unsupported, short_error
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
    """One implementation of one op on one workload. Times are over rounds (see
    ``timing.time_rounds``): each round ran every implementation of the row group once, and the
    in-place-add reference beside them; ratios and floor fractions are medians of per-round values."""

    workload: str  # Workload.key, e.g. "gpt-like/bf16"
    workload_description: str
    op: str
    implementation: str
    role: str
    backend: str | None
    plotted: bool
    copies: int  # tensor sets rotated over
    floor_bytes: int
    launch_unit: str
    floor_ms: float | None = None  # floor_bytes at the in-place-add bandwidth, median over the rounds
    median_ms: float | None = None
    min_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    rounds: int = 0
    samples_ms: list[float] = dataclasses.field(default_factory=list)
    host_ms: float | None = None
    first_call_ms: float | None = None
    launches: int | None = None
    graph_ms: float | None = None
    graph_note: str = ""
    vs_torch_best: float | None = None  # median over rounds of (torch's best eager time in the round / this row's)
    floor_fraction: float | None = None  # median over rounds of (floor / this row's time): above 1 is a bug
    contention: float | None = None  # fraction of the row's rounds during which some task waited for a CPU
    flags: list[str] = dataclasses.field(default_factory=list)
    notes: str = ""
    error: str | None = None

    @property
    def spread(self) -> float | None:
        """Interquartile range over the median."""
        if self.median_ms is None or self.q1_ms is None or self.q3_ms is None or self.median_ms <= 0:
            return None
        return (self.q3_ms - self.q1_ms) / self.median_ms

    @property
    def compile_s(self) -> float | None:
        """Compilation time: the first call's excess over a steady call (torch.compile rows)."""
        if self.role != "torch.compile" or self.first_call_ms is None or self.median_ms is None:
            return None
        return (self.first_call_ms - self.median_ms) / 1e3

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "spread": self.spread, "compile_s": self.compile_s}


@dataclasses.dataclass
class Results:
    device: str  # torch device type
    copy_bandwidth: float  # bytes / s of a large copy at the start of the run (context; floors use each row's add)
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


def _memory_budget(device: torch.device) -> int:
    """Bytes a row group may hold at once: half of what the device has free."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def _bytes_held(item: PlanItem, copies: int) -> int:
    """What one implementation holds while measured: per copy, params, grads and their saved
    values, both optimizer states, and an fp32 grad buffer for torch with bf16 grads."""
    w = item.workload
    return copies * w.numel * (2 * w.param_dtype.itemsize + 2 * w.grad_dtype.itemsize + 2 * w.state_dtype.itemsize)


def _chunks(items: list[PlanItem], held: list[int], budget: int) -> list[list[int]]:
    """Indices of the items to measure together. All of them when they fit in ``budget``;
    otherwise torch's baselines with as many others as fit, again for the next others, so
    that every ratio still comes from rounds that ran a baseline."""
    if sum(held) <= budget:
        return [list(range(len(items)))]
    baselines = [i for i, item in enumerate(items) if item.implementation.role == "torch"]
    others = [i for i in range(len(items)) if i not in baselines]
    room = budget - sum(held[i] for i in baselines)
    chunks, current, used = [], [], 0
    for i in others:
        if current and used + held[i] > room:
            chunks.append(baselines + current)
            current, used = [], 0
        current.append(i)
        used += held[i]
    if current or not chunks:
        chunks.append(baselines + current)
    return chunks


def _new_row(item: PlanItem, device: torch.device, copies: int) -> Row:
    implementation = item.implementation
    return Row(
        workload=item.workload.key,
        workload_description=item.workload.describe(),
        op=item.op,
        implementation=implementation.name,
        role=implementation.role,
        backend=implementation.backend,
        plotted=implementation.plotted,
        copies=copies,
        floor_bytes=floor_bytes(item.op, item.workload),
        launch_unit=timing.launch_unit(device),
        notes=_notes(item),
    )


def _add_note(row: Row, note: str) -> None:
    row.notes = "; ".join(filter(None, [row.notes, note]))


def measure_group(
    items: list[PlanItem],
    device: torch.device,
    cache_bytes: int,
    *,
    min_run_time: float = 0.2,
    min_rounds: int = 15,
    graphs: bool = False,
) -> list[Row]:
    """Time every implementation of one (workload, op) together, in rounds, beside the
    in-place-add reference over the bytes the op touches. A failure becomes a row with an
    error, never the end of the run."""
    if len({(item.workload.key, item.op) for item in items}) > 1:
        raise ValueError("measure_group takes the implementations of one workload and op")
    op, workload = items[0].op, items[0].workload
    touched = bytes_touched(op, workload)
    copies = [1 if item.implementation.one_copy else timing.copies_to_rotate(touched, cache_bytes) for item in items]
    rows = [_new_row(item, device, n) for item, n in zip(items, copies)]
    per_round: list[dict[str, list]] = [{"samples": [], "ratios": [], "floors": [], "fractions": []} for _ in items]
    held = [_bytes_held(item, n) for item, n in zip(items, copies)]
    for chunk in _chunks(items, held, _memory_budget(device)):
        _measure_chunk(items, chunk, rows, per_round, copies, touched, device, min_run_time, min_rounds, graphs)
    for row, figures in zip(rows, per_round):
        if row.error is None and figures["samples"]:
            _summarize(row, figures)
    return rows


def _measure_chunk(items, chunk, rows, per_round, copies, touched, device, min_run_time, min_rounds, graphs) -> None:
    prepared: dict[int, Prepared] = {}
    try:
        for i in chunk:
            if rows[i].error is not None:
                continue
            try:
                prepared[i] = prepare(items[i], device, copies[i])
                rows[i].first_call_ms = timing.first_calls(prepared[i].steps, prepared[i].after, device)
            except Exception as exc:  # noqa: BLE001 - one broken implementation must not end the run
                rows[i].error = short_error(exc)
                prepared.pop(i, None)
        if not prepared:
            return
        reference, reference_bytes = timing.in_place_add_reference(touched, max(copies[i] for i in prepared), device)
        order = list(prepared)
        contenders = [timing.Contender(prepared[i].steps, prepared[i].after) for i in order] + [reference]
        try:
            rounds = timing.time_rounds(contenders, device, min_run_time, min_rounds=min_rounds)
        except Exception as exc:  # noqa: BLE001 - the rows of this chunk say what failed
            for i in order:
                rows[i].error = f"failed during the rounds: {short_error(exc)}"
            return
        ratios, floors, fractions = timing.per_round_figures(
            rounds.samples_ms[:-1],
            [items[i].implementation.role == "torch" for i in order],
            rounds.samples_ms[-1],
            reference_bytes,
            rows[order[0]].floor_bytes,
        )
        for k, i in enumerate(order):
            figures = per_round[i]
            figures["samples"] += rounds.samples_ms[k]
            figures["ratios"] += [r for r in ratios[k] if r is not None]
            figures["floors"] += floors
            figures["fractions"] += fractions[k]
            rows[i].host_ms = rounds.host_ms[k]
            if rounds.contention is not None:
                rows[i].contention = max(rows[i].contention or 0.0, rounds.contention)
            _count_and_replay(items[i], prepared[i], rows[i], device, graphs)
    finally:
        prepared.clear()
        if any(items[i].implementation.role == "torch.compile" for i in chunk):
            torch._dynamo.reset()  # free the compiled graphs that hold this workload's tensors
        if device.type == "cuda":  # give this chunk's memory back before the next allocates
            gc.collect()
            torch.cuda.empty_cache()


def _count_and_replay(item: PlanItem, prepared: Prepared, row: Row, device: torch.device, graphs: bool) -> None:
    """Launches per step (torch.profiler) and, on a GPU, the CUDA-graph replay time."""
    if item.implementation.role == "torch.compile" and device.type != "cuda":
        _add_note(row, "launches not counted: inductor's CPU code is no aten op")
    else:
        try:
            row.launches = timing.count_launches(prepared.steps[0], device)
        except Exception as exc:  # noqa: BLE001 - the timing stands without the count
            _add_note(row, f"launches not counted: {short_error(exc)}")
        if prepared.after is not None:
            prepared.after(0)
    if device.type != "cuda":
        row.graph_note = "CUDA graphs: GPU only"
    elif graphs:
        try:
            row.graph_ms = timing.graph_replay_ms(prepared.steps, prepared.after, device)
        except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a finding
            row.graph_note = f"not capturable: {short_error(exc)}"
            with contextlib.suppress(Exception):  # a failed capture may leave an error to clear
                torch.cuda.synchronize(device)


def _summarize(row: Row, figures: dict[str, list]) -> None:
    stats = timing.spread(figures["samples"])
    row.min_ms, row.q1_ms, row.median_ms, row.q3_ms = stats.min_ms, stats.q1_ms, stats.median_ms, stats.q3_ms
    row.rounds = len(figures["samples"])
    row.samples_ms = [round(ms, 6) for ms in figures["samples"]]
    row.floor_ms = statistics.median(figures["floors"])
    row.floor_fraction = statistics.median(figures["fractions"])
    row.vs_torch_best = statistics.median(figures["ratios"]) if figures["ratios"] else None


# When a row is flagged (the flags ride in the table, the JSON and the chart).
WIDE_SPREAD = 0.25  # interquartile range over median
CONTENDED = 0.10  # fraction of the row's rounds during which some task waited for a CPU
# Ops that contain others, for the same implementation on the same workload: the whole cannot be
# faster than its part beyond noise. torch's steps also contain its clip_grad_norm_ and unscale.
CONTAINS = {
    "clip_grad_norm_": ("multi_tensor_norm",),
    "clip + adamw step": ("adamw step", "multi_tensor_norm"),
    "AMP step": ("clip + adamw step", "adamw step", "multi_tensor_norm"),
    "AGC + adamw step": ("adamw step",),
    "clip + sgd step": ("sgd step", "multi_tensor_norm"),
    "clip + lion step": ("lion step", "multi_tensor_norm"),
}
CONTAINS_TORCH = {"clip + adamw step": ("clip_grad_norm_",), "AMP step": ("clip_grad_norm_", "unscale_and_check_"),
                  "clip + sgd step": ("clip_grad_norm_",), "clip + lion step": ("clip_grad_norm_",)}  # fmt: skip


def flag_rows(rows: list[Row]) -> None:
    """Mark what a reader must not take at face value: a wide spread, contention during the row,
    a floor fraction above 100% (nothing moves bytes faster than the in-place add: a bug in the op's
    byte count or its timing), and a part slower than the whole that contains it (the quartiles
    apart: beyond noise)."""
    for row in rows:
        row.flags = []
        if row.median_ms is None:
            continue
        if row.spread is not None and row.spread > WIDE_SPREAD:
            row.flags.append(f"wide spread (IQR {100 * row.spread:.0f}% of median)")
        if row.contention is not None and row.contention > CONTENDED:
            row.flags.append(f"contention ({100 * row.contention:.0f}% of the row)")
        if row.floor_fraction is not None and row.floor_fraction > 1.0:
            row.flags.append(f"beats the floor ({100 * row.floor_fraction:.0f}%)")
    measured = {(r.workload, r.implementation, r.op): r for r in rows if r.median_ms is not None}
    for (workload, implementation, op), whole in measured.items():
        parts = CONTAINS.get(op, ()) + (CONTAINS_TORCH.get(op, ()) if whole.role == "torch" else ())
        for part_op in parts:
            part = measured.get((workload, implementation, part_op))
            if part is None or part.q1_ms is None or whole.q3_ms is None or whole.q3_ms >= part.q1_ms:
                continue
            part.flags.append(f"slower than its whole ({op}: {whole.median_ms:.3g} ms)")
            whole.flags.append(f"faster than its part ({part_op}: {part.median_ms:.3g} ms)")


def groups(items: list[PlanItem]) -> list[list[PlanItem]]:
    """Plan items by (workload, op), in plan order: the implementations timed together."""
    grouped: dict[tuple[str, str], list[PlanItem]] = {}
    for item in items:
        grouped.setdefault((item.workload.key, item.op), []).append(item)
    return list(grouped.values())


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
    min_rounds: int = 15,
    progress: Callable[[int, int, str], None] | None = None,
) -> Results:
    """Measure every planned row group. ``progress(done, total, description)`` is called before
    each. Interrupted (Ctrl-C, or ``timeout -s INT``), it keeps the rows measured so far and says
    so in ``settings["interrupted"]``: a run cut short by a time limit still reports what it has."""
    graphs = device.type == "cuda" if graphs is None else graphs
    items, skipped = plan(workloads, device, backend_names, ops=ops, peers=peers, compile=compile)
    started, stalled_before = time.perf_counter(), timing.cpu_stall_us()
    bandwidth = timing.copy_bandwidth(device, min_run_time=min_run_time)
    read_bandwidth = timing.read_bandwidth(device, min_run_time=min_run_time) if device.type == "cuda" else None
    cache = timing.cache_bytes(device)
    rows: list[Row] = []
    interrupted = None
    planned = groups(items)
    for done, group in enumerate(planned):
        description = f"{group[0].workload.key}: {group[0].op} ({len(group)} implementations)"
        if progress is not None:
            progress(done, len(planned), description)
        try:
            rows += measure_group(group, device, cache, min_run_time=min_run_time, min_rounds=min_rounds, graphs=graphs)
        except KeyboardInterrupt:
            interrupted = f"interrupted after {done} of {len(planned)} row groups, during {description}"
            break
    if progress is not None:
        progress(len(planned), len(planned), "done" if interrupted is None else "interrupted")
    flag_rows(rows)
    settings = {"min_run_time_s": min_run_time, "min_rounds": min_rounds, "compile": compile, "peers": peers,
                "cuda_graphs": graphs}  # fmt: skip
    if interrupted is not None:
        settings["interrupted"] = interrupted
    stalled_after, wall_s = timing.cpu_stall_us(), time.perf_counter() - started
    # Other jobs on the same cores make CPU timings noisy: say how much they were there.
    contention = None
    if stalled_before is not None and stalled_after is not None:
        contention = (stalled_after - stalled_before) / (wall_s * 1e6)
    return Results(device.type, bandwidth, cache, rows, skipped, settings, wall_s, contention, read_bandwidth)
