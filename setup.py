"""Build script: the pure-Python package always; the CUDA extension fastopt._C when it can.

The extension is built when csrc/ has kernel sources, torch is importable in the build
environment and is a CUDA build, and a CUDA toolkit is found. Otherwise the package installs
without it (every op still runs on the Triton or torch backend) and says why in one line.

Environment: FASTOPT_SKIP_CUDA_BUILD=1 never builds it; FASTOPT_FORCE_CUDA_BUILD=1 fails the
install instead of skipping. pip shows the line with -v (the Makefile prints it).
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension_skip_reason():
    if os.environ.get("FASTOPT_SKIP_CUDA_BUILD") == "1":
        return "FASTOPT_SKIP_CUDA_BUILD=1"
    if not glob.glob(os.path.join(HERE, "csrc", "*.cu")):
        return "this version has no CUDA kernel sources in csrc/"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable in the build environment (pip install --no-build-isolation builds against yours)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    return None


def cuda_extension_kwargs():
    reason = cuda_extension_skip_reason()
    if reason is not None:
        if os.environ.get("FASTOPT_FORCE_CUDA_BUILD") == "1":
            sys.exit(f"fastopt: FASTOPT_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}")
        print(f"fastopt: CUDA extension skipped: {reason}; installing the pure-Python package", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    import torch

    # Ampere (A100) and Hopper (H100 / H200) unless the builder says otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    print(
        f"fastopt: building the CUDA extension for sm {os.environ['TORCH_CUDA_ARCH_LIST']} against torch"
        f" {torch.__version__}",
        file=sys.stderr,
    )
    write_build_info(torch.__version__, torch.version.cuda)
    # -lineinfo: compute-sanitizer and ncu name source lines; it does not change the code.
    extension = CUDAExtension(
        "fastopt._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def write_build_info(torch_version, cuda_version):
    """fastopt/_build_info.py: the torch the extension is built against, so that fastopt can
    refuse (and say why) an extension that a later torch upgrade made incompatible, instead of
    loading it."""
    with open(os.path.join(HERE, "fastopt", "_build_info.py"), "w") as out:
        out.write(
            '"""Written by setup.py when it builds fastopt._C: what the extension was built against."""\n\n'
            f"TORCH_VERSION = {torch_version!r}\nCUDA_VERSION = {cuda_version!r}\n"
        )


setup(**cuda_extension_kwargs())
