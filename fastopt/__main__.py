"""``python -m fastopt info`` and ``python -m fastopt bench``."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from fastopt import backends


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _device_description() -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({', '.join(names)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); no CUDA GPU visible"


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


def bench(args: argparse.Namespace) -> int:
    from fastopt import benchmark

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.backends or [n for n in backends.available_backends() if backends.status(n).runs_on(device)]
    workloads = [w for w in benchmark.default_workloads(device) if not args.workload or w.name in args.workload]
    progress = (lambda msg: print(f"  timing {msg}", file=sys.stderr)) if not args.quiet else None
    rows = benchmark.run(workloads, device, names, min_run_time=args.min_run_time, progress=progress)
    command = "python -m fastopt " + " ".join(args.command_line)
    print(f"{datetime.date.today()}, {_device_description()}; torch {torch.__version__}, "
          f"triton {_triton_version()}, python {platform.python_version()}; `{command}`; "
          "median of torch.utils.benchmark blocked_autorange\n")  # fmt: skip
    print(benchmark.markdown_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which backends run here (and why not)").set_defaults(
        func=info
    )
    bench_parser = commands.add_parser("bench", help="time fastopt against torch on this machine's device")
    bench_parser.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible)")
    bench_parser.add_argument("--backends", nargs="+", help="fastopt backends to time (default: all that run)")
    bench_parser.add_argument(
        "--workload", nargs="+", choices=["gpt-like", "many-small"], help="workloads to run (default: all)"
    )
    bench_parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per measurement")
    bench_parser.add_argument("--quiet", action="store_true", help="no progress lines")
    bench_parser.set_defaults(func=bench)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
