#!/usr/bin/env bash
# The emulation's C++ checks (make test-cuda-emulated runs them before the Python lane):
#   1. test_runtime: the runtime's own tests (barriers, shuffles, votes, last-block fold, CUB
#      stand-ins, per-block shared memory, launch failures), optimised build;
#   2. test_runtime and kernel_driver (every launcher of csrc/cuda/*.cu over chunk boundaries,
#      misaligned starts, several blocks) under ThreadSanitizer: no report may appear, and the
#      planted races of test_runtime (a missing barrier, a missing fence) must each be reported;
#   3. kernel_driver under AddressSanitizer (+UBSan): every tensor ends where its allocation ends,
#      so an access one element past a chunk's end is reported.
# Usage: run_checks.sh [--csrc DIR] [--out DIR] [--only plain|thread|address]   (g++ with C++20, CUDA headers)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CSRC="$ROOT/csrc"
ONLY=""
OUT="$ROOT/build/emulation-checks"
while [ $# -gt 0 ]; do
  case "$1" in
    --csrc) CSRC="$(cd "$2" && pwd)"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    *) echo "usage: $0 [--csrc DIR] [--out DIR] [--only plain|thread|address]" >&2; exit 2 ;;
  esac
done
CXX="${CXX:-g++}"
CUDA_INCLUDE="${CUDA_HOME:-/usr/local/cuda}/include"
if [ ! -f "$CUDA_INCLUDE/cuda_runtime.h" ]; then
  echo "run_checks.sh: no CUDA headers in $CUDA_INCLUDE (set CUDA_HOME; headers only, at build time)" >&2
  exit 3
fi
INCLUDES=(-I"$HERE/include" -I"$HERE" -I"$CSRC" -I"$CUDA_INCLUDE" -I"$CUDA_INCLUDE/cccl")
COMMON=(-std=c++20 -Wno-unknown-pragmas -fno-strict-aliasing)
JOBS="${MAX_JOBS:-2}"

# build VARIANT all|runtime FLAGS...: test_runtime, and with `all` kernel_driver (the five kernel files).
build() {
  local variant="$1" what="$2"
  shift 2
  local dir="$OUT/$variant"
  mkdir -p "$dir"
  local -a flags=("${COMMON[@]}" "$@")
  local -a sources=(runtime.cpp tests/test_runtime.cu)
  [ "$what" = all ] && sources+=(kernels_norm.cpp kernels_agc.cpp kernels_elementwise.cpp kernels_adamw.cpp kernels_updates.cpp tests/kernel_driver.cpp)
  printf '%s\n' "${sources[@]}" |
    xargs -P "$JOBS" -I{} bash -c '
      src="$1"; shift; dir="$1"; shift
      obj="$dir/$(basename "${src%.*}").o"
      # Up to date when newer than every source it may include.
      if [ -f "$obj" ] && [ -z "$(find "'"$HERE"'" "'"$CSRC"'" -maxdepth 3 -newer "$obj" \( -name "*.cu" -o -name "*.cuh" -o -name "*.h" -o -name "*.cpp" \) -print -quit)" ]; then exit 0; fi
      extra=()
      case "$src" in *.cu) extra=(-x c++ -include "'"$HERE"'/cuda_emulation.h") ;; esac
      "'"$CXX"'" "$@" "${extra[@]}" -c "'"$HERE"'/$src" -o "$obj"
    ' _ {} "$dir" "${flags[@]}" "${INCLUDES[@]}"
  "$CXX" "${flags[@]}" "$dir/test_runtime.o" "$dir/runtime.o" -lpthread -o "$dir/test_runtime"
  if [ "$what" = all ]; then
    "$CXX" "${flags[@]}" "$dir/kernel_driver.o" "$dir/runtime.o" "$dir"/kernels_*.o -lpthread -o "$dir/kernel_driver"
  fi
}

export FASTOPT_EMULATION_QUIET=1
status=0
start=$SECONDS

if [ -z "$ONLY" ] || [ "$ONLY" = plain ]; then
  # (the kernels' plain build is fastopt._C_emulated, which the Python lane runs)
  echo "== emulation: the runtime's tests"
  build plain runtime -O2
  "$OUT/plain/test_runtime" || status=1
fi

if [ -z "$ONLY" ] || [ "$ONLY" = thread ]; then
  echo "== emulation: ThreadSanitizer"
  build thread all -O1 -g -fsanitize=thread -Wno-tsan
  export TSAN_OPTIONS="halt_on_error=0 exitcode=66 report_signal_unsafe=0"
  for t in block_sum warp_xor votes last_block cub shared_per_block failures; do
    "$OUT/thread/test_runtime" "$t" > "$OUT/thread/$t.log" 2>&1 || { echo "TSan: test_runtime $t failed:"; tail -n 40 "$OUT/thread/$t.log"; status=1; }
  done
  FASTOPT_EMULATION_SMS=2 "$OUT/thread/kernel_driver" --quick > "$OUT/thread/kernel_driver.log" 2>&1 ||
    { echo "TSan: kernel_driver failed:"; grep -m 60 -A 20 "WARNING\|FAILED" "$OUT/thread/kernel_driver.log" | head -n 80; status=1; }
  for t in race-shared race-missing-fence; do  # planted races: TSan must report each
    if "$OUT/thread/test_runtime" "$t" > "$OUT/thread/$t.log" 2>&1 || ! grep -q "ThreadSanitizer: data race" "$OUT/thread/$t.log"; then
      echo "TSan did not report the planted race $t"; status=1
    else
      echo "planted race $t: reported by TSan"
    fi
  done
  unset TSAN_OPTIONS
fi

if [ -z "$ONLY" ] || [ "$ONLY" = address ]; then
  echo "== emulation: AddressSanitizer + UBSan"
  build address all -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
  ASAN_OPTIONS="detect_leaks=0" "$OUT/address/kernel_driver" > "$OUT/address/kernel_driver.log" 2>&1 ||
    { echo "ASan: kernel_driver failed:"; grep -m 5 -A 30 "ERROR\|FAILED\|runtime error" "$OUT/address/kernel_driver.log" | head -n 60; status=1; }
fi

echo "== emulation checks: $([ $status = 0 ] && echo ok || echo FAILED) in $((SECONDS - start)) s"
exit $status
