"""What every fastopt optimizer shares: the step's two passes, clipping, AGC, AMP, the spike guard,
the monitor, the step plan and flat storage. An optimizer (fastopt/optim/adam.py, sgd.py, lion.py)
adds only its update op, its per-param states and its hyperparameters' checks.

A step is the two passes of docs/design.md section 1: one read of the grads (global norm, and the
AMP inf/nan check when fastopt.amp.GradScaler drives the step), then one update pass per param
group that applies ``1 / grad_scale * clip_coef`` to the grads on the fly and changes nothing
where an overflow was found. No value is read back to the host, so the step can be captured in
a CUDA graph; what happened is left in ``optimizer.stats`` as device tensors.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import operator

import torch
import torch.distributed as dist
from torch import Tensor

from fastopt import backends, distributed, ops
from fastopt.backends import reference

__all__ = ["FusedOptimizer"]


# The op's name of each state's list (fastopt.ops' update ops take the states as lists).
_OP_LIST_NAMES = {"exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs", "max_exp_avg_sq": "max_exp_avg_sqs",
                  "step": "steps", "momentum_buffer": "momentum_buffers"}  # fmt: skip


@dataclasses.dataclass
class _GroupLists:
    """The tensors of one param group (on one device) that take part in this step."""

    state_keys: tuple[str, ...]  # the per-param states the update takes, in the op's order
    params: list[Tensor] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    states: dict[str, list[Tensor]] = dataclasses.field(default_factory=dict)
    indices: list[int] = dataclasses.field(default_factory=list)  # positions among all params
    fresh: list[bool] = dataclasses.field(default_factory=list)  # states made for this step (no history yet)
    backend_plan: dict = dataclasses.field(default_factory=dict)  # what a backend prepared for these lists

    def __post_init__(self) -> None:
        for key in self.state_keys:
            self.states.setdefault(key, [])

    def append(self, param: Tensor, state: dict, fresh: bool) -> None:
        """One param with a grad, and its states."""
        self.params.append(param)
        self.grads.append(param.grad)
        for key in self.state_keys:
            self.states[key].append(state[key])
        self.fresh.append(fresh)

    def as_op_lists(self) -> dict[str, list[Tensor]]:
        """The lists by the names the update op takes them."""
        lists = {"params": self.params, "grads": self.grads}
        lists.update((_OP_LIST_NAMES[key], self.states[key]) for key in self.state_keys)
        return lists

    def written(self) -> itertools.chain:
        """Every tensor the update writes: the params and their states."""
        return itertools.chain(self.params, *self.states.values())


class _Changes:
    """A counter of changes, shared by a state table and its per-param dicts."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class _CountsChanges:
    """Mutating methods of a dict that count each call in ``self._changes`` (what a step plan
    compares instead of looking at every param's state)."""

    def _changed(self) -> None:
        changes = self.__dict__.get("_changes")  # absent while unpickling sets the items
        if changes is not None:
            changes.value += 1

    def __setitem__(self, key, value):
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self):
        self._changed()
        super().clear()

    def update(self, *args, **kwargs):
        self._changed()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self._changed()
        return super().setdefault(key, default)


class _ParamState(_CountsChanges, dict):
    """One param's state dict (``exp_avg``, ``exp_avg_sq``, ``step``, ...), counting changes."""

    def __init__(self, changes: _Changes, *args):
        super().__init__(*args)
        self._changes = changes

    def __reduce__(self):  # pickled as a plain dict: checkpoints load without fastopt
        return dict, (dict(self),)


class _StateTable(_CountsChanges, collections.defaultdict):
    """``optimizer.state``: torch's ``defaultdict(dict)`` whose dicts count every change (a state
    tensor set or replaced, a dict added or removed) in ``changes``: a step plan notices them with
    one comparison instead of a look at every param's state. Plain dicts put in (a user's
    ``optimizer.state[p] = {...}``) are taken over by the next step that rebuilds the plan."""

    def __init__(self, items=()):
        super().__init__(dict)
        self._changes = _Changes()
        for key, value in dict(items).items():
            dict.__setitem__(self, key, self.tracked(value))

    @property
    def changes(self) -> int:
        return self._changes.value

    def tracked(self, value):
        """``value`` as a dict of this table (a copy for a plain dict)."""
        if isinstance(value, _ParamState) and value._changes is self._changes:
            return value
        return _ParamState(self._changes, value) if isinstance(value, dict) else value

    def __missing__(self, key):
        value = self[key] = _ParamState(self._changes)
        return value

    def __reduce__(self):  # pickled as torch's: a defaultdict(dict) of plain dicts
        return collections.defaultdict, (dict, {k: dict(v) if isinstance(v, dict) else v for k, v in self.items()})

    def __deepcopy__(self, memo):
        return _StateTable(copy.deepcopy(self.__reduce__()[1][1], memo))


@dataclasses.dataclass
class _StepPlan:
    """What a successful step gathered, reused while the same params have grads: their states
    and lists, which the ops validated in full then. A later step checks only what can have
    changed and calls the ops' prechecked entries, so its host cost does not grow with several
    validations per tensor (docs/design.md, "The step plan").

    ``key`` covers what Python sees at once: the layout version (``load_state_dict``,
    ``add_param_group``), the state table's change count (a state tensor or dict replaced), the
    groups' params lists and which states each group's update takes (e.g. amsgrad's). With the
    CPU extension, ``watch`` (its ``GradWatch``) checks the rest in one C++ loop over the params:
    each group's params list unchanged, each param's data unchanged, the same params with grads,
    and the new grads (checked, then kept as C++ tensors that the cpu backend reads directly, or
    put into the lists for other backends).
    Without it, the same checks run in Python, slower."""

    key: tuple
    gathered: list  # [(group, {device: _GroupLists})]
    shapes: dict[int, list[tuple]]  # id(_GroupLists) -> the params' shapes
    written: ops.WrittenSpans | None  # the memory of every param and state (the Python check)
    with_grads: tuple  # ids of the params with grads, per group (the Python check)
    param_records: dict[int, list[tuple]]  # id(_GroupLists) -> each param's address and dtype (the Python check)
    watch: object | None = None
    norm_plans: dict = dataclasses.field(default_factory=dict)  # device -> what the norm's backend may use

    def refresh(self, param_groups: list, lists_needed: bool) -> bool:
        """Whether the plan still holds. If so the new grads are checked (a bad grad raises,
        changing nothing) and, when ``lists_needed``, in the lists."""
        if self.watch is None:
            return self.refresh_in_python(param_groups)
        if self.watch.refresh() < 0:
            return False
        if lists_needed:
            self.watch.fill_lists()
        return True

    def refresh_in_python(self, param_groups: list) -> bool:
        with_grads = _ids_with_grads(param_groups)
        if with_grads != self.with_grads:
            return False
        for _, by_device in self.gathered:
            for lists in by_device.values():  # a param's data replaced (p.data = x) moves or retypes it
                if list(map(_param_record, lists.params)) != self.param_records[id(lists)]:
                    return False
        for _, by_device in self.gathered:
            for device, lists in by_device.items():
                grads = [p.grad for p in lists.params]
                if any(map(_is_sparse, grads)):
                    raise RuntimeError(_SPARSE_MESSAGE)
                ops.check_replacement("grads", grads, self.shapes[id(lists)], device, self.written)
                lists.grads[:] = grads
        return True

    def release_grads(self) -> None:
        """Let go of this step's grads (None in the lists), so that ``zero_grad()`` frees their
        memory until the next backward, as it does without a plan."""
        if self.watch is not None:
            self.watch.release()
            return
        for _, by_device in self.gathered:
            for lists in by_device.values():
                lists.grads[:] = itertools.repeat(None, len(lists.grads))

    @classmethod
    def of(cls, key: tuple, gathered: list, param_groups: list) -> "_StepPlan | None":
        lists = [lists for _, by_device in gathered for lists in by_device.values()]
        params = [p for group_lists in lists for p in group_lists.params]
        if distributed.any_dtensor(params):  # sharded params keep the full path (fastopt.distributed)
            return None
        written = list(itertools.chain.from_iterable(g.written() for g in lists))
        shapes = {id(g): [tuple(p.size()) for p in g.params] for g in lists}
        with_grads = _ids_with_grads(param_groups)
        records = {id(g): list(map(_param_record, g.params)) for g in lists}
        native = _grad_watch_type()
        spans = ops.WrittenSpans.of(written) if native is None else None
        plan = cls(key, gathered, shapes, spans, with_grads, records)
        if native is not None:
            plan._watch(native, param_groups, written)
        return plan

    def _watch(self, native, param_groups: list, written: list[Tensor]) -> None:
        """The C++ GradWatch over this plan: which entry each param's grad is (the entries of one
        list are consecutive), handed to the backends through the lists' plans."""
        slots = [-1] * sum(len(group["params"]) for group in param_groups)
        grad_lists, positions, ranges = [], [], {}
        for _, by_device in self.gathered:
            for device, lists in by_device.items():
                first = len(positions)
                for position, index in enumerate(lists.indices):
                    slots[index] = len(positions)
                    grad_lists.append(lists.grads)
                    positions.append(position)
                lists.backend_plan["watch"] = first
                ranges.setdefault(device, []).append((first, len(lists.indices)))
        self.watch = native([group["params"] for group in param_groups], slots, grad_lists, positions, written)
        for _, by_device in self.gathered:
            for lists in by_device.values():
                lists.backend_plan["watch"] = (self.watch, lists.backend_plan["watch"])
        self.norm_plans = {
            device: {"watch": (self.watch, device_ranges), "device": device} for device, device_ranges in ranges.items()
        }


def _ids_with_grads(param_groups: list) -> tuple:
    """Which params have a grad, per group (the Python check's key)."""
    return tuple(tuple(id(p) for p in group["params"] if p.grad is not None) for group in param_groups)


def _grad_watch_type():
    """The CPU extension's GradWatch, when the extension is built (any device: it reads metadata)."""
    from fastopt.backends import cpu  # the cpu backend's module loads the extension once

    return None if cpu._C is None else cpu._C.GradWatch


_GRAD_OF = operator.attrgetter("grad")


def _grads_are_in_python(params: list[Tensor], views: list[Tensor]) -> bool:
    return all(map(operator.is_, map(_GRAD_OF, params), views))


def _grads_are():
    """``grads_are(params, views)``: whether ``params[i].grad is views[i]`` for every i. The CPU
    extension's loop when it is built (any device: it reads metadata), else Python's."""
    from fastopt.backends import cpu

    return _grads_are_in_python if cpu._C is None else cpu._C.grads_are
_SPARSE_MESSAGE = "fastopt's optimizers do not support sparse gradients"


def _views_of(buffer: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive views of ``buffer`` with the shapes of ``like``."""
    offsets = itertools.accumulate((t.numel() for t in like), initial=0)
    return [buffer[offset : offset + t.numel()].view(t.shape) for offset, t in zip(offsets, like)]


def _param_record(param: Tensor) -> tuple:
    return param.data_ptr(), param.dtype, param.device


def _grads_on(gathered: list, device: torch.device) -> list[Tensor]:
    """The grads of every group on ``device``, in group order, in one list (C-level concatenation)."""
    lists = [by_device[device].grads for _, by_device in gathered if device in by_device]
    return lists[0] if len(lists) == 1 else list(itertools.chain.from_iterable(lists))


def _is_sparse(t: Tensor) -> bool:
    return t.is_sparse


def _zeros(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 0-d zero of an explicit dtype (torch's default dtype may have been set to float64)."""
    return torch.zeros((), dtype=dtype, device=device)


def _scalar_on(t: Tensor, device: torch.device) -> Tensor:
    """A 1-element tensor as a 0-d tensor on ``device``: itself when it already is one."""
    return t if t.dim() == 0 and t.device == device else t.reshape(()).to(device)


def _lr_on(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """A tensor lr on the params' device stays a tensor (graph-capturable); a CPU tensor lr for
    device params is read on the host, which costs no device sync, rather than copied over."""
    if not isinstance(lr, Tensor) or lr.device == device:
        return lr
    return lr.item() if lr.device.type == "cpu" else lr.to(device)


def _step_dtype() -> torch.dtype:
    """The dtype of new step counters: float64 when torch's default dtype is float64, else
    float32 (torch.optim's ``_get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _beta_value(beta: float | Tensor) -> float:
    """A beta as the ops take it: a float. A tensor beta (torch accepts them) is read on the host:
    free for a CPU tensor, one device sync per step for a GPU tensor (the ops take betas as
    numbers; keep tensor betas on the CPU)."""
    return beta.item() if isinstance(beta, Tensor) else beta


def _widest(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype that loses nothing of either (of equal widths, ``a``)."""
    return b if torch.finfo(b).bits > torch.finfo(a).bits else a


class FusedOptimizer(torch.optim.Optimizer):
    """The base of fastopt's optimizers: torch's constructor, param groups, state_dict and
    schedulers, and fastopt's step. A subclass sets ``_OP`` (its update op in ``fastopt.ops``),
    ``_FLAT_STATE_KEYS``, and defines ``_state_keys``, ``_init_state``, ``_update_hyper`` and
    ``_check_group``.

    Beyond torch's arguments, every fastopt optimizer takes:

    - ``max_grad_norm``: clip the global 2-norm of all grads (as ``clip_grad_norm_`` before
      ``step()`` would), computed in the step's read pass. Grads themselves are left unchanged.
    - ``agc_clip_factor`` / ``agc_eps``: adaptive gradient clipping (NFNets) of each param's grad
      unit by unit before the update, in place (as timm's ``adaptive_clip_grad``); under a loss
      scale the grads are first unscaled in place, since AGC compares them with the weights.
      Per param group: a group with ``"agc_clip_factor": None`` opts out (e.g. the classifier
      head). With both, AGC comes first and ``max_grad_norm`` applies to the AGC'd grads.
    - ``state_dtype``: dtype of the optimizer's tensor states (moments, momentum buffers; default:
      the param's, as torch does); ``torch.float32`` keeps fp32 states for bf16 / fp16 params.
    - ``process_group``: for ZeRO-style sharding (each rank steps different params), the group
      over which the grad norm and the overflow flag are global. FSDP2 (DTensor params) needs
      nothing: its norms are global over the mesh already.
    - ``spike_guard``: skip the update, on the device, when the grad norm exceeds this many times
      its running average (an EMA with decay ``spike_ema_decay`` over accepted steps, after
      ``spike_warmup`` of them), or is inf / nan: the loss spike that would otherwise blow the run
      up. Counted in ``stats["spikes"]``; training goes on with the next batch.
    - ``monitor``: a ``fastopt.monitor.TrainingMonitor`` that each step records into (grad-norm
      history, clip rate, skipped steps, per-tensor grad norms from the same read), on the device.
    - ``flat_states``: keep the tensor states of all params as views of one contiguous buffer per
      device, dtype and kind. ``state_dict()`` keeps torch's per-param layout (the views);
      checkpoints load both ways with torch's optimizer.
    - ``flat_grads``: give every param that requires a grad a view of one zeroed buffer per device
      and dtype as its ``.grad``, into which backward accumulates in place; ``zero_grad()`` zeroes
      each buffer in one op (whatever ``set_to_none`` says: the grads stay allocated, so a param
      that gets no gradient in a backward is stepped with a zero grad, as after
      ``zero_grad(set_to_none=False)`` in torch). A grad set to None or replaced (e.g. by
      ``model.zero_grad()``) still works, as an ordinary grad, and gets its view back at the next
      ``optimizer.zero_grad()``. With both, a step's host work is one C++ pass over the params that
      finds nothing changed (docs/design.md, "The step plan").

    ``optimizer.stats`` holds device tensors updated by every step, read by the host only when
    you log them: ``grad_norm`` (global 2-norm of the unscaled grads, after AGC if any, before
    clipping by norm: it costs one read of the grads, 4 bytes per fp32 param, on every step),
    ``clip_coef`` (1.0 when not clipped), ``found_inf`` (non-zero on an inf/nan overflow),
    ``skipped_steps`` (cumulative, overflows and spikes) and ``spikes`` (cumulative).

    With ``fastopt.amp.GradScaler``, ``scaler.step(optimizer)`` hands the step ``grad_scale`` /
    ``found_inf``: grads are unscaled on the fly and an overflow skips the step on the device,
    leaving params, states and step counters untouched. ``torch.amp.GradScaler`` does the same when
    the step clips or guards itself (``max_grad_norm``, ``spike_guard``, AGC; ``fused=True``): that is
    when ``_step_supports_amp_scaling`` is True. Otherwise it is False, as for torch's optimizers: the
    scaler unscales, reads the overflow flag on the host and skips the call, and Lightning's
    ``gradient_clip_val`` (which refuses optimizers that declare it) works in every precision.

    What differs from torch, and what to do about it:

    - A step skipped on the device (an overflow handed over by the scaler, or a spike) is invisible
      to the host without a sync: accelerate's ``optimizer.step_was_skipped`` stays False and HF
      Trainer's LR scheduler steps anyway, as with torch's fused optimizers. ``stats["skipped_steps"]``
      counts them on the device; read it when logging (one sync every N steps, not every step),
      or keep ``fastopt.amp.GradScaler.step_skipped`` as a tensor.
    - ``max_grad_norm`` sums the norm in the optimizer's param order (group after group), bit for
      bit ``clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]])``. When the
      groups list the params in another order than ``model.parameters()`` (decay / no-decay
      groups), ``clip_grad_norm_(model.parameters())`` may differ in the norm's last bit.
    - Under ``torch.compile`` the step traces fastopt's reference formulas (``fastopt.backends.reference``,
      torch ops that Inductor fuses) instead of calling a backend's kernels: a compiled training
      step graph-breaks only at ``backward()``, and ``torch.compile(optimizer.step, fullgraph=True)``
      works. dynamo runs ``_init_group`` eagerly, as for torch's optimizers. A ``process_group``, a
      ``monitor``, params on several devices or tensor hyperparameters read on the host keep the
      eager step, run outside the graph.
    - ``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` keep fastopt's settings and the
      spike guard's state; a deep copy shares the ``process_group`` (pickling one fails: save the
      ``state_dict()`` instead).
    """

    _fastopt_can_check_inf = True  # fastopt.amp.GradScaler may leave the inf/nan check to our read pass
    _OP = ""  # the update op in fastopt.ops (and fastopt.backends.reference): "adamw_", "sgd_", "lion_"
    _FLAT_STATE_KEYS: tuple[str, ...] = ()  # the tensor states that flat_states keeps in buffers
    _GROUP_DEFAULTS: dict = {}  # keys a torch checkpoint of this optimizer may lack, with torch's defaults

    # fastopt's settings beyond torch's param groups: what a copy (deepcopy, pickle,
    # torch.save(optimizer)) must keep, with torch's own "defaults", "state" and "param_groups".
    _SETTINGS = ("max_grad_norm", "state_dtype", "process_group", "spike_guard", "spike_warmup",
                 "spike_ema_decay", "monitor", "spike_state", "stats", "_layout_version", "flat_states", "flat_grads")  # fmt: skip

    @property
    def state(self) -> _StateTable:
        """torch's per-param state (``defaultdict(dict)``), in a table that counts changes for the
        step plan. Assigning any mapping converts it."""
        return self.__dict__["_state_table"]

    @state.setter
    def state(self, value) -> None:
        self.__dict__["_state_table"] = value if isinstance(value, _StateTable) else _StateTable(value)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``torch.amp.GradScaler.step`` hands this optimizer ``grad_scale`` / ``found_inf``
        instead of unscaling the grads and reading the overflow flag on the host first.

        True when the step itself clips or guards (``max_grad_norm``, ``spike_guard``, AGC in any
        group) — then it unscales on the fly and skips an overflow on the device, with no sync —
        or with ``fused=True``, as torch's fused optimizers declare it. Otherwise False, as torch's
        optimizers: GradScaler unscales first, and frameworks that clip between unscale and step
        (Lightning's ``gradient_clip_val``, accelerate's ``clip_grad_norm_``) accept the optimizer.
        ``fastopt.amp.GradScaler`` checks for overflows in the step's own read pass either way.
        Assigning it (``optimizer._step_supports_amp_scaling = True``) overrides the choice."""
        override = self.__dict__.get("_amp_scaling_override")
        if override is not None:
            return override
        return bool(
            self.defaults.get("fused")
            or getattr(self, "max_grad_norm", None) is not None
            or getattr(self, "spike_guard", None) is not None
            or any(group.get("agc_clip_factor") is not None for group in self.param_groups)
        )

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        self.__dict__["_amp_scaling_override"] = bool(value)

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        max_grad_norm: float | None = None,
        agc_clip_factor: float | None = None,
        agc_eps: float = 1e-3,
        state_dtype: torch.dtype | None = None,
        process_group=None,
        spike_guard: float | None = None,
        spike_warmup: int = 20,
        spike_ema_decay: float = 0.99,
        monitor=None,
        flat_states: bool = False,
        flat_grads: bool = False,
    ):
        """``defaults``: the subclass's hyperparameters, checked by it as torch checks them."""
        if defaults.get("differentiable"):
            raise ValueError(f"fastopt.optim.{type(self).__name__} does not support differentiable=True")
        if max_grad_norm is not None:
            max_grad_norm = ops.check_real("max_grad_norm", max_grad_norm, minimum=0.0, finite=False)
        if agc_clip_factor is not None:
            ops.check_real("agc_clip_factor", agc_clip_factor, above=0.0)
        ops.check_real("agc_eps", agc_eps, minimum=0.0)
        if spike_guard is not None:
            ops.check_real("spike_guard", spike_guard, above=1.0)
        ops.check_real("spike_ema_decay", spike_ema_decay, minimum=0.0, below=1.0)
        if not isinstance(spike_warmup, int) or spike_warmup < 0:
            raise ValueError(f"spike_warmup must be a non-negative int, got {spike_warmup!r}")
        if state_dtype is not None and state_dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"state_dtype must be a floating dtype, got {state_dtype}")
        defaults = dict(defaults, agc_clip_factor=agc_clip_factor, agc_eps=agc_eps)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.state_dtype = state_dtype
        self.process_group = process_group
        self.spike_guard, self.spike_warmup, self.spike_ema_decay = spike_guard, spike_warmup, spike_ema_decay
        self.monitor = monitor
        self.spike_state: dict[str, Tensor] = {}  # the spike guard's EMA, on the device
        self.stats: dict[str, Tensor] = {}
        self._step_plan: _StepPlan | None = None
        self._layout_version = 0  # bumped when params or states are replaced: plans of before are void
        self.flat_states, self.flat_grads = bool(flat_states), bool(flat_grads)
        if (self.flat_states or self.flat_grads) and distributed.any_dtensor(
            [p for group in self.param_groups for p in group["params"]]
        ):
            raise ValueError("flat_states / flat_grads take plain tensors; FSDP2 (DTensor) params keep their own storage")
        self._flat_grads: list = []  # [(buffer, params, views)]
        if self.flat_grads:
            self._flatten_grads()

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._layout_version = getattr(self, "_layout_version", 0) + 1
        if getattr(self, "flat_grads", False):  # torch's __init__ adds the first groups before our attributes exist
            self._flatten_grads()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with ``flat_grads``, one ``zero_()`` per buffer whatever
        ``set_to_none`` says, and the views put back where a grad was set to None or replaced."""
        if not self.flat_grads:
            return super().zero_grad(set_to_none)
        grads_are = _grads_are()
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            for buffer, params, views in self._flat_grads:
                buffer.zero_()
                if not grads_are(params, views):
                    for param, view in zip(params, views):
                        if param.grad is not view:
                            param.grad = view

    def _flatten_grads(self) -> None:
        """Every param that requires a grad gets a view of one buffer per device and dtype as its
        grad (a grad it has is copied in)."""
        params = dict.fromkeys(p for group in self.param_groups for p in group["params"] if p.requires_grad)
        buckets: dict[tuple, list[Tensor]] = {}
        for param in params:
            buckets.setdefault((param.device, param.dtype), []).append(param)
        flat = []
        with torch.no_grad():
            for (device, dtype), members in buckets.items():
                buffer = torch.zeros(sum(p.numel() for p in members), device=device, dtype=dtype)
                views = _views_of(buffer, members)
                for param, view in zip(members, views):
                    if param.grad is not None:
                        view.copy_(param.grad.to_dense() if param.grad.is_sparse else param.grad)
                    param.grad = view
                flat.append((buffer, members, views))
        self._flat_grads = flat

    def _flatten_states(self) -> bool:
        """With ``flat_states``: the tensor states (``_FLAT_STATE_KEYS``) of every param with states as
        views of one buffer per device, dtype and kind, in param order (copied over; the dicts get
        the views). False when they already are."""
        params = [p for group in self.param_groups for p in group["params"] if p in self.state]
        kinds: dict[tuple, list[tuple[dict, Tensor]]] = {}
        for param in params:
            state = self.state[param]
            for key in self._FLAT_STATE_KEYS:
                if isinstance(state.get(key), Tensor):
                    kinds.setdefault((state[key].device, state[key].dtype, key), []).append((state, state[key]))
        buffers = {t.untyped_storage().data_ptr() for entries in kinds.values() for _, t in entries}
        flat = len(buffers) == len(kinds) and all(
            t.is_contiguous() and t.data_ptr() == entries[0][1].data_ptr() + offset * t.element_size()
            for entries in kinds.values()
            for (_, t), offset in zip(entries, itertools.accumulate((t.numel() for _, t in entries), initial=0))
        )
        if flat:
            return False
        with torch.no_grad():
            for (device, dtype, key), entries in kinds.items():
                buffer = torch.empty(sum(t.numel() for _, t in entries), device=device, dtype=dtype)
                for (state, t), view in zip(entries, _views_of(buffer, [t for _, t in entries])):
                    view.copy_(t)
                    state[key] = view
        return True

    def __getstate__(self):
        """torch's state (defaults, state, param_groups) and fastopt's settings, so that a copy
        clips, guards and keeps moments as the original does. The step plan (a cache of tensor
        lists) is left out: a copy builds its own."""
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._SETTINGS if name in self.__dict__})
        if "_amp_scaling_override" in self.__dict__:
            state["_amp_scaling_override"] = self.__dict__["_amp_scaling_override"]
        return state

    def __deepcopy__(self, memo):
        """A deep copy (params, states and settings copied) that shares the process group: a
        communicator is a handle to the ranks, not data. (Pickling a process group fails, as it
        does for any torch.distributed group: save ``state_dict()`` for a ZeRO-split optimizer.)"""
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def __setstate__(self, state):
        super().__setstate__(state)
        if "state" in self.__dict__:  # torch's __setstate__ (load_state_dict, unpickling) sets __dict__ directly
            self.state = self.__dict__.pop("state")
        # A torch checkpoint lacks fastopt's keys: this optimizer's settings. An older one lacks some
        # of torch's (e.g. Adam's decoupled_weight_decay): torch's defaults, as torch's __setstate__.
        defaults = {"agc_clip_factor": None, "agc_eps": 1e-3, **self.defaults, **self._GROUP_DEFAULTS}
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
        attributes = {"max_grad_norm": None, "state_dtype": None, "process_group": None, "spike_guard": None,
                      "spike_warmup": 20, "spike_ema_decay": 0.99, "monitor": None, "stats": {},
                      "spike_state": {}, "_step_plan": None, "_layout_version": 0, "flat_states": False,
                      "flat_grads": False, "_flat_grads": []}  # fmt: skip
        for name, default in attributes.items():
            self.__dict__.setdefault(name, default)
        if self.flat_grads and not self._flat_grads:  # a copy: its params' grads are its own tensors
            self._flatten_grads()

    def state_dict(self):
        """torch's layout, plus the spike guard's average under a key of its own (loaders that
        know only torch's ``state`` and ``param_groups`` ignore it). Per-param states are plain
        dicts, as torch's (``torch.load(weights_only=True)`` loads them)."""
        state_dict = super().state_dict()
        state_dict["state"] = {key: dict(value) for key, value in state_dict["state"].items()}
        if self.spike_state:
            state_dict["fastopt"] = {"spike_guard": dict(self.spike_state)}
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        """torch's loader, then two corrections: moments keep their saved dtype when it is wider
        than the param's (torch would round fp32 moments down to a bf16 param's dtype), and step
        counters live on the param's device as float32 tensors (float64 ones stay float64, as
        torch keeps them under a float64 default dtype), so the step never syncs."""
        saved_state = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            state = self.state.get(param)
            if not state or saved_id not in saved_state:
                continue
            for key, saved in saved_state[saved_id].items():
                if not isinstance(saved, Tensor):
                    continue
                if key == "step":  # float64 stays float64 (torch's under a float64 default dtype)
                    dtype = torch.float64 if saved.dtype == torch.float64 else torch.float32
                    state[key] = state[key].to(device=param.device, dtype=dtype)
                elif saved.is_floating_point() and param.is_floating_point():
                    dtype = _widest(saved.dtype, param.dtype)
                    if dtype != state[key].dtype:
                        state[key] = saved.to(device=param.device, dtype=dtype, copy=True)
        self._layout_version += 1  # new state tensors
        saved_guard = state_dict.get("fastopt", {}).get("spike_guard")
        self.spike_state = {k: v.clone() for k, v in saved_guard.items()} if saved_guard else {}

    # ------------------------------------------------------------------ what a subclass defines

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        """The per-param states the group's update takes, in the op's order (keys of
        ``_OP_LIST_NAMES``); empty when it keeps none (SGD without momentum)."""
        raise NotImplementedError

    def _init_state(self, param: Tensor, group: dict, state: dict) -> bool:
        """Create in ``state`` what the group's update takes and the param lacks; True when a
        state was made now and holds no history yet."""
        raise NotImplementedError

    def _update_hyper(self, group: dict, lists: _GroupLists) -> dict:
        """The update op's keyword hyperparameters for this group, but for lr and the step-wide
        grad_scale / found_inf / clip_coef."""
        raise NotImplementedError

    def _check_group(self, group: dict, where: str) -> None:
        """The group's own hyperparameters, checked before anything changes (a group added or
        edited since the constructor must not fail halfway through a step)."""
        raise NotImplementedError

    def _host_read_hyper(self, group: dict) -> bool:
        """Whether the group has hyperparameters that the step reads on the host (tensor betas):
        then torch.compile leaves the step eager."""
        return False

    # ------------------------------------------------------------------ gathering the step

    def _param_state(self, param: Tensor) -> _ParamState:
        state = self.state[param]
        if not isinstance(state, _ParamState):  # a plain dict a user put in: one that counts changes
            state = self.state[param] = self.state.tracked(state)
        return state

    def _gather(self, group, first_index: int) -> dict[torch.device, _GroupLists]:
        """The group's params that have a grad, with their states, by device."""
        by_device: dict[torch.device, _GroupLists] = {}
        keys = self._state_keys(group)
        for index, param in enumerate(group["params"], start=first_index):
            found = self._state_to_step(param, group, keys)
            if found is not None:
                lists = by_device.get(param.device)
                if lists is None:
                    lists = by_device[param.device] = _GroupLists(keys)
                lists.append(param, *found)
                lists.indices.append(index)
        return by_device

    def _state_to_step(self, param: Tensor, group: dict, keys: tuple[str, ...]) -> tuple[dict, bool] | None:
        """The param's state (created on first use) and whether it was made now, when the param
        has a grad to step with, else None. An update that keeps no state leaves the table alone,
        as torch does."""
        if param.grad is None:
            return None
        if param.grad.is_sparse:
            raise RuntimeError(_SPARSE_MESSAGE)
        if not keys:
            return {}, False
        state = self._param_state(param)
        return state, self._init_state(param, group, state)

    def _stats_on(self, device: torch.device) -> dict[str, Tensor]:
        if not self.stats or self.stats["grad_norm"].device != device:
            old_skipped, old_spikes = self.stats.get("skipped_steps"), self.stats.get("spikes")
            self.stats = {
                "grad_norm": _zeros(device),
                "clip_coef": _zeros(device) + 1,
                "found_inf": _zeros(device),
                "skipped_steps": _zeros(device, torch.int64) if old_skipped is None else old_skipped.to(device),
                "spikes": _zeros(device, torch.int64) if old_spikes is None else old_spikes.to(device),
            }
        return self.stats

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every param that has a grad. See the class docstring."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._check_param_groups()
            gathered = self._gather_traced()
            if gathered is None:  # what torch.compile cannot trace runs eagerly, behind one graph break
                _eager_step_untraced(self)
            else:
                self._update(gathered, None, False, _TracedKernels)
            return loss
        self._eager_step()
        return loss

    def _eager_step(self) -> None:
        self._check_param_groups()
        gathered, plan, prechecked = self._gather_step()  # prechecked: validated by an earlier step
        self._update(gathered, plan, prechecked, ops)

    def _update(self, gathered: list, plan: "_StepPlan | None", prechecked: bool, kernels) -> None:
        """The two passes over ``gathered`` ([(group, {device: _GroupLists})]), with ``kernels``:
        ``fastopt.ops`` (validated, the backends' kernels), or, under torch.compile, the reference
        formulas in torch ops (``_TracedKernels``), which Inductor compiles."""
        devices = list(dict.fromkeys(d for _, by_device in gathered for d in by_device))
        if not devices:
            return
        home = devices[0]  # where the global quantities (norm, flags, stats) live
        stats = self._stats_on(home)
        grads_by_device = {d: _grads_on(gathered, d) for d in devices}

        # What torch.amp.GradScaler / fastopt.amp.GradScaler hand over (attributes they set).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        check_inf = getattr(self, "_fastopt_scaler_defers_inf_check", False)  # fastopt's scaler: we do the check
        verdict_is_ours = check_inf
        found_inf_used = None if found_inf is None else _scalar_on(found_inf, home)
        if found_inf_used is not None and not check_inf and self.process_group is not None:
            # A verdict reached on this rank alone: every rank of a ZeRO split must skip together.
            dist.all_reduce(found_inf_used, op=dist.ReduceOp.MAX, group=self.process_group)

        # AGC compares grads with weights, so it needs unscaled grads: unscale first (one extra
        # read+write pass, only with AGC under a loss scale). The inf check rides along.
        agc_groups = [(group, by_device) for group, by_device in gathered if group["agc_clip_factor"] is not None]
        if agc_groups and grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float().reshape(())
            for device in devices:
                flag = self._device_flag(found_inf_used, device, check_inf)
                if flag is None:  # the scaler already checked: the op still wants a flag to set
                    flag = _zeros(device)
                kernels.unscale_and_check_(
                    grads_by_device[device], inv_scale.to(device), flag, process_group=self.process_group
                )
                self._merge_flag(found_inf_used, flag, check_inf)
            grad_scale, check_inf = None, False
        for group, by_device in agc_groups:
            for lists in by_device.values():
                kernels.adaptive_clip_(lists.params, lists.grads, group["agc_clip_factor"], group["agc_eps"])

        # Pass 1: one read of all grads for the global norm (and the inf check, if ours to do),
        # with the per-tensor norms from the same read when a monitor wants them.
        per_tensor = self.monitor is not None
        device_norms, tensor_norms = [], []
        for device in devices:
            flag = self._device_flag(found_inf_used, device, check_inf)
            if prechecked:
                norms = kernels.multi_tensor_norm_prechecked(
                    grads_by_device[device], device, per_tensor=per_tensor, found_inf=flag,
                    process_group=self.process_group, plan=plan.norm_plans.get(device),
                )  # fmt: skip
            else:
                norms = kernels.multi_tensor_norm(
                    grads_by_device[device], per_tensor=per_tensor, found_inf=flag, process_group=self.process_group
                )
            device_norms.append((norms[0] if per_tensor else norms).to(home))
            if per_tensor:
                tensor_norms.append(norms[1].to(home))
            self._merge_flag(found_inf_used, flag, check_inf)
        if verdict_is_ours and found_inf_used is not found_inf:  # hand the verdict back to the scaler's tensor
            found_inf.copy_(found_inf_used.reshape(found_inf.shape).to(found_inf.device))
        total = device_norms[0] if len(device_norms) == 1 else torch.linalg.vector_norm(torch.stack(device_norms))
        inv_scale = None if grad_scale is None else grad_scale.reshape(()).to(home).reciprocal()
        grad_norm = total if inv_scale is None else total * inv_scale
        clip_coef = None
        if self.max_grad_norm is not None:
            # clip_grad_norm_'s formula, so results equal clipping before step() bit for bit:
            # clamp(max_norm / (norm + 1e-6), max=1), whose division Tensor.__rdiv__ computes as
            # reciprocal() * max_norm; in place on one temporary (no Python-level __rdiv__).
            clip_coef = (grad_norm + 1e-6).reciprocal_().mul_(self.max_grad_norm).clamp_(max=1.0)
        overflow = found_inf_used
        # What the update pass skips on: None when nothing can skip it, which spares the
        # reference backend its copy-and-select path.
        skip = found_inf_used
        if self.spike_guard is not None:
            overflow = _zeros(home) if overflow is None else overflow
            skip = torch.maximum(overflow, self._spike(grad_norm, overflow))
        stats["grad_norm"].copy_(grad_norm)
        stats["clip_coef"].copy_(clip_coef if clip_coef is not None else 1.0)
        if overflow is None:  # nothing can skip this step: no flag to copy, no skipped step to count
            stats["found_inf"].zero_()
            skipped = _zeros(home, torch.bool) if self.monitor is not None else None
        else:
            stats["found_inf"].copy_(overflow)
            skipped = overflow != 0 if skip is None else skip != 0
            stats["skipped_steps"].add_(skipped)
        if self.monitor is not None:
            norms = torch.cat(tensor_norms)
            indices = [i for d in devices for _, by_device in gathered if d in by_device for i in by_device[d].indices]
            self.monitor.record(
                grad_norm, stats["clip_coef"], skipped, norms if inv_scale is None else norms * inv_scale, indices
            )

        # Pass 2: the update, one call per group and device; a non-zero found_inf changes nothing.
        for group, by_device in gathered:
            for device, lists in by_device.items():
                on_device = lambda t: None if t is None else t.to(device)  # noqa: E731
                hyper = dict(
                    self._update_hyper(group, lists), lr=_lr_on(group["lr"], device),
                    grad_scale=on_device(grad_scale), found_inf=on_device(skip), clip_coef=on_device(clip_coef),
                )  # fmt: skip
                self._update_group(kernels, group, lists, device, hyper, prechecked)
        if not prechecked:  # states made for this step hold history now (a reused plan's were cleared)
            for _, by_device in gathered:
                for lists in by_device.values():
                    if True in lists.fresh:
                        lists.fresh[:] = itertools.repeat(False, len(lists.fresh))
        if kernels is ops:
            self._step_plan = plan  # every op accepted these lists: later steps may reuse them
            if plan is not None:
                plan.release_grads()

    def _update_group(self, kernels, group: dict, lists: _GroupLists, device: torch.device, hyper: dict,
                      prechecked: bool) -> None:  # fmt: skip
        """The update op on one group's lists on one device."""
        if prechecked:
            kernels.update_prechecked_(self._OP, lists.as_op_lists(), device, plan=lists.backend_plan, **hyper)
        else:
            getattr(kernels, self._OP)(**lists.as_op_lists(), **hyper)

    def _init_group(self, group, params, grads, fresh, *states) -> bool:
        """Fill the lists with the group's params that have a grad, their grads, whether their
        states were made now, and their states (one list per ``_state_keys(group)``, created on
        first use). Under torch.compile, dynamo runs this method eagerly instead of tracing it (as
        for torch's optimizers; it updates plain list arguments only): the states it creates are
        real tensors, graph inputs at static addresses. Returns whether any param has a grad."""
        lists = _GroupLists(self._state_keys(group), params, grads, dict(zip(self._state_keys(group), states)),
                            fresh=fresh)  # fmt: skip
        for param in group["params"]:
            found = self._state_to_step(param, group, lists.state_keys)
            if found is not None:
                lists.append(param, *found)
        if params:  # the step's own tensors too: made here, they are real tensors when traced
            self._stats_on(params[0].device)
            if self.spike_guard is not None:
                self._spike_state_on(params[0].device)
        return bool(params)

    def _gather_traced(self) -> list | None:
        """What ``_gather_step`` returns, for a step traced by torch.compile: the params with grads
        of every group, through ``_init_group``. None when the step is not one that fastopt traces
        (then it runs eagerly behind a graph break): params on several devices or sharded
        (DTensor), a ``process_group``, a ``monitor``, hyperparameters read on the host."""
        if self.process_group is not None or self.monitor is not None:
            return None
        gathered, device = [], None
        for group in self.param_groups:
            if self._host_read_hyper(group):
                return None
            keys = self._state_keys(group)
            params, grads, fresh, states = [], [], [], [[] for _ in keys]
            if not self._init_group(group, params, grads, fresh, *states):
                continue
            lists = _GroupLists(keys, params, grads, dict(zip(keys, states)), fresh=fresh)
            if distributed.any_dtensor(lists.params):
                return None
            for param in lists.params:
                if device is None:
                    device = param.device
                elif param.device != device:
                    return None
            gathered.append((group, {device: lists}))
        return gathered

    def _gather_step(self) -> tuple[list, _StepPlan | None, bool]:
        """The params with grads and their states, by group and device; the plan they form; and
        whether it is the last step's plan, reused (the usual training loop: the same params
        have grads), with the new grads put in and checked against it."""
        plan = self._step_plan
        if plan is not None and plan.key == self._plan_key() and plan.refresh(self.param_groups, self._lists_needed(plan)):
            return plan.gathered, plan, True
        self._step_plan = None  # void: a refusal below must not leave it in place
        firsts = list(itertools.accumulate((len(g["params"]) for g in self.param_groups[:-1]), initial=0))
        gathered = [(group, self._gather(group, first)) for group, first in zip(self.param_groups, firsts)]
        if self.flat_states and self._flatten_states():  # new states (or loaded ones) moved into the buffers
            regathered = [(group, self._gather(group, first)) for group, first in zip(self.param_groups, firsts)]
            for (_, before), (_, after) in zip(gathered, regathered):
                for device, lists in after.items():  # the moved states are as new as they were
                    lists.fresh[:] = before[device].fresh
            gathered = regathered
        # The key after gathering, which creates the states of params stepped for the first time.
        return gathered, _StepPlan.of(self._plan_key(), gathered, self.param_groups), False

    def _plan_key(self) -> tuple:
        """What voids a step plan that Python sees at once (see _StepPlan)."""
        return (
            self._layout_version,
            self.state.changes,
            tuple(id(group["params"]) for group in self.param_groups),
            tuple(self._state_keys(group) for group in self.param_groups),
        )

    def _lists_needed(self, plan: _StepPlan) -> bool:
        """Whether this step needs the grads in Python lists: unless every device's backend reads
        them from the plan's watch (the cpu and triton backends, for the norm and the update), no
        group clips with AGC and no process group makes the norm global (those take lists)."""
        if self.process_group is not None or any(group["agc_clip_factor"] is not None for group in self.param_groups):
            return True
        planned_update = self._OP + "planned_"
        return not all(
            getattr(backend, "READS_GRAD_WATCH", False) and hasattr(backend, planned_update)
            for backend in map(backends.select, plan.norm_plans)
        )

    def _check_param_groups(self) -> None:
        """Every group's hyperparameters, checked before anything changes: a group added or
        edited since the constructor must not fail halfway through a step."""
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]"
            if not isinstance(group["lr"], Tensor):
                ops.check_real(f"{where}['lr']", group["lr"], minimum=0.0)
            self._check_group(group, where)
            if group["agc_clip_factor"] is not None:
                ops.check_real(f"{where}['agc_clip_factor']", group["agc_clip_factor"], above=0.0)
                ops.check_real(f"{where}['agc_eps']", group["agc_eps"], minimum=0.0)

    def _spike(self, grad_norm: Tensor, overflow: Tensor) -> Tensor:
        """1.0 when the grad norm jumps above spike_guard times its running average, or is inf or
        nan without a GradScaler having flagged it, else 0.0.

        The average is an EMA of the norms of accepted steps (bias-corrected, so it is the mean
        of the first steps too), kept on the device in ``state["spike_guard"]`` and saved with
        the optimizer; the first ``spike_warmup`` accepted steps only feed it.
        """
        guard = self._spike_state_on(grad_norm.device)
        decay = self.spike_ema_decay
        average = guard["ema"] / (1 - torch.pow(decay, guard["accepted"]))  # nan before the first
        jump = (guard["accepted"] >= self.spike_warmup) & (grad_norm > self.spike_guard * average)
        spike = (overflow == 0) & (jump | ~torch.isfinite(grad_norm))  # an overflow is the scaler's to count
        accept = (overflow == 0) & ~spike
        guard["ema"].copy_(torch.where(accept, decay * guard["ema"] + (1 - decay) * grad_norm, guard["ema"]))
        guard["accepted"].add_(accept)
        self.stats["spikes"].add_(spike)
        return spike.float()

    def _spike_state_on(self, device: torch.device) -> dict[str, Tensor]:
        guard = self.spike_state
        if not guard:
            guard.update(ema=_zeros(device), accepted=_zeros(device))
        elif guard["ema"].device != device:
            guard.update({k: v.to(device) for k, v in guard.items()})
        return guard

    @staticmethod
    def _device_flag(found_inf: Tensor | None, device: torch.device, check_inf: bool) -> Tensor | None:
        """The flag a pass on ``device`` should set on inf/nan, when the check is ours to do."""
        if not check_inf:
            return None
        return found_inf if found_inf.device == device else _zeros(device)

    @staticmethod
    def _merge_flag(found_inf: Tensor | None, flag: Tensor | None, check_inf: bool) -> None:
        if check_inf and flag is not found_inf:
            found_inf.copy_(torch.maximum(found_inf, flag.to(found_inf.device)))


_eager_step_untraced = torch.compiler.disable(FusedOptimizer._eager_step)


def _traced_scalar(value):
    """A float, or a 1-element tensor as a 0-d one (what ``fastopt.ops`` hands the backends)."""
    return value.reshape(()) if isinstance(value, Tensor) else value


class _TracedKernels:
    """The step's kernels under torch.compile: fastopt's reference formulas (``fastopt.backends.reference``,
    torch ops) called directly, with the arguments the step has already put in the backends' form.
    ``fastopt.ops``' checks read memory addresses (``data_ptr``) that a traced tensor does not
    have, and the compiled backends' kernels are opaque to Inductor; these formulas are the ones
    every backend is tested against, and Inductor fuses them into its own kernels (as it does for
    torch's optimizers). Only the ops the step calls, with the step's signatures."""

    @staticmethod
    def unscale_and_check_(tensors, inv_scale, found_inf, *, process_group=None) -> None:
        reference.unscale_and_check_(tensors, _traced_scalar(inv_scale), found_inf)

    @staticmethod
    def adaptive_clip_(params, grads, clip_factor, eps) -> None:
        reference.adaptive_clip_(params, grads, float(clip_factor), float(eps), 2.0, True)

    @staticmethod
    def multi_tensor_norm(tensors, *, per_tensor=False, found_inf=None, process_group=None):
        return reference.multi_tensor_norm(tensors, 2.0, per_tensor, found_inf)

    @staticmethod
    def adamw_(*, params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs=None, lr, grad_scale=None,
               found_inf=None, clip_coef=None, **hyper) -> None:  # fmt: skip
        reference.adamw_(
            params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs=max_exp_avg_sqs, **_traced_scalars(
                lr=lr, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef), **hyper,
        )  # fmt: skip

    @staticmethod
    def sgd_(*, params, grads, momentum_buffers=None, lr, grad_scale=None, found_inf=None, clip_coef=None,
             **hyper) -> None:  # fmt: skip
        reference.sgd_(params, grads, momentum_buffers, **_traced_scalars(
            lr=lr, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef), **hyper)  # fmt: skip

    @staticmethod
    def lion_(*, params, grads, exp_avgs, lr, grad_scale=None, found_inf=None, clip_coef=None, **hyper) -> None:
        reference.lion_(params, grads, exp_avgs, **_traced_scalars(
            lr=lr, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef), **hyper)  # fmt: skip


def _traced_scalars(*, lr, grad_scale, found_inf, clip_coef) -> dict:
    return dict(lr=_traced_scalar(lr), grad_scale=_traced_scalar(grad_scale), found_inf=found_inf,
                clip_coef=_traced_scalar(clip_coef))  # fmt: skip
