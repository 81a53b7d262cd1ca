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
from fastopt import cuda

BUILT = importlib.util.find_spec("fastopt._C") is not None and cuda.LOAD_ERROR is None
needs_extension = pytest.mark.skipif(not BUILT, reason=f"fastopt._C is not usable here: {cuda.LOAD_ERROR}")

# What DESIGN.md and csrc/ops.cpp promise: written lists and tensors carry (x!), nothing written
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


def test_python_knows_which_adamw_combinations_the_kernel_builds():
    """Under torch.compile the fallback is decided in Python (fastopt.cuda.ADAMW_BUILDS), so that
    set must be exactly the kernel's list of compiled combinations."""
    import pathlib
    import re

    source = (pathlib.Path(__file__).parents[1] / "csrc" / "adamw.cu").read_text()
    codes = {"kFloat64": torch.float64, "kFloat32": torch.float32, "kBFloat16": torch.bfloat16, "kFloat16": torch.float16}
    cases = re.findall(r"FASTOPT_ADAMW_CASE\((k\w+), (k\w+), (k\w+),", source)
    assert len(cases) >= 4
    assert {tuple(codes[c] for c in case) for case in cases} == cuda.ADAMW_BUILDS
