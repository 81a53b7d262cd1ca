"""Shared test helpers: devices, per-dtype tolerances, random tensor lists, inf/nan injection."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# (rtol, atol) for comparing a result computed in a dtype against a float64 computation.
# fp32: a few ulps of accumulated rounding; bf16 / fp16: one rounding of the stored result.
_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = _TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def describe_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def active_backend() -> str:
    """The backend the ops run on for CPU tensors in this run of the suite: the one forced by
    ``FASTOPT_BACKEND``, else the one fastopt chooses (``cpu`` when its extension is built, else
    ``torch``, the reference)."""
    forced = os.environ.get("FASTOPT_BACKEND", "").strip()
    if forced:
        return forced
    from fastopt import backends

    module = backends.select(torch.device("cpu"))
    return next(spec.name for spec in backends.BACKENDS if spec.module == module.__name__)


def assert_matches_torch(actual: torch.Tensor, expected: torch.Tensor, msg: str = "", **close) -> None:
    """``actual`` (fastopt's) against ``expected`` (torch's own function, same inputs).

    Bit for bit on the torch backend, which runs torch's formulas in torch's order; that is a
    property of the reference, not of the ops. Other backends (fused kernels: other evaluation
    order, FMA contraction) must agree within fp32 rounding, or within ``close`` (rtol / atol /
    equal_nan) where a test knows better."""
    if active_backend() == "torch":
        assert_bitwise_equal(actual, expected, msg)
        return
    close = {**tolerance(torch.float32), **close}
    torch.testing.assert_close(actual, expected, msg=msg or None, **close)


def devices() -> list:
    """Devices to parametrize over: FASTOPT_TEST_DEVICES (comma-separated), else cpu and cuda;
    cuda carries the `cuda` mark, so it is skipped cleanly without a GPU."""
    names = os.environ.get("FASTOPT_TEST_DEVICES", "cpu,cuda").split(",")
    return [pytest.param(n, marks=pytest.mark.cuda) if n.startswith("cuda") else n for n in names]

# Shapes that catch edge cases: 0-d, zero-element, odd sizes, a >=2-D tensor for unit-wise ops.
MIXED_SHAPES = [(), (0,), (1,), (7,), (3, 5), (0, 4), (33, 17), (4, 3, 3, 3), (129,), (2, 0, 3)]


def random_tensors(
    shapes, dtype=torch.float32, device="cpu", *, seed=0, non_contiguous=False, scale=1.0
) -> list[torch.Tensor]:
    """Random normal tensors. With non_contiguous, >=2-D tensors are transposed views and 1-D
    tensors are every-other-element views of a larger buffer, so writes must go through."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if non_contiguous and len(shape) >= 2:
            base = torch.randn(*reversed(shape), generator=generator) * scale
            t = base.to(dtype).to(device).permute(*reversed(range(len(shape))))
        elif non_contiguous and len(shape) == 1:
            t = (torch.randn(2 * shape[0], generator=generator) * scale).to(dtype).to(device)[::2]
        else:
            t = (torch.randn(shape, generator=generator) * scale).to(dtype).to(device)
        out.append(t)
    return out


def inject_nonfinite(tensors, *, seed=0, count=3, values=(float("inf"), float("-inf"), float("nan"))) -> list[tuple]:
    """Write inf / -inf / nan at random positions of random non-empty tensors; returns where."""
    generator = torch.Generator().manual_seed(seed)
    candidates = [i for i, t in enumerate(tensors) if t.numel() > 0]
    where = []
    for k in range(count):
        i = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
        flat_index = int(torch.randint(tensors[i].numel(), (1,), generator=generator))
        index = torch.unravel_index(torch.tensor(flat_index), tensors[i].shape) if tensors[i].ndim else ()
        value = values[k % len(values)]
        tensors[i][tuple(int(j) for j in index)] = value
        where.append((i, flat_index, value))
    return where


def clone_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (views of a fresh copy of the base), so that reductions see
    the same memory order: a contiguous clone of a strided view may round differently."""
    if t._base is None:
        return t.detach().clone()
    return t._base.detach().clone().as_strided(t.size(), t.stride(), t.storage_offset())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that comparisons see -0.0 vs 0.0 and nan payloads."""
    int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(int_dtype).cpu()


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    assert torch.equal(bits(actual), bits(expected)), msg or "tensors differ bitwise"


def float64_norm(tensors, p: float) -> torch.Tensor:
    """The norm of all tensors as if concatenated, computed in float64."""
    flat = torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors] + [torch.zeros(0, dtype=torch.float64)])
    return torch.linalg.vector_norm(flat, p) if flat.numel() else torch.zeros((), dtype=torch.float64)


@contextlib.contextmanager
def no_host_sync():
    """Inside: any host-device synchronisation on the GPU raises (torch's sync debug mode). The
    device is synchronised first, so only what runs inside counts."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
