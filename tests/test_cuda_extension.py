"""The CUDA extension as far as a machine without a GPU can check it.

With ``fastopt._C`` built (``make test-cuda-build`` compiles it against torch's CUDA build with
the local nvcc): every op's schema is registered exactly as documented, with the alias
annotations of what it writes, and ``torch.library.opcheck`` passes on meta tensors (schema,
fake implementations, autograd registration, AOT dispatch). In every run: a missing or
incompatible extension leaves the cuda backend unavailable with a reason, and never breaks
``import fastopt``. The kernels themselves run in tests/test_cuda_backend.py, on a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import pytest
import torch

import fastopt
from fastopt.backends import cuda

BUILT = importlib.util.find_spec("fastopt._C") is not None and cuda.LOAD_ERROR is None
needs_extension = pytest.mark.skipif(not BUILT, reason=f"fastopt._C is not usable here: {cuda.LOAD_ERROR}")

# What docs/design.md and csrc/cuda/registration.cpp promise: written lists and tensors carry (x!), nothing written
# is returned.
SCHEMAS = {
    "multi_tensor_norm": "fastopt::multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor,"
    " Tensor(a!)? found_inf) -> (Tensor, Tensor)",
    "unscale_and_check_": "fastopt::unscale_and_check_(Tensor(a!)[] tensors, float inv_scale, Tensor? inv_scale_tensor,"
    " Tensor(b!) found_inf, float? norm_type=None, bool per_tensor=False) -> (Tensor, Tensor)",
    "scale_": "fastopt::scale_(Tensor(a!)[] tensors, float coef, Tensor? coef_tensor) -> ()",
    "clamp_": "fastopt::clamp_(Tensor(a!)[] tensors, float clip_value) -> ()",
    "adaptive_clip_": "fastopt::adaptive_clip_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps,"
    " float norm_type, bool unitwise) -> ()",
    "adamw_": "fastopt::adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
    " Tensor(d!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay,"
    " bool maximize, Tensor(e!)[] max_exp_avg_sqs, float grad_scale, Tensor? grad_scale_tensor,"
    " Tensor? found_inf, float clip_coef, Tensor? clip_coef_tensor, bool decoupled_weight_decay=True) -> ()",
    "sgd_": "fastopt::sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr,"
    " Tensor? lr_tensor, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
    " bool first_step, float grad_scale, Tensor? grad_scale_tensor, Tensor? found_inf, float clip_coef,"
    " Tensor? clip_coef_tensor) -> ()",
    "lion_": "fastopt::lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, Tensor? lr_tensor,"
    " float beta1, float beta2, float weight_decay, bool maximize, float grad_scale, Tensor? grad_scale_tensor,"
    " Tensor? found_inf, float clip_coef, Tensor? clip_coef_tensor) -> ()",
}

SHAPES = [(3, 4), (5,), (), (0,), (2, 3, 3, 3)]


def meta(shapes=SHAPES, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=dtype, device="meta") for shape in shapes]


def meta_scalar() -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device="meta")


def adamw_args(param_dtype, grad_dtype, state_dtype, *, amsgrad, tensors_for_scalars):
    scalar = meta_scalar if tensors_for_scalars else (lambda: None)
    return (
        meta(dtype=param_dtype), meta(dtype=grad_dtype), meta(dtype=state_dtype), meta(dtype=state_dtype),
        [meta_scalar() for _ in SHAPES], 1e-3, scalar(), 0.9, 0.999, 1e-8, 0.01, False,
        meta(dtype=state_dtype) if amsgrad else [], 1.0, scalar(), scalar(), 1.0, scalar(),
    )  # fmt: skip


def sgd_args(param_dtype, grad_dtype, buffer_dtype, *, momentum, first_step, tensors_for_scalars):
    scalar = meta_scalar if tensors_for_scalars else (lambda: None)
    return (
        meta(dtype=param_dtype), meta(dtype=grad_dtype), meta(dtype=buffer_dtype) if momentum else [], 1e-3, scalar(),
        0.9 if momentum else 0.0, 0.0, 0.01, momentum, False, first_step, 1.0, scalar(), scalar(), 1.0, scalar(),
    )  # fmt: skip


def lion_args(param_dtype, grad_dtype, state_dtype, *, tensors_for_scalars):
    scalar = meta_scalar if tensors_for_scalars else (lambda: None)
    return (
        meta(dtype=param_dtype), meta(dtype=grad_dtype), meta(dtype=state_dtype), 1e-4, scalar(), 0.9, 0.99, 0.1,
        True, 1.0, scalar(), scalar(), 1.0, scalar(),
    )  # fmt: skip


OPCHECK_CASES = {
    "norm": ("multi_tensor_norm", (meta(), 2.0, False, None), {}),
    "norm-per-tensor-found-inf": ("multi_tensor_norm", (meta(dtype=torch.bfloat16), float("inf"), True, meta_scalar()), {}),
    "unscale": ("unscale_and_check_", (meta(dtype=torch.float16), 0.5, None, meta_scalar()), {}),
    "unscale-tensor-scale-with-norm": (
        "unscale_and_check_", (meta(), 0.0, meta_scalar(), meta_scalar()), {"norm_type": 2.0, "per_tensor": True},
    ),
    "scale": ("scale_", (meta(), 0.5, None), {}),
    "scale-tensor-coef": ("scale_", (meta(dtype=torch.bfloat16), 0.0, meta_scalar()), {}),
    "clamp": ("clamp_", (meta(), 0.25), {}),
    "agc-unitwise": ("adaptive_clip_", (meta(), meta(), 0.01, 1e-3, 2.0, True), {}),
    "agc-whole": ("adaptive_clip_", (meta(), meta(dtype=torch.bfloat16), 0.01, 1e-3, 1.0, False), {}),
    "adamw-fp32": ("adamw_", adamw_args(torch.float32, torch.float32, torch.float32, amsgrad=False, tensors_for_scalars=False), {}),
    "adamw-bf16-fp32-states-amsgrad-device-scalars": (
        "adamw_", adamw_args(torch.bfloat16, torch.bfloat16, torch.float32, amsgrad=True, tensors_for_scalars=True), {},
    ),
    "adam-l2": (
        "adamw_", adamw_args(torch.float32, torch.float32, torch.float32, amsgrad=False, tensors_for_scalars=False),
        {"decoupled_weight_decay": False},
    ),
    "sgd-fp32": (
        "sgd_", sgd_args(torch.float32, torch.float32, None, momentum=False, first_step=False, tensors_for_scalars=False),
        {},
    ),
    "sgd-bf16-fp32-buffers-nesterov-first-step-device-scalars": (
        "sgd_", sgd_args(torch.bfloat16, torch.bfloat16, torch.float32, momentum=True, first_step=True,
                         tensors_for_scalars=True), {},
    ),
    "lion-fp32": ("lion_", lion_args(torch.float32, torch.float32, torch.float32, tensors_for_scalars=False), {}),
    "lion-fp16-fp32-grads-device-scalars": (
        "lion_", lion_args(torch.float16, torch.float32, torch.float16, tensors_for_scalars=True), {},
    ),
}


@needs_extension
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_registered_as_documented(name):
    assert str(getattr(torch.ops.fastopt, name).default._schema) == SCHEMAS[name]


@needs_extension
def test_every_op_has_a_cuda_kernel_and_a_fake():
    for name in SCHEMAS:
        qualified = f"fastopt::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"), name


@needs_extension
@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck_on_meta_tensors(case):
    name, args, kwargs = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(torch.ops.fastopt, name).default, args, kwargs)


@needs_extension
def test_fake_outputs_have_the_documented_shapes():
    total, norms = torch.ops.fastopt.multi_tensor_norm(meta(), 2.0, True, None)
    assert (total.shape, total.dtype, norms.shape, norms.dtype) == ((), torch.float32, (len(SHAPES),), torch.float32)
    total, norms = torch.ops.fastopt.multi_tensor_norm(meta(dtype=torch.float16), 3.0, False, None)
    assert (total.shape, norms.shape) == ((), (0,))
    total, norms = torch.ops.fastopt.unscale_and_check_(meta(), 0.5, None, meta_scalar())
    assert (total.shape, norms.shape) == ((0,), (0,))
    total, norms = torch.ops.fastopt.unscale_and_check_(meta(), 0.5, None, meta_scalar(), norm_type=2.0, per_tensor=True)
    assert (total.shape, norms.shape, norms.dtype) == ((), (len(SHAPES),), torch.float32)


@needs_extension
def test_cpu_tensors_are_refused_by_the_dispatcher():
    with pytest.raises(NotImplementedError, match="fastopt::scale_"):
        torch.ops.fastopt.scale_([torch.ones(3)], 2.0, None)


def test_extension_built_for_another_torch_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastopt._build_info", types.SimpleNamespace(TORCH_VERSION="2.9.0+cu126"))
    reason = cuda._load_extension()
    assert f"built against torch 2.9.0+cu126 but torch {torch.__version__} is running" in reason
    assert "rebuild" in reason


def test_missing_extension_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "fastopt._C", raising=False)
    monkeypatch.setitem(sys.modules, "fastopt._build_info", None)  # import of it fails
    real_import = cuda.importlib.import_module

    def no_extension(name, *args):
        if name == "fastopt._C":
            raise ModuleNotFoundError("No module named 'fastopt._C'", name="fastopt._C")
        return real_import(name, *args)

    monkeypatch.setattr(cuda.importlib, "import_module", no_extension)
    assert cuda._load_extension() == "the CUDA extension fastopt._C is not built (see csrc/README.md)"


def test_a_broken_extension_is_logged_and_the_ops_fall_back(monkeypatch, caplog):
    def broken(name, *args):
        raise ImportError("undefined symbol: _ZN3c104cuda9SomethingEv", name=None)

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="fastopt"):
        patch.setitem(sys.modules, "fastopt._build_info", None)
        patch.setattr(cuda.importlib, "import_module", broken)  # importlib's own: undone before the op runs
        reason = cuda._load_extension()
    assert reason.startswith("fastopt._C failed to load: undefined symbol")
    assert reason in caplog.text and "using Triton or torch instead" in caplog.text
    monkeypatch.setattr(cuda, "LOAD_ERROR", reason)
    assert cuda.unavailable_reason() == reason
    grads = [torch.randn(4, 3), torch.randn(5)]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(fastopt.multi_tensor_norm(grads), expected)


def test_python_knows_which_combinations_the_update_kernels_build():
    """Under torch.compile the fallback is decided in Python (fastopt.backends.cuda.UPDATE_BUILDS), so that
    set must be exactly the kernels' list of compiled combinations (AdamW, SGD and Lion share it)."""
    import pathlib
    import re

    csrc = pathlib.Path(__file__).parents[1] / "csrc" / "cuda"
    source = (csrc / "multi_tensor.cuh").read_text()
    listing = source[source.index("#define FASTOPT_UPDATE_COMBINATIONS(CASE)") :].split("\n\n")[0]
    codes = {"kFloat64": torch.float64, "kFloat32": torch.float32, "kBFloat16": torch.bfloat16, "kFloat16": torch.float16}
    cases = re.findall(r"CASE\((k\w+), (k\w+), (k\w+),", listing)
    assert len(cases) >= 4
    assert {tuple(codes[c] for c in case) for case in cases} == cuda.UPDATE_BUILDS
    for kernel in ("adamw.cu", "updates.cu"):  # every launcher table is that list
        assert "FASTOPT_UPDATE_COMBINATIONS(" in (csrc / kernel).read_text(), kernel


# --------------------------------------------------------------------------- the built kernels' SASS (sm_90)
# Read from the built extension with cuobjdump (the CUDA toolkit's, or the one that the pip
# packages nvidia-cuda-cuobjdump / triton carry); skipped when neither it nor the build is here.


def _tool_candidates(tool: str) -> list[str]:
    """Executables named ``tool``: on PATH, in the CUDA toolkit, in pip packages (nvidia-*, triton)."""
    import os
    import pathlib
    import shutil

    candidates = [shutil.which(tool)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(pathlib.Path(home) / "bin" / tool))
    for package, folder in (("nvidia", "cu13/bin"), ("nvidia", "cuda_cuobjdump/bin"), ("nvidia", "cuda_nvdisasm/bin"),
                            ("triton", "backends/nvidia/bin")):  # fmt: skip
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(str(pathlib.Path(location) / folder / tool))
    found = []
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK) and c not in found:
            found.append(c)
    return found


def _built_library() -> str | None:
    spec = importlib.util.find_spec("fastopt._C")
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".so") else None


CUOBJDUMPS, LIBRARY = _tool_candidates("cuobjdump"), _built_library()
needs_cuobjdump = pytest.mark.skipif(
    not CUOBJDUMPS or LIBRARY is None, reason=f"needs cuobjdump ({CUOBJDUMPS}) and the built extension ({LIBRARY})"
)


def _cuobjdump_output(option: str) -> str:
    """cuobjdump's output for the sm_90 code of the built extension, from the first cuobjdump that
    gives one (--dump-sass also needs an nvdisasm: NVDISASM_PATH points at one found beside)."""
    import os
    import subprocess

    nvdisasms = _tool_candidates("nvdisasm")
    environment = dict(os.environ)
    if nvdisasms and "NVDISASM_PATH" not in environment:
        environment["NVDISASM_PATH"] = os.path.dirname(nvdisasms[0])
    errors = []
    for cuobjdump in CUOBJDUMPS:
        result = subprocess.run([cuobjdump, option, "-arch", "sm_90", LIBRARY], capture_output=True, text=True,
                                timeout=300, env=environment)  # fmt: skip
        if result.returncode == 0 and "Function" in result.stdout:
            return result.stdout
        errors.append(f"{cuobjdump}: {result.stderr.strip()[:200]}")
    pytest.skip(f"no cuobjdump could read the sm_90 code of {LIBRARY}: {errors}")


@pytest.fixture(scope="module")
def sass() -> dict[str, str]:
    """Kernel (mangled name) -> its sm_90 SASS."""
    import re

    functions, name = {}, None
    for line in _cuobjdump_output("--dump-sass").splitlines():
        found = re.search(r"Function : (\S+)", line)
        if found:
            name = found.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, int]]:
    """Kernel (mangled name) -> {"REG": ..., "STACK": ..., "LOCAL": ..., "SHARED": ...} on sm_90."""
    import re

    usage, name = {}, None
    for line in _cuobjdump_output("--dump-resource-usage").splitlines():
        found = re.search(r"Function (\S+):", line)
        if found:
            name = found.group(1)
        elif name is not None and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
    return usage


# Kernels whose tensor accesses must be global-memory instructions: AdamW, SGD and Lion (the
# update kernel) and both norm passes (every instantiation), named by what their mangled names contain.
GLOBAL_ONLY_KERNELS = ("adamw_kernel", "update_kernel", "norm_partials_kernel", "norm_finish_kernel")
# Generic (not LDG/STG/LDS/STS/LDL/STL/LDC) loads and stores: "LD.E.128", "ST.E.64", "LD.E ".
GENERIC_ACCESS = r"(?<![\w.])(?:LD|ST)(?:\.[\w.]+)?\s"


@needs_cuobjdump
@pytest.mark.parametrize("kernel", GLOBAL_ONLY_KERNELS)
def test_tensor_accesses_are_global_memory_instructions(sass, kernel):
    import re

    functions = {name: code for name, code in sass.items() if kernel in name}
    assert functions, f"no {kernel} in the sm_90 SASS of {LIBRARY}"
    for name, code in functions.items():
        generic = re.findall(GENERIC_ACCESS, code)
        assert not generic, f"{name}: generic loads/stores {sorted(set(generic))}"
        assert re.search(r"\bLDG\.E", code), f"{name}: no LDG at all"


@needs_cuobjdump
def test_adamw_fits_three_blocks_of_512_threads_per_sm_without_spills(sass, resources):
    """sm_90: 64 K registers per SM; 3 blocks x 512 threads leave 42 registers a thread, allocated
    in units of 8: at most 40. No stack (a spill, or a call's frame) and no local memory. fp64
    (two registers per value) is held to 2 blocks, 64 registers."""
    import re

    adamw = {name: usage for name, usage in resources.items() if "adamw_kernel" in name}
    assert len(adamw) >= 48, sorted(adamw)  # 12 dtype combinations x (with, without AMSGrad) x (AdamW, Adam's L2)
    for name, usage in adamw.items():
        fp64 = "adamw_kernelIddd" in name
        limit = 64 if fp64 else 40
        assert usage["REG"] <= limit, f"{name}: {usage['REG']} registers > {limit}"
        if not fp64:
            assert usage["STACK"] == 0 and usage.get("LOCAL", 0) == 0, f"{name}: {usage}"
            assert not re.search(r"\b(?:LDL|STL)\b", sass[name]), f"{name}: local-memory spills"
            assert re.search(r"\b(?:LDG|STG)\.E\.(?:128|64)\b", sass[name]), f"{name}: no vector accesses"


@needs_cuobjdump
def test_sgd_and_lion_fit_three_blocks_of_512_threads_per_sm_without_spills(sass, resources):
    """The update kernel (SGD without buffers, with buffers only written, with buffers read; Lion)
    keeps AdamW's budget: at most 40 registers (fp64: 64), no stack, no local memory, 16-byte or
    8-byte accesses."""
    import re

    updates = {name: usage for name, usage in resources.items() if "update_kernel" in name}
    # SGD: 8 (param, grad) pairs without buffers, 12 combinations x 2 momentum modes; Lion: 12.
    assert len(updates) >= 44, sorted(updates)
    for name, usage in updates.items():
        fp64 = re.search(r"(?:SGDStep|LionStep)Id", name) is not None
        limit = 64 if fp64 else 40
        assert usage["REG"] <= limit, f"{name}: {usage['REG']} registers > {limit}"
        assert usage["STACK"] == 0 and usage.get("LOCAL", 0) == 0, f"{name}: {usage}"
        assert not re.search(r"\b(?:LDL|STL)\b", sass[name]), f"{name}: local-memory spills"
        assert re.search(r"\b(?:LDG|STG)\.E\.(?:128|64)\b", sass[name]), f"{name}: no vector accesses"
