"""Build fastopt._C_emulated: the CUDA backend (csrc/cuda/, unchanged) compiled with the system C++
compiler against the host emulation of the device (csrc/emulation), for CPU tensors.

    python csrc/emulation/build.py [--csrc DIR] [--sanitize thread|address] [--out PATH]

Needs torch (any build, CPU-only included), a C++20 compiler, ninja, and the CUDA headers of a CUDA
toolkit (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, libcu++; found through CUDA_HOME or
/usr/local/cuda) at build time only: nothing of CUDA is linked or needed at run time. Writes
fastopt/_C_emulated.so (imported when FASTOPT_CUDA_EMULATION=1) and prints its path; exits 3, with
the reason, when something it needs is missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = ["ops_emulated.cpp", "kernels_norm.cpp", "kernels_agc.cpp", "kernels_elementwise.cpp",
           "kernels_adamw.cpp", "kernels_updates.cpp", "runtime.cpp"]


def cuda_include_dirs() -> list[str] | str:
    """The CUDA toolkit's include folders (runtime headers, then CCCL's), or why they are missing."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, candidates):
        include = os.path.join(home, "include")
        if os.path.exists(os.path.join(include, "cuda_runtime.h")):
            cccl = os.path.join(include, "cccl")
            if not os.path.exists(os.path.join(cccl, "cuda", "atomic")) and not os.path.exists(
                os.path.join(include, "cuda", "atomic")
            ):
                return f"{include} has no libcu++ (cuda/atomic)"
            return [include] + ([cccl] if os.path.isdir(cccl) else [])
    return "no CUDA headers found (set CUDA_HOME; only the headers are needed, at build time)"


def skip_reason() -> str | None:
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError:
        return "torch is not importable"
    includes = cuda_include_dirs()
    if isinstance(includes, str):
        return includes
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        return "no C++ compiler (set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csrc", default=os.path.join(ROOT, "csrc"), help="the kernel sources (default: csrc/)")
    parser.add_argument("--sanitize", choices=["thread", "address"], help="a ThreadSanitizer / AddressSanitizer build")
    parser.add_argument("--out", default=os.path.join(ROOT, "fastopt", "_C_emulated.so"))
    parser.add_argument("--build-dir", default=os.path.join(ROOT, "build", "emulated"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    reason = skip_reason()
    if reason is not None:
        print(f"fastopt: the emulated CUDA extension cannot be built: {reason}", file=sys.stderr)
        return 3

    from torch.utils.cpp_extension import load

    # -mtls-dialect=gnu2: TLS descriptors, so that threadIdx (a thread_local read) and __shared__
    # (thread_local storage) cost no __tls_get_addr call in a shared library (x86-64).
    # -O3, as setup.py compiles the real extension's host code (bench/host_overhead.py times it here).
    flags = ["-std=c++20", "-O3", "-g0", "-Wno-unknown-pragmas", "-fno-strict-aliasing"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mtls-dialect=gnu2")
    link = []
    build_dir = args.build_dir
    if args.sanitize:
        flags += [f"-fsanitize={args.sanitize}", "-O1", "-g", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={args.sanitize}"]
        if args.sanitize == "thread":
            flags.append("-Wno-tsan")
        build_dir += "-" + args.sanitize
    os.makedirs(build_dir, exist_ok=True)
    includes = [os.path.join(HERE, "include"), HERE, os.path.abspath(args.csrc)] + cuda_include_dirs()
    os.environ.setdefault("MAX_JOBS", "2")
    load(
        name="_C_emulated",
        sources=[os.path.join(HERE, s) for s in SOURCES],
        extra_include_paths=includes,
        extra_cflags=flags,
        extra_ldflags=link + ["-lpthread"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=args.verbose,
    )
    built = os.path.join(build_dir, "_C_emulated.so")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    shutil.copyfile(built, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
