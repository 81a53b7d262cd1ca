"""Results as a reader gets them: markdown tables, JSON, and a PNG bar chart, each naming the
date, device, versions and the exact command that produced it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import platform
import re
import statistics

import torch

from fastopt.benchmark.cases import OPS, Skipped
from fastopt.benchmark.runner import CONTENDED, WIDE_SPREAD, Results, Row
from fastopt.benchmark.workloads import ALL_OPS


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def device_description(device: torch.device | None = None) -> str:
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({', '.join(names)})"
    where = "no CUDA GPU visible" if not torch.cuda.is_available() else "CUDA GPU not used"
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads); {where}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, command: str) -> dict:
    import fastopt

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_description(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "python": platform.python_version(),
        "fastopt": fastopt.__version__,
        "command": command,
    }


def header_line(env: dict) -> str:
    timer = "CUDA events" if env["device"].startswith("cuda") else "wall time per call"
    return (
        f"{env['date'][:10]}, {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"python {env['python']}; `{env['command']}`; rounds of every implementation of a row, in rotating "
        f"order, after warm-up ({timer})"
    )


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def significant(value: float, digits: int = 2) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept: 0.0020, 1.0, 15, 120."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    rounded = float(f"{value:.{digits - 1}e}")  # 0.999 -> 1.0: count the digits after rounding
    decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{max(decimals, 0)}f}"


def ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{significant(value)}x"


def _percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"


def _op_order(op: str) -> int:
    return ALL_OPS.index(op) if op in ALL_OPS else len(ALL_OPS)


def _groups(results: Results) -> dict[tuple[str, str], list[Row]]:
    """Rows by (workload, op), in the order they were measured."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in results.rows:
        groups.setdefault((row.workload, row.op), []).append(row)
    return groups


def best(rows: list[Row], role: str) -> Row | None:
    candidates = [r for r in rows if r.role == role and r.median_ms is not None and (role != "fastopt" or r.plotted)]
    return min(candidates, key=lambda r: r.median_ms, default=None)


def summary_table(results: Results) -> str:
    """One line per (workload, op): torch's best eager path against fastopt's best backend, and
    the fastest peer that ran."""
    lines = [
        "| workload | op | torch best | ms | fastopt | ms | fastopt vs torch | floor ms | fastopt at floor | best peer "
        "| peer vs torch | flags |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for (workload, op), rows in _groups(results).items():
        torch_row, fastopt_row, peer_row = best(rows, "torch"), best(rows, "fastopt"), best(rows, "peer")
        flags = [f"{r.implementation}: {_short_flag(f)}" for r in (torch_row, fastopt_row, peer_row) if r is not None
                 for f in r.flags]  # fmt: skip
        lines.append(
            f"| {workload} | {op} | {torch_row.implementation if torch_row else '—'} "
            f"| {_ms(torch_row.median_ms if torch_row else None)} "
            f"| {fastopt_row.implementation if fastopt_row else '—'} "
            f"| {_ms(fastopt_row.median_ms if fastopt_row else None)} "
            f"| {ratio_text(fastopt_row.vs_torch_best if fastopt_row else None)} | {_ms(_group_floor(rows))} "
            f"| {_percent(fastopt_row.floor_fraction if fastopt_row else None)} "
            f"| {peer_row.implementation if peer_row else '—'} "
            f"| {ratio_text(peer_row.vs_torch_best if peer_row else None)} "
            f"| {'; '.join(flags) or '—'} |"
        )
    return "\n".join(lines)


def _short_flag(flag: str) -> str:
    """A flag without its figures (the detail tables have them): "wide spread", "contention"."""
    return flag.split(" (", 1)[0]


def _group_floor(rows: list[Row]) -> float | None:
    """The floor of a row group: the same rounds' reference for every row; the median over them."""
    floors = [r.floor_ms for r in rows if r.floor_ms is not None]
    return statistics.median(floors) if floors else None


# The speed goals for the fused backends on a GPU, on the full-size fp32 workloads.
STEP_FLOOR_GOALS = (("gpt-like/fp32", 1.05), ("many-small/fp32", 1.3))  # AMP step time / floor, at most
NORM_READ_GOAL = 0.9  # multi_tensor_norm: fraction of the read bandwidth, at least
HOST_GOAL_MS = ("many-small/fp32", 0.3)  # AMP step: host ms per step, at most
LAUNCH_WORKLOADS = ("gpt-like/fp32", "many-small/fp32")  # launches per step must not grow with the tensor count
PASSES = {"multi_tensor_norm": 1, "unscale_and_check_": 1, "clip_grad_norm_": 2, "adamw step": 1,
          "clip + adamw step": 2, "AMP step": 2, "sgd step": 1, "clip + sgd step": 2, "adam step": 1,
          "lion step": 1, "clip + lion step": 2}  # fmt: skip


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "missed")


def targets(results: Results) -> list[dict]:
    """Each speed goal, per fastopt backend: what was measured and whether it is met.
    Dicts with ``goal``, ``implementation``, ``measured``, ``value`` and ``met`` (None: no data)."""
    rows = [r for r in results.rows if r.role == "fastopt" and r.plotted]
    names = sorted({r.implementation for r in rows})

    def find(name: str, workload: str, op: str) -> Row | None:
        return next((r for r in rows if (r.implementation, r.workload, r.op) == (name, workload, op)), None)

    out = []
    for name in names:
        for workload, goal in STEP_FLOOR_GOALS:
            row = find(name, workload, "AMP step")
            value = row.median_ms / row.floor_ms if row and row.median_ms and row.floor_ms else None
            measured = (row.error if row else None) or "—"
            if value is not None:
                measured = (f"{_ms(row.median_ms)} ms, floor {_ms(row.floor_ms)} ms: {value:.2f}x floor; "
                            f"{ratio_text(row.vs_torch_best)} vs torch best")  # fmt: skip
            out.append({"goal": f"AMP step (unscale + clip + AdamW), {workload}: time <= {goal}x the floor",
                        "implementation": name, "measured": measured, "value": value,
                        "met": None if value is None else value <= goal})  # fmt: skip
        read_bw = results.read_bandwidth or results.copy_bandwidth
        yardstick = "read" if results.read_bandwidth else "copy"
        for workload in LAUNCH_WORKLOADS:
            row = find(name, workload, "multi_tensor_norm")
            value = row.floor_bytes / (row.median_ms * 1e-3) / read_bw if row and row.median_ms else None
            measured = (row.error if row else None) or "—"
            if value is not None:
                measured = (f"{row.floor_bytes / (row.median_ms * 1e-3) / 1e9:.0f} GB/s of {read_bw / 1e9:.0f} GB/s "
                            f"({yardstick} bandwidth): {_percent(value)}")  # fmt: skip
            out.append({"goal": f"multi_tensor_norm, {workload}: >= {NORM_READ_GOAL:.0%} of the read bandwidth",
                        "implementation": name, "measured": measured, "value": value,
                        "met": None if value is None else value >= NORM_READ_GOAL})  # fmt: skip
        counts = {op: [getattr(find(name, w, op), "launches", None) for w in LAUNCH_WORKLOADS] for op in PASSES}
        measured_ops = {op: c for op, c in counts.items() if None not in c}
        met = None if not measured_ops else all(len(set(c)) == 1 for c in measured_ops.values())
        out.append({
            "goal": f"kernels per step the same at {' and '.join(LAUNCH_WORKLOADS)} (one launch per pass)",
            "implementation": name,
            "measured": "; ".join(f"{op} {' -> '.join(map(str, c))} ({PASSES[op]} pass{'es' * (PASSES[op] > 1)})"
                                  for op, c in measured_ops.items()) or "—",
            "value": None, "met": met,
        })  # fmt: skip
        workload, goal = HOST_GOAL_MS
        row = find(name, workload, "AMP step")
        value = row.host_ms if row else None
        out.append({"goal": f"AMP step, {workload}: host time <= {goal} ms per step", "implementation": name,
                    "measured": "—" if value is None else f"{_ms(value)} ms", "value": value,
                    "met": None if value is None else value <= goal})  # fmt: skip
    return out


def targets_table(results: Results) -> str:
    """The speed goals as a markdown table (GPU runs; the goals are for the fused backends)."""
    lines = ["| goal | fastopt | measured | verdict |", "|---|---|---|---|"]
    for t in targets(results):
        measured = t["measured"].replace("|", "/")
        lines.append(f"| {t['goal']} | {t['implementation']} | {measured} | {_verdict(t['met'])} |")
    return "\n".join(lines) if len(lines) > 2 else "- no fastopt rows measured"


def detail_tables(results: Results) -> str:
    """Every row, one table per workload."""
    on_gpu = results.device == "cuda"
    unit = results.rows[0].launch_unit if results.rows else "launches"
    columns = ["op", "implementation", "median ms", "min ms", "IQR", "rounds", "vs torch best", "floor ms",
               "floor reached", "host ms", unit]  # fmt: skip
    columns += ["graph ms"] if on_gpu else []
    columns += ["flags", "notes"]
    sections = []
    by_workload: dict[str, list[Row]] = {}
    for row in results.rows:
        by_workload.setdefault(row.workload, []).append(row)
    for workload, rows in by_workload.items():
        fewest, most = min(r.copies for r in rows), max(r.copies for r in rows)
        copies = f"{fewest}" if fewest == most else f"{fewest} to {most} (by the bytes each op touches)"
        lines = [
            f"#### {rows[0].workload_description}; tensor sets rotated: {copies}",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" if c in ("op", "implementation", "flags", "notes") else "---:" for c in columns) + "|",
        ]
        for row in sorted(rows, key=lambda r: _op_order(r.op)):
            notes = [row.notes] if row.notes else []
            if row.error:
                notes.append(f"failed: {row.error}")
            if row.compile_s is not None:
                notes.append(f"compile {row.compile_s:.0f} s")
            if on_gpu and row.graph_note:
                notes.append(row.graph_note)
            cells = [
                row.op,
                row.implementation,
                _ms(row.median_ms),
                _ms(row.min_ms),
                _percent(row.spread),
                str(row.rounds) if row.rounds else "—",
                ratio_text(row.vs_torch_best),
                _ms(row.floor_ms),
                _percent(row.floor_fraction),
                _ms(row.host_ms),
                "—" if row.launches is None else str(row.launches),
            ]
            cells += [_ms(row.graph_ms)] if on_gpu else []
            cells += ["; ".join(row.flags).replace("|", "/") or "—", "; ".join(notes).replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def flag_count(results: Results) -> int:
    return sum(1 for row in results.rows if row.flags)


BUILD_HINT = "to build it: a CUDA build of torch, nvcc, and pip install -v --no-build-isolation . in a source checkout"


def in_source_checkout() -> bool:
    """Whether fastopt runs from a checkout of its repository (where csrc/README.md is)."""
    import fastopt

    return (pathlib.Path(fastopt.__file__).resolve().parents[1] / "csrc" / "README.md").is_file()


def for_installed_users(reason: str, checkout: bool | None = None) -> str:
    """A backend's reason as the reader can act on it: csrc/README.md is in the source
    repository, not in the wheel, so an installed package says how to build instead."""
    if in_source_checkout() if checkout is None else checkout:
        return reason
    return re.sub(r"\(see csrc/README\.md\)", f"({BUILD_HINT})", reason)


def skipped_list(results: Results) -> str:
    lines = [f"- {s.implementation} ({', '.join(s.ops)}): {for_installed_users(s.reason)}" for s in results.skipped]
    return "\n".join(lines) if lines else "- nothing"


def how_to_read(results: Results) -> str:
    on_gpu = results.device == "cuda"
    launches = (
        "kernels: GPU activities per step in torch.profiler (kernels, memcpy, memset)"
        if on_gpu
        else "aten ops: top-level aten calls per step in torch.profiler (a foreach call counts once)"
    )
    host = "wall time of the Python call, started with the GPU idle" if on_gpu else "the same as the median on a CPU"
    rounds = results.settings.get("min_rounds", 15)
    lines = [
        f"Each row group (one op on one workload) is timed in rounds, at least {rounds}: a round calls every "
        "implementation once, in an order that rotates from round to round, and an in-place add `a += b` over the "
        "bytes the op touches (the bandwidth reference). median / min ms and IQR (interquartile range over the "
        "median) are over the rounds; vs torch best is the median over rounds of torch's fastest eager time in the "
        "round over this row's (above 1x is faster).",
        "floor ms: the bytes an op's math must move at the in-place-add bandwidth of the same round (median over "
        "rounds); floor reached: floor / time. Nothing moves bytes faster than that add, so above 100% means a bug "
        "in the op's byte count or its timing, and is flagged.",
        f"Flags: wide spread (IQR over {100 * WIDE_SPREAD:.0f}% of the median); contention (some task waited for "
        f"a CPU during over {100 * CONTENDED:.0f}% of the row's rounds, /proc/pressure/cpu); beats the floor; a "
        "part slower than the whole that contains it (clip_grad_norm_ in clip + adamw, ...), quartiles apart. "
        "A flagged row's figure is not to be trusted as it stands: rerun it.",
        f"host ms: {host}. {launches}."
        + (" graph ms: CUDA-graph replay of the captured step." if on_gpu else " CUDA-graph replay: GPU only."),
        "Inputs are random; calls rotate over the tensor sets shown, so caches do not flatter; grads that an op "
        "changes are restored (untimed) after each call.",
    ]
    if on_gpu and results.read_bandwidth:
        lines.append(
            f"Read bandwidth measured in this run: {results.read_bandwidth / 1e9:.1f} GB/s (torch.sum of 1 GiB): the "
            "yardstick of multi_tensor_norm in the targets."
        )
    if results.settings.get("interrupted"):
        lines.append(f"This run was cut short ({results.settings['interrupted']}): the rows below are those measured.")
    run_line = f"The run took {results.wall_s:.0f} s"
    if results.cpu_contention is not None:
        run_line += (f"; during {100 * results.cpu_contention:.0f}% of it some task waited for a CPU "
                     "(/proc/pressure/cpu): other jobs on these cores")  # fmt: skip
    lines.append(f"{run_line}. Rows flagged: {flag_count(results)} of {len(results.rows)}.")
    return "\n".join(lines)


def markdown(results: Results, env: dict) -> str:
    return "\n\n".join(
        [
            header_line(env),
            how_to_read(results),
            "### Summary: torch's best path against fastopt's",
            summary_table(results),
            *(["### Targets", targets_table(results)] if results.device == "cuda" else []),
            "### Every row",
            detail_tables(results),
            "Skipped:\n" + skipped_list(results),
        ]
    )


def readme_block(results: Results, env: dict) -> str:
    """The figures README.md shows: the run's header, how long it took and how contended, and
    the summary table."""
    contention = "" if results.cpu_contention is None else (
        f"; some task waited for a CPU during {100 * results.cpu_contention:.0f}% of it")
    return "\n\n".join([
        header_line(env),
        f"The run took {results.wall_s:.0f} s{contention}; {flag_count(results)} of {len(results.rows)} rows flagged "
        "(bench/RESULTS.md has every row, its spread and flags).",
        summary_table(results),
    ])  # fmt: skip


def write_json(results: Results, env: dict, path: pathlib.Path) -> None:
    payload = {"environment": env, **results.to_dict()}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def read_json(path: pathlib.Path) -> tuple[Results, dict]:
    """A run written by ``write_json``, back as (results, environment): to render its tables or
    chart again without measuring again."""
    payload = json.loads(pathlib.Path(path).read_text())
    row_fields = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{k: v for k, v in row.items() if k in row_fields}) for row in payload["rows"]]
    skipped = [Skipped(s["implementation"], tuple(s["ops"]), s["reason"]) for s in payload["skipped"]]
    results = Results(
        payload["device"],
        payload["copy_bandwidth_GBps"] * 1e9,
        payload["cache_bytes"],
        rows,
        skipped,
        payload["settings"],
        payload.get("wall_s", 0.0),
        payload.get("cpu_contention"),
        None if payload.get("read_bandwidth_GBps") is None else payload["read_bandwidth_GBps"] * 1e9,
    )
    return results, payload["environment"]


def plot(results: Results, env: dict, path: pathlib.Path) -> None:
    """A bar chart per op: torch's best eager path and each fastopt backend per workload (log ms),
    each fastopt bar labelled with its speed vs torch, the memory floor a black line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = _groups(results)
    ops = sorted({op for _, op in groups}, key=_op_order)
    fastopt_names = sorted({r.implementation for r in results.rows if r.role == "fastopt" and r.plotted})
    peers = any(r.role == "peer" and r.median_ms is not None for r in results.rows)
    series = ["torch best"] + fastopt_names + (["best peer"] if peers else [])
    colors = dict(zip(series, ["#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]))
    columns = 2 if len(ops) > 1 else 1
    panel_rows = math.ceil(len(ops) / columns)
    height = 3.4 * panel_rows + 1.4  # inches: the panels, then a two-line title and the legend above them
    figure, axes = plt.subplots(panel_rows, columns, figsize=(8 * columns, height), squeeze=False)
    width = 0.8 / len(series)
    for panel, op in zip(axes.flat, ops):
        workloads = [w for (w, o) in groups if o == op]
        heights = []
        for x, workload in enumerate(workloads):
            rows = groups[(workload, op)]
            bars = {"torch best": best(rows, "torch"), "best peer": best(rows, "peer")}
            bars.update({r.implementation: r for r in rows if r.role == "fastopt" and r.plotted})
            for i, name in enumerate(series):
                row = bars.get(name)
                if row is None or row.median_ms is None:
                    continue
                center = x - 0.4 + (i + 0.5) * width
                flagged = bool(row.flags)  # hatched, its label marked: not to be taken at face value
                panel.bar(center, row.median_ms, width, color=colors[name], hatch="///" if flagged else None,
                          edgecolor="black" if flagged else None, linewidth=0.5)  # fmt: skip
                # the interquartile range as an error bar
                if row.q1_ms is not None and row.q3_ms is not None:
                    panel.vlines(center, row.q1_ms, row.q3_ms, colors="black", linewidth=0.8)
                heights.append(row.median_ms)
                label = ratio_text(row.vs_torch_best) if name != "torch best" and row.vs_torch_best else ""
                if label or flagged:
                    panel.annotate(label + ("!" if flagged else ""), (center, row.median_ms), ha="center",
                                   va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")  # fmt: skip
            floor = _group_floor(rows)
            if floor is not None:
                panel.hlines(floor, x - 0.45, x + 0.45, colors="black", linewidth=2)
                heights.append(floor)
        panel.set_yscale("log")
        if heights:  # room above the tallest bar for its label, below the floor for the line
            panel.set_ylim(min(heights) / 2, max(heights) * 2.5)
        panel.set_xticks(range(len(workloads)))
        panel.set_xticklabels(workloads, fontsize=8)
        panel.set_ylabel("ms per call (log)", fontsize=8)
        panel.set_title(f"{op}: {OPS[op].description}" if op in OPS else op, fontsize=9)
        panel.grid(axis="y", which="major", alpha=0.3)
    for panel in list(axes.flat)[len(ops) :]:
        panel.set_visible(False)
    handles = [Patch(color=colors[name], label=name) for name in series]
    handles.append(Line2D([], [], color="black", linewidth=2, label="memory floor (bytes / in-place-add bandwidth)"))
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="flagged (!): see the tables"))
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 1 - 0.5 / height))
    figure.suptitle(
        f"fastopt vs torch's best eager path: {env['device']}, {env['date'][:10]}, torch {env['torch']}; "
        f"labels: speed vs torch (above 1x is faster; median of per-round ratios); whiskers: IQR; "
        f"{flag_count(results)} of {len(results.rows)} rows flagged\n`{env['command']}`",
        fontsize=9,
        y=1 - 0.04 / height,
    )
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(results: Results, env: dict, out_dir: pathlib.Path) -> dict[str, pathlib.Path | str]:
    """JSON, markdown and PNG into ``out_dir``; the PNG is skipped, with the reason, without matplotlib."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{results.device}-{env['date'].replace(':', '')}"
    written: dict[str, pathlib.Path | str] = {}
    written["json"] = out_dir / f"{stem}.json"
    write_json(results, env, written["json"])
    written["markdown"] = out_dir / f"{stem}.md"
    written["markdown"].write_text(markdown(results, env) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        written["png"] = "not written: matplotlib is not installed (pip install 'fastopt[bench]')"
    else:
        written["png"] = out_dir / f"{stem}.png"
        plot(results, env, written["png"])
    return written
