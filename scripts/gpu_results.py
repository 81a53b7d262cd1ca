"""The results of `make gpu-check`: written on the GPU machine, rendered on any machine.

    python scripts/gpu_results.py versions OUT.json                 # on the GPU machine (gpu_check.sh)
    python scripts/gpu_results.py summarize --plan P --logs DIR --out DIR --seconds S --budget B
    python scripts/gpu_results.py render gpu-check-main.json [gpu-check-extra.json] [--results bench/RESULTS.md]

`summarize` reads the step log (steps.tsv), the junit XMLs and the benchmark JSONs that
scripts/gpu_check.sh left in its log folder, and writes two of the three files that come back from
the GPU machine: gpu-check-<plan>.json (everything, self-contained) and summary-<plan>.md. `render`
runs on the CPU machine, after the files came back: it appends a dated section to bench/RESULTS.md
with the device, the versions, every step and the benchmark's own tables, and prints it. Only the
standard library and fastopt's benchmark report module (for the benchmark tables) are used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADLINE_OPS = ("multi_tensor_norm", "clip + adamw step", "AMP step")
TEST_STEPS = ("build", "info", "collect", "tests", "optests-cuda", "optests-triton", "memcheck", "racecheck",
              "synccheck", "memcheck-triton")


def versions(path: str) -> None:
    """The machine and the software stack, as the device and nvidia-smi report them."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - an unusable triton is a finding, not a crash
        triton_version = f"not importable ({type(exc).__name__})"
    props = torch.cuda.get_device_properties(0)
    smi = [s.strip() for s in os.environ.get("SMI", "").split(",") if s.strip()]
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": smi[0] if smi else props.name,
        "driver": smi[1] if len(smi) > 1 else "?",
        "memory": smi[2] if len(smi) > 2 else f"{props.total_memory >> 20} MiB",
        "capability": "%d.%d" % torch.cuda.get_device_capability(0),
        "sms": props.multi_processor_count,
        "l2_mb": round(getattr(props, "L2_cache_size", 0) / 1e6),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "nvcc": os.environ.get("NVCC_VERSION", "?"),
        "compute_sanitizer": os.environ.get("SANITIZER_VERSION", "?"),
        "cpus": os.cpu_count(),
    }
    pathlib.Path(path).write_text(json.dumps(info, indent=1))
    for key, value in info.items():
        print(f"{key:<18} {value}")


def junit_counts(path: pathlib.Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ][:50]
    return counts


def read_steps(logs: pathlib.Path) -> list[dict]:
    """steps.tsv, with each step's test counts or benchmark payload folded in."""
    steps = []
    tsv = logs / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, status, seconds, detail, artifact = (line.split("\t") + [""] * 5)[:5]
        step = {"name": name, "status": status, "seconds": int(seconds or 0), "detail": detail}
        if artifact.endswith(".xml") and (logs / artifact).exists():
            try:
                counts = junit_counts(logs / artifact)
                step["counts"] = counts
                step["detail"] = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors,"
                                  f" {counts['skipped']} skipped")
                if status == "TIMEOUT":
                    step["detail"] += " (cut short by the time limit)"
            except ET.ParseError as exc:
                step["detail"] += f" (junit unreadable: {exc})"
        if artifact.endswith(".json") and (logs / artifact).exists():
            payload = json.loads((logs / artifact).read_text())
            errored = sum(1 for r in payload["rows"] if r.get("error"))
            step["detail"] = f"{len(payload['rows'])} rows, {errored} failed; copy {payload['copy_bandwidth_GBps']:.0f} GB/s"
            if payload["settings"].get("interrupted"):
                step["detail"] += f"; {payload['settings']['interrupted']}"
            step["bench"] = payload
        steps.append(step)
    return steps


def bench_sections(steps: list[dict]) -> tuple[list[str], list[str], dict]:
    """The benchmark's own tables per bench step, the targets met or missed, and the headline cells."""
    sections, targets_lines, headline = [], [], {}
    benches = [s for s in steps if "bench" in s]
    if not benches:
        return sections, targets_lines, headline
    try:
        sys.path.insert(0, str(ROOT))
        from fastopt.benchmark import report

        for step in benches:
            with tempfile.TemporaryDirectory() as tmp:
                path = pathlib.Path(tmp) / "bench.json"
                path.write_text(json.dumps(step["bench"]))
                results, env = report.read_json(path)
            section = [f"#### {step['name']}: `{env['command']}`", report.how_to_read(results),
                       report.summary_table(results)]
            targets = report.targets(results)
            if any(t["met"] is not None for t in targets):
                section += ["Targets:", report.targets_table(results)]
            for t in targets:
                if t["met"] is not None:
                    verdict = "met" if t["met"] else "MISSED"
                    targets_lines.append(f"  {verdict:<6} {t['implementation']:<15} {t['goal']}: {t['measured']}")
            section += ["Every row:", report.detail_tables(results)]
            sections.append("\n\n".join(section))
            for row in results.rows:  # fastopt's main entry points against torch's best path
                if row.role == "fastopt" and row.plotted and row.op in HEADLINE_OPS:
                    cell = (f"{row.vs_torch_best:.2f}x, {row.floor_ms / row.median_ms:.0%} floor"
                            if row.median_ms and row.vs_torch_best else "failed" if row.error else "-")
                    headline.setdefault(f"{row.workload} / {row.op}", {})[row.implementation] = cell
    except Exception as exc:  # noqa: BLE001 - the rest of the summary must still be written
        sections.append(f"(the benchmark tables could not be rendered: {type(exc).__name__}: {exc})")
    return sections, targets_lines, headline


def describe_stack(versions_info: dict) -> tuple[str, str]:
    device = (f"{versions_info.get('device', '?')} (sm_{str(versions_info.get('capability', '?')).replace('.', '')},"
              f" {versions_info.get('sms', '?')} SMs, driver {versions_info.get('driver', '?')})")
    stack = (f"torch {versions_info.get('torch', '?')} (CUDA {versions_info.get('cuda', '?')}), triton"
             f" {versions_info.get('triton', '?')}, nvcc {versions_info.get('nvcc', '?')}, python"
             f" {versions_info.get('python', '?')}, compute-sanitizer {versions_info.get('compute_sanitizer', '?')}")
    return device, stack


def summary_text(check: dict) -> tuple[str, list[str]]:
    steps = check["steps"]
    sections, targets_lines, headline = bench_sections(steps)
    failed = [s["name"] for s in steps if s["status"] in ("FAIL", "TIMEOUT")]
    not_run = [s["name"] for s in steps if s["status"] == "NOTIME"]
    device, stack = describe_stack(check["versions"])
    width = max([len(s["name"]) for s in steps] + [4])
    lines = [f"gpu-check ({check['plan']}), {check['versions'].get('date', '?')}: {device}; {stack}",
             f"{check['seconds']} s of the plan's {check['budget']} s", "",
             f"{'step':<{width}}  {'status':<7} {'time':>5}  result"]
    lines += [f"{s['name']:<{width}}  {s['status']:<7} {s['seconds']:>4}s  {s['detail']}" for s in steps]
    for s in steps:
        for test in s.get("counts", {}).get("failed_tests", [])[:10]:
            lines.append(f"  {s['name']} failed: {test}")
    if targets_lines:
        lines += ["", "targets (the issues' speed goals):", *targets_lines]
    if headline:
        names = sorted({name for cells in headline.values() for name in cells})
        lines += ["", "fastopt vs torch's best path (speed-up, fraction of the memory floor):",
                  f"  {'workload / op':<40} " + " ".join(f"{n:<22}" for n in names)]
        lines += [f"  {key:<40} " + " ".join(f"{cells.get(n, '-'):<22}" for n in names) for key, cells in headline.items()]
    overall = f"FAIL ({', '.join(failed)})" if failed else "ok"
    if not_run:
        overall += f"; not started for lack of time: {', '.join(not_run)}"
    lines += ["", f"overall: {overall}"]
    return "\n".join(lines), sections


def summarize(args: argparse.Namespace) -> int:
    logs, out = pathlib.Path(args.logs), pathlib.Path(args.out)
    versions_path = logs / "versions.json"
    check = {
        "plan": args.plan,
        "versions": json.loads(versions_path.read_text()) if versions_path.exists() else {},
        "seconds": args.seconds,
        "budget": args.budget,
        "steps": read_steps(logs),
    }
    (out / f"gpu-check-{args.plan}.json").write_text(json.dumps(check, indent=1))
    text, sections = summary_text(check)
    (out / f"summary-{args.plan}.md").write_text("```\n" + text + "\n```\n\n" + "\n\n".join(sections) + "\n")
    print(text)
    return 0


def results_section(check: dict) -> str:
    steps = check["steps"]
    sections, _, _ = bench_sections(steps)
    device, stack = describe_stack(check["versions"])
    failed = [s["name"] for s in steps if s["status"] in ("FAIL", "TIMEOUT")]
    command = "make gpu-check" if check["plan"] == "main" else "make gpu-check-extra"
    table = ["| step | status | time | result |", "|---|---|---|---|"]
    table += [f"| {s['name']} | {s['status']} | {s['seconds']} s | {s['detail'].replace('|', '/')} |" for s in steps
              if s["name"] in TEST_STEPS or s["name"].startswith("bench")]
    return "\n\n".join([
        f"## GPU: `{command}`, {str(check['versions'].get('date', '?'))[:10]}",
        f"{device}, {check['versions'].get('memory', '?')}; {stack}. Command: `{command}` (scripts/gpu_check.sh, plan"
        f" {check['plan']}, {check['seconds']} s of its {check['budget']} s); the benchmark commands are named with"
        f" each table. Steps that failed: {', '.join(failed) or 'none'}.",
        "\n".join(table),
        *sections,
    ])


def render(args: argparse.Namespace) -> int:
    sections = [results_section(json.loads(pathlib.Path(p).read_text())) for p in args.json]
    text = "\n\n".join(sections).strip() + "\n"
    results = pathlib.Path(args.results)
    with results.open("a") as f:
        f.write("\n\n" + text)
    print(text)
    print(f"(appended to {results})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("versions", help="write the GPU machine's versions (GPU machine)")
    p.add_argument("path")
    p = sub.add_parser("summarize", help="the JSON and summary from a gpu_check.sh log folder (GPU machine)")
    p.add_argument("--plan", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--budget", type=int, default=0)
    p = sub.add_parser("render", help="append returned gpu-check JSONs to bench/RESULTS.md (any machine)")
    p.add_argument("json", nargs="+")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.command == "versions":
        versions(args.path)
        return 0
    return summarize(args) if args.command == "summarize" else render(args)


if __name__ == "__main__":
    sys.exit(main())
