"""What is timed: each op and full step, done by torch, by each fastopt backend, and by peers.

Every implementation of an op builds its step on a fresh ``TensorSet`` made from the same seed,
so rows of one (workload, op) group do the same work on the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

import fastopt
from fastopt.benchmark.workloads import Workload

# Hyper-parameters shared by every implementation (the values do not change the work).
LR = 1e-3
WEIGHT_DECAY = 0.01
MAX_NORM = 1.0
AGC_CLIP_FACTOR = 0.01
AGC_EPS = 1e-3
SGD_MOMENTUM = 0.9  # as the field's examples (ResNet on ImageNet) use it: momentum buffers are read and written


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    # Element reads + writes the math cannot avoid, per element of (params, grads, optimizer states).
    floor_accesses: tuple[int, int, int]
    floor_reason: str
    writes_grads: bool  # some implementation changes the grads: restore them (untimed) after each call
    compares: str  # what the same-work check compares: "value", "grads" or "params"
    description: str
    state_tensors: int = 2  # optimizer states per param (exp_avg and exp_avg_sq; SGD's and Lion's: one)


OPS = {
    op.name: op
    for op in [
        Op("multi_tensor_norm", (0, 1, 0), "read the grads once", False, "value",
           "global 2-norm of all grads"),
        Op("unscale_and_check_", (0, 2, 0), "read + write the grads once; the inf/nan check rides on the read",
           True, "grads", "AMP unscale of all grads (by 1.0) with the inf/nan check"),
        Op("clip_grad_norm_", (0, 3, 0), "read the grads for the norm, then read + write them to scale", True,
           "grads", "clip all grads to a global 2-norm of 1.0"),
        Op("adaptive_clip_grad_", (1, 2, 0),
           "read weights and grads once, write the grads (a unit stays on chip between its norms and its scaling)",
           True, "grads", "AGC (clip factor 0.01, eps 1e-3) of every grad, unit-wise"),
        Op("adamw step", (2, 1, 4), "read params, grads, exp_avg, exp_avg_sq; write params and both states",
           False, "params", "one AdamW update of every param"),
        Op("clip + adamw step", (2, 2, 4),
           "read the grads for the norm, then one AdamW pass applying the clip coefficient on the fly", True,
           "params", "clip to a global norm of 1.0, then AdamW"),
        Op("AMP step", (2, 2, 4),
           "as clip + adamw: unscale and the inf/nan check ride on the two passes; the scale update is a scalar",
           True, "params", "GradScaler unscale (scale 1.0) + inf check, clip, AdamW, scaler update"),
        Op("AGC + adamw step", (2, 1, 4),
           "one AdamW pass: each unit's weight and grad norms come from the loads the update makes anyway", True,
           "params", "AGC, then AdamW"),
        Op("sgd step", (2, 1, 2), "read params, grads, momentum buffers; write params and buffers", False, "params",
           f"one SGD update (momentum {SGD_MOMENTUM}, L2 weight decay) of every param", state_tensors=1),
        Op("clip + sgd step", (2, 2, 2),
           "read the grads for the norm, then one SGD pass applying the clip coefficient on the fly", True, "params",
           "clip to a global norm of 1.0, then SGD with momentum", state_tensors=1),
        Op("adam step", (2, 1, 4), "as adamw step: the L2 term is added to the grad as it is loaded", False,
           "params", "one Adam update (L2 weight decay) of every param"),
        Op("lion step", (2, 1, 2), "read params, grads, exp_avg; write params and exp_avg", False, "params",
           "one Lion update of every param", state_tensors=1),
        Op("clip + lion step", (2, 2, 2),
           "read the grads for the norm, then one Lion pass applying the clip coefficient on the fly", True, "params",
           "clip to a global norm of 1.0, then Lion", state_tensors=1),
    ]
}  # fmt: skip


def floor_bytes(op: str, workload: Workload) -> int:
    """Bytes the math of ``op`` must move over ``workload``: its memory floor at copy bandwidth."""
    params, grads, states = OPS[op].floor_accesses
    per_element = (
        params * workload.param_dtype.itemsize
        + grads * workload.grad_dtype.itemsize
        + states * workload.state_dtype.itemsize
    )
    return workload.numel * per_element


def bytes_touched(op: str, workload: Workload) -> int:
    """Bytes of distinct data ``op`` reads or writes: what must not be left in cache by the call
    before for the timing to be honest (see ``timing.copies_to_rotate``)."""
    params, grads, states = (accesses > 0 for accesses in OPS[op].floor_accesses)
    per_element = (
        params * workload.param_dtype.itemsize
        + grads * workload.grad_dtype.itemsize
        + states * OPS[op].state_tensors * workload.state_dtype.itemsize  # AdamW: exp_avg and exp_avg_sq
    )
    return workload.numel * per_element


# --------------------------------------------------------------------------- tensors


def mixed_grads_unsupported() -> str | None:
    """Why this torch cannot hold bf16 grads on fp32 params, if it cannot."""
    if not hasattr(torch.nn.Parameter(torch.zeros(1)), "grad_dtype"):
        return f"torch {torch.__version__} has no Tensor.grad_dtype, so a param cannot hold a grad of another dtype"
    return None


def attach_grads(params: list[torch.nn.Parameter], grads: list[Tensor]) -> None:
    for param, grad in zip(params, grads):
        param.grad = None
        if grad.dtype != param.dtype:
            param.grad_dtype = grad.dtype  # lets an fp32 param hold its bf16 grad
        param.grad = grad


@dataclasses.dataclass
class TensorSet:
    """One copy of a workload's tensors: params with random grads attached, and (for ops that
    change the grads) the grads' initial values, restored between timed calls."""

    params: list[torch.nn.Parameter]
    grads: list[Tensor]
    initial_grads: list[Tensor] | None

    @classmethod
    def random(cls, workload: Workload, device: torch.device, seed: int, keep_initial_grads: bool = True):
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(shape, dtype):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)

        params = [torch.nn.Parameter(randn(shape, workload.param_dtype)) for shape in workload.shapes]
        grads = [randn(shape, workload.grad_dtype) for shape in workload.shapes]
        attach_grads(params, grads)
        initial_grads = [g.clone() for g in grads] if keep_initial_grads else None
        return cls(params, grads, initial_grads)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def restore_grads(self) -> None:
        torch._foreach_copy_(self.grads, self.initial_grads)


# --------------------------------------------------------------------------- implementations

Step = Callable[[], object]
Builder = Callable[[Workload, TensorSet], Step]


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str  # as in the tables: "torch fused", "fastopt[torch]", "DeepSpeed FusedAdam", ...
    role: str  # "torch" (torch's eager paths: the baselines), "torch.compile", "fastopt" or "peer"
    op: str
    build: Builder
    backend: str | None = None  # the fastopt backend forced around every call
    one_copy: bool = False  # torch.compile: a new copy of the tensors would compile anew
    plotted: bool = True  # the chart shows torch's best and each backend's main entry point
    notes: str = ""


def _unit_scaler(scaler_class, device: torch.device):
    """A GradScaler whose scale stays 1.0, so the grads stay the same from call to call (the work
    does not depend on the scale's value)."""
    scaler = scaler_class(device.type, init_scale=1.0, growth_interval=2**30)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as the first backward does
    return scaler


def agc_per_tensor_loop(params, clip_factor: float = AGC_CLIP_FACTOR, eps: float = AGC_EPS) -> None:
    """AGC as torch users write it today (and as timm's ``adaptive_clip_grad`` does, whose formula
    this follows): a Python loop issuing a few torch ops per tensor; torch has no AGC of its own."""
    for p in params:
        if p.grad is None:
            continue
        unit_dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        weight_norm = torch.linalg.vector_norm(p.detach(), dim=unit_dims, keepdim=p.ndim > 1)
        grad_norm = torch.linalg.vector_norm(p.grad, dim=unit_dims, keepdim=p.ndim > 1)
        limit = weight_norm.clamp(min=eps) * clip_factor
        p.grad.mul_(torch.where(grad_norm > limit, limit / grad_norm.clamp(min=1e-6), 1.0))


def _cast_grads_for_torch(workload: Workload, tensors: TensorSet) -> Callable[[], None]:
    """torch's optimizers want grads in the params' dtype: with bf16 grads on fp32 params a torch
    user casts them into fp32 buffers first. That cast is part of the timed step."""
    if workload.grad_dtype == workload.param_dtype:
        return lambda: None
    buffers = [torch.empty_like(p) for p in tensors.params]
    for param, buffer in zip(tensors.params, buffers):
        param.grad = None
        param.grad_dtype = param.dtype
        param.grad = buffer
    return lambda: torch._foreach_copy_(buffers, tensors.grads)


def _torch_adamw(flavor: str) -> Callable[[list], torch.optim.Optimizer]:
    return _torch_optimizer("AdamW", flavor)


def _torch_optimizer(name: str, flavor: str) -> Callable[[list], torch.optim.Optimizer]:
    """torch.optim's ``AdamW``, ``Adam`` (L2 weight decay) or ``SGD`` (momentum 0.9, L2 weight
    decay), ``foreach=True`` or ``fused=True``."""

    def make(params):
        device = params[0].device
        options = {flavor: True}
        if name == "SGD":
            options.update(momentum=SGD_MOMENTUM)  # SGD has no capturable
        else:
            # fused on CUDA keeps its step counters on the device anyway; capturable lets the
            # CUDA-graph row capture it. foreach stays torch's eager default.
            options.update(capturable=flavor == "fused" and device.type == "cuda")
        return getattr(torch.optim, name)(params, lr=LR, weight_decay=WEIGHT_DECAY, **options)

    return make


@functools.cache
def torch_fused_unsupported(name: str, device_type: str) -> str | None:
    """Why ``torch.optim.<name>(fused=True)`` cannot step tensors of this device type here, if it
    cannot (torch's fused paths cover CUDA, and the CPU since torch 2.4, not every device)."""
    try:
        param = torch.nn.Parameter(torch.randn(8, device=device_type))
        param.grad = torch.randn_like(param)
        _torch_optimizer(name, "fused")([param]).step()
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"torch {torch.__version__}: {name}(fused=True) on {device_type} tensors failed: {short_error(exc)}"
    return None


class ForeachLion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) as a torch user writes it: torch has no Lion, so a few
    ``torch._foreach`` calls per param group, the foreach form of lucidrains' ``lion-pytorch``
    and timm's Lion. fastopt.optim.Lion's math and defaults: ``p *= 1 - lr * weight_decay``,
    ``p -= lr * sign(lerp(m, g, 1 - beta1))``, then ``m = lerp(m, g, 1 - beta2)``; grads in the
    params' dtype, as torch's optimizers take them. The benchmark's Lion baseline, and the torch
    side of ``examples/train_gpt.py --optimizer lion --compare-torch``."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            directions = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
            torch._foreach_sign_(directions)
            if weight_decay != 0:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            torch._foreach_add_(params, directions, alpha=-lr)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
        return loss


def _foreach_lion(params) -> ForeachLion:
    return ForeachLion(params, lr=LR, weight_decay=WEIGHT_DECAY)


# Full steps: an optimizer's step alone, or after torch's clip_grad_norm_ (what _step_with builds).
PLAIN_STEPS = ("adamw step", "sgd step", "adam step", "lion step")
CLIP_STEPS = ("clip + adamw step", "clip + sgd step", "clip + lion step")


def _step_with(op: str, make_optimizer: Callable[[list], object], agc: Callable[[list], None] | None = None) -> Builder:
    """A full step done the torch way, around any torch.optim-style optimizer: torch's clip and
    GradScaler, AGC by the given per-tensor function."""

    def build(workload: Workload, tensors: TensorSet) -> Step:
        cast = _cast_grads_for_torch(workload, tensors)
        params = tensors.params
        optimizer = make_optimizer(params)
        clip = functools.partial(torch.nn.utils.clip_grad_norm_, params, MAX_NORM, foreach=True)
        if op in PLAIN_STEPS:

            def step():
                cast()
                optimizer.step()

        elif op in CLIP_STEPS:

            def step():
                cast()
                clip()
                optimizer.step()

        elif op == "AMP step":
            scaler = _unit_scaler(torch.amp.GradScaler, tensors.device)

            def step():
                cast()
                scaler.unscale_(optimizer)
                clip()
                scaler.step(optimizer)
                scaler.update()

        elif op == "AGC + adamw step":

            def step():
                cast()
                agc(params)
                optimizer.step()

        else:
            raise ValueError(f"{op!r} is not a full step")
        return step

    return build


def _compiled(builder: Builder) -> Builder:
    def build(workload: Workload, tensors: TensorSet) -> Step:
        return torch.compile(builder(workload, tensors))

    return build


def _torch_op(op: str) -> Builder:
    def build(workload: Workload, tensors: TensorSet) -> Step:
        grads, params = tensors.grads, tensors.params
        if op == "multi_tensor_norm":  # what clip_grad_norm_(foreach=True) does for its norm
            return lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if op == "unscale_and_check_":
            found_inf = torch.zeros(1, device=tensors.device)
            inv_scale = torch.ones(1, device=tensors.device)
            return lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        if op == "clip_grad_norm_":
            return lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        if op == "adaptive_clip_grad_":
            return lambda: agc_per_tensor_loop(params)
        raise ValueError(f"torch has no single call for {op!r}")

    return build


def _fastopt(op: str) -> Builder:
    """fastopt through what users call: the functional ops, and the drop-in optimizers (AdamW, SGD,
    Adam, Lion) and GradScaler for the steps (clipping and AGC inside the optimizer's step)."""

    def build(workload: Workload, tensors: TensorSet) -> Step:
        grads, params, device = tensors.grads, tensors.params, tensors.device
        if op == "multi_tensor_norm":
            return lambda: fastopt.multi_tensor_norm(grads)
        if op == "unscale_and_check_":
            found_inf = torch.zeros(1, device=device)
            inv_scale = torch.ones(1, device=device)
            return lambda: fastopt.unscale_and_check_(grads, inv_scale, found_inf)
        if op == "clip_grad_norm_":
            return lambda: fastopt.clip_grad_norm_(params, MAX_NORM)
        if op == "adaptive_clip_grad_":
            return lambda: fastopt.adaptive_clip_grad_(params, AGC_CLIP_FACTOR, AGC_EPS)
        adamw = functools.partial(fastopt.optim.AdamW, params, lr=LR, weight_decay=WEIGHT_DECAY)
        if op == "adamw step":
            return adamw().step
        if op == "clip + adamw step":
            return adamw(max_grad_norm=MAX_NORM).step
        if op == "AGC + adamw step":
            return adamw(agc_clip_factor=AGC_CLIP_FACTOR, agc_eps=AGC_EPS).step
        if op == "AMP step":
            optimizer = adamw(max_grad_norm=MAX_NORM)
            scaler = _unit_scaler(fastopt.amp.GradScaler, device)

            def step():
                scaler.step(optimizer)
                scaler.update()

            return step
        others = {
            "sgd step": functools.partial(fastopt.optim.SGD, params, lr=LR, momentum=SGD_MOMENTUM,
                                          weight_decay=WEIGHT_DECAY),
            "adam step": functools.partial(fastopt.optim.Adam, params, lr=LR, weight_decay=WEIGHT_DECAY),
            "lion step": functools.partial(fastopt.optim.Lion, params, lr=LR, weight_decay=WEIGHT_DECAY),
        }  # fmt: skip
        if op in others:
            return others[op]().step
        if op.startswith("clip + ") and op.removeprefix("clip + ") in others:
            return others[op.removeprefix("clip + ")](max_grad_norm=MAX_NORM).step
        raise ValueError(f"unknown op {op!r}")

    return build


def _fastopt_functional_adamw(workload: Workload, tensors: TensorSet) -> Step:
    """The functional ``adamw_`` under the drop-in: the same update without the optimizer's
    per-step Python (gathering lists, stats)."""
    params, grads = tensors.params, tensors.grads
    exp_avgs = [torch.zeros_like(p, dtype=workload.state_dtype) for p in params]
    exp_avg_sqs = [torch.zeros_like(p, dtype=workload.state_dtype) for p in params]
    steps = [torch.zeros((), device=tensors.device) for _ in params]
    return lambda: fastopt.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, steps, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY
    )


# --------------------------------------------------------------------------- peers


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the top-level module whose presence is detected (never installed by us)
    optimizer_class: Callable[[], type]
    devices: tuple[str, ...]  # device types whose tensors it steps
    options: dict = dataclasses.field(default_factory=dict)
    install: str = ""  # how to get it, for the skip reason


def _class_from(module: str, name: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(module), name)


def _torchao_adamw() -> type:
    try:
        return importlib.import_module("torchao.optim").AdamW
    except (ImportError, AttributeError):  # releases before torchao.optim kept it in the prototype
        return importlib.import_module("torchao.prototype.low_bit_optim").AdamW


ADAMW_MODE = {"adam_w_mode": True}  # the fused Adams of apex lineage do AdamW with this flag
CUDA, CPU, ANY = ("cuda",), ("cpu",), ("cpu", "cuda")
PEERS = (
    Peer("DeepSpeed FusedAdam", "deepspeed", _class_from("deepspeed.ops.adam", "FusedAdam"), CUDA, ADAMW_MODE,
         "pip install deepspeed"),
    # The AdamW a CPU user would pick (ZeRO-Offload's): deepspeed builds its C++ op with ninja on
    # first use (4 CPU-minutes on a 2-core machine); afterwards it loads from deepspeed's cache.
    Peer("DeepSpeed CPUAdam", "deepspeed", _class_from("deepspeed.ops.adam", "DeepSpeedCPUAdam"), CPU,
         {"adamw_mode": True}, "pip install deepspeed (with torch's CPU build: README.md, Benchmarks)"),
    Peer("TransformerEngine FusedAdam", "transformer_engine",
         _class_from("transformer_engine.pytorch.optimizers", "FusedAdam"), CUDA, ADAMW_MODE),
    Peer("apex FusedAdam", "apex", _class_from("apex.optimizers", "FusedAdam"), CUDA, ADAMW_MODE),
    Peer("torchao AdamW", "torchao", _torchao_adamw, ANY, install="pip install torchao"),
)  # fmt: skip
PEER_OPS = ("adamw step", "clip + adamw step")


@functools.cache
def peer_unavailable(name: str, device_type: str) -> str | None:
    """Why a peer cannot run here, or None. Detection only: peers are never installed by us."""
    if name == "timm":
        if importlib.util.find_spec("timm") is None:
            return "timm is not installed"
        try:
            importlib.import_module("timm.utils.agc")
        except Exception as exc:  # noqa: BLE001 - any failure to import is a reason to report
            return f"importing timm.utils.agc failed: {type(exc).__name__}: {exc}"
        return None
    peer = next(p for p in PEERS if p.name == name)
    if importlib.util.find_spec(peer.package) is None:
        return f"{peer.package} is not installed" + (f" ({peer.install})" if peer.install else "")
    if device_type not in peer.devices:
        return f"{peer.name} runs on {' and '.join(d.upper() for d in peer.devices)} tensors only"
    try:
        optimizer_class = peer.optimizer_class()
    except Exception as exc:  # noqa: BLE001
        return f"importing it failed: {short_error(exc)}"
    try:  # installed is not yet working: one step on a small tensor (builds the op of a peer that builds on use)
        param = torch.nn.Parameter(torch.randn(64, device=device_type))
        param.grad = torch.randn_like(param)
        optimizer_class([param], lr=LR, weight_decay=WEIGHT_DECAY, **peer.options).step()
    except Exception as exc:  # noqa: BLE001
        return f"installed, but a step on {device_type} tensors failed: {short_error(exc)}"
    return None


def short_error(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _peer_optimizer(peer: Peer) -> Callable[[list], object]:
    def make(params):
        return peer.optimizer_class()(params, lr=LR, weight_decay=WEIGHT_DECAY, **peer.options)

    return make


def _timm_agc(params) -> None:
    from timm.utils.agc import adaptive_clip_grad

    adaptive_clip_grad(params, clip_factor=AGC_CLIP_FACTOR, eps=AGC_EPS)


# --------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Skipped:
    implementation: str
    ops: tuple[str, ...]
    reason: str


COMPILE_OPT_IN = "opt-in: pass --compile (compiling the step takes about a minute per workload on a CPU)"


def implementations(
    device: torch.device, backend_names: list[str], *, peers: bool = True, compile: bool = False
) -> tuple[list[Implementation], list[Skipped]]:
    """Every implementation of every op that can run here, and those that cannot, with why."""
    found: list[Implementation] = []
    skipped: list[Skipped] = []
    step_ops = ("adamw step", "clip + adamw step", "AMP step")

    # torch's own paths: foreach (torch's default) and fused, the baselines of every ratio.
    for op in ("multi_tensor_norm", "unscale_and_check_", "clip_grad_norm_"):
        found.append(Implementation("torch foreach", "torch", op, _torch_op(op)))
    agc = "adaptive_clip_grad_"
    found.append(Implementation("torch loop (timm AGC)", "torch", agc, _torch_op(agc)))
    for flavor in ("foreach", "fused"):
        for op in step_ops:
            found.append(Implementation(f"torch {flavor}", "torch", op, _step_with(op, _torch_adamw(flavor))))
        found.append(
            Implementation(f"torch loop (timm AGC) + {flavor}", "torch", "AGC + adamw step",
                           _step_with("AGC + adamw step", _torch_adamw(flavor), agc=agc_per_tensor_loop))
        )  # fmt: skip

    # The other optimizers against torch's fastest paths for them: torch.optim's SGD and Adam,
    # foreach and fused (where fused steps this device), clip_grad_norm_(foreach=True) before the
    # clip variants; Lion, which torch lacks, against a foreach Lion of torch ops.
    for name, ops in (("SGD", ("sgd step", "clip + sgd step")), ("Adam", ("adam step",))):
        for flavor in ("foreach", "fused"):
            if flavor == "fused" and (reason := torch_fused_unsupported(name, device.type)):
                skipped.append(Skipped("torch fused", ops, reason))
                continue
            for op in ops:
                build = _step_with(op, _torch_optimizer(name, flavor))
                found.append(Implementation(f"torch {flavor}", "torch", op, build))
    lion_note = "torch has no Lion: fastopt.benchmark.cases.ForeachLion, in torch._foreach ops"
    for op in ("lion step", "clip + lion step"):
        found.append(Implementation("torch _foreach Lion", "torch", op, _step_with(op, _foreach_lion), notes=lion_note))

    for op in ("adamw step", "clip + adamw step"):
        if compile:
            found.append(Implementation("torch.compile foreach", "torch.compile", op,
                                        _compiled(_step_with(op, _torch_adamw("foreach"))), one_copy=True))  # fmt: skip
    if not compile:
        skipped.append(Skipped("torch.compile foreach", ("adamw step", "clip + adamw step"), COMPILE_OPT_IN))

    for backend in backend_names:
        label = f"fastopt[{backend}]"
        for op in OPS:
            found.append(Implementation(label, "fastopt", op, _fastopt(op), backend=backend))
        found.append(Implementation(f"{label} adamw_", "fastopt", "adamw step", _fastopt_functional_adamw,
                                    backend=backend, plotted=False))  # fmt: skip

    if not peers:
        return found, skipped + [Skipped(p.name, PEER_OPS, "peers not requested (--no-peers)") for p in PEERS]
    reason = peer_unavailable("timm", device.type)
    timm_ops = ("adaptive_clip_grad_", "AGC + adamw step")
    if reason:
        skipped.append(Skipped("timm adaptive_clip_grad", timm_ops, reason))
    else:
        found.append(Implementation("timm", "peer", "adaptive_clip_grad_", lambda w, t: lambda: _timm_agc(t.params)))
        found.append(Implementation("timm + torch fused", "peer", "AGC + adamw step",
                                    _step_with("AGC + adamw step", _torch_adamw("fused"), agc=_timm_agc)))  # fmt: skip
    for peer in PEERS:
        reason = peer_unavailable(peer.name, device.type)
        if reason:
            skipped.append(Skipped(peer.name, PEER_OPS, reason))
            continue
        for op in PEER_OPS:
            found.append(Implementation(peer.name, "peer", op, _step_with(op, _peer_optimizer(peer)),
                                        notes="clip by torch" if op != "adamw step" else ""))  # fmt: skip
    return found, skipped
