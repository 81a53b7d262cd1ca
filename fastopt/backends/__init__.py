"""The backend registry: which implementation of the ops runs for a given call.

A backend is a module that defines every op of ``fastopt.ops`` under the same name (see
``fastopt/backends/reference.py``, the ``torch`` backend, for the full list and signatures) plus:

- ``DEVICE_TYPES``: the tuple of ``torch.device.type`` values it runs on (``None``: any), and
- optionally ``unavailable_reason() -> str | None``: why it cannot run on this machine.

A backend whose module fails to import is unavailable, with the import error as its reason.
The choice per call: a backend forced by ``use_backend(name)`` (innermost wins) or by the
``FASTOPT_BACKEND`` environment variable; otherwise the first available backend, in the order
below, that runs on the tensors' device. On CPU tensors that is ``cpu`` (the compiled extension)
when it is built, else ``torch``: the GPU backends reach CPU tensors only in test modes (Triton's
interpreter), so they are chosen there only when forced.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable

import torch

ENV_VAR = "FASTOPT_BACKEND"


def _gpu_missing() -> str | None:
    if torch.version.cuda is None and torch.version.hip is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def _cuda_prerequisites() -> list[str]:
    if os.environ.get("FASTOPT_CUDA_EMULATION") == "1":  # the kernels on CPU tensors (csrc/emulation)
        if importlib.util.find_spec("fastopt._C_emulated") is None:
            return ["FASTOPT_CUDA_EMULATION=1 but fastopt._C_emulated is not built (python csrc/emulation/build.py)"]
        return []
    missing = [_gpu_missing()]
    if importlib.util.find_spec("fastopt._C") is None:
        missing.append("the CUDA extension fastopt._C is not built (see csrc/README.md)")
    return [m for m in missing if m]


def cpu_extension_name() -> str:
    """The CPU extension built for the running torch release: fastopt._cpu_torch2_13 (setup.py
    names it so; venvs with other torch releases sharing a source tree keep their own)."""
    return "fastopt._cpu_torch" + "_".join(torch.__version__.split("+")[0].split(".")[:2])


def _cpu_prerequisites() -> list[str]:
    if importlib.util.find_spec(cpu_extension_name()) is None:
        return [f"the CPU extension {cpu_extension_name()} is not built for torch {torch.__version__}"
                " (pip install --no-build-isolation -e .)"]
    return []


def _triton_prerequisites() -> list[str]:
    missing = []
    if importlib.util.find_spec("triton") is None:
        missing.append("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1" and (gpu := _gpu_missing()):
        missing.append(f"{gpu} (TRITON_INTERPRET=1 runs Triton kernels on CPU tensors)")
    return missing


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str  # import path of the module that implements the ops
    description: str
    prerequisites: Callable[[], list[str]] = list  # what this machine lacks for it, if anything


# In order of preference: the first available one that runs on a device is chosen for it.
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("cuda", "fastopt.backends.cuda", "fused CUDA kernels (compiled extension fastopt._C)",
                _cuda_prerequisites),
    BackendSpec("triton", "fastopt.backends.triton", "Triton kernels, compiled at first use", _triton_prerequisites),
    BackendSpec("cpu", "fastopt.backends.cpu",
                "C++ multi-tensor loops for CPU tensors (compiled extension fastopt._cpu_torch*)", _cpu_prerequisites),
    BackendSpec("torch", "fastopt.backends.reference", "plain torch foreach ops; the reference and CPU path"),
)
_BY_NAME = {spec.name: spec for spec in BACKENDS}
# The backends chosen for CPU tensors when none is forced, in the order above.
CPU_DEFAULTS = ("cpu", "torch")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastopt_backend", default=None)


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    module: ModuleType | None  # None when unavailable
    reason: str | None  # why it is unavailable; None when available

    @property
    def available(self) -> bool:
        return self.module is not None

    def runs_on(self, device: torch.device) -> bool:
        device_types = getattr(self.module, "DEVICE_TYPES", None)
        return device_types is None or device.type in device_types


@functools.cache
def status(name: str) -> BackendStatus:
    """Load a backend once and say whether it can run here (cached; see ``refresh``)."""
    spec = _spec(name)
    missing = spec.prerequisites()
    if importlib.util.find_spec(spec.module) is None:
        missing.append(f"this version of fastopt has no {spec.module} module")
    if missing:
        return BackendStatus(name, None, "; ".join(missing))
    try:
        module = importlib.import_module(spec.module)
    except Exception as exc:  # a broken optional backend must never break `import fastopt`
        return BackendStatus(name, None, f"importing {spec.module} failed: {type(exc).__name__}: {exc}")
    reason_fn = getattr(module, "unavailable_reason", None)
    reason = reason_fn() if reason_fn is not None else None
    return BackendStatus(name, None if reason else module, reason)


def refresh() -> None:
    """Forget cached availability (after building the extension, installing triton, ...)."""
    status.cache_clear()


def _spec(name: str) -> BackendSpec:
    if name not in _BY_NAME:
        raise ValueError(f"unknown fastopt backend {name!r}; known backends: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in order of preference."""
    return [spec.name for spec in BACKENDS if status(spec.name).available]


def unavailable_backends() -> dict[str, str]:
    """Each backend that cannot run on this machine, with the reason."""
    return {spec.name: status(spec.name).reason for spec in BACKENDS if not status(spec.name).available}


def forced_backend() -> tuple[str, str] | None:
    """(name, where it was forced) when a backend is forced, else None."""
    name = _forced.get()
    if name is not None:
        return name, f"fastopt.use_backend({name!r})"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in _BY_NAME:
            raise ValueError(f"{ENV_VAR}={env!r} names no fastopt backend; known backends: {', '.join(_BY_NAME)}")
        return env, f"{ENV_VAR}={env}"
    return None


def select(device: torch.device) -> ModuleType:
    """The backend module that runs ops on tensors of ``device``."""
    forced = forced_backend()
    if forced is not None:
        name, source = forced
        backend = status(name)
        if not backend.available:
            raise RuntimeError(f"fastopt backend {name!r} was requested ({source}) but is unavailable: {backend.reason}")
        if not backend.runs_on(device):
            raise RuntimeError(
                f"fastopt backend {name!r} was requested ({source}) but does not run on {device.type} tensors"
                f" (it runs on: {', '.join(backend.module.DEVICE_TYPES)})"
            )
        return backend.module
    for spec in BACKENDS:
        if device.type == "cpu" and spec.name not in CPU_DEFAULTS:
            continue  # GPU kernels reach CPU tensors only through Triton's interpreter: a test mode
        backend = status(spec.name)
        if backend.available and backend.runs_on(device):
            return backend.module
    raise RuntimeError(f"no fastopt backend runs on {device.type} tensors")  # unreachable: torch runs anywhere


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fastopt ops inside this block on backend ``name``.

    Raises ValueError for an unknown name and RuntimeError for a backend that cannot run here,
    on entry, before any op is called.
    """
    backend = status(name)  # an unknown name raises ValueError
    if not backend.available:
        raise RuntimeError(f"fastopt backend {name!r} is unavailable: {backend.reason}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
