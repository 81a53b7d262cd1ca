#!/usr/bin/env bash
# `make gpu-check`: what fastopt needs a GPU for, sized for one short GPU slot (15 minutes in all,
# the machine's start included), on a GPU machine where nothing can be downloaded.
#
#   bash scripts/gpu_check.sh [--plan main|extra] [--dry-run]
#
# Two plans, each one command within the device tool's limits:
#   main  (make gpu-check, at most 8 minutes): versions; build the CUDA extension in place for this
#         GPU's arch only; `fastopt info`; the cuda-marked tests; the op suites with
#         FASTOPT_BACKEND=cuda and =triton; compute-sanitizer memcheck over the cuda backend; the fp32
#         benchmark (GPT-like and 5,000-tensor workloads, torch against fastopt's cuda and triton).
#   extra (make gpu-check-extra, optional, when time is left): racecheck and synccheck, memcheck of
#         the triton backend, the bf16 benchmark. It rebuilds only what is missing.
#
# Every step has a time cap, and may also use what the steps before it left unused: step i must
# end by start + the caps of steps 1..i (each plus GRACE, the seconds between SIGINT and SIGKILL),
# so the plan's total bounds the command's wall time whatever happens. pytest and the benchmark
# stop on SIGINT and still write what they have. A failed step does not stop the later ones, except
# where they need what it failed to make. `--dry-run` prints each step with its cap and a last line
# `total: N s`, needs no GPU, and exits 0 (CI runs it, so the plan stays inside its budget).
#
# Output, in $GPU_CHECK_OUT, else $OUT (the device tool's folder), else gpu-check-results/: three
# files, whatever the plan: gpu-check-<plan>.json (versions, every step, test counts and the
# benchmark's results), summary-<plan>.md (what the command printed last), and logs-<plan>.tar.gz
# (every log, junit XML and benchmark table). On the CPU machine, render the JSON into
# bench/RESULTS.md: `python scripts/gpu_results.py render gpu-check-main.json [gpu-check-extra.json]`.
#
# Environment: PYTHON (default python3), GPU_CHECK_PLAN (default main), GPU_CHECK_BENCH_ARGS (more
# `fastopt bench` flags).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
PLAN=${GPU_CHECK_PLAN:-main}
DRY_RUN=0
GRACE=5  # seconds from SIGINT to SIGKILL when a step runs out of time
# The in-place build lives here: a script run from scripts/ (the sanitizer driver) must find it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --plan) PLAN=${2:-}; shift ;;
        --plan=*) PLAN=${1#--plan=} ;;
        -h | --help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# step:cap-in-seconds, in order. main must stay within 480 s, extra within 360 s (CI checks both).
case $PLAN in
    main) STEPS=(versions:15 build:100 info:15 collect:20 tests:55 optests-cuda:55 optests-triton:50 memcheck:50
                 bench-fp32:60 finalize:10) ;;
    extra) STEPS=(versions:15 build:100 info:15 racecheck:55 synccheck:40 memcheck-triton:45 bench-bf16:40 finalize:10) ;;
    *) echo "gpu-check: unknown plan '$PLAN' (main or extra)" >&2; exit 2 ;;
esac

say() { printf 'gpu-check: %s\n' "$*"; }
die() { printf 'gpu-check: %s\n' "$*" >&2; exit 2; }

describe() {  # one line per step, for --dry-run
    case $1 in
        versions) echo "device, driver, torch, triton, nvcc, compute-sanitizer versions" ;;
        build) echo "setup.py build_ext --inplace, this GPU's arch only (no-op when already built)" ;;
        info) echo "python -m fastopt info: the cuda and triton backends must be available" ;;
        collect) echo "leave out test modules that cannot import (a package missing)" ;;
        tests) echo "pytest -m cuda --maxfail=25 tests/ (less the op suites)" ;;
        optests-cuda) echo "FASTOPT_BACKEND=cuda pytest -m cuda --maxfail=25 <op suites>" ;;
        optests-triton) echo "FASTOPT_BACKEND=triton pytest -m cuda --maxfail=25 <op suites>" ;;
        memcheck) echo "compute-sanitizer --tool memcheck scripts/sanitizer_driver.py --backend cuda" ;;
        racecheck) echo "compute-sanitizer --tool racecheck scripts/sanitizer_driver.py --backend cuda" ;;
        synccheck) echo "compute-sanitizer --tool synccheck scripts/sanitizer_driver.py --backend cuda" ;;
        memcheck-triton) echo "compute-sanitizer --tool memcheck scripts/sanitizer_driver.py --backend triton" ;;
        bench-*) echo "python -m fastopt bench --dtypes ${1#bench-}: gpt-like + many-small, torch vs cuda, triton" ;;
        finalize) echo "summary and gpu-check-$PLAN.json (scripts/gpu_results.py summarize), logs tarball" ;;
    esac
}

plan_total() {
    local entry total=0
    for entry in "${STEPS[@]}"; do total=$((total + ${entry#*:} + GRACE)); done
    echo "$total"
}

if ((DRY_RUN)); then
    say "plan '$PLAN' (dry run: nothing is executed); each step: its cap + ${GRACE} s for SIGINT -> SIGKILL"
    for entry in "${STEPS[@]}"; do
        printf '  %-15s %4s s  %s\n' "${entry%%:*}" "$((${entry#*:} + GRACE))" "$(describe "${entry%%:*}")"
    done
    echo "total: $(plan_total) s"
    exit 0
fi

# ----------------------------------------------------------------------------- fail fast without a GPU

preflight() {
    if ! command -v nvidia-smi > /dev/null 2>&1; then
        die "no GPU here: nvidia-smi is not installed. This check runs on the GPU machine; on a CPU machine use \`make test\`, \`make test-triton\`, or \`bash scripts/gpu_check.sh --dry-run\` to see the plan."
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

START=$SECONDS
declare -A DEADLINE=()
elapsed_plan=0
for entry in "${STEPS[@]}"; do
    elapsed_plan=$((elapsed_plan + ${entry#*:} + GRACE))
    DEADLINE[${entry%%:*}]=$((elapsed_plan - GRACE))  # seconds after START by which the step has ended
done

STEP_RC=0 STEP_S=0 LIMIT=0
# timed LOG CMD...: run CMD under timeout with the current step's LIMIT (SIGINT first, so pytest
# and the benchmark report what they have; SIGKILL GRACE s later), output to LOG. STEP_RC: its
# exit status (124: timed out; 125: no time was left to start it), STEP_S: seconds it took.
timed() {
    local log=$1 began
    shift
    if ((LIMIT < 5)); then
        echo "not started: no time left in the plan" > "$log"
        STEP_RC=125 STEP_S=0
        return 0
    fi
    began=$SECONDS
    printf '$ %s\n(time limit %s s)\n' "$*" "$LIMIT" > "$log"
    timeout -s INT -k "$GRACE" "$LIMIT" "$@" >> "$log" 2>&1
    STEP_RC=$?
    STEP_S=$((SECONDS - began))
    return 0
}

# record STEP STATUS SECONDS DETAIL [ARTIFACT]: one line of the summary (the artifact, a junit XML
# or a benchmark JSON in the log folder, is read by gpu_results.py).
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" "${5:-}" >> "$LOGDIR/steps.tsv"
    printf 'gpu-check: %-15s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

status_of() {  # status_of RC: ok / TIMEOUT (cut short) / NOTIME (never started) / FAIL
    case $1 in
        0) echo ok ;;
        124 | 137) echo TIMEOUT ;;
        125) echo NOTIME ;;
        *) echo FAIL ;;
    esac
}

# ----------------------------------------------------------------------------- steps

step_versions() {
    local smi nvcc_version sanitizer_version
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)
    nvcc_version=$(command -v nvcc > /dev/null 2>&1 && nvcc --version 2>&1 | grep -o 'release [0-9.]*, V[0-9.]*' | head -n 1)
    sanitizer_version=$(command -v compute-sanitizer > /dev/null 2>&1 \
        && compute-sanitizer --version 2>&1 | grep -io 'version [0-9.]*' | head -n 1)
    SMI="$smi" NVCC_VERSION="${nvcc_version:-not found}" SANITIZER_VERSION="${sanitizer_version:-not found}" \
        timed "$LOGDIR/versions.log" "$PY" "$ROOT/scripts/gpu_results.py" versions "$LOGDIR/versions.json"
    sed 's/^/  /' "$LOGDIR/versions.log"
    record versions "$(status_of "$STEP_RC")" "$STEP_S" \
        "$(grep -E '^(device|capability|sms|driver|torch|triton) ' "$LOGDIR/versions.log" | sed -E 's/^[a-z_]+ +//' | paste -sd ',' -)"
}

step_build() {
    local arch log="$LOGDIR/build.log" so
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
    # The CPU backend's extension is not what this slot is for (and would add a minute to the build).
    export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTOPT_FORCE_CUDA_BUILD=1 FASTOPT_SKIP_CPU_BUILD=1
    timed "$log" "$PY" setup.py build_ext --inplace
    so=fastopt/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if ((STEP_RC == 0)) && [[ -e $so ]]; then
        record build ok "$STEP_S" "$so (sm $arch, CUDA_HOME=${CUDA_HOME:-?}, MAX_JOBS=$MAX_JOBS)"
    else
        local why
        why=$(grep -E -m 1 'error:|Error|FASTOPT_FORCE_CUDA_BUILD' "$log" | cut -c1-200)
        record build "$(status_of $((STEP_RC == 0 ? 1 : STEP_RC)))" "$STEP_S" \
            "extension not built (rc $STEP_RC): ${why:-see build.log}"
        echo "---- last lines of build.log ----" >&2
        tail -n 25 "$log" >&2
    fi
}

CUDA_BACKEND=0 TRITON_BACKEND=0
step_info() {
    timed "$LOGDIR/info.log" "$PY" -m fastopt info
    local available
    available=$(grep -E '^\s+\S+\s+available' "$LOGDIR/info.log" | awk '{print $1}' | xargs)
    [[ " $available " == *" cuda "* ]] && CUDA_BACKEND=1
    [[ " $available " == *" triton "* ]] && TRITON_BACKEND=1
    if ((CUDA_BACKEND && TRITON_BACKEND)); then
        record info ok "$STEP_S" "backends: $available"
    else
        record info FAIL "$STEP_S" "available: ${available:-none (rc $STEP_RC)}; $(grep -E '^\s+(cuda|triton)\s' "$LOGDIR/info.log" \
            | grep -v available | sed -E 's/^\s+//' | paste -sd ';' -)"
    fi
}

backend_ready() {  # backend_ready NAME: did `fastopt info` list it as available?
    case $1 in
        cuda) ((CUDA_BACKEND)) ;;
        triton) ((TRITON_BACKEND)) ;;
        *) return 1 ;;
    esac
}

PYTEST_ARGS=(-q -p no:cacheprovider -rfE)
step_collect() {  # test modules that cannot import for want of an optional package are left out
    timed "$LOGDIR/collect.log" "$PY" - <<'PY'
import importlib, pathlib, sys
sys.path.insert(0, ".")
for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    try:
        importlib.import_module(f"tests.{path.stem}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("", "fastopt", "tests"):
            print(f"missing\t{path}\t{exc.name}")
    except Exception:  # noqa: BLE001 - pytest reports it
        pass
PY
    "$PY" -c 'import pytest_timeout' 2> /dev/null && PYTEST_ARGS+=(--timeout=120)
    local left_out=() tag file module
    while IFS=$'\t' read -r tag file module; do
        [[ $tag == missing ]] || continue
        PYTEST_ARGS+=("--ignore=$file")
        left_out+=("$file (no $module)")
    done < "$LOGDIR/collect.log"
    record collect "$(status_of "$STEP_RC")" "$STEP_S" \
        "${left_out[*]:+left out, a package missing: }${left_out[*]:-every test module imports}"
}

run_pytest() {  # run_pytest STEP ENV... -- PYTEST-ARGS...
    local step=$1 envs=()
    shift
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    timed "$LOGDIR/$step.log" env "${envs[@]}" "$PY" -m pytest "${PYTEST_ARGS[@]}" --junitxml="$LOGDIR/$step.xml" "$@"
    local status last
    status=$(status_of "$STEP_RC")
    ((STEP_RC == 5)) && status=FAIL  # no tests collected: something is wrong
    last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGDIR/$step.log" | tail -n 1 | tr -d '=' | sed -E 's/^ +| +$//g')
    record "$step" "$status" "$STEP_S" "${last:-rc $STEP_RC, see $step.log}" "$step.xml"
}

# The op-level suites: run with a backend forced (optests-*), left out of the cuda-marked run,
# where their cuda cases would be held to the torch backend's bitwise results.
OPTEST_FILES=()
for f in tests/test_norm_scale.py tests/test_clip.py tests/test_adamw.py tests/test_sgd.py tests/test_lion.py \
    tests/test_optim_adamw.py tests/test_amp.py tests/test_no_sync.py; do
    [[ -e $f ]] && OPTEST_FILES+=("$f")
done

step_tests() {
    local ignores=() f
    for f in "${OPTEST_FILES[@]}"; do ignores+=("--ignore=$f"); done
    run_pytest tests FASTOPT_BACKEND= FASTOPT_TEST_DEVICES=cpu,cuda -- -m cuda --maxfail=25 ${ignores[@]+"${ignores[@]}"} tests
}

step_optests() {  # step_optests BACKEND
    if ! backend_ready "$1"; then
        record "optests-$1" SKIP 0 "the $1 backend is not available (see info)"
        return
    fi
    run_pytest "optests-$1" "FASTOPT_BACKEND=$1" FASTOPT_TEST_DEVICES=cuda -- -m cuda --maxfail=25 "${OPTEST_FILES[@]}"
}

step_sanitizer() {  # step_sanitizer NAME TOOL BACKEND [DRIVER-ARGS...]
    local name=$1 tool=$2 backend=$3 log="$LOGDIR/$1.log"
    shift 3
    if ! command -v compute-sanitizer > /dev/null 2>&1; then
        record "$name" SKIP 0 "compute-sanitizer is not installed"
        return
    fi
    if ! backend_ready "$backend"; then
        record "$name" SKIP 0 "the $backend backend is not available (see info)"
        return
    fi
    timed "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        --print-limit 100 "$PY" "$ROOT/scripts/sanitizer_driver.py" --backend "$backend" "$@"
    local summary driver
    if grep -q 'Device not supported' "$log"; then  # seen on gVisor machines: not fastopt's finding
        record "$name" SKIP "$STEP_S" "compute-sanitizer refuses this device ('Device not supported'; a gVisor runtime?)"
        return
    fi
    summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | sed -E 's/^=+ *//' | paste -sd ';' -)
    driver=$(grep -E '^sanitizer_driver: [0-9]+ cases' "$log" | sed -E 's/^sanitizer_driver: //')
    record "$name" "$(status_of "$STEP_RC")" "$STEP_S" "${summary:-no summary line (rc $STEP_RC)}; driver: ${driver:-did not finish}"
}

step_bench() {  # step_bench DTYPE
    local dtype=$1 step="bench-$1" dir="$LOGDIR/bench-$1" extra=() backends=()
    ((CUDA_BACKEND)) && backends+=(cuda)
    ((TRITON_BACKEND)) && backends+=(triton)
    ((${#backends[@]})) || backends=(torch)
    read -r -a extra <<< "${GPU_CHECK_BENCH_ARGS:-}"
    timed "$LOGDIR/$step.log" "$PY" -m fastopt bench --device cuda --workloads gpt-like many-small --dtypes "$dtype" \
        --ops multi_tensor_norm clip_grad_norm_ "adamw step" "clip + adamw step" "AMP step" \
        --backends "${backends[@]}" --no-peers --no-graphs --quiet --out "$dir" ${extra[@]+"${extra[@]}"}
    local json="" f
    for f in "$dir"/bench-*.json; do json=$f; done  # one run per folder
    if [[ -n $json ]]; then
        cp "$json" "$LOGDIR/$step.json"
        record "$step" "$(status_of "$STEP_RC")" "$STEP_S" "rows in $step.json" "$step.json"
    else
        record "$step" "$(status_of "$STEP_RC")" "$STEP_S" \
            "no results written (rc $STEP_RC): $(tail -n 1 "$LOGDIR/$step.log" | cut -c1-160)"
    fi
}

step_finalize() {
    timed "$LOGDIR/finalize.log" "$PY" "$ROOT/scripts/gpu_results.py" summarize --plan "$PLAN" --logs "$LOGDIR" \
        --out "$OUTDIR" --seconds $((SECONDS - START)) --budget "$(plan_total)"
    cat "$LOGDIR/finalize.log" | sed 1,2d
    if [[ ! -s $OUTDIR/summary-$PLAN.md ]]; then  # the summary's python failed: the steps as recorded
        echo "gpu-check: the summary could not be made (rc $STEP_RC); the steps as recorded:" >&2
        column -t -s $'\t' "$LOGDIR/steps.tsv" 2> /dev/null || cat "$LOGDIR/steps.tsv"
        cp "$LOGDIR/steps.tsv" "$OUTDIR/summary-$PLAN.md"
    fi
}

run_step() {  # run_step NAME: the step with its share of the plan's time
    LIMIT=$((DEADLINE[$1] - (SECONDS - START)))
    case $1 in
        versions) say "versions"; step_versions ;;
        build) say "build the CUDA extension"; step_build ;;
        info) step_info ;;
        collect) step_collect ;;
        tests) say "pytest -m cuda"; step_tests ;;
        optests-cuda) say "op suites on the cuda backend"; step_optests cuda ;;
        optests-triton) say "op suites on the triton backend"; step_optests triton ;;
        memcheck) say "compute-sanitizer memcheck"; step_sanitizer memcheck memcheck cuda ;;
        racecheck) say "compute-sanitizer racecheck"; step_sanitizer racecheck racecheck cuda --no-check ;;
        synccheck) say "compute-sanitizer synccheck"; step_sanitizer synccheck synccheck cuda --no-check ;;
        memcheck-triton) say "compute-sanitizer memcheck, triton"; step_sanitizer memcheck-triton memcheck triton ;;
        bench-*) say "benchmark ${1#bench-}"; step_bench "${1#bench-}" ;;
        finalize) step_finalize ;;
    esac
}

main() {
    preflight
    OUTDIR=${GPU_CHECK_OUT:-${OUT:-gpu-check-results}}
    mkdir -p "$OUTDIR" || die "cannot create the output folder $OUTDIR"
    OUTDIR=$(cd "$OUTDIR" && pwd)
    LOGDIR="$OUTDIR/logs-$PLAN"
    rm -rf "$LOGDIR" "$OUTDIR/logs-$PLAN.tar.gz" "$OUTDIR/summary-$PLAN.md" "$OUTDIR/gpu-check-$PLAN.json"
    mkdir -p "$LOGDIR"
    : > "$LOGDIR/steps.tsv"
    say "plan '$PLAN', at most $(plan_total) s; output in $OUTDIR"
    local entry
    for entry in "${STEPS[@]}"; do run_step "${entry%%:*}"; done
    # Three files come back, whatever happened: the JSON, the summary, and the logs.
    tar -czf "$OUTDIR/logs-$PLAN.tar.gz" -C "$OUTDIR" "logs-$PLAN" && rm -rf "$LOGDIR"
    ! grep -qE $'\t(FAIL|TIMEOUT)\t' <(tar -xzOf "$OUTDIR/logs-$PLAN.tar.gz" "logs-$PLAN/steps.tsv" 2> /dev/null)
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # sourced (to try a step by hand): define only
    main
fi
