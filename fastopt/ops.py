"""fastopt's functional ops: the one place where inputs are checked and a backend is chosen.

Every op validates all of its arguments before any tensor is touched, so a call that raises
changes nothing. Then it hands the normalised arguments (lists of tensors on one device, floats
or 0-d tensors for scalars) to the backend chosen by ``fastopt.backends.select`` for that
device. No op reads a tensor's value on the host: results are device tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from fastopt import backends, distributed

__all__ = [
    "multi_tensor_norm",
    "unscale_and_check_",
    "scale_",
    "clamp_",
    "adaptive_clip_",
    "adamw_",
    "sgd_",
    "lion_",
]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"
_INF = math.inf


# --------------------------------------------------------------------------- validation


def _tensor_list(value, name: str) -> list[Tensor]:
    """A list or tuple of tensors (a lone tensor counts as a list of one)."""
    if isinstance(value, Tensor):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    tensors = list(value)
    if not all(isinstance(t, Tensor) for t in tensors):
        i = next(i for i, t in enumerate(tensors) if not isinstance(t, Tensor))
        raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(tensors[i]).__name__}")
    return tensors


def _label(name: str | Sequence[str], i: int) -> str:
    """How an error names element i of a list: ``name[i]``, or a caller's own label for it."""
    return f"{name}[{i}]" if isinstance(name, str) else name[i]


def check_dense_floating(tensors: list[Tensor], name: str | Sequence[str]) -> None:
    if not {t.layout for t in tensors} <= {torch.strided}:
        i = next(i for i, t in enumerate(tensors) if t.layout != torch.strided)
        raise TypeError(f"{_label(name, i)} is a {tensors[i].layout} tensor; fastopt ops take dense (strided) tensors")
    if not {t.dtype for t in tensors} <= FLOAT_DTYPES:
        i = next(i for i, t in enumerate(tensors) if t.dtype not in FLOAT_DTYPES)
        raise TypeError(f"{_label(name, i)} has dtype {tensors[i].dtype}; fastopt ops take {_DTYPE_NAMES} tensors")


def _tensor_lists(**named) -> dict[str, list[Tensor]]:
    """Check named tensor lists (None entries are absent lists) and return them as lists."""
    out = {}
    for name, value in named.items():
        if value is not None:
            out[name] = _tensor_list(value, name)
            check_dense_floating(out[name], name)
    return out


def _localize(named: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
    """DTensors (FSDP2, tensor parallel) become their local shards, which the backends work on;
    what makes a result global is in fastopt.distributed."""
    if not distributed.any_dtensor(*named.values()):
        return named
    for name, tensors in named.items():
        distributed.check_placements(tensors, name)
    return {name: distributed.to_local(tensors) for name, tensors in named.items()}


def _common_device(named: dict[str, list[Tensor]]) -> torch.device | None:
    """The one device every tensor of every list is on (None when there are no tensors)."""
    first = None
    for name, tensors in named.items():
        if not tensors:
            continue
        if first is None:
            first = (name, tensors[0].device)
        if {t.device for t in tensors} != {first[1]}:
            i = next(i for i, t in enumerate(tensors) if t.device != first[1])
            raise ValueError(
                f"{name}[{i}] is on {tensors[i].device} but {first[0]}[0] is on {first[1]}; "
                "all tensors of one call must be on the same device"
            )
    return None if first is None else first[1]


def _check_lengths(named: dict[str, list[Tensor]]) -> int:
    (first_name, first), *rest = named.items()
    for name, tensors in rest:
        if len(tensors) != len(first):
            raise ValueError(f"{name} has {len(tensors)} tensors but {first_name} has {len(first)}; they must match")
    return len(first)


def _check_shapes(reference_name: str, reference: list[Tensor], named: dict[str, list[Tensor]]) -> None:
    # Plain tuples: thousands of live torch.Size objects set off garbage collections that walk
    # every tensor (measured: 80 ms vs 5 ms for 20,000 tensors).
    shapes = [tuple(t.size()) for t in reference]
    for name, tensors in named.items():
        if [tuple(t.size()) for t in tensors] != shapes:
            i = next(i for i, (t, s) in enumerate(zip(tensors, shapes)) if tuple(t.size()) != s)
            raise ValueError(
                f"{name}[{i}] has shape {tuple(tensors[i].shape)} but {reference_name}[{i}] has shape {tuple(shapes[i])}"
            )


def _one_pass_check():
    """The CPU extension's ``lists_pass`` (csrc/cpu/list_checks.h), or None where it is not built."""
    from fastopt.backends import cpu  # loads the extension once

    return None if cpu._C is None else cpu._C.lists_pass


def _lists_in_one_pass(lists: dict, *, written=(), shaped=(), scalars=(), reads=(), writes=()):
    """``lists`` (name -> the caller's list argument, None: absent) as lists, with the device of
    their tensors, when one C++ pass over all of them finds every check of this module that
    concerns them satisfied: dense float16 / bfloat16 / float32 / float64 tensors on one device,
    every list as long as the first; the ``shaped`` ones of the first's shapes; the ``scalars``
    ones 0-d float32 or float64; the ``written`` ones (and the single tensors in ``writes``)
    contiguous and sharing no byte with anything else the call touches (``reads``: the scalar
    arguments; non-tensors are skipped). None: the Python checks decide, which say what is wrong
    or accept what the C++ pass leaves to them (DTensor and other subclasses, meta tensors,
    strided written tensors); also without the CPU extension and under torch.compile."""
    check = _one_pass_check()
    if check is None or torch.compiler.is_compiling():
        return None
    present = {name: value for name, value in lists.items() if value is not None}
    if not all(isinstance(value, (list, tuple)) for value in present.values()):
        return None
    names = list(present)
    singles = lambda values: [v for v in values if isinstance(v, Tensor)]  # noqa: E731
    flags = [[name in chosen for name in names] for chosen in (written, shaped, scalars)]
    if not check(list(present.values()), *flags, singles(reads), singles(writes)):
        return None
    named = {name: list(value) for name, value in present.items()}
    first = named[names[0]] if names else []
    return named, (first[0].device if first else None)


def check_replacement(name: str, tensors: list[Tensor], shapes: list[tuple], device: torch.device,
                      written: "WrittenSpans") -> None:
    """Check a list that replaces one already validated with the same layout (grads, re-made by
    every backward, against the validated params and states): dense floating tensors of the
    same shapes, on ``device``, none sharing memory with ``written`` (what the call writes in
    place). C-level ``map`` and vectorised spans instead of the full checks, so a training step
    stays cheap on the host."""
    if len(tensors) != len(shapes):
        raise ValueError(f"{name} has {len(tensors)} tensors but {len(shapes)} were expected")
    check_dense_floating(tensors, name)
    if list(map(tuple, map(Tensor.size, tensors))) != shapes:
        i = next(i for i, (t, s) in enumerate(zip(tensors, shapes)) if tuple(t.size()) != s)
        raise ValueError(f"{name}[{i}] has shape {tuple(tensors[i].shape)} but its param has shape {shapes[i]}")
    if set(map(_device_of, tensors)) != {device}:
        i = next(i for i, t in enumerate(tensors) if t.device != device)
        raise ValueError(f"{name}[{i}] is on {tensors[i].device} but its param is on {device}")
    hit = written.first_met_by(_MemorySpans({name: tensors}))
    if hit is not None:
        raise ValueError(f"{name}[{hit[0]}] shares memory with a param or state that this call updates in place")


def _device_of(t: Tensor) -> torch.device:
    return t.device


class _MemorySpans:
    """Where each tensor of some named values lies in memory: first byte and one-past-last byte
    as int64 tensors, flat over all values. Values are lists, single tensors, or anything else
    (a float standing for a scalar: skipped). Built without a Python object per tensor: many
    small objects that outlive the loop set off garbage collections that walk every tensor."""

    def __init__(self, named: dict):
        self.segments = []  # (key, first flat index, single tensor?)
        starts, extents = [], []
        for key, value in named.items():
            tensors = [value] if isinstance(value, Tensor) else value if isinstance(value, (list, tuple)) else ()
            if not tensors or tensors[0].is_meta:  # meta tensors hold no memory (one device per call)
                continue
            self.segments.append((key, len(starts), isinstance(value, Tensor)))
            starts.extend([t.data_ptr() for t in tensors])
            extents.extend([t.nbytes if t.is_contiguous() else _strided_extent(t) for t in tensors])
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.ends = self.starts + torch.tensor(extents, dtype=torch.int64)

    def label(self, flat: int) -> str:
        key, first, single = next(seg for seg in reversed(self.segments) if seg[1] <= flat)
        return key if single else _label(key, flat - first)


def _strided_extent(t: Tensor) -> int:
    """Bytes from a non-contiguous tensor's first element to one past its last (0 if empty)."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def _may_self_overlap(t: Tensor) -> bool:
    """False when the strides prove that no two elements share memory (true of every view torch
    makes by slicing, transposing or permuting); True for expanded and other aliasing views."""
    reach = 0  # the furthest element offset that the faster-moving dims cover
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_writable(written: dict, read_only: dict | None = None) -> None:
    """Tensors written in place must not share memory with each other (a tensor passed twice
    would be updated twice; overlapping views would see each other's writes) nor within
    themselves (expanded views), and nothing the call reads (inputs, scalar tensors such as lr
    or inv_scale) may share memory with them. Keys name the values in errors: ``key[i]`` for a
    list, or the caller's own label when the key is a tuple of labels. All tensors of one call
    are on one device. Vectorised, since it runs on every call over every tensor."""
    for key, value in written.items():
        tensors = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, Tensor) else []
        for i, t in enumerate(tensors):
            if not t.is_contiguous() and _may_self_overlap(t):
                where = key if isinstance(value, Tensor) else _label(key, i)
                raise ValueError(f"{where} has elements that share memory (an expanded view); it cannot be updated in place")

    spans = WrittenSpans(_MemorySpans(written))
    if not read_only:
        return
    reads = _MemorySpans(read_only)
    hit = spans.first_met_by(reads)
    if hit is not None:
        j, other = hit
        raise ValueError(f"{reads.label(j)} shares memory with {spans.label(other)}, which this call updates in place")


class WrittenSpans:
    """The memory of tensors a call updates in place, sorted by address; raises when two of them
    share memory (the same tensor, or overlapping views)."""

    def __init__(self, spans: _MemorySpans):
        self.spans = spans
        kept = (spans.ends > spans.starts).nonzero().squeeze(1)  # zero-element tensors hold no memory
        self.order = kept[torch.argsort(spans.starts[kept], stable=True)]  # flat indices by address
        self.starts, self.ends = spans.starts[self.order], spans.ends[self.order]
        reach, reached_by = torch.cummax(self.ends, dim=0)  # furthest end so far, and which span reached it
        clash = (self.starts[1:] < reach[:-1]).nonzero()
        if clash.numel():
            k = int(clash[0])
            later, earlier = sorted([int(self.order[k + 1]), int(self.order[reached_by[k]])], reverse=True)
            raise ValueError(
                f"{spans.label(later)} and {spans.label(earlier)} share memory (the same tensor, or overlapping views); "
                "each tensor updated in place must be passed once"
            )

    @classmethod
    def of(cls, tensors: list[Tensor]) -> "WrittenSpans":
        return cls(_MemorySpans({"written": tensors}))

    def label(self, flat: int) -> str:
        return self.spans.label(flat)

    def first_met_by(self, reads: _MemorySpans) -> tuple[int, int] | None:
        """The first of ``reads`` (a flat index) that shares memory with a written span, and that
        span's flat index; None when none does."""
        starts, ends = self.starts, self.ends
        if not len(starts) or not len(reads.starts):
            return None
        # Written spans are disjoint and sorted: a read span can only meet the last written span
        # starting at or before it, or the next one.
        below = torch.searchsorted(starts, reads.starts, right=True) - 1
        above = (below + 1).clamp(max=len(starts) - 1)
        meets_below = (below >= 0) & (ends[below.clamp(min=0)] > reads.starts)
        meets_above = (below + 1 < len(starts)) & (starts[above] < reads.ends)
        hit = ((meets_below | meets_above) & (reads.ends > reads.starts)).nonzero()
        if not hit.numel():
            return None
        j = int(hit[0])
        return j, int(self.order[below[j]] if meets_below[j] else self.order[above[j]])


def check_real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
) -> float:
    """A real number (not bool), optionally finite, >= minimum, > above, < below."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def check_norm_type(value) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf"):
        return _INF
    p = check_real("norm_type", value, finite=False)
    if not p > 0:
        raise ValueError(f"norm_type must be a positive number or inf, got {value!r}")
    return p


def _scalar(name: str, value, device: torch.device | None, *, float32_only: bool = False, **bounds) -> float | Tensor:
    """A Python number (range-checked) or a 1-element floating tensor on ``device``, returned
    as a 0-d view. A tensor's value is not checked: that would read it on the host."""
    if not isinstance(value, Tensor):
        return check_real(name, value, **bounds)
    allowed = {torch.float32} if float32_only else FLOAT_DTYPES
    if value.dtype not in allowed:
        kind = "float32" if float32_only else "floating-point"
        raise TypeError(f"{name} must be a {kind} tensor, got dtype {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must hold exactly one element, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the tensors are on {device}; it must be on their device")
    return value.reshape(())


def _found_inf(value, device: torch.device | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"found_inf must be a 1-element float32 tensor, got {type(value).__name__}")
    _scalar("found_inf", value, device, float32_only=True)
    return value


# --------------------------------------------------------------------------- ops


@torch.no_grad()
def multi_tensor_norm(tensors, norm_type=2.0, *, per_tensor: bool = False, found_inf=None, process_group=None):
    """The norm of all ``tensors`` taken together, as if concatenated: a 0-d float32 tensor.

    ``norm_type`` is any p > 0, or inf for the max-abs norm. With ``per_tensor=True`` returns
    ``(total, norms)``, where ``norms`` is a 1-D float32 tensor with one norm per input (0 for
    zero-element tensors). bf16 / fp16 inputs accumulate in fp32. An inf or nan input makes the
    total inf or nan. The result is bit-identical from run to run for the same inputs.
    ``found_inf`` (optional, a 1-element float32 tensor) is set to 1.0 if any element is inf
    or nan, from the same read, and never cleared: the AMP overflow check for free.

    Distributed: DTensor inputs (FSDP2) give the norms of the whole tensors, as plain tensors,
    the same on every rank; ``process_group`` makes the total sum over the group's ranks (a
    ZeRO-style split of the params). ``found_inf`` is then set on every rank if any rank saw an
    inf or nan.
    """
    checked = _lists_in_one_pass({"tensors": tensors}, writes=(found_inf,))
    if checked is not None:
        (originals, device), p = checked, check_norm_type(norm_type)
        named = originals
        if found_inf is not None:
            found_inf = _found_inf(found_inf, device)
    else:
        originals = _tensor_lists(tensors=tensors)
        named = _localize(originals)
        p = check_norm_type(norm_type)
        device = _common_device(named)
        if found_inf is not None:
            found_inf = _found_inf(found_inf, device)
            check_writable({"found_inf": found_inf}, read_only=named)
    return _norm_dispatch(originals["tensors"], named["tensors"], device, p, bool(per_tensor), found_inf, process_group)


def _norm_dispatch(originals: list[Tensor], local: list[Tensor], device: torch.device | None, p: float,
                   per_tensor: bool, found_inf: Tensor | None, process_group) -> Tensor | tuple[Tensor, Tensor]:
    backend = backends.select(device or torch.device("cpu"))
    if local is originals and process_group is None:
        return backend.multi_tensor_norm(local, p, per_tensor, found_inf=found_inf)
    _, local_norms = backend.multi_tensor_norm(local, p, True, found_inf=found_inf)
    total, norms = distributed.global_norms(originals, local_norms, p, process_group)
    if found_inf is not None:
        distributed.all_reduce_flag(found_inf, originals, process_group)
    return (total, norms) if per_tensor else total


@torch.no_grad()
def multi_tensor_norm_prechecked(tensors: list[Tensor], device: torch.device, norm_type=2.0, *, per_tensor: bool = False,
                                 found_inf=None, process_group=None, plan: dict | None = None):
    """``multi_tensor_norm`` of a list of plain (not DTensor) tensors on ``device`` that the caller
    has validated (fastopt.optim.AdamW's step plan); only ``found_inf`` is checked here. ``plan``:
    what the step plan keeps for these tensors, which a backend that defines
    ``multi_tensor_norm_planned`` reads instead of the list (the cpu backend: the plan's grads
    as C++ tensors, when the list was not filled)."""
    if found_inf is not None:
        found_inf = _found_inf(found_inf, device)
    p = check_norm_type(norm_type)
    planned = None if plan is None or process_group is not None else getattr(
        backends.select(device), "multi_tensor_norm_planned", None
    )  # fmt: skip
    if planned is not None:
        return planned(plan, p, bool(per_tensor), found_inf=found_inf)
    return _norm_dispatch(tensors, tensors, device, p, bool(per_tensor), found_inf, process_group)


@torch.no_grad()
def unscale_and_check_(tensors, inv_scale, found_inf, *, process_group=None) -> None:
    """``t *= inv_scale`` for every tensor, in place, and set ``found_inf`` (a 1-element float32
    tensor) to 1.0 if any input element is inf or nan. ``found_inf`` is never cleared, so one
    flag can collect several calls. ``inv_scale``: a float or a 1-element float32 tensor.
    With DTensor inputs or a ``process_group``, the flag is set on every rank if any rank saw
    an inf or nan."""
    checked = _lists_in_one_pass({"tensors": tensors}, written=("tensors",), reads=(inv_scale,), writes=(found_inf,))
    if checked is not None:
        originals, device = checked
        named = originals
        inv_scale = _scalar("inv_scale", inv_scale, device, float32_only=True)
        found_inf = _found_inf(found_inf, device)
    else:
        originals = _tensor_lists(tensors=tensors)
        named = _localize(originals)
        device = _common_device(named)
        inv_scale = _scalar("inv_scale", inv_scale, device, float32_only=True)
        found_inf = _found_inf(found_inf, device)
        check_writable({**named, "found_inf": found_inf}, read_only={"inv_scale": inv_scale})
    backends.select(device or found_inf.device).unscale_and_check_(named["tensors"], inv_scale, found_inf)
    if named is not originals or process_group is not None:
        distributed.all_reduce_flag(found_inf, originals["tensors"], process_group)


@torch.no_grad()
def scale_(tensors, coef) -> None:
    """``t *= coef`` for every tensor, in place; ``coef`` a float or a 1-element tensor."""
    checked = _lists_in_one_pass({"tensors": tensors}, written=("tensors",), reads=(coef,))
    if checked is not None:
        named, device = checked
        coef = _scalar("coef", coef, device)
    else:
        named = _localize(_tensor_lists(tensors=tensors))
        device = _common_device(named)
        coef = _scalar("coef", coef, device)
        check_writable(named, read_only={"coef": coef})
    if device is not None:
        backends.select(device).scale_(named["tensors"], coef)


@torch.no_grad()
def clamp_(tensors, clip_value) -> None:
    """Clamp every element to ``[-clip_value, clip_value]`` in place (nan stays nan)."""
    checked = _lists_in_one_pass({"tensors": tensors}, written=("tensors",))
    if checked is not None:
        (named, device), clip_value = checked, check_real("clip_value", clip_value, minimum=0.0, finite=False)
    else:
        named = _localize(_tensor_lists(tensors=tensors))
        clip_value = check_real("clip_value", clip_value, minimum=0.0, finite=False)
        device = _common_device(named)
        check_writable(named)
    if device is not None:
        backends.select(device).clamp_(named["tensors"], clip_value)


@torch.no_grad()
def adaptive_clip_(params, grads, clip_factor=0.01, eps=1e-3, norm_type=2.0, *, unitwise: bool = True) -> None:
    """Adaptive gradient clipping (AGC, Brock et al. 2021) of ``grads`` against ``params``.

    For each unit u (an output row / channel, i.e. a slice along dim 0, of a >=2-D tensor; the
    whole tensor if it is <=1-D or ``unitwise=False``): ``max_u = clip_factor * max(||W_u||, eps)``,
    and where ``||g_u|| > max_u``, ``g_u *= max_u / max(||g_u||, 1e-6)``. Grads change in place.
    """
    checked = _lists_in_one_pass({"params": params, "grads": grads}, written=("grads",), shaped=("grads",))
    if checked is None:
        originals = _tensor_lists(params=params, grads=grads)
        _check_lengths(originals)
        _check_shapes("params", originals["params"], {"grads": originals["grads"]})
        named = _localize(originals)
    else:
        originals, device = checked
        named = originals
    clip_factor = check_real("clip_factor", clip_factor, above=0.0)
    eps = check_real("eps", eps, minimum=0.0)
    p = check_norm_type(norm_type)
    if checked is None:
        device = _common_device(named)
        check_writable({"grads": named["grads"]}, read_only={"params": named["params"]})
    if device is None:
        return
    if named is not originals:  # sharded units need their norms reduced across ranks
        distributed.adaptive_clip_(originals["params"], originals["grads"], clip_factor, eps, p, bool(unitwise))
    else:
        backends.select(device).adaptive_clip_(named["params"], named["grads"], clip_factor, eps, p, bool(unitwise))


# ---------------------------------------------------------------------------- optimizer updates
#
# Every update op (adamw_, sgd_, lion_) takes params, grads and per-param state lists, changes them
# in place, reads the grads, and takes the same step-wide scalars: lr (a float or a device scalar)
# and the AMP / clipping trio grad_scale, clip_coef, found_inf. Checked here in one way for all.


def _validated_update_lists(**named) -> tuple[dict[str, list[Tensor]], torch.device | None]:
    """The lists of an update (params first, then grads and the states; None: an absent list),
    checked: dense floating tensors, as many as params, of the params' shapes (``steps``: any
    shape, checked by the caller), all on one device. DTensors become their local shards."""
    named = _tensor_lists(**named)
    _check_lengths(named)
    shaped = {k: v for k, v in named.items() if k not in ("params", "steps")}
    _check_shapes("params", named["params"], shaped)
    named = _localize(named)
    return named, _common_device(named)


def _validated_update(lists: dict, step_scalars: tuple, hyper_on) -> tuple[dict, torch.device | None, dict]:
    """An update op's lists (``_validated_update_lists``'s) and scalars, checked before anything
    changes: (lists, their device, the op's scalars from ``hyper_on(device)``). The lists in one
    C++ pass where it can (``_lists_in_one_pass``), else in Python; ``step_scalars``: lr,
    grad_scale, clip_coef, found_inf as given (what the update reads besides the grads)."""
    states = tuple(name for name in lists if name not in ("params", "grads"))
    checked = _lists_in_one_pass(
        lists, written=("params", *states), shaped=tuple(n for n in lists if n not in ("params", "steps")),
        scalars=("steps",), reads=step_scalars,
    )  # fmt: skip
    if checked is not None:
        named, device = checked
        return named, device, hyper_on(device)
    named, device = _validated_update_lists(**lists)
    steps = named.get("steps", ())
    bad_step = next((i for i, s in enumerate(steps) if s.ndim != 0 or s.dtype not in (torch.float32, torch.float64)), None)
    if bad_step is not None:
        s = steps[bad_step]
        raise ValueError(f"steps[{bad_step}] must be a 0-d float32 (or float64) tensor, got shape {tuple(s.shape)} and dtype {s.dtype}")
    hyper = hyper_on(device)
    _check_update_writable(named, hyper)
    return named, device, hyper


def _step_scalars(device: torch.device | None, lr, grad_scale, found_inf, clip_coef) -> dict:
    return {
        "lr": _scalar("lr", lr, device, minimum=0.0),
        "grad_scale": None if grad_scale is None else _scalar("grad_scale", grad_scale, device, above=0.0),
        "clip_coef": None if clip_coef is None else _scalar("clip_coef", clip_coef, device, minimum=0.0),
        "found_inf": None if found_inf is None else _found_inf(found_inf, device),
    }


def _check_update_writable(named: dict[str, list[Tensor]], scalars: dict) -> None:
    """What an update writes (all but the grads) shares memory with nothing else it touches."""
    written = {k: v for k, v in named.items() if k != "grads"}
    read = {"grads": named["grads"], **{k: scalars[k] for k in ("lr", "grad_scale", "clip_coef", "found_inf")}}
    check_writable(written, read_only=read)


@torch.no_grad()
def adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize: bool = False,
    max_exp_avg_sqs=None,
    grad_scale=None,
    found_inf=None,
    clip_coef=None,
    decoupled_weight_decay: bool = True,
) -> None:
    """One AdamW update of ``params`` with torch.optim.AdamW's math, in place; with
    ``decoupled_weight_decay=False``, torch.optim.Adam's (``weight_decay * param`` added to the
    grad instead of the param decayed), as torch's ``Adam(decoupled_weight_decay=...)``.

    ``steps``: 0-d float32 tensors, one per param, incremented by the op and used for the bias
    corrections. ``lr``: a float or a 1-element tensor. Each grad is used as
    ``g / grad_scale * clip_coef`` (either may be omitted; tensors or floats) and negated when
    ``maximize``. When ``found_inf`` (1-element float32 tensor) is non-zero, nothing at all
    changes: params, states and steps keep every bit. AMSGrad when ``max_exp_avg_sqs`` is given.
    Grads are read, never written. Params, grads and states may have different floating dtypes
    (e.g. bf16 params and grads with fp32 states); the math runs in fp32 (fp64 for fp64 params).
    """
    named, device, hyper = _validated_update(
        dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
             steps=steps),
        (lr, grad_scale, clip_coef, found_inf),
        lambda device: _adamw_hyper(device, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf,
                                    clip_coef, decoupled_weight_decay),
    )  # fmt: skip
    if device is not None:
        _dispatch_update("adamw_", named, device, hyper)


def _adamw_hyper(device, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale, found_inf, clip_coef,
                 decoupled_weight_decay) -> dict:  # fmt: skip
    return {
        **_step_scalars(device, lr, grad_scale, found_inf, clip_coef),
        "beta1": check_real("beta1", beta1, minimum=0.0, below=1.0),
        "beta2": check_real("beta2", beta2, minimum=0.0, below=1.0),
        "eps": check_real("eps", eps, minimum=0.0),
        "weight_decay": check_real("weight_decay", weight_decay, minimum=0.0),
        "maximize": bool(maximize),
        "decoupled_weight_decay": bool(decoupled_weight_decay),
    }


@torch.no_grad()
def sgd_(
    params,
    grads,
    momentum_buffers=None,
    *,
    lr,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    grad_scale=None,
    found_inf=None,
    clip_coef=None,
) -> None:
    """One SGD update of ``params`` with torch.optim.SGD's math, in place.

    The grad (``g / grad_scale * clip_coef``, negated when ``maximize``) gets ``weight_decay *
    param`` added; with ``momentum`` (then ``momentum_buffers``, one per param, is required) the
    buffer becomes ``momentum * buf + (1 - dampening) * g`` and the step uses it (Nesterov:
    ``g + momentum * buf``); then ``param -= lr * step``. ``first_step=True``: the buffers hold no
    history yet (torch's state before the first step) and are set to ``g``, not read. A non-zero
    ``found_inf`` changes nothing. Mixed dtypes and precision as ``adamw_``.
    """
    momentum = check_real("momentum", momentum, minimum=0.0)
    if momentum_buffers is None and momentum != 0:
        raise ValueError("sgd_ with momentum needs momentum_buffers (one per param)")
    if momentum_buffers is not None and momentum == 0:
        raise ValueError("momentum_buffers were given but momentum is 0: SGD without momentum keeps no buffers")
    named, device, hyper = _validated_update(
        dict(params=params, grads=grads, momentum_buffers=momentum_buffers), (lr, grad_scale, clip_coef, found_inf),
        lambda device: _sgd_hyper(device, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                                  grad_scale, found_inf, clip_coef),
    )  # fmt: skip
    if device is not None:
        _dispatch_update("sgd_", named, device, hyper)


def _sgd_hyper(device, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, grad_scale, found_inf,
               clip_coef) -> dict:  # fmt: skip
    momentum = check_real("momentum", momentum, minimum=0.0)
    dampening = check_real("dampening", dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return {
        **_step_scalars(device, lr, grad_scale, found_inf, clip_coef),
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": check_real("weight_decay", weight_decay, minimum=0.0),
        "nesterov": bool(nesterov),
        "maximize": bool(maximize),
        "first_step": bool(first_step),
    }


@torch.no_grad()
def lion_(
    params,
    grads,
    exp_avgs,
    *,
    lr,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale=None,
    found_inf=None,
    clip_coef=None,
) -> None:
    """One Lion update (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") of
    ``params``, in place: ``param = param * (1 - lr * weight_decay) - lr * sign(beta1 * m +
    (1 - beta1) * g)``, then ``m = beta2 * m + (1 - beta2) * g`` (``exp_avgs``: one m per param).
    The grad as ``adamw_`` forms it; a non-zero ``found_inf`` changes nothing. Mixed dtypes and
    precision as ``adamw_``.
    """
    named, device, hyper = _validated_update(
        dict(params=params, grads=grads, exp_avgs=exp_avgs), (lr, grad_scale, clip_coef, found_inf),
        lambda device: _lion_hyper(device, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf, clip_coef),
    )
    if device is not None:
        _dispatch_update("lion_", named, device, hyper)


def _lion_hyper(device, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf, clip_coef) -> dict:
    return {
        **_step_scalars(device, lr, grad_scale, found_inf, clip_coef),
        "beta1": check_real("beta1", beta1, minimum=0.0, below=1.0),
        "beta2": check_real("beta2", beta2, minimum=0.0, below=1.0),
        "weight_decay": check_real("weight_decay", weight_decay, minimum=0.0),
        "maximize": bool(maximize),
    }


# The list arguments of each update op, as the backends take them (positional first, then the
# keyword lists), and its scalar checks for a prechecked call.
_UPDATE_POSITIONAL = {
    "adamw_": ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"),
    "sgd_": ("params", "grads", "momentum_buffers"),
    "lion_": ("params", "grads", "exp_avgs"),
}
_UPDATE_KEYWORD_LISTS = {"adamw_": ("max_exp_avg_sqs",), "sgd_": (), "lion_": ()}


def _dispatch_update(op: str, named: dict[str, list[Tensor]], device: torch.device, hyper: dict) -> None:
    positional = [named.get(name) for name in _UPDATE_POSITIONAL[op]]
    keyword = {name: named.get(name) for name in _UPDATE_KEYWORD_LISTS[op]}
    getattr(backends.select(device), op)(*positional, **keyword, **hyper)


# Each update op's scalar checks (keyword arguments as the op takes them, with the device first).
_UPDATE_HYPER = {"adamw_": _adamw_hyper, "sgd_": _sgd_hyper, "lion_": _lion_hyper}


@torch.no_grad()
def update_prechecked_(op: str, lists: dict[str, list[Tensor]], device: torch.device, *, plan: dict | None = None,
                       **hyper) -> None:  # fmt: skip
    """An update op (``"adamw_"``, ``"sgd_"``, ``"lion_"``) on plain (not DTensor) lists on
    ``device`` that the op has validated before and that keep their layout (fastopt.optim's cached
    step; grads re-checked with ``check_replacement``): ``lists`` holds the op's lists by name.
    ``hyper``: the op's keyword scalars, checked here as the op checks them. ``plan``: a dict the
    caller keeps while these lists keep their params and states, where a backend that defines
    ``<op>planned_`` (e.g. ``adamw_planned_``) keeps what it prepared for them."""
    hyper = _UPDATE_HYPER[op](device, **hyper)
    planned = None if plan is None else getattr(backends.select(device), op + "planned_", None)
    if planned is not None:
        planned(lists, plan, **hyper)
    else:
        _dispatch_update(op, lists, device, hyper)
