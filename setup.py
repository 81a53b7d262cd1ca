"""Build script: the pure-Python package always; the CUDA extension fastopt._C and the CPU
extension fastopt._cpu_torch<release> when it can.

The CUDA extension is built when csrc/cuda/ has kernel sources, torch is importable in the build
environment and is a CUDA build, and a CUDA toolkit is found. The CPU extension (csrc/cpu/, the
``cpu`` backend) is built when torch is importable in the build environment and a C++ compiler is
found. Otherwise the package installs without them (every op still runs on the Triton or torch
backend) and says why, one line per extension.

Environment: FASTOPT_SKIP_CUDA_BUILD=1 / FASTOPT_SKIP_CPU_BUILD=1 never build one;
FASTOPT_FORCE_CUDA_BUILD=1 / FASTOPT_FORCE_CPU_BUILD=1 fail the install instead of skipping.
pip shows the lines with -v (the Makefile prints them).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension_skip_reason():
    if os.environ.get("FASTOPT_SKIP_CUDA_BUILD") == "1":
        return "FASTOPT_SKIP_CUDA_BUILD=1"
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        return "this version has no CUDA kernel sources in csrc/cuda/"
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
    cuda = os.path.join("csrc", "cuda")
    sources = sorted(glob.glob(os.path.join(cuda, "*.cu")) + glob.glob(os.path.join(cuda, "*.cpp")))
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


def cpu_extension_skip_reason():
    if os.environ.get("FASTOPT_SKIP_CPU_BUILD") == "1":
        return "FASTOPT_SKIP_CPU_BUILD=1"
    if not glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")):
        return "this version has no CPU sources in csrc/cpu/"
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CppExtension  # noqa: F401
    except ImportError:
        return "torch is not importable in the build environment (pip install --no-build-isolation builds against yours)"
    compiler = os.environ.get("CXX", "c++")
    if sys.platform != "win32" and shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler found ({compiler!r}; set CXX)"
    return None


def cpu_extension():
    """fastopt._cpu_torch<release> (csrc/cpu/): the loops are compiled per ISA inside the one module (GCC
    target_clones), so no -march is passed: the build machine's ISA is assumed nowhere."""
    reason = cpu_extension_skip_reason()
    if reason is not None:
        if os.environ.get("FASTOPT_FORCE_CPU_BUILD") == "1":
            sys.exit(f"fastopt: FASTOPT_FORCE_CPU_BUILD=1 but the CPU extension cannot be built: {reason}")
        print(f"fastopt: CPU extension skipped: {reason}; the cpu backend is unavailable", file=sys.stderr)
        return None
    import torch
    from torch.utils.cpp_extension import CppExtension

    print(f"fastopt: building the CPU extension against torch {torch.__version__}", file=sys.stderr)
    if sys.platform == "win32":
        compile_args, link_args = ["/O2"], []
    else:
        # -fno-math-errno: sqrt stays an instruction (the loops vectorise); -ffp-contract=off: the
        # rounding is what the code says (torch's fused steps are written out with std::fma).
        compile_args, link_args = ["-O3", "-fno-math-errno", "-ffp-contract=off"], []
        if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
            compile_args.append("-fopenmp")  # at::parallel_for is inline OpenMP code in torch's headers
            link_args.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # Named after the torch release it is built against (fastopt._cpu_torch2_13): venvs with other
    # torch releases that share a source tree (an editable install builds in place) each keep
    # their own, and a torch upgrade finds none rather than one with another C++ ABI.
    release = "_".join(torch.__version__.split("+")[0].split(".")[:2])
    return CppExtension(
        f"fastopt._cpu_torch{release}",
        sources,
        define_macros=[("FASTOPT_TORCH_VERSION", f'"{torch.__version__}"')],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


def extension_kwargs():
    kwargs = cuda_extension_kwargs()
    cpu = cpu_extension()
    if cpu is not None:
        from torch.utils.cpp_extension import BuildExtension

        kwargs = {"ext_modules": kwargs.get("ext_modules", []) + [cpu], "cmdclass": {"build_ext": BuildExtension}}
    return kwargs


def write_build_info(torch_version, cuda_version):
    """fastopt/_build_info.py: the torch the extension is built against, so that fastopt can
    refuse (and say why) an extension that a later torch upgrade made incompatible, instead of
    loading it."""
    with open(os.path.join(HERE, "fastopt", "_build_info.py"), "w") as out:
        out.write(
            '"""Written by setup.py when it builds fastopt._C: what the extension was built against."""\n\n'
            f"TORCH_VERSION = {torch_version!r}\nCUDA_VERSION = {cuda_version!r}\n"
        )


setup(**extension_kwargs())
