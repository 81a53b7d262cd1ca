#!/usr/bin/env bash
# `make gpu-check`: everything fastopt needs a GPU for, in one command of about 10 minutes, on a
# GPU machine where nothing can be downloaded (nothing is installed from the network here):
#
#   1. versions: device, driver, torch, triton, nvcc, compute-sanitizer
#   2. build:    the CUDA extension in place (setup.py build_ext --inplace, FASTOPT_FORCE_CUDA_BUILD=1,
#                TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability(), MAX_JOBS=nproc);
#      info:     `python -m fastopt info` must list the cuda backend as available
#   3. collect:  test modules that cannot import for want of an optional package (hypothesis, ...)
#                are left out (--ignore), so that a collection error does not stop the run;
#      tests:    the cuda-marked tests (pytest -m cuda -x tests/, less the op test files, see
#                below); optests: the op suite forced onto the cuda backend
#                (FASTOPT_BACKEND=cuda FASTOPT_TEST_DEVICES=cuda pytest -m cuda <op test files>)
#   4. compute-sanitizer memcheck, racecheck, synccheck over scripts/sanitizer_driver.py
#   5. bench:    python -m fastopt bench on the GPT-like (1.3 B params, 292 tensors) and 5,000-tensor
#                workloads, torch's paths against fastopt's cuda and triton backends, fp32 then bf16
#   6. results:  a dated section appended to bench/RESULTS.md (when the benchmark ran)
#   7. a short summary table, printed last; the exit status is non-zero if any step failed
#
# Every step runs under `timeout` within one budget (GPU_CHECK_BUDGET_S, default 550 s, so that the
# whole script ends inside a 600 s command), keeping time back for the steps after it; a step cut short still reports what it has (pytest and the
# benchmark stop on SIGINT and write their results). A failed step does not stop the later ones,
# except where they need what it failed to make (no extension: no cuda-backend tests).
#
# Output: $GPU_CHECK_OUT, else $OUT (the device tool's folder), else gpu-check-results/:
# summary.md, RESULTS.md, bench-fp32.{md,json}, bench-bf16.{md,json}, and the full logs in logs/
# (packed into logs.tar.gz, and logs/ removed, when writing to $OUT: at most 8 files come back).
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (default
# "build tests optests sanitizer bench results": split the work over two calls with, e.g.,
# GPU_CHECK_STEPS="build bench results"), GPU_CHECK_BENCH_ARGS (more `fastopt bench` flags).
#
# Why the cuda-marked run leaves the op test files to optests: without FASTOPT_BACKEND their cuda
# cases run on the cuda backend while tests/helpers.py's active_backend() says "torch", whose
# results must match torch's bit for bit; optests runs them with FASTOPT_BACKEND=cuda, which
# compares within fp32 rounding.

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
shopt -s nullglob
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-550}
STEPS=" ${GPU_CHECK_STEPS:-build tests optests sanitizer bench results} "
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { printf 'gpu-check: %s\n' "$*"; }
die() { printf 'gpu-check: %s\n' "$*" >&2; exit 2; }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# ----------------------------------------------------------------------------- fail fast without a GPU

preflight() {
    if ! command -v nvidia-smi > /dev/null 2>&1; then
        die "no GPU here: nvidia-smi is not installed. This check runs on the GPU machine (one H100 or H200, with torch, nvcc and compute-sanitizer); on a CPU machine use \`make test\` and \`make test-triton\`."
    fi
    if ! nvidia-smi -L > /dev/null 2>&1; then
        die "no GPU here: \`nvidia-smi -L\` fails ($(nvidia-smi -L 2>&1 | head -n 1)). This check needs a working NVIDIA GPU."
    fi
    command -v "$PY" > /dev/null 2>&1 || die "no python: '$PY' is not on PATH (set PYTHON=...)"
    local why
    why=$("$PY" -c '
import sys
try:
    import torch
except Exception as exc:
    sys.exit(f"{sys.executable} cannot import torch ({exc})")
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} in {sys.executable} is a CPU-only build")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)")
' 2>&1) || die "cannot use the GPU from python: $(tail -n 1 <<< "$why")"
}

# ----------------------------------------------------------------------------- time and bookkeeping

# Seconds to keep back for the steps after each one (what each later step is guaranteed).
declare -A GUARANTEE=([tests]=45 [optests]=45 [memcheck]=40 [racecheck]=30 [synccheck]=20 [bench-fp32]=150
                      [bench-bf16]=0 [finalize]=20)
ORDER=(build info tests optests memcheck racecheck synccheck bench-fp32 bench-bf16 finalize)

group_of() {  # the GPU_CHECK_STEPS word that runs a step
    case $1 in
        memcheck | racecheck | synccheck) echo sanitizer ;;
        bench-*) echo bench ;;
        *) echo "$1" ;;
    esac
}

reserve_after() {  # the guarantees of the steps after $1 that will run
    local seen=0 total=0 step
    if [[ $1 == info ]]; then echo "${GUARANTEE[finalize]}"; return; fi  # seconds, and the rest depends on it
    for step in "${ORDER[@]}"; do
        if ((seen)) && { [[ $step == finalize ]] || wanted "$(group_of "$step")"; }; then
            total=$((total + ${GUARANTEE[$step]:-0}))
        fi
        [[ $step == "$1" ]] && seen=1
    done
    echo "$total"
}

limit_for() {  # limit_for STEP CAP: seconds the step may run now
    local left=$((BUDGET - (SECONDS - START) - $(reserve_after "$1")))
    echo $((left < $2 ? left : $2))
}

STEP_RC=0 STEP_S=0
# timed STEP CAP LOG CMD...: run CMD under timeout (SIGINT first, so pytest and the benchmark
# report what they have; SIGKILL 20 s later), output to LOG. STEP_RC: its exit status (124: timed
# out; 125: no time was left to start it), STEP_S: seconds it took.
timed() {
    local step=$1 cap=$2 log=$3 limit began
    shift 3
    limit=$(limit_for "$step" "$cap")
    if ((limit < 10)); then
        echo "not started: no time left in the ${BUDGET} s budget" > "$log"
        STEP_RC=125 STEP_S=0
        return 0
    fi
    began=$SECONDS
    printf '$ %s\n(time limit %s s)\n' "$*" "$limit" > "$log"
    timeout -s INT -k 20 "$limit" "$@" >> "$log" 2>&1
    STEP_RC=$?
    STEP_S=$((SECONDS - began))
    return 0
}

# record STEP STATUS SECONDS DETAIL [ARTIFACT]: one line of the summary (the artifact, a junit XML
# or benchmark JSON, is read when the summary is made).
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" "${5:-}" >> "$LOGDIR/steps.tsv"
    printf 'gpu-check: %-11s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

status_of() {  # status_of RC: ok / TIMEOUT (cut short) / NOTIME (never started) / FAIL
    case $1 in
        0) echo ok ;;
        124 | 137) echo TIMEOUT ;;
        125) echo NOTIME ;;
        *) echo FAIL ;;
    esac
}

# ----------------------------------------------------------------------------- 1. versions

versions() {
    local smi nvcc_version sanitizer_version
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)
    if command -v nvcc > /dev/null 2>&1; then
        nvcc_version=$(nvcc --version 2>&1 | grep -o 'release [0-9.]*, V[0-9.]*' | head -n 1)
    else
        nvcc_version="not found"
    fi
    if command -v compute-sanitizer > /dev/null 2>&1; then
        sanitizer_version=$(compute-sanitizer --version 2>&1 | grep -io 'version [0-9.]*' | head -n 1)
    else
        sanitizer_version="not found"
    fi
    SMI="$smi" NVCC_VERSION="$nvcc_version" SANITIZER_VERSION="$sanitizer_version" "$PY" - "$LOGDIR/versions.json" <<'PY'
import datetime, json, os, platform, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except Exception as exc:  # noqa: BLE001
    triton_version = f"not importable ({type(exc).__name__})"
props = torch.cuda.get_device_properties(0)
smi = [s.strip() for s in os.environ["SMI"].split(",")]
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
    "nvcc": os.environ["NVCC_VERSION"],
    "compute_sanitizer": os.environ["SANITIZER_VERSION"],
    "cpus": os.cpu_count(),
}
json.dump(info, open(sys.argv[1], "w"), indent=1)
for key, value in info.items():
    print(f"{key:<18} {value}")
PY
}

# ----------------------------------------------------------------------------- 2. build + info

build() {
    local arch log="$LOGDIR/build.log"
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
    if ! command -v nvcc > /dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
    if [[ -z ${CUDA_HOME:-} ]] && command -v nvcc > /dev/null 2>&1; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        export CUDA_HOME
    fi
    # ATen's CUDA headers want cuSPARSE / cuBLAS headers; the pip packages torch depends on carry them
    # where the toolkit lacks them.
    if [[ -n ${CUDA_HOME:-} && ! -e $CUDA_HOME/include/cusparse.h ]]; then
        local extra
        extra=$("$PY" -c '
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
print(":".join(sorted({str(h.parent) for r in roots for h in pathlib.Path(r).glob("*/include/cusparse.h")})))
' 2>/dev/null)
        [[ -n $extra ]] && export CPATH="$extra${CPATH:+:$CPATH}"
    fi
    export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTOPT_FORCE_CUDA_BUILD=1
    timed build 300 "$log" "$PY" setup.py build_ext --inplace
    local rc=$STEP_RC so
    so=fastopt/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if ((rc == 0)) && [[ -e $so ]]; then
        record build ok "$STEP_S" "$so (sm $arch, CUDA_HOME=${CUDA_HOME:-?}, MAX_JOBS=$MAX_JOBS)"
    else
        local why
        why=$(grep -E -m 1 'error:|Error|FASTOPT_FORCE_CUDA_BUILD' "$log" | cut -c1-200)
        record build "$(status_of $((rc == 0 ? 1 : rc)))" "$STEP_S" "extension not built (rc $rc): ${why:-see logs/build.log}"
        echo "---- last lines of logs/build.log ----" >&2
        tail -n 25 "$log" >&2
    fi
}

backend_info() {
    timed info 60 "$LOGDIR/info.log" "$PY" -m fastopt info
    local line
    line=$(grep -E '^\s+cuda\s' "$LOGDIR/info.log" | head -n 1 | sed -E 's/^\s+//')
    if [[ $line =~ ^cuda[[:space:]]+available ]]; then
        CUDA_BACKEND=1
        record info ok "$STEP_S" "backends: $(grep -E '^\s+\S+\s+available' "$LOGDIR/info.log" | awk '{print $1}' | xargs)"
    else
        record info FAIL "$STEP_S" "cuda backend not available: ${line:-python -m fastopt info failed (rc $STEP_RC)}"
    fi
}

# ----------------------------------------------------------------------------- 3. tests

pytest_args() {  # common flags: per-test timeout, no cache in the checkout, modules that cannot import
    PYTEST_ARGS=(-q -p no:cacheprovider)
    if "$PY" -c 'import pytest_timeout' 2> /dev/null; then PYTEST_ARGS+=(--timeout=180); fi
    # A test module that cannot import for want of an optional package (hypothesis, ...) is left out:
    # a collection error would stop `pytest -x` before any test ran.
    local missing file module left_out=() began=$SECONDS
    missing=$(timeout 90 "$PY" - 2> /dev/null <<'PY'
import importlib, pathlib, sys
sys.path.insert(0, ".")
for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    try:
        importlib.import_module(f"tests.{path.stem}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("", "fastopt", "tests"):
            print(f"{path}\t{exc.name}")
    except Exception:  # noqa: BLE001 - pytest reports it
        pass
PY
    )
    while IFS=$'\t' read -r file module; do
        [[ -n $file ]] || continue
        PYTEST_ARGS+=("--ignore=$file")
        left_out+=("$file (no $module)")
    done <<< "$missing"
    record collect ok $((SECONDS - began)) "${left_out[*]:+left out, a package missing: }${left_out[*]:-every test module imports}"
}

run_pytest() {  # run_pytest STEP CAP ENV... -- PYTEST-ARGS...
    local step=$1 cap=$2 envs=()
    shift 2
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    timed "$step" "$cap" "$LOGDIR/$step.log" env "${envs[@]}" "$PY" -m pytest "${PYTEST_ARGS[@]}" \
        --junitxml="$LOGDIR/$step.xml" "$@"
    local status last
    status=$(status_of "$STEP_RC")
    ((STEP_RC == 5)) && status=FAIL  # no tests collected: something is wrong
    last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGDIR/$step.log" | tail -n 1 | tr -d '=' | sed -E 's/^ +| +$//g')
    record "$step" "$status" "$STEP_S" "${last:-rc $STEP_RC, see logs/$step.log}" "$step.xml"
}

# The op-level test files: run with the cuda backend forced (optests), left out of the cuda-marked
# run (tests), where their cuda cases would be held to the torch backend's bitwise results.
OPTEST_FILES=()
for f in tests/test_norm_scale.py tests/test_clip.py tests/test_adamw.py tests/test_optim_adamw.py tests/test_amp.py \
    tests/test_no_sync.py; do
    [[ -e $f ]] && OPTEST_FILES+=("$f")
done

tests() {  # every other cuda-marked test, with the default backend choice
    local ignores=() f
    for f in "${OPTEST_FILES[@]}"; do ignores+=("--ignore=$f"); done
    run_pytest tests 150 FASTOPT_BACKEND= FASTOPT_TEST_DEVICES=cpu,cuda -- -m cuda -x ${ignores[@]+"${ignores[@]}"} tests
}

optests() {
    run_pytest optests 150 FASTOPT_BACKEND=cuda FASTOPT_TEST_DEVICES=cuda -- -m cuda --maxfail=25 "${OPTEST_FILES[@]}"
}

# ----------------------------------------------------------------------------- 4. compute-sanitizer

sanitizer() {  # sanitizer TOOL CAP [DRIVER-ARGS...]
    local tool=$1 cap=$2 log="$LOGDIR/$1.log"
    shift 2
    timed "$tool" "$cap" "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 100 "$PY" scripts/sanitizer_driver.py "$@"
    local summary driver
    summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | sed -E 's/^=+ *//' | paste -sd ';' -)
    driver=$(grep -E '^sanitizer_driver: [0-9]+ cases' "$log" | sed -E 's/^sanitizer_driver: //')
    record "$tool" "$(status_of "$STEP_RC")" "$STEP_S" "${summary:-no summary line (rc $STEP_RC)}; driver: ${driver:-did not finish}"
}

# ----------------------------------------------------------------------------- 5. benchmark

bench() {  # bench DTYPE CAP
    local dtype=$1 cap=$2 step="bench-$1" dir="$LOGDIR/bench-$1" extra=()
    read -r -a extra <<< "${GPU_CHECK_BENCH_ARGS:-}"
    timed "$step" "$cap" "$LOGDIR/$step.log" "$PY" -m fastopt bench --device cuda --workloads gpt-like many-small \
        --dtypes "$dtype" --backends "${BENCH_BACKENDS[@]}" --no-peers --no-graphs --out "$dir" \
        ${extra[@]+"${extra[@]}"}
    local json="" md="" f
    for f in "$dir"/bench-*.json; do json=$f; done  # one run per folder
    for f in "$dir"/bench-*.md; do md=$f; done
    [[ -n $json ]] && cp "$json" "$OUTDIR/$step.json"
    [[ -n $md ]] && cp "$md" "$OUTDIR/$step.md"
    local detail="${json:+rows in $step.json}"
    [[ -z $json ]] && detail="no results written (rc $STEP_RC): $(tail -n 1 "$LOGDIR/$step.log" | cut -c1-160)"
    record "$step" "$(status_of "$STEP_RC")" "$STEP_S" "$detail" "${json:+$step.json}"
}

# ----------------------------------------------------------------------------- 6 + 7. RESULTS.md, summary

finalize() {
    local append=0
    wanted results && append=1
    GPU_CHECK_OUTDIR="$OUTDIR" GPU_CHECK_LOGDIR="$LOGDIR" GPU_CHECK_APPEND="$append" \
        GPU_CHECK_SECONDS=$((SECONDS - START)) GPU_CHECK_BUDGET="$BUDGET" "$PY" - <<'PY'
"""Reads logs/steps.tsv, the junit XMLs and the benchmark JSONs; appends bench/RESULTS.md; writes
summary.md; prints the summary. Standard library only, except the benchmark's own tables."""
import json, os, pathlib, sys
import xml.etree.ElementTree as ET

out, logs = pathlib.Path(os.environ["GPU_CHECK_OUTDIR"]), pathlib.Path(os.environ["GPU_CHECK_LOGDIR"])
versions = json.loads((logs / "versions.json").read_text()) if (logs / "versions.json").exists() else {}


def junit_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


steps = []
for line in (logs / "steps.tsv").read_text().splitlines() if (logs / "steps.tsv").exists() else []:
    name, status, seconds, detail, artifact = (line.split("\t") + [""] * 5)[:5]
    step = {"name": name, "status": status, "seconds": int(seconds or 0), "detail": detail}
    if artifact.endswith(".xml") and (logs / artifact).exists():
        try:
            n = junit_counts(logs / artifact)
            step["counts"] = n
            step["detail"] = f"{n['passed']} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
            if status == "TIMEOUT":
                step["detail"] += " (cut short by the time limit)"
        except ET.ParseError as exc:
            step["detail"] += f" (junit unreadable: {exc})"
    if artifact.endswith(".json") and (out / artifact).exists():
        payload = json.loads((out / artifact).read_text())
        rows = payload["rows"]
        errored = [r for r in rows if r.get("error")]
        step["detail"] = (f"{len(rows)} rows, {len(errored)} failed; copy {payload['copy_bandwidth_GBps']:.0f} GB/s"
                          + (f", read {payload['read_bandwidth_GBps']:.0f} GB/s" if payload.get("read_bandwidth_GBps") else ""))
        if payload["settings"].get("interrupted"):
            step["detail"] += f"; {payload['settings']['interrupted']}"
        step["json"] = out / artifact
    steps.append(step)

# The benchmark's own tables (targets, summary, every row), through fastopt's report module.
bench_sections, targets_lines, headline = [], [], {}
HEADLINE_OPS = ("multi_tensor_norm", "clip + adamw step", "AMP step")
bench_steps = [s for s in steps if "json" in s]
if bench_steps:
    try:
        sys.path.insert(0, os.getcwd())
        from fastopt.benchmark import report

        for s in bench_steps:
            results, env = report.read_json(s["json"])
            s["command"] = env["command"]
            section = [f"#### {s['name']}: `{env['command']}`", report.how_to_read(results),
                       report.summary_table(results)]
            if results.device == "cuda":
                targets = report.targets(results)
                if any(t["met"] is not None for t in targets):
                    section += ["Targets:", report.targets_table(results)]
                for t in targets:
                    if t["met"] is not None:
                        verdict = "met" if t["met"] else "MISSED"
                        targets_lines.append(f"  {verdict:<6} {t['implementation']:<15} {t['goal']}: {t['measured']}")
            section += ["Every row:", report.detail_tables(results)]
            bench_sections.append("\n\n".join(section))
            for row in results.rows:  # fastopt's main entry points against torch's best path
                if row.role == "fastopt" and row.plotted and row.op in HEADLINE_OPS:
                    cell = (f"{row.vs_torch_best:.2f}x, {row.floor_ms / row.median_ms:.0%} floor"
                            if row.median_ms and row.vs_torch_best else "failed" if row.error else "—")
                    headline.setdefault((row.workload, row.op), {})[row.implementation] = cell
    except Exception as exc:  # noqa: BLE001 - the summary must still be written
        bench_sections.append(f"(the benchmark tables could not be rendered: {type(exc).__name__}: {exc})")

failed = [s["name"] for s in steps if s["status"] in ("FAIL", "TIMEOUT")]
not_run = [s["name"] for s in steps if s["status"] == "NOTIME"]
device = (f"{versions.get('device', '?')} (sm_{versions.get('capability', '?').replace('.', '')}, "
          f"driver {versions.get('driver', '?')})")
stack = (f"torch {versions.get('torch', '?')} (CUDA {versions.get('cuda', '?')}), triton {versions.get('triton', '?')}, "
         f"nvcc {versions.get('nvcc', '?')}, python {versions.get('python', '?')}")
width = max([len(s["name"]) for s in steps] + [4])
table = [f"{'step':<{width}}  {'status':<7} {'time':>5}  result"]
table += [f"{s['name']:<{width}}  {s['status']:<7} {s['seconds']:>4}s  {s['detail']}" for s in steps]

# 6. bench/RESULTS.md: only when the benchmark produced results.
results_note = None
if os.environ["GPU_CHECK_APPEND"] == "1" and bench_sections:
    tests_table = ["| step | status | result |", "|---|---|---|"]
    tests_table += [f"| {s['name']} | {s['status']} | {s['detail'].replace('|', '/')} |" for s in steps
                    if s["name"] in ("build", "info", "tests", "optests", "sanitizer", "memcheck", "racecheck", "synccheck")]
    section = "\n\n".join([
        f"## GPU: `make gpu-check`, {versions.get('date', '?')[:10]}",
        f"{device}, {versions.get('memory', '?')}, {versions.get('sms', '?')} SMs; {stack}. Command: `make gpu-check` "
        f"(scripts/gpu_check.sh; the benchmark commands are named with each table). "
        f"Steps that failed: {', '.join(failed) or 'none'}.",
        "\n".join(tests_table),
        *bench_sections,
    ])
    results_md = pathlib.Path("bench/RESULTS.md")
    with results_md.open("a") as f:
        f.write("\n\n" + section.strip() + "\n")
    (out / "RESULTS.md").write_text(results_md.read_text())
    results_note = "bench/RESULTS.md: section appended (a copy in the output folder)"
elif os.environ["GPU_CHECK_APPEND"] == "1":
    results_note = "bench/RESULTS.md: not changed (no benchmark results)"

lines = [f"gpu-check summary, {versions.get('date', '?')}: {device}; {stack}",
         f"{os.environ['GPU_CHECK_SECONDS']} s of the {os.environ['GPU_CHECK_BUDGET']} s budget; output: {out}", "", *table]
if results_note:
    lines.append(results_note)
if targets_lines:
    lines += ["", "targets (the issue's speed goals):", *targets_lines]
if headline:
    names = sorted({name for cells in headline.values() for name in cells})
    lines += ["", "fastopt vs torch's best path (speed-up, fraction of the memory floor):",
              f"  {'workload':<17} {'op':<18} " + " ".join(f"{n:<22}" for n in names)]
    lines += [f"  {w:<17} {op:<18} " + " ".join(f"{cells.get(n, '—'):<22}" for n in names)
              for (w, op), cells in headline.items()]
overall = f"FAIL ({', '.join(failed)})" if failed else "ok"
if not_run:
    overall += f"; not started for lack of time: {', '.join(not_run)}"
lines += ["", f"overall: {overall}"]
text = "\n".join(lines)
(out / "summary.md").write_text("```\n" + text + "\n```\n\n" + "\n\n".join(bench_sections) + "\n")
print("\n" + text)
sys.exit(1 if failed else 0)
PY
}

# ----------------------------------------------------------------------------- main

main() {
    preflight
    OUTDIR=${GPU_CHECK_OUT:-${OUT:-gpu-check-results}}
    mkdir -p "$OUTDIR" || die "cannot create the output folder $OUTDIR"
    OUTDIR=$(cd "$OUTDIR" && pwd)
    LOGDIR="$OUTDIR/logs"
    rm -rf "$LOGDIR" "$OUTDIR/logs.tar.gz" "$OUTDIR"/summary.md "$OUTDIR"/RESULTS.md "$OUTDIR"/bench-*.json "$OUTDIR"/bench-*.md
    mkdir -p "$LOGDIR"
    : > "$LOGDIR/steps.tsv"
    CUDA_BACKEND=0

    say "1. versions"
    local began=$SECONDS
    versions 2>&1 | tee "$LOGDIR/versions.log" | sed 's/^/  /'
    record versions ok $((SECONDS - began)) \
        "$(grep -E '^(device|capability|sms|driver) ' "$LOGDIR/versions.log" | sed -E 's/^[a-z_]+ +//' | paste -sd ',' -)"

    if wanted build; then
        say "2. build the CUDA extension"
        build
    fi
    backend_info

    if wanted tests || wanted optests; then pytest_args; fi
    if wanted tests; then
        say "3. tests: pytest -m cuda"
        tests
    fi
    if wanted optests; then
        if ((CUDA_BACKEND)); then
            say "3. tests: the op suite on the cuda backend"
            optests
        else
            record optests SKIP 0 "the cuda backend is not available (see build, info)"
        fi
    fi

    if wanted sanitizer; then
        if ! command -v compute-sanitizer > /dev/null 2>&1; then
            record sanitizer SKIP 0 "compute-sanitizer is not installed"
        elif ((!CUDA_BACKEND)); then
            record sanitizer SKIP 0 "the cuda backend is not available (see build, info)"
        else
            say "4. compute-sanitizer"
            sanitizer memcheck 120
            sanitizer racecheck 90 --no-check
            sanitizer synccheck 60 --no-check
        fi
    fi

    if wanted bench; then
        BENCH_BACKENDS=()
        local name
        for name in $("$PY" -c 'import fastopt; print(*fastopt.available_backends())' 2> /dev/null); do
            [[ $name == cuda || $name == triton ]] && BENCH_BACKENDS+=("$name")
        done
        ((${#BENCH_BACKENDS[@]})) || BENCH_BACKENDS=(torch)
        say "5. benchmark: torch against fastopt[${BENCH_BACKENDS[*]}]"
        bench fp32 240
        bench bf16 180
    fi

    say "6-7. results and summary"
    finalize
    local rc=$?
    if [[ ! -s $OUTDIR/summary.md ]]; then  # the summary's python failed: the steps as recorded
        echo "gpu-check: the summary could not be made (rc $rc); the steps as recorded:" >&2
        column -t -s $'\t' "$LOGDIR/steps.tsv" 2> /dev/null || cat "$LOGDIR/steps.tsv"
        cp "$LOGDIR/steps.tsv" "$OUTDIR/summary.md"
    fi
    if grep -qE $'\t(FAIL|TIMEOUT)\t' "$LOGDIR/steps.tsv"; then rc=1; fi
    if [[ -n ${OUT:-} && $OUTDIR == "$(cd "$OUT" && pwd)" ]]; then  # the device tool brings back 8 files at most
        tar -czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" logs && rm -rf "$LOGDIR"
    fi
    return "$rc"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
    exit $?
fi
