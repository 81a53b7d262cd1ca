"""``python -m fastopt info`` and ``python -m fastopt bench``."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys

import torch

from fastopt import backends
from fastopt.benchmark import workloads


def _triton_version() -> str:
    from fastopt.benchmark.report import triton_version

    return triton_version()


def _device_description() -> str:
    from fastopt.benchmark.report import device_description

    return device_description()


def info(_args: argparse.Namespace) -> int:
    import fastopt

    print(f"fastopt  {fastopt.__version__}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton   {_triton_version()}")
    print(f"device   {_device_description()}")
    forced = backends.forced_backend()
    print(f"forced   {forced[1] if forced else 'no (FASTOPT_BACKEND unset)'}")
    print("backends")
    unavailable = backends.unavailable_backends()
    for spec in backends.BACKENDS:
        state = "available" if spec.name not in unavailable else f"missing: {unavailable[spec.name]}"
        print(f"  {spec.name:<7} {state}")
    return 0


def _progress(quiet: bool):
    """A progress bar on stderr (tqdm when installed; plain lines otherwise), or nothing."""
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = None

    def report(done: int, total: int, description: str) -> None:
        nonlocal bar
        if tqdm is None:
            if done < total:
                print(f"  [{done + 1}/{total}] {description}", file=sys.stderr, flush=True)
            return
        if bar is None:
            bar = tqdm(total=total, file=sys.stderr, unit="row", leave=False)
        bar.set_description_str(description[:70])
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def bench(args: argparse.Namespace) -> int:
    import pathlib

    from fastopt import benchmark
    from fastopt.benchmark import report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workloads = benchmark.default_workloads(device, args.workloads, args.dtypes, args.size)
    command = "python -m fastopt " + shlex.join(args.command_line)  # quoted, so it can be pasted back
    env = report.environment(device, command)
    print(report.header_line(env), flush=True)  # first line: date, device, versions, command
    results = benchmark.run(
        workloads,
        device,
        args.backends,
        ops=args.ops,
        peers=not args.no_peers,
        compile=args.compile,
        graphs=False if args.no_graphs else None,
        min_run_time=args.min_run_time,
        progress=_progress(args.quiet),
    )
    print()
    print(report.how_to_read(results))
    print("\n### Summary: torch's best path against fastopt's\n")
    print(report.summary_table(results))
    if results.device == "cuda":
        print("\n### Targets\n")
        print(report.targets_table(results))
    print("\n### Every row\n")
    print(report.detail_tables(results))
    print("\nSkipped:\n" + report.skipped_list(results))
    written = report.write_all(results, env, pathlib.Path(args.out))
    print("\nWrote " + "; ".join(f"{kind}: {path}" for kind, path in written.items()))
    if results.settings.get("interrupted"):
        print(f"\nIncomplete: {results.settings['interrupted']}", file=sys.stderr)
        return 1
    return 1 if any(row.error for row in results.rows if row.role == "fastopt") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which backends run here (and why not)").set_defaults(
        func=info
    )
    bench_parser = commands.add_parser(
        "bench", help="time fastopt against torch and peers on this machine's device; tables, JSON and a PNG"
    )
    bench_parser.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible)")
    bench_parser.add_argument(
        "--workloads", "--workload", nargs="+", choices=workloads.FAMILIES, help="workloads to run (default: all)"
    )
    bench_parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(workloads.DTYPES),
        help="fp32; bf16 (params and grads); bf16-grads (fp32 params, bf16 grads). Default: all",
    )
    bench_parser.add_argument("--ops", nargs="+", choices=workloads.ALL_OPS, help="ops to time (default: all)")
    bench_parser.add_argument(
        "--backends",
        nargs="+",
        choices=[spec.name for spec in backends.BACKENDS],
        help="fastopt backends to time (default: all that run on the device)",
    )
    bench_parser.add_argument(
        "--size",
        choices=workloads.SIZES,
        help="full: docs/design.md's sizes (1.3 B params, ...); cpu: the same layouts scaled down; tiny: a smoke "
        "test of the harness. Default: full on a GPU, cpu on a CPU",
    )
    bench_parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the step (slow: reported apart)"
    )
    bench_parser.add_argument("--no-peers", action="store_true", help="skip timm, DeepSpeed, TransformerEngine, ...")
    bench_parser.add_argument("--no-graphs", action="store_true", help="GPU: skip the CUDA-graph replay timings")
    bench_parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per row")
    bench_parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 resists other jobs sharing the cores"
    )
    bench_parser.add_argument(
        "--out", default="bench-results", help="folder for the JSON, markdown and PNG (default: bench-results/)"
    )
    bench_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    bench_parser.set_defaults(func=bench)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
