"""The backend registry: selection, overrides, and reasons for missing backends."""

import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import backends
from fastopt.backends import reference
from tests.helpers import active_backend


def test_torch_backend_is_always_available_and_chosen_for_cpu():
    if active_backend() != "torch":  # e.g. the Triton interpreter lane, where triton runs on CPU too
        pytest.skip(f"this run forces the {active_backend()!r} backend")
    assert "torch" in fastopt.available_backends()
    assert backends.select(torch.device("cpu")) is reference


def test_every_missing_backend_says_why():
    missing = backends.unavailable_backends()
    assert set(missing) | set(fastopt.available_backends()) == {spec.name for spec in backends.BACKENDS}
    for name, reason in missing.items():
        assert reason, name
    if not torch.cuda.is_available():
        assert "cuda" in missing and ("GPU" in missing["cuda"] or "CPU-only" in missing["cuda"])


def test_use_backend_forces_nests_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.forced_backend() is None
    with fastopt.use_backend("torch"):
        assert backends.forced_backend() == ("torch", "fastopt.use_backend('torch')")
        with fastopt.use_backend("torch"):
            assert fastopt.multi_tensor_norm([torch.ones(4)]).item() == 2.0
        assert backends.forced_backend()[0] == "torch"
    assert backends.forced_backend() is None


def test_use_backend_rejects_unknown_and_unavailable_on_entry():
    with pytest.raises(ValueError, match="unknown fastopt backend 'nope'"):
        with fastopt.use_backend("nope"):
            pass
    for name, reason in backends.unavailable_backends().items():
        with pytest.raises(RuntimeError, match=f"fastopt backend '{name}' is unavailable"):
            with fastopt.use_backend(name):
                pass


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.forced_backend() == ("torch", "FASTOPT_BACKEND=torch")
    assert backends.select(torch.device("cpu")) is reference
    missing = backends.unavailable_backends()
    if missing:
        name = next(iter(missing))
        monkeypatch.setenv(backends.ENV_VAR, name)
        with pytest.raises(RuntimeError, match=f"FASTOPT_BACKEND={name}"):
            fastopt.scale_([torch.ones(2)], 2.0)


def test_a_backend_that_fails_to_import_is_reported_not_raised(monkeypatch):
    broken = backends.BackendSpec("broken", "fastopt.tests_broken_backend", "test")
    monkeypatch.setattr(backends, "_BY_NAME", {**backends._BY_NAME, "broken": broken})
    status = backends.status("broken")
    assert not status.available and "has no fastopt.tests_broken_backend module" in status.reason


def test_info_command_reports_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "fastopt", "info"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert f"torch    {torch.__version__}" in out
    assert "triton   " in out and "python   " in out and "device   " in out
    assert "torch   available" in out
    for name, reason in backends.unavailable_backends().items():
        assert f"{name:<7} missing: {reason}" in out
