"""``python -m fastopt info``, ``python -m fastopt bench`` and ``python -m fastopt report``."""

from __future__ import annotations

import argparse
import pathlib
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
    from fastopt.benchmark import report

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
        reason = unavailable.get(spec.name)
        state = "available" if reason is None else f"missing: {report.for_installed_users(reason)}"
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
            bar = tqdm(total=total, file=sys.stderr, unit="group", leave=False)
        bar.set_description_str(description[:70])
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def bench(args: argparse.Namespace) -> int:
    from fastopt import benchmark
    from fastopt.benchmark import report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workloads = benchmark.default_workloads(device, args.workloads, args.dtypes, args.size, args.ops)
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
        min_rounds=args.min_rounds,
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


BEGIN, END = "<!-- fastopt report: begin (python -m fastopt report --update) -->", "<!-- fastopt report: end -->"


def replace_marked_block(text: str, block: str, where: str) -> str:
    """``text`` with what lies between the report's markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{where}: needs one pair of lines {BEGIN} ... {END} around the figures to replace")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def report_command(args: argparse.Namespace) -> int:
    """Render a bench run's JSON again, without measuring: print it, update the marked blocks of
    README.md (the summary) and bench/RESULTS.md (every table), redraw the chart."""
    from fastopt.benchmark import report

    path = pathlib.Path(args.json)
    if path.is_dir():  # the newest run in a --out folder
        runs = sorted(path.glob("bench-*.json"))
        if not runs:
            raise SystemExit(f"{path}: no bench-*.json in it")
        path = runs[-1]
    results, env = report.read_json(path)
    full = report.markdown(results, env)
    brief = report.readme_block(results, env)
    for target in args.update:
        target = pathlib.Path(target)
        block = brief if target.name == "README.md" else full
        target.write_text(replace_marked_block(target.read_text(), block, str(target)))
        print(f"updated {target} from {path}", file=sys.stderr)
    if args.png:
        report.plot(results, env, pathlib.Path(args.png))
        print(f"drew {args.png} from {path}", file=sys.stderr)
    if not args.update and not args.png:
        print(brief if args.brief else full)
    return 0


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
    bench_parser.add_argument(
        "--ops",
        nargs="+",
        choices=workloads.ALL_OPS,
        help="ops to time, in every dtype chosen (default: all; the sgd, adam and lion steps on fp32 only)",
    )
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
    bench_parser.add_argument(
        "--min-run-time", type=float, default=0.2, help="seconds of rounds per implementation of a row (default: 0.2)"
    )
    bench_parser.add_argument(
        "--min-rounds", type=int, default=15, help="rounds per row group, at least (default: 15)"
    )
    bench_parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 resists other jobs sharing the cores"
    )
    bench_parser.add_argument(
        "--out", default="bench-results", help="folder for the JSON, markdown and PNG (default: bench-results/)"
    )
    bench_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    bench_parser.set_defaults(func=bench)
    report_parser = commands.add_parser(
        "report",
        help="render a bench run's JSON again (tables, chart) and update README.md / bench/RESULTS.md",
        description="Render a bench run's JSON without measuring again. With --update, replace the figures "
        f"between the lines '{BEGIN}' and '{END}' of each file: README.md gets the summary, any other file "
        "(bench/RESULTS.md) every table. `make figures` runs the bench and this in one go.",
    )
    report_parser.add_argument("json", help="a bench-*.json, or a --out folder (its newest run)")
    report_parser.add_argument("--update", nargs="+", default=[], metavar="FILE", help="files whose block to replace")
    report_parser.add_argument("--png", help="redraw the chart into this file")
    report_parser.add_argument("--brief", action="store_true", help="print README's summary block, not every table")
    report_parser.set_defaults(func=report_command)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
