"""Bad inputs to every public op: each is rejected with the right exception type, a message that
names the offending argument, and no change to any tensor (validation runs before any write).

The table is ``CASES``: one row per bad input. Each row's builder makes a valid call on fresh
random tensors (seeded), with one argument replaced by a bad one. Package bugs are strict xfails
whose reason says what goes wrong.
"""

from __future__ import annotations

import dataclasses
import math
import types
import unittest.mock
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import backends, ops

NAN = math.nan
INF = math.inf


# --------------------------------------------------------------------------- tensor makers


def randn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random data, never zeros (on 'meta' only the metadata exists)."""
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if dtype.is_complex or dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randint(1, 100, shape, dtype=dtype)


def sparse(*shape) -> torch.Tensor:
    return randn(*shape).to_sparse()


def meta(*shape) -> torch.Tensor:
    return randn(*shape, device="meta")


def expanded(rows=3, cols=4) -> torch.Tensor:
    """A view whose elements share memory (stride 0): an in-place update of it is ill-defined."""
    return randn(rows, 1).expand(rows, cols)


def flag(dtype=torch.float32, numel=1) -> torch.Tensor:
    """A found_inf flag; it starts at 0."""
    return torch.zeros(numel, dtype=dtype)


def param(*shape, dtype=torch.float32, grad=None) -> torch.Tensor:
    """A leaf parameter with a random ``.grad`` (or the given one)."""
    p = randn(*shape, dtype=dtype)
    if dtype.is_floating_point or dtype.is_complex:
        p.requires_grad_()
    p.grad = randn(*shape, dtype=dtype) if grad is None else grad
    return p


def two() -> list[torch.Tensor]:
    return [randn(3, 4), randn(5)]


def two_params() -> list[torch.Tensor]:
    return [param(3, 4), param(5)]


def param_without_grad() -> torch.Tensor:
    return randn(3).requires_grad_()


# --------------------------------------------------------------------------- the calls


@dataclasses.dataclass
class Call:
    fn: Callable
    args: tuple
    kwargs: dict

    def __call__(self):
        return self.fn(*self.args, **self.kwargs)


def call(fn, *args, **kwargs) -> Call:
    return Call(fn, args, kwargs)


def _or(value, make):
    return make() if value is None else value


# One valid call per op; a row passes the one argument it makes bad (None: a fresh valid one).
def norm(tensors=None, norm_type=2.0):
    return call(fastopt.multi_tensor_norm, _or(tensors, two), norm_type)


def unscale(tensors=None, inv_scale=0.5, found_inf=None):
    return call(fastopt.unscale_and_check_, _or(tensors, two), inv_scale, _or(found_inf, flag))


def scale(tensors=None, coef=2.0):
    return call(fastopt.scale_, _or(tensors, two), coef)


def clamp(tensors=None, clip_value=1.0):
    return call(ops.clamp_, _or(tensors, two), clip_value)


def agc(params=None, grads=None, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    return call(ops.adaptive_clip_, _or(params, two), _or(grads, two), clip_factor, eps, norm_type)


def clip_norm(parameters=None, max_norm=1.0, norm_type=2.0):
    return call(fastopt.clip_grad_norm_, _or(parameters, two_params), max_norm, norm_type)


def clip_value(parameters=None, clip_value=0.5):
    return call(fastopt.clip_grad_value_, _or(parameters, two_params), clip_value)


def agc_grad(parameters=None, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    return call(fastopt.adaptive_clip_grad_, _or(parameters, two_params), clip_factor, eps, norm_type)


def adamw(edit: Callable[[dict], None] | None = None, n=2, **overrides) -> Call:
    """A valid adamw_ call on ``n`` params of shape (3, 4); ``overrides`` replace arguments,
    then ``edit`` may change the argument dict in place (e.g. to alias two tensors)."""
    kwargs = {
        "params": [randn(3, 4) for _ in range(n)],
        "grads": [randn(3, 4) for _ in range(n)],
        "exp_avgs": [randn(3, 4) for _ in range(n)],
        "exp_avg_sqs": [randn(3, 4).abs() for _ in range(n)],
        "steps": [torch.tensor(float(3 + i)) for i in range(n)],
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 1e-2,
        **overrides,
    }
    if edit is not None:
        edit(kwargs)
    return Call(fastopt.adamw_, (), kwargs)


def put(name: str, i: int, make: Callable[[], object]):
    """An adamw ``edit``: kwargs[name][i] = make()."""
    return lambda kwargs: kwargs[name].__setitem__(i, make())


def alias(dst: str, i: int, src: str, j: int):
    """An adamw ``edit``: kwargs[dst][i] becomes the very tensor kwargs[src][j]."""
    return lambda kwargs: kwargs[dst].__setitem__(i, kwargs[src][j])


def drop_last(name: str):
    """An adamw ``edit``: one tensor fewer in kwargs[name]."""
    return lambda kwargs: kwargs[name].pop()


def twice(make: Callable[[torch.Tensor], list], shape=(3, 4)):
    """Tensors lists that hold one random tensor twice: make(t) -> the list."""
    return lambda: make(randn(*shape))


def under_backend(name: str, the_call: Call) -> None:
    with fastopt.use_backend(name):
        the_call()


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    build: Callable[[], Call]
    error: type[Exception]
    match: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def table(op: str, rows: list[tuple]) -> list:
    """Rows ``(id, build, error, match[, env vars][, xfail reason])`` as pytest params, ids ``op-id``."""
    params = []
    for id_, build, error, match, *extra in rows:
        env = next((x for x in extra if isinstance(x, dict)), {})
        reason = next((x for x in extra if isinstance(x, str)), None)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(Case(build, error, match, env), id=f"{op}-{id_}", marks=marks))
    return params


def cases_multi_tensor_norm():
    return table("multi_tensor_norm", [
        ("dict", lambda: norm({"w": randn(3)}), TypeError, r"tensors must be a list"),
        ("int", lambda: norm(3), TypeError, r"tensors must be a list"),
        ("non-tensor-element", lambda: norm([randn(3), 1.5]), TypeError, r"tensors\[1\] must be a torch.Tensor"),
        ("int64", lambda: norm([randn(3), randn(3, dtype=torch.int64)]), TypeError, r"tensors\[1\].*int64"),
        ("bool", lambda: norm([randn(3), randn(3, dtype=torch.bool)]), TypeError, r"tensors\[1\].*bool"),
        ("complex", lambda: norm([randn(3), randn(3, dtype=torch.complex64)]), TypeError, r"tensors\[1\].*complex64"),
        ("sparse", lambda: norm([randn(3), sparse(3)]), TypeError, r"tensors\[1\].*sparse"),
        ("mixed-devices", lambda: norm([randn(3), meta(3)]), ValueError, r"tensors\[1\] is on meta"),
        ("norm_type-0", lambda: norm(norm_type=0.0), ValueError, r"norm_type"),
        ("norm_type-negative", lambda: norm(norm_type=-2.0), ValueError, r"norm_type"),
        ("norm_type-nan", lambda: norm(norm_type=NAN), ValueError, r"norm_type"),
        ("norm_type--inf", lambda: norm(norm_type=-INF), ValueError, r"norm_type"),
        ("norm_type-string", lambda: norm(norm_type="fro"), TypeError, r"norm_type"),
        ("norm_type-bool", lambda: norm(norm_type=True), TypeError, r"norm_type"),
    ])  # fmt: skip


def cases_unscale_and_check():
    def found_inf_among_tensors():
        found_inf = flag()
        # The inf sets the flag to 1.0, then the flag is scaled with the tensors (to 0.5 here;
        # inv_scale=0 would clear it).
        return unscale([torch.tensor([1.0, INF]), found_inf], 0.5, found_inf)

    def inv_scale_among_tensors():
        inv_scale = torch.tensor([0.5])
        return unscale([torch.tensor([2.0, INF, 3.0]), inv_scale], inv_scale)

    return table("unscale_and_check_", [
        ("dict", lambda: unscale({"g": randn(3)}), TypeError, r"tensors must be a list"),
        ("int", lambda: unscale(7), TypeError, r"tensors must be a list"),
        ("non-tensor-element", lambda: unscale([randn(3), "g"]), TypeError, r"tensors\[1\] must be a torch.Tensor"),
        ("int32", lambda: unscale([randn(3), randn(3, dtype=torch.int32)]), TypeError, r"tensors\[1\].*int32"),
        ("bool", lambda: unscale([randn(3), randn(3, dtype=torch.bool)]), TypeError, r"tensors\[1\].*bool"),
        ("complex", lambda: unscale([randn(3), randn(3, dtype=torch.complex64)]), TypeError, r"tensors\[1\].*complex"),
        ("sparse", lambda: unscale([randn(3), sparse(3)]), TypeError, r"tensors\[1\].*sparse"),
        ("mixed-devices", lambda: unscale([randn(3), meta(3)]), ValueError, r"tensors\[1\] is on meta"),
        ("found_inf-on-other-device", lambda: unscale(found_inf=meta(1)), ValueError, r"found_inf is on meta"),
        ("found_inf-float16", lambda: unscale(found_inf=flag(torch.float16)), TypeError, r"found_inf"),
        ("found_inf-int", lambda: unscale(found_inf=flag(torch.int32)), TypeError, r"found_inf"),
        ("found_inf-2-elements", lambda: unscale(found_inf=flag(numel=2)), ValueError, r"found_inf"),
        ("found_inf-not-a-tensor", lambda: unscale(found_inf=0.0), TypeError, r"found_inf"),
        ("inv_scale-on-other-device", lambda: unscale(inv_scale=meta(1)), ValueError, r"inv_scale is on meta"),
        ("inv_scale-2-elements", lambda: unscale(inv_scale=torch.full((2,), 0.5)), ValueError, r"inv_scale"),
        ("inv_scale-float64-tensor", lambda: unscale(inv_scale=torch.tensor([0.5]).double()), TypeError, r"inv_scale"),
        ("inv_scale-nan", lambda: unscale(inv_scale=NAN), ValueError, r"inv_scale"),
        ("inv_scale-bool", lambda: unscale(inv_scale=True), TypeError, r"inv_scale"),
        ("same-tensor-twice", twice(lambda t: unscale([t, t])), ValueError,
         r"tensors\[1\] and tensors\[0\] share memory"),
        ("tensor-and-its-transpose", twice(lambda t: unscale([t, t.t()])), ValueError, r"tensors\[1\] and tensors\[0"),
        ("expanded-view", lambda: unscale([randn(3), expanded()]), ValueError, r"tensors\[1\].*share memory"),
        ("found_inf-among-tensors", found_inf_among_tensors, ValueError, r"found_inf and tensors\[1\] share memory"),
        ("inv_scale-among-tensors", inv_scale_among_tensors, ValueError, r"inv_scale shares memory with tensors"),
    ])  # fmt: skip


def cases_scale():
    def coef_among_tensors():
        coef = torch.tensor(2.0)
        return scale([coef, randn(3)], coef)

    def overlapping_slices():
        t = randn(5)
        return scale([t[:4], t[1:]])

    return table("scale_", [
        ("dict", lambda: scale({"g": randn(3)}), TypeError, r"tensors must be a list"),
        ("int", lambda: scale(3), TypeError, r"tensors must be a list"),
        ("non-tensor-element", lambda: scale([randn(3), None]), TypeError, r"tensors\[1\] must be a torch.Tensor"),
        ("int64", lambda: scale([randn(3), randn(3, dtype=torch.int64)]), TypeError, r"tensors\[1\].*int64"),
        ("bool", lambda: scale([randn(3), randn(3, dtype=torch.bool)]), TypeError, r"tensors\[1\].*bool"),
        ("complex", lambda: scale([randn(3), randn(3, dtype=torch.complex128)]), TypeError, r"tensors\[1\].*complex"),
        ("sparse", lambda: scale([randn(3), sparse(3)]), TypeError, r"tensors\[1\].*sparse"),
        ("mixed-devices", lambda: scale([randn(3), meta(3)]), ValueError, r"tensors\[1\] is on meta"),
        ("coef-on-other-device", lambda: scale(coef=meta()), ValueError, r"coef is on meta"),
        ("coef-2-elements", lambda: scale(coef=torch.full((2,), 2.0)), ValueError, r"coef"),
        ("coef-int-tensor", lambda: scale(coef=torch.tensor(2)), TypeError, r"coef"),
        ("coef-nan", lambda: scale(coef=NAN), ValueError, r"coef"),
        ("coef-inf", lambda: scale(coef=INF), ValueError, r"coef"),
        ("coef-bool", lambda: scale(coef=True), TypeError, r"coef"),
        ("coef-string", lambda: scale(coef="2"), TypeError, r"coef"),
        ("same-tensor-twice", twice(lambda t: scale([t, t])), ValueError,
         r"tensors\[1\] and tensors\[0\] share memory"),
        ("tensor-and-a-view-of-it", twice(lambda t: scale([t, t.view(4, 3)])), ValueError,
         r"tensors\[1\] and tensors\[0\]"),
        ("expanded-view", lambda: scale([expanded()]), ValueError, r"tensors\[0\].*share memory"),
        ("overlapping-slices", overlapping_slices, ValueError, r"tensors\[1\] and tensors\[0\] share memory"),
        ("self-overlapping-as_strided", lambda: scale([randn(10).as_strided((3, 3), (1, 1))]), ValueError,
         r"tensors\[0\]"),
        ("coef-among-tensors", coef_among_tensors, ValueError, r"coef shares memory with tensors\[0\]"),
    ])  # fmt: skip


def cases_clamp():
    return table("ops.clamp_", [
        ("dict", lambda: clamp({"g": randn(3)}), TypeError, r"tensors must be a list"),
        ("int", lambda: clamp(5), TypeError, r"tensors must be a list"),
        ("non-tensor-element", lambda: clamp([randn(3), [1.0]]), TypeError, r"tensors\[1\] must be a torch.Tensor"),
        ("int16", lambda: clamp([randn(3), randn(3, dtype=torch.int16)]), TypeError, r"tensors\[1\].*int16"),
        ("bool", lambda: clamp([randn(3, dtype=torch.bool)]), TypeError, r"tensors\[0\].*bool"),
        ("complex", lambda: clamp([randn(3, dtype=torch.complex64)]), TypeError, r"tensors\[0\].*complex"),
        ("sparse", lambda: clamp([sparse(3)]), TypeError, r"tensors\[0\].*sparse"),
        ("mixed-devices", lambda: clamp([randn(3), meta(3)]), ValueError, r"tensors\[1\] is on meta"),
        ("clip_value-negative", lambda: clamp(clip_value=-0.5), ValueError, r"clip_value"),
        ("clip_value-nan", lambda: clamp(clip_value=NAN), ValueError, r"clip_value"),
        ("clip_value-bool", lambda: clamp(clip_value=True), TypeError, r"clip_value"),
        ("same-tensor-twice", twice(lambda t: clamp([t, t])), ValueError, r"tensors\[1\] and tensors\[0\]"),
        ("expanded-view", lambda: clamp([expanded()]), ValueError, r"tensors\[0\].*share memory"),
    ])  # fmt: skip


def cases_adaptive_clip():
    def grad_is_its_param():
        params = two()
        return agc(params, [randn(3, 4), params[1]])

    def same_grad_twice():
        g = randn(3, 4)
        return agc([randn(3, 4), randn(3, 4)], [g, g])

    return table("ops.adaptive_clip_", [
        ("params-dict", lambda: agc({"w": randn(3)}, [randn(3)]), TypeError, r"params must be a list"),
        ("grads-int", lambda: agc([randn(3)], 1), TypeError, r"grads must be a list"),
        ("grads-non-tensor-element", lambda: agc(grads=[randn(3, 4), 2.0]), TypeError, r"grads\[1\] must be a torch"),
        ("grads-int64", lambda: agc([randn(3)], [randn(3, dtype=torch.int64)]), TypeError, r"grads\[0\].*int64"),
        ("params-bool", lambda: agc([randn(3, dtype=torch.bool)], [randn(3)]), TypeError, r"params\[0\].*bool"),
        ("params-complex", lambda: agc([randn(3, dtype=torch.complex64)], [randn(3)]), TypeError,
         r"params\[0\].*complex"),
        ("grads-sparse", lambda: agc([randn(3)], [sparse(3)]), TypeError, r"grads\[0\].*sparse"),
        ("mixed-devices", lambda: agc([randn(3)], [meta(3)]), ValueError, r"grads\[0\] is on meta"),
        ("length-mismatch", lambda: agc(grads=[randn(3, 4)]), ValueError, r"grads has 1 tensors but params has 2"),
        ("shape-mismatch", lambda: agc(grads=[randn(3, 4), randn(6)]), ValueError, r"grads\[1\] has shape \(6,\)"),
        ("transposed-shape", lambda: agc(grads=[randn(4, 3), randn(5)]), ValueError, r"grads\[0\] has shape \(4, 3\)"),
        ("clip_factor-0", lambda: agc(clip_factor=0.0), ValueError, r"clip_factor"),
        ("clip_factor-negative", lambda: agc(clip_factor=-0.01), ValueError, r"clip_factor"),
        ("clip_factor-nan", lambda: agc(clip_factor=NAN), ValueError, r"clip_factor"),
        ("clip_factor-bool", lambda: agc(clip_factor=True), TypeError, r"clip_factor"),
        ("eps-negative", lambda: agc(eps=-1e-3), ValueError, r"eps"),
        ("norm_type-0", lambda: agc(norm_type=0), ValueError, r"norm_type"),
        ("grad-is-its-param", grad_is_its_param, ValueError, r"params\[1\] shares memory with grads\[1\]"),
        ("same-grad-twice", same_grad_twice, ValueError, r"grads\[1\] and grads\[0\]"),
        ("expanded-grad", lambda: agc([randn(3, 4)], [expanded()]), ValueError, r"grads\[0\].*share memory"),
    ])  # fmt: skip


def cases_clip_grad_norm():
    def shared_grad():
        g = randn(3)
        return clip_norm([param(3, grad=g), param(3, grad=g)])

    return table("clip_grad_norm_", [
        ("int", lambda: clip_norm(3), TypeError, r"parameters must be a tensor or an iterable"),
        ("dict", lambda: clip_norm({"w": param(3)}), TypeError, r"parameters\[0\] must be a torch.Tensor"),
        ("non-tensor-element", lambda: clip_norm([param(3), 1.0]), TypeError, r"parameters\[1\]"),
        ("int64", lambda: clip_norm([param(3), param(3, dtype=torch.int64)]), TypeError, r"parameters\[1\]\.grad.*int64"),
        ("bool", lambda: clip_norm([param(3, dtype=torch.bool)]), TypeError, r"parameters\[0\]\.grad.*bool"),
        ("complex", lambda: clip_norm([param(3, dtype=torch.complex64)]), TypeError, r"parameters\[0\]\.grad.*complex"),
        ("sparse-grad", lambda: clip_norm([param(3), param(3, grad=sparse(3))]), TypeError, r"parameters\[1\]\.grad.*sparse"),
        ("max_norm-negative", lambda: clip_norm(max_norm=-1.0), ValueError, r"max_norm"),
        ("max_norm-nan", lambda: clip_norm(max_norm=NAN), ValueError, r"max_norm"),
        ("max_norm-bool", lambda: clip_norm(max_norm=True), TypeError, r"max_norm"),
        ("max_norm-string", lambda: clip_norm(max_norm="1.0"), TypeError, r"max_norm"),
        ("norm_type-0", lambda: clip_norm(norm_type=0.0), ValueError, r"norm_type"),
        ("norm_type-negative", lambda: clip_norm(norm_type=-1.0), ValueError, r"norm_type"),
        ("norm_type-nan", lambda: clip_norm(norm_type=NAN), ValueError, r"norm_type"),
        ("norm_type--inf", lambda: clip_norm(norm_type=-INF), ValueError, r"norm_type"),
        ("norm_type-string", lambda: clip_norm(norm_type="fro"), TypeError, r"norm_type"),
        ("shared-grad", shared_grad, ValueError, r"parameters\[1\]\.grad and parameters\[0\]\.grad share memory"),
        ("expanded-grad", lambda: clip_norm([param(3, 4, grad=expanded())]), ValueError, r"parameters\[0\]\.grad.*share memory"),
        ("index-of-bad-grad", lambda: clip_norm([param_without_grad(), param(3, grad=sparse(3))]), TypeError,
         r"parameters\[1\]"),
    ])  # fmt: skip


def cases_clip_grad_value():
    def shared_grad():
        g = randn(3)
        return clip_value([param(3, grad=g), param(3, grad=g)])

    return table("clip_grad_value_", [
        ("int", lambda: clip_value(3), TypeError, r"parameters must be a tensor or an iterable"),
        ("dict", lambda: clip_value({"w": param(3)}), TypeError, r"parameters\[0\] must be a torch.Tensor"),
        ("non-tensor-element", lambda: clip_value([param(3), "w"]), TypeError, r"parameters\[1\]"),
        ("int32", lambda: clip_value([param(3), param(3, dtype=torch.int32)]), TypeError, r"parameters\[1\]\.grad.*int32"),
        ("bool", lambda: clip_value([param(3, dtype=torch.bool)]), TypeError, r"parameters\[0\]\.grad.*bool"),
        ("complex", lambda: clip_value([param(3, dtype=torch.complex128)]), TypeError, r"parameters\[0\]\.grad.*complex"),
        ("sparse-grad", lambda: clip_value([param(3, grad=sparse(3))]), TypeError, r"parameters\[0\]\.grad.*sparse"),
        ("clip_value-negative", lambda: clip_value(clip_value=-0.5), ValueError, r"clip_value"),
        ("clip_value-nan", lambda: clip_value(clip_value=NAN), ValueError, r"clip_value"),
        ("clip_value-bool", lambda: clip_value(clip_value=False), TypeError, r"clip_value"),
        ("shared-grad", shared_grad, ValueError, r"parameters\[1\]\.grad and parameters\[0\]\.grad"),
        ("expanded-grad", lambda: clip_value([param(3, 4, grad=expanded())]), ValueError, r"parameters\[0\]\.grad.*share memory"),
    ])  # fmt: skip


def cases_adaptive_clip_grad():
    def grad_is_its_param():
        p = randn(3, 4).requires_grad_()
        p.grad = p.detach()  # torch allows this; AGC would read the weight it is scaling
        return agc_grad([param(5), p])

    def shared_grad():
        g = randn(3)
        return agc_grad([param(3, grad=g), param(3, grad=g)])

    return table("adaptive_clip_grad_", [
        ("int", lambda: agc_grad(3), TypeError, r"parameters must be a tensor or an iterable"),
        ("dict", lambda: agc_grad({"w": param(3)}), TypeError, r"parameters\[0\] must be a torch.Tensor"),
        ("non-tensor-element", lambda: agc_grad([param(3), 0.1]), TypeError, r"parameters\[1\]"),
        ("int64", lambda: agc_grad([param(3), param(3, dtype=torch.int64)]), TypeError, r"parameters\[1\].*int64"),
        ("bool", lambda: agc_grad([param(3, dtype=torch.bool)]), TypeError, r"parameters\[0\].*bool"),
        ("complex", lambda: agc_grad([param(3, dtype=torch.complex64)]), TypeError, r"parameters\[0\].*complex"),
        ("sparse-grad", lambda: agc_grad([param(3), param(3, grad=sparse(3))]), TypeError, r"parameters\[1\]\.grad.*sparse"),
        ("clip_factor-0", lambda: agc_grad(clip_factor=0.0), ValueError, r"clip_factor"),
        ("clip_factor-negative", lambda: agc_grad(clip_factor=-0.01), ValueError, r"clip_factor"),
        ("clip_factor-nan", lambda: agc_grad(clip_factor=NAN), ValueError, r"clip_factor"),
        ("clip_factor-bool", lambda: agc_grad(clip_factor=True), TypeError, r"clip_factor"),
        ("eps-negative", lambda: agc_grad(eps=-1e-3), ValueError, r"eps"),
        ("eps-nan", lambda: agc_grad(eps=NAN), ValueError, r"eps"),
        ("norm_type-0", lambda: agc_grad(norm_type=0.0), ValueError, r"norm_type"),
        ("norm_type-nan", lambda: agc_grad(norm_type=NAN), ValueError, r"norm_type"),
        ("norm_type-string", lambda: agc_grad(norm_type="fro"), TypeError, r"norm_type"),
        ("grad-is-its-param", grad_is_its_param, ValueError, r"parameters\[1\] shares memory with parameters\[1\]\.grad"),
        ("shared-grad", shared_grad, ValueError, r"parameters\[1\]\.grad and parameters\[0\]\.grad"),
        ("expanded-grad", lambda: agc_grad([param(3, 4, grad=expanded())]), ValueError, r"parameters\[0\]\.grad.*share memory"),
    ])  # fmt: skip


def cases_adamw():
    def lr_is_a_step(kwargs):
        kwargs["lr"] = kwargs["steps"][0]

    return table("adamw_", [
        # containers and elements
        ("params-dict", lambda: adamw(params={"w": randn(3, 4)}), TypeError, r"params must be a list"),
        ("params-int", lambda: adamw(params=2), TypeError, r"params must be a list"),
        ("grads-non-tensor-element", lambda: adamw(put("grads", 1, lambda: 0.5)), TypeError, r"grads\[1\]"),
        ("steps-non-tensor-element", lambda: adamw(put("steps", 0, lambda: 3.0)), TypeError, r"steps\[0\]"),
        # dtypes, layouts, devices
        ("params-int64", lambda: adamw(put("params", 1, lambda: randn(3, 4, dtype=torch.int64))), TypeError,
         r"params\[1\].*int64"),
        ("grads-bool", lambda: adamw(put("grads", 0, lambda: randn(3, 4, dtype=torch.bool))), TypeError,
         r"grads\[0\].*bool"),
        ("exp_avgs-complex", lambda: adamw(put("exp_avgs", 1, lambda: randn(3, 4, dtype=torch.complex64))), TypeError,
         r"exp_avgs\[1\].*complex"),
        ("grads-sparse", lambda: adamw(put("grads", 1, lambda: sparse(3, 4))), TypeError, r"grads\[1\].*sparse"),
        ("mixed-devices", lambda: adamw(put("grads", 1, lambda: meta(3, 4))), ValueError, r"grads\[1\] is on meta"),
        ("exp_avg_sqs-on-other-device", lambda: adamw(exp_avg_sqs=[meta(3, 4), meta(3, 4)]), ValueError,
         r"exp_avg_sqs\[0\] is on meta"),
        # lengths and shapes
        ("grads-length", lambda: adamw(drop_last("grads")), ValueError, r"grads has 1 tensors but params has 2"),
        ("steps-length", lambda: adamw(drop_last("steps")), ValueError, r"steps has 1 tensors"),
        ("max_exp_avg_sqs-length", lambda: adamw(max_exp_avg_sqs=[randn(3, 4).abs()]), ValueError,
         r"max_exp_avg_sqs has 1 tensors"),
        ("grads-shape", lambda: adamw(put("grads", 1, lambda: randn(4, 3))), ValueError,
         r"grads\[1\] has shape \(4, 3\)"),
        ("grads-same-numel-flat", lambda: adamw(put("grads", 1, lambda: randn(12))), ValueError,
         r"grads\[1\] has shape \(12,\)"),
        ("exp_avg_sqs-shape", lambda: adamw(put("exp_avg_sqs", 0, lambda: randn(4, 3).abs())), ValueError,
         r"exp_avg_sqs\[0\] has shape"),
        # steps
        ("steps-1-d", lambda: adamw(put("steps", 1, lambda: torch.tensor([4.0]))), ValueError, r"steps\[1\].*0-d"),
        ("steps-int64", lambda: adamw(put("steps", 0, lambda: torch.tensor(3))), TypeError, r"steps\[0\].*int64"),
        ("steps-float16", lambda: adamw(put("steps", 0, lambda: torch.tensor(3.0).half())), ValueError,
         r"steps\[0\] must be a 0-d float32"),
        # lr
        ("lr-negative", lambda: adamw(lr=-1e-3), ValueError, r"lr must be >= 0"),
        ("lr-nan", lambda: adamw(lr=NAN), ValueError, r"lr"),
        ("lr-inf", lambda: adamw(lr=INF), ValueError, r"lr"),
        ("lr-bool", lambda: adamw(lr=True), TypeError, r"lr"),
        ("lr-string", lambda: adamw(lr="1e-3"), TypeError, r"lr"),
        ("lr-2-elements", lambda: adamw(lr=torch.full((2,), 1e-3)), ValueError, r"lr"),
        ("lr-int-tensor", lambda: adamw(lr=torch.tensor(1)), TypeError, r"lr"),
        ("lr-on-other-device", lambda: adamw(lr=meta()), ValueError, r"lr is on meta"),
        # betas, eps, weight decay
        ("beta1-1", lambda: adamw(beta1=1.0), ValueError, r"beta1"),
        ("beta1-negative", lambda: adamw(beta1=-0.1), ValueError, r"beta1"),
        ("beta1-nan", lambda: adamw(beta1=NAN), ValueError, r"beta1"),
        ("beta2-negative", lambda: adamw(beta2=-0.1), ValueError, r"beta2"),
        ("beta2-1", lambda: adamw(beta2=1.0), ValueError, r"beta2"),
        ("beta2-tensor", lambda: adamw(beta2=torch.tensor(0.999)), TypeError, r"beta2"),
        ("eps-negative", lambda: adamw(eps=-1e-8), ValueError, r"eps"),
        ("eps-bool", lambda: adamw(eps=False), TypeError, r"eps"),
        ("weight_decay-negative", lambda: adamw(weight_decay=-0.01), ValueError, r"weight_decay"),
        ("weight_decay-bool", lambda: adamw(weight_decay=True), TypeError, r"weight_decay"),
        ("weight_decay-inf", lambda: adamw(weight_decay=INF), ValueError, r"weight_decay"),
        # grad_scale, clip_coef, found_inf
        ("grad_scale-0", lambda: adamw(grad_scale=0.0), ValueError, r"grad_scale"),
        ("grad_scale-2-elements", lambda: adamw(grad_scale=torch.full((2,), 1024.0)), ValueError, r"grad_scale"),
        ("clip_coef-negative", lambda: adamw(clip_coef=-0.5), ValueError, r"clip_coef"),
        ("clip_coef-2-elements", lambda: adamw(clip_coef=torch.full((2,), 0.5)), ValueError, r"clip_coef"),
        ("found_inf-float16", lambda: adamw(found_inf=flag(torch.float16)), TypeError, r"found_inf"),
        ("found_inf-int", lambda: adamw(found_inf=flag(torch.int64)), TypeError, r"found_inf"),
        ("found_inf-2-elements", lambda: adamw(found_inf=flag(numel=2)), ValueError, r"found_inf"),
        ("found_inf-not-a-tensor", lambda: adamw(found_inf=0.0), TypeError, r"found_inf"),
        ("found_inf-on-other-device", lambda: adamw(found_inf=meta(1)), ValueError, r"found_inf is on meta"),
        # aliasing
        ("param-is-also-an-exp_avg", lambda: adamw(alias("exp_avgs", 1, "params", 0)), ValueError,
         r"exp_avgs\[1\] and params\[0\] share memory"),
        ("same-param-twice", lambda: adamw(alias("params", 1, "params", 0)), ValueError, r"params\[1\] and params\[0"),
        ("grad-is-also-an-exp_avg", lambda: adamw(alias("grads", 0, "exp_avgs", 0)), ValueError,
         r"grads\[0\] shares memory with exp_avgs\[0\]"),
        ("grad-is-its-param", lambda: adamw(alias("grads", 1, "params", 1)), ValueError,
         r"grads\[1\] shares memory with params\[1\]"),
        ("same-step-for-two-params", lambda: adamw(alias("steps", 1, "steps", 0)), ValueError,
         r"steps\[1\] and steps\[0\] share memory"),
        ("expanded-exp_avg", lambda: adamw(put("exp_avgs", 0, expanded)), ValueError, r"exp_avgs\[0\].*share memory"),
        ("lr-is-a-step", lambda: adamw(lr_is_a_step), ValueError, r"lr shares memory with steps\[0\]"),
    ])  # fmt: skip


VALID_CALLS = {
    "multi_tensor_norm": norm,
    "unscale_and_check_": unscale,
    "scale_": scale,
    "ops.clamp_": clamp,
    "ops.adaptive_clip_": agc,
    "clip_grad_norm_": clip_norm,
    "clip_grad_value_": clip_value,
    "adaptive_clip_grad_": agc_grad,
    "adamw_": adamw,
}


def cases_backends():
    """Each op, called validly, under a backend that does not exist or cannot run here."""

    def forced(name, make):
        return lambda: call(under_backend, name, make())

    nope, cuda = {"FASTOPT_BACKEND": "nope"}, {"FASTOPT_BACKEND": "cuda"}
    params = []
    for op, make in VALID_CALLS.items():
        params += table(op, [
            ("use_backend-nope", forced("nope", make), ValueError, r"unknown fastopt backend 'nope'"),
            ("use_backend-cuda", forced("cuda", make), RuntimeError, r"'cuda' is unavailable"),
            ("env-nope", make, ValueError, r"FASTOPT_BACKEND='nope'", nope),
            ("env-cuda", make, RuntimeError, r"FASTOPT_BACKEND=cuda\).*unavailable", cuda),
        ])  # fmt: skip
    return params


CASES = [
    *cases_multi_tensor_norm(),
    *cases_unscale_and_check(),
    *cases_scale(),
    *cases_clamp(),
    *cases_adaptive_clip(),
    *cases_clip_grad_norm(),
    *cases_clip_grad_value(),
    *cases_adaptive_clip_grad(),
    *cases_adamw(),
    *cases_backends(),
]


# --------------------------------------------------------------------------- snapshots


def _tensors_in(obj, found: dict[int, torch.Tensor]) -> None:
    """Every tensor reachable from a call's arguments: list items, dict values, ``.grad``s and
    the bases of views (a write through a view shows in its base)."""
    if isinstance(obj, Call):
        _tensors_in((obj.args, obj.kwargs), found)
    elif isinstance(obj, torch.Tensor):
        for t in (obj, obj._base, obj.grad if obj.is_leaf else None):
            if t is not None and id(t) not in found:
                found[id(t)] = t
                _tensors_in(t.grad if t.is_leaf else None, found)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors_in(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors_in(item, found)


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s values as integers, so that comparing them is bit for bit (nan, -0.0)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.clone()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.view(_SAME_SIZE_INT[t.element_size()])
    return t


def snapshot(the_call: Call) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, its bits) for every tensor with data that the call can reach."""
    found: dict[int, torch.Tensor] = {}
    _tensors_in(the_call, found)
    return [(t, bits(t)) for t in found.values() if t.device.type != "meta"]


def changed(before: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [i for i, (t, old) in enumerate(before) if not torch.equal(bits(t), old)]


# --------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_rejected_and_changes_nothing(bad: Case, monkeypatch):
    torch.manual_seed(0)
    for name, value in bad.env.items():
        monkeypatch.setenv(name, value)
    the_call = bad.build()
    before = snapshot(the_call)

    with pytest.raises(bad.error, match=bad.match):
        the_call()

    assert not changed(before), f"a rejected call changed tensors {changed(before)} of {len(before)}"


@pytest.mark.parametrize("make", VALID_CALLS.values(), ids=VALID_CALLS.keys())
def test_the_calls_the_rows_vary_are_valid(make):
    """Each row above is one of these calls with one argument made bad: so each rejection is
    caused by that argument."""
    torch.manual_seed(0)
    make()()


def test_adamw_with_every_optional_argument_is_valid():
    torch.manual_seed(0)
    adamw(
        lr=torch.tensor(1e-3),
        grad_scale=2.0,
        clip_coef=torch.tensor([0.5]),
        found_inf=flag(),
        max_exp_avg_sqs=[randn(3, 4).abs() for _ in range(2)],
    )()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_use_backend_unavailable_raises_on_entry(name):
    if name in fastopt.available_backends():
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=rf"'{name}' is unavailable"), fastopt.use_backend(name):
        pytest.fail("the block must not run")


def test_snapshot_sees_writes_through_views_grads_and_nan_bits():
    """The 'nothing changed' check above would notice a write: through a view (in its base), to a
    parameter's .grad, or one that only flips a nan's sign bit."""
    p = param(3)
    base = randn(4, 4)
    nan = torch.tensor([NAN, 1.0])
    before = snapshot(call(None, [p, base.t()[::2]], nan=nan))
    assert len(before) == 5  # p, p.grad, the view, its base, nan
    assert changed(before) == []
    base[0, 0] += 1  # inside the view: the view and its base change
    assert len(changed(before)) == 2
    p.grad[1] *= 2
    nan[:1].neg_()  # only the sign bit of the nan
    assert len(changed(before)) == 4


# --------------------------------------------------------------------------- the one C++ pass
# With the CPU extension, the ops check their lists in one C++ pass (ops._lists_in_one_pass,
# csrc/cpu/list_checks.h) and run the Python checks only when it declines. The table above tests
# that it never accepts a bad input (each row would then not raise); these test that it does
# accept the usual calls, and, on random calls with random defects, that every op's outcome (its
# error, or none) is the one the Python checks alone give.

needs_one_pass = pytest.mark.skipif(ops._one_pass_check() is None, reason="the CPU extension is not built")


def _adamw_every_option() -> Call:
    return adamw(lr=torch.tensor(1e-3), grad_scale=torch.tensor(2.0), clip_coef=torch.tensor([0.5]), found_inf=flag(),
                 max_exp_avg_sqs=[randn(3, 4).abs() for _ in range(2)])  # fmt: skip


@needs_one_pass
@pytest.mark.parametrize(
    "make", [*VALID_CALLS.values(), _adamw_every_option], ids=[*VALID_CALLS.keys(), "adamw_-every-option"]
)
def test_valid_calls_are_checked_in_one_cpp_pass(make, monkeypatch):
    check, verdicts = ops._one_pass_check(), []
    monkeypatch.setattr(ops, "_one_pass_check", lambda: lambda *args: verdicts.append(check(*args)) or verdicts[-1])
    torch.manual_seed(0)
    make()()
    assert verdicts and all(verdicts), f"the one pass declined a valid call: {verdicts}"


_NO_KERNELS = types.SimpleNamespace(
    multi_tensor_norm=lambda tensors, p, per_tensor, found_inf=None: (
        (torch.zeros(()), torch.zeros(len(tensors))) if per_tensor else torch.zeros(())
    ),
    **{name: lambda *args, **kwargs: None
       for name in ("unscale_and_check_", "scale_", "clamp_", "adaptive_clip_", "adamw_", "sgd_", "lion_")},
)  # fmt: skip

_UPDATE_STATES = {"adamw_": ("exp_avgs", "exp_avg_sqs"), "sgd_": ("momentum_buffers",), "lion_": ("exp_avgs",)}
_SINGLE_LIST_OPS = ("multi_tensor_norm", "unscale_and_check_", "scale_", "clamp_")


def _random_call(data) -> Call:
    """A call of one op on small random lists, with up to two random defects (or harmless
    variations: tuples, float64 tensors, transposed views)."""
    op = data.draw(st.sampled_from([*_UPDATE_STATES, *_SINGLE_LIST_OPS, "adaptive_clip_"]), label="op")
    n = data.draw(st.integers(0, 3), label="n")
    shapes = [data.draw(st.sampled_from([(3,), (2, 3), (4, 2)])) for _ in range(n)]
    fresh = lambda: [randn(*shape) for shape in shapes]  # noqa: E731
    names = (["params", "grads", *_UPDATE_STATES[op]] if op in _UPDATE_STATES
             else ["params", "grads"] if op == "adaptive_clip_" else ["tensors"])  # fmt: skip
    lists = {name: fresh() for name in names}
    if op == "adamw_":
        lists["steps"] = [torch.tensor(1.0) for _ in range(n)]
    scalars = {"lr": 1e-3, "inv_scale": 0.5, "coef": 2.0, "found_inf": flag()}
    for _ in range(data.draw(st.integers(0, 2), label="defects")):
        name = data.draw(st.sampled_from(sorted(lists)), label="list")
        tensors = lists[name]
        defect = data.draw(st.sampled_from([
            "dtype", "float64", "not-a-tensor", "shape", "drop", "same-tensor", "overlapping-view", "transposed",
            "expanded", "tuple", "scalar-alias", "meta", "sparse", "empty", "zero-dim",
        ]), label="defect")  # fmt: skip
        if defect == "tuple":
            lists[name] = tuple(tensors)
            continue
        if not tensors or isinstance(tensors, tuple):
            continue
        i = data.draw(st.integers(0, len(tensors) - 1), label="i")
        other = data.draw(st.sampled_from(sorted(lists)), label="other")
        j = data.draw(st.integers(0, len(lists[other]) - 1), label="j") if lists[other] else None
        shape = tuple(tensors[i].shape) if isinstance(tensors[i], torch.Tensor) else (3,)
        if defect == "dtype":
            tensors[i] = randn(*shape, dtype=data.draw(st.sampled_from([torch.int32, torch.bool, torch.complex64])))
        elif defect == "float64":
            tensors[i] = randn(*shape, dtype=torch.float64)
        elif defect == "not-a-tensor":
            tensors[i] = 1.0
        elif defect == "shape":
            tensors[i] = randn(7)
        elif defect == "drop":
            tensors.pop()
        elif defect == "same-tensor" and j is not None and isinstance(lists[other], list):
            tensors[i] = lists[other][j]
        elif defect == "overlapping-view" and j is not None and isinstance(lists[other], list):
            numel = math.prod(shape)
            base = randn(2 * numel)
            tensors[i] = base[:numel].view(shape)
            if isinstance(lists[other][j], torch.Tensor) and lists[other][j].numel() == numel:
                lists[other][j] = base[numel // 2 : numel // 2 + numel].view(lists[other][j].shape)
        elif defect == "transposed" and len(shape) == 2:
            tensors[i] = randn(*shape[::-1]).t()
        elif defect == "expanded" and len(shape) == 2:
            tensors[i] = randn(shape[0], 1).expand(shape)
        elif defect == "scalar-alias":
            scalar = data.draw(st.sampled_from(sorted(scalars)), label="scalar")
            if isinstance(tensors[i], torch.Tensor) and tensors[i].layout == torch.strided and tensors[i].numel():
                scalars[scalar] = tensors[i].view(-1)[:1]
        elif defect == "meta":
            tensors[i] = meta(*shape)
        elif defect == "sparse" and len(shape) >= 1:
            tensors[i] = sparse(*shape)
        elif defect == "empty":
            tensors[i] = randn(0)
        elif defect == "zero-dim":
            tensors[i] = torch.tensor(1.5)
    if op in _UPDATE_STATES:
        kwargs = dict(lists, lr=scalars["lr"], found_inf=scalars["found_inf"])
        if op == "adamw_":
            kwargs.update(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        elif op == "sgd_":
            kwargs.update(momentum=0.9)
        return Call(getattr(ops, op), (), kwargs)
    if op == "adaptive_clip_":
        return call(ops.adaptive_clip_, lists["params"], lists["grads"])
    tensors = lists["tensors"]
    return {
        "multi_tensor_norm": lambda: call(ops.multi_tensor_norm, tensors, found_inf=scalars["found_inf"]),
        "unscale_and_check_": lambda: call(ops.unscale_and_check_, tensors, scalars["inv_scale"], scalars["found_inf"]),
        "scale_": lambda: call(ops.scale_, tensors, scalars["coef"]),
        "clamp_": lambda: call(ops.clamp_, tensors, 1.0),
    }[op]()


def _outcome(the_call: Call) -> tuple:
    try:
        the_call()
    except Exception as error:  # noqa: BLE001 - which error, and its message, is the outcome
        return type(error), str(error)
    return None, None


@needs_one_pass
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_one_pass_gives_the_python_checks_outcome(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    the_call = _random_call(data)
    check = ops._one_pass_check()
    verdicts = []
    with unittest.mock.patch.object(backends, "select", lambda device: _NO_KERNELS):
        with unittest.mock.patch.object(ops, "_one_pass_check", lambda: None):
            python_only = _outcome(the_call)
        spy = lambda *args: verdicts.append(check(*args)) or verdicts[-1]  # noqa: E731
        with unittest.mock.patch.object(ops, "_one_pass_check", lambda: spy):
            with_one_pass = _outcome(the_call)
    assert with_one_pass == python_only
    if True in verdicts:
        assert python_only == (None, None), "the one pass accepted a call the Python checks refuse"
