"""How a step is timed: rounds over every implementation of a row, device and host time,
launches, CUDA-graph replay, the in-place-add bandwidth reference, and the statistics of samples.

A measured step is a list of callables, one per copy of the workload's tensors; calls rotate
over the copies so that what one call reads was not left in cache by the call before. After
each call an optional ``after(copy)`` runs untimed (it restores that copy's grads, so every
timed call sees the same random data).

Implementations compared in a row are timed in rounds: each round calls every one of them once,
in an order that rotates from round to round, together with an in-place add over as many bytes
(the bandwidth reference). What slows a round down (another job on the cores, a clock change)
slows all of them, so per-round ratios stay honest where absolute times do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

After = Callable[[int], None] | None


@dataclasses.dataclass
class Timing:
    median_ms: float
    reps: int
    host_ms: float  # wall time of the Python call; on a GPU, measured with the device idle
    first_call_ms: float  # includes compilation (torch.compile, Triton JIT) where there is one


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_after(after: After, copy: int) -> None:
    if after is not None:
        after(copy)


def first_calls(steps: list[Callable[[], object]], after: After, device: torch.device) -> float:
    """Call each copy's step once (creates optimizer state, compiles) and return the first
    call's wall time in ms."""
    first_ms = 0.0
    for copy, step in enumerate(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if copy == 0:
            first_ms = (time.perf_counter() - start) * 1e3
        _run_after(after, copy)
    return first_ms


def time_steps(
    steps: list[Callable[[], object]],
    after: After,
    device: torch.device,
    min_run_time: float,
    min_reps: int = 5,
    max_reps: int = 2000,
    warmup_calls: int = 2,
) -> Timing:
    """Median time of a step after warm-up (a first call on every copy, then ``warmup_calls``):
    CUDA events per call on a GPU (calls queue back to back, as in training), wall time per
    call on a CPU."""
    first_ms = first_calls(steps, after, device)
    for call in range(warmup_calls):
        steps[call % len(steps)]()
        _run_after(after, call % len(steps))
    synchronize(device)

    samples_ms: list[float] = []
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    started = time.perf_counter()
    rep = 0
    while rep < max_reps and (rep < min_reps or time.perf_counter() - started < min_run_time):
        copy = (warmup_calls + rep) % len(steps)  # carry on the rotation where warm-up left it
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            steps[copy]()
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            steps[copy]()
            samples_ms.append((time.perf_counter() - t0) * 1e3)
        _run_after(after, copy)
        rep += 1
    synchronize(device)
    if device.type == "cuda":
        samples_ms = [begin.elapsed_time(end) for begin, end in events]
        host_ms = host_time_ms(steps, after, device, reps=min(len(samples_ms), 20))
    else:
        host_ms = statistics.median(samples_ms)  # on a CPU the call is the work
    return Timing(statistics.median(samples_ms), len(samples_ms), host_ms, first_ms)


def host_time_ms(steps: list[Callable[[], object]], after: After, device: torch.device, reps: int) -> float:
    """Median wall time of the Python call, each call starting with the device idle: what the
    step costs the host, which a GPU hides only while the host keeps ahead of it."""
    samples = []
    for rep in range(max(reps, 1)):
        copy = rep % len(steps)
        synchronize(device)
        start = time.perf_counter()
        steps[copy]()
        samples.append((time.perf_counter() - start) * 1e3)
        synchronize(device)
        _run_after(after, copy)
    return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class Spread:
    """Order statistics of one implementation's samples (ms)."""

    min_ms: float
    q1_ms: float
    median_ms: float
    q3_ms: float

    @property
    def relative_iqr(self) -> float:
        """Interquartile range over the median: the row's spread, independent of its scale."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0


def spread(samples_ms: list[float]) -> Spread:
    if not samples_ms:
        raise ValueError("no samples")
    if len(samples_ms) == 1:
        only = samples_ms[0]
        return Spread(only, only, only, only)
    q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Spread(min(samples_ms), q1, median, q3)


@dataclasses.dataclass
class Contender:
    """One implementation in a row's rounds: a step per rotated copy, and what restores a copy."""

    steps: list[Callable[[], object]]
    after: After = None
    next_copy: int = 0

    def call(self) -> int:
        """Call the step of the next copy; return that copy (for ``finish``)."""
        copy = self.next_copy
        self.steps[copy]()
        self.next_copy = (copy + 1) % len(self.steps)
        return copy

    def finish(self, copy: int) -> None:
        _run_after(self.after, copy)


@dataclasses.dataclass
class Rounds:
    """What ``time_rounds`` measured: ``samples_ms[i][r]`` is contender i's time in round r."""

    samples_ms: list[list[float]]
    host_ms: list[float]
    wall_s: float
    contention: float | None  # fraction of the rounds' wall time during which some task waited for a CPU


def in_place_add_reference(nbytes: int, copies: int, device: torch.device) -> tuple[Contender, int]:
    """The bandwidth reference of a row: ``a += b`` over ``copies`` pairs of fp32 tensors whose
    two halves together hold ``nbytes`` (at least 1 MiB), rotated as the row's steps are. An
    in-place add reads two tensors and writes one, as the in-place ops measured do, with nothing
    to compute; no op can move its bytes faster. Returns the contender and the bytes one call moves."""
    elements = max(nbytes, 1 << 20) // 8  # two fp32 halves
    pairs = [
        (torch.empty(elements, device=device).uniform_(), torch.empty(elements, device=device).uniform_(-1e-6, 1e-6))
        for _ in range(copies)
    ]
    return Contender([lambda a=a, b=b: a.add_(b) for a, b in pairs]), 3 * 4 * elements


def time_rounds(
    contenders: list[Contender],
    device: torch.device,
    min_run_time: float,
    min_rounds: int = 15,
    max_rounds: int = 1000,
    warmup_rounds: int = 2,
) -> Rounds:
    """Time ``contenders`` (their first calls already made) in rounds: each round calls every
    contender once, the first one of round r being contender r mod n, so that none always runs
    after the same neighbour. After ``warmup_rounds``, rounds go on until ``min_rounds`` are done
    and about ``min_run_time`` seconds per contender have passed. CUDA events per call on a GPU,
    wall time per call on a CPU."""
    count = len(contenders)
    for _ in range(warmup_rounds):
        for contender in contenders:
            contender.finish(contender.call())
    synchronize(device)

    samples: list[list[float]] = [[] for _ in contenders]
    stalled_before, started = cpu_stall_us(), time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < min_run_time * count):
        events = []
        for index in [(rounds + k) % count for k in range(count)]:
            contender = contenders[index]
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                copy = contender.call()
                end.record()
                events.append((index, begin, end))
            else:
                t0 = time.perf_counter()
                copy = contender.call()
                samples[index].append((time.perf_counter() - t0) * 1e3)
            contender.finish(copy)
        if events:
            synchronize(device)
            for index, begin, end in events:
                samples[index].append(begin.elapsed_time(end))
        rounds += 1
    wall_s = time.perf_counter() - started
    stalled_after = cpu_stall_us()
    contention = None
    if stalled_before is not None and stalled_after is not None and wall_s > 0:
        contention = (stalled_after - stalled_before) / (wall_s * 1e6)
    if device.type == "cuda":
        host = [host_time_ms(c.steps, c.after, device, reps=min(rounds, 20)) for c in contenders]
    else:
        host = [statistics.median(s) for s in samples]  # on a CPU the call is the work
    return Rounds(samples, host, wall_s, contention)


def per_round_figures(
    samples_ms: list[list[float]],
    baselines: list[bool],
    reference_ms: list[float],
    reference_bytes: int,
    floor_bytes: int,
) -> tuple[list[list[float | None]], list[float], list[list[float]]]:
    """From one set of rounds: each contender's ratio to the fastest baseline of the same round
    (above 1 is faster; None without a baseline), the floor of each round (``floor_bytes`` at
    the in-place-add bandwidth of that round, in ms), and each contender's floor fraction
    (that floor over its time) per round."""
    rounds = len(reference_ms)
    if any(len(s) != rounds for s in samples_ms):
        raise ValueError("every contender needs one sample per round")
    floors = [floor_bytes * ms / reference_bytes for ms in reference_ms]
    ratios, fractions = [], []
    for samples in samples_ms:
        ratio_row: list[float | None] = []
        for r, sample in enumerate(samples):
            baseline = [s[r] for s, is_baseline in zip(samples_ms, baselines) if is_baseline]
            ratio_row.append(min(baseline) / sample if baseline and sample > 0 else None)
        ratios.append(ratio_row)
        fractions.append([floor / sample if sample > 0 else math.inf for floor, sample in zip(floors, samples)])
    return ratios, floors, fractions


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Kineto prints profiler start/stop lines on fd 2 from C++; keep them out of the progress bar."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def launch_unit(device: torch.device) -> str:
    return "kernels" if device.type == "cuda" else "aten ops"


def count_launches(step: Callable[[], object], device: torch.device) -> int:
    """Launches per step from torch.profiler. GPU: device activities (kernels, memcpy, memset).
    CPU: top-level aten ops (a foreach call counts once; the aten ops it calls inside do not).
    Reads the profiler's raw events: building its FunctionEvent tree costs seconds per step
    over thousands of small tensors."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with _stderr_silenced(), profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.profiler.kineto_results.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type() == DeviceType.CUDA)

    # An aten op is top-level when it does not lie within another aten op on the same thread.
    spans = sorted(
        (e.start_thread_id(), e.start_ns(), -e.end_ns())
        for e in events
        if e.device_type() == DeviceType.CPU and e.name().startswith("aten::")
    )
    count, thread, enclosing_end = 0, None, -1
    for span_thread, start, negative_end in spans:
        if span_thread != thread or start >= enclosing_end:
            count += 1
            thread, enclosing_end = span_thread, -negative_end
    return count


def graph_replay_ms(
    steps: list[Callable[[], object]], after: After, device: torch.device, reps: int = 20
) -> float:
    """GPU only: capture each copy's step in a CUDA graph and time replays with CUDA events
    (the step without host work). Raises when the step cannot be captured (it syncs, or an
    optimizer was not built capturable)."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    graphs = []
    for copy, step in enumerate(steps):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture wants the step's lazy allocations done off-graph
            for _ in range(2):
                step()
                _run_after(after, copy)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        _run_after(after, copy)
        graphs.append(graph)
    synchronize(device)
    events = []
    for rep in range(reps):
        copy = rep % len(graphs)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graphs[copy].replay()
        end.record()
        events.append((begin, end))
        _run_after(after, copy)
    synchronize(device)
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def cpu_stall_us() -> int | None:
    """Microseconds that some task has waited for a CPU since boot (Linux pressure stall
    information), or None where the kernel does not expose it."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = pressure.readline().split()
    except OSError:
        return None
    fields = dict(field.split("=") for field in some[1:])
    return int(fields["total"]) if "total" in fields else None


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that could hold a step's data between calls (GPU L2, CPU L3)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 64 << 20
    largest = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        largest = max(largest, int(text.rstrip("KMG")) * scale)
    return largest or 64 << 20


def copies_to_rotate(bytes_touched: int, cache: int, most: int = 8) -> int:
    """How many copies of the tensors to rotate over so that a call finds none of its data in
    cache: what the other copies touch in between must be at least twice the cache. One copy
    only when a call's own data dwarfs the cache (8x: a 1.3 B-param step on a GPU), where a
    second copy would cost memory and change nothing (measured on a CPU: one copy of 3x the
    cache still flattered fused AdamW by 10%)."""
    if bytes_touched >= 8 * cache:
        return 1
    return min(most, 1 + math.ceil(2 * cache / max(bytes_touched, 1)))


def copy_bandwidth(device: torch.device, nbytes: int | None = None, min_run_time: float = 0.2) -> float:
    """Bytes per second of a large device-to-device tensor copy (read + write), measured in the
    same run: the memory floor of each op is the bytes it must move over this bandwidth."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    timing = time_steps([lambda: target.copy_(source)], None, device, min_run_time, min_reps=5)
    return 2 * nbytes / (timing.median_ms * 1e-3)


def read_bandwidth(device: torch.device, nbytes: int | None = None, min_run_time: float = 0.2) -> float:
    """Bytes per second of a large reduction (``torch.sum`` of 1 GiB on a GPU): what a pass
    that only reads moves, the yardstick of ``multi_tensor_norm``."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    timing = time_steps([lambda: source.sum()], None, device, min_run_time, min_reps=5)
    return nbytes / (timing.median_ms * 1e-3)
