"""The Triton backend's ops: the same functions, signatures and meaning as ``fastopt.backends.reference``.

Each op looks up the cached chunk table of its tensor lists (``tables.py``) and launches one
kernel per pass and dtype group (``kernels.py``), whatever the number of tensors:

==========================  ======================================================
op                          launches (for lists of one dtype combination)
==========================  ======================================================
``multi_tensor_norm``       2: per-chunk partials (and the inf/nan check, with
                            ``found_inf``), then per-tensor norms and total
``unscale_and_check_``      1
``scale_``                  1
``clamp_``                  1
``adaptive_clip_``          3: per-chunk partials of params and grads, per-unit
                            clip factors, then the scaling of the grads
``adamw_``, ``sgd_``,       1
``lion_``
==========================  ======================================================

A list that mixes dtype combinations takes one launch per combination for each per-chunk pass.
A launch whose tensors all start 16 bytes aligned (the host checks, per dtype group) runs the
kernels' ``ALIGNED`` variant: whole blocks with 128-bit unmasked loads and stores, a masked tail.
Every op runs under a device guard for its tensors' device.
Non-contiguous tensors run on contiguous copies, which in-place ops copy back afterwards (a few
extra torch launches for those tensors only). Arguments arrive validated by ``fastopt.ops``.
"""

from __future__ import annotations

import collections
import contextlib
import math

import torch
import triton.language as tl
from torch import Tensor

from fastopt.backends.triton import kernels
from fastopt.backends.watched import WatchedColumn, fill_lists, grads_of
from fastopt.backends.triton.tables import (
    BLOCK_SIZE,
    ChunkTable,
    TableCache,
    capturing,
    dtype_signature,
    numel_column,
    pointer_column_of,
    scan,
    stream_key,
)

# Partials that one program of a reduction's second pass reads per step; the total's program
# (which reads every chunk's partial) reads this many.
PARTIALS_BLOCK = 256
TOTAL_BLOCK = 4096

# Compile options of every launch, explicit: triton 3.10 changes the default of FP fusion. Off:
# each operation rounds as written, as the interpreter rounds it; the kernels fuse only where they
# say so (tl.fma, where torch's CPU kernels fuse: kernels._fma).
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# The chunk tables of recent layouts, shared by every op (clip_grad_norm_'s norm and scale reuse one).
TABLES = TableCache()
# Kernel launches by kernel name, for tests and for anyone counting.
LAUNCHES: collections.Counter[str] = collections.Counter()

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _launch(kernel, num_programs: int, *args, **kwargs) -> None:
    if num_programs == 0:  # a grid of zero programs is an error on the GPU
        return
    LAUNCHES[kernel.fn.__name__] += 1
    kernel[(num_programs,)](*args, **kwargs, **COMPILE_OPTIONS)


def _on(device: torch.device):
    """A device guard for the tensors' device: Triton launches on the current device, and the
    tensors may be on another one (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _guarded(op):
    """Run ``op`` under a device guard for its first tensor's device."""

    def guarded(tensors, *args, **kwargs):
        if not tensors:
            return op(tensors, *args, **kwargs)
        with _on(tensors[0].device):
            return op(tensors, *args, **kwargs)

    guarded.__name__, guarded.__doc__, guarded.__wrapped__ = op.__name__, op.__doc__, op
    return guarded


def _dense(tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The tensors as the kernels need them, contiguous, and the (original, contiguous copy)
    pairs whose results an in-place op must copy back."""
    if _all_contiguous(tensors):
        return tensors, []
    dense = [t.contiguous() for t in tensors]
    return dense, [(t, d) for t, d in zip(tensors, dense) if d is not t]


def _all_contiguous(tensors: list[Tensor]) -> bool:
    """Whether every tensor is contiguous: one C++ pass with the CPU extension, else Python's."""
    from fastopt.backends import cpu

    if cpu._C is not None and type(tensors) is list:
        return cpu._C.all_contiguous(tensors)
    return all(map(Tensor.is_contiguous, tensors))


def _write_back(copies: list[tuple[Tensor, Tensor]]) -> None:
    if copies:
        originals, results = zip(*copies)
        torch._foreach_copy_(list(originals), list(results))


def _scalar_args(value: float | Tensor) -> tuple[float, Tensor | None]:
    """A kernel's (value, value_ptr) pair for a float or a 0-d device tensor."""
    return (0.0, value) if isinstance(value, Tensor) else (float(value), None)


def _norm_kind(norm_type: float) -> int:
    if math.isinf(norm_type):
        return kernels.MAX_ABS
    return {1.0: kernels.SUM_ABS, 2.0: kernels.SUM_SQUARES}.get(norm_type, kernels.SUM_POWERS)


def _inverse(norm_type: float) -> float:
    return 0.0 if math.isinf(norm_type) else 1.0 / norm_type


def _chunk_partials(table: ChunkTable, num_lists: int, norm_type: float, found_inf: Tensor | None = None) -> Tensor:
    """Pass 1 of a norm: fp64 [lists, chunks], one partial per chunk of each list; found_inf
    (if given) is set when the first list holds an inf or nan."""
    partials = torch.empty((num_lists, table.num_chunks), dtype=torch.float64, device=table.addresses.device)
    for group, aligned in zip(table.groups, table.aligned(tuple(range(num_lists)))):
        _launch(
            kernels.chunk_norm_partials_kernel, group.num_chunks,
            table.addresses, table.num_tensors, table.chunks, table.num_chunks, group.first_chunk, partials,
            0.0 if math.isinf(norm_type) else norm_type, found_inf,
            FIRST_DTYPE=_TL_DTYPES[group.dtypes[0]],
            SECOND_DTYPE=_TL_DTYPES[group.dtypes[1]] if num_lists == 2 else None,
            KIND=_norm_kind(norm_type), ALIGNED=aligned, BLOCK=BLOCK_SIZE,
        )  # fmt: skip
    return partials


@_guarded
def multi_tensor_norm(tensors: list[Tensor], norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors:
        total = torch.zeros((), dtype=torch.float32, device=device)
        return (total, torch.zeros(0, dtype=torch.float32, device=device)) if per_tensor else total
    dense, _ = _dense(tensors)
    return _norm_of_table(TABLES.lookup([dense]), norm_type, per_tensor, found_inf)


def _norm_of_table(table: ChunkTable, norm_type: float, per_tensor: bool, found_inf: Tensor | None):
    """The norm's two launches over the tensors of ``table`` (one row, at least one tensor)."""
    device = table.addresses.device
    total = torch.empty((), dtype=torch.float32, device=device)  # written by pass 2's last program
    partials = _chunk_partials(table, 1, norm_type, found_inf)
    # Without per-tensor norms only the total's program runs (it is program num_segments).
    norms = torch.empty(table.num_tensors, dtype=torch.float32, device=device) if per_tensor else total
    num_segments = table.num_segments if per_tensor else 0
    _launch(
        kernels.segment_norms_kernel, num_segments + 1,
        partials, table.segments, num_segments, table.num_chunks, norms, total, _inverse(norm_type),
        KIND=_norm_kind(norm_type), BLOCK=PARTIALS_BLOCK, TOTAL_BLOCK=TOTAL_BLOCK,
    )  # fmt: skip
    return (total, norms) if per_tensor else total


@_guarded
def _scale(tensors: list[Tensor], factor: float | Tensor, found_inf: Tensor | None) -> None:
    if not tensors:
        return
    dense, copies = _dense(tensors)
    table = TABLES.lookup([dense])
    value, value_ptr = _scalar_args(factor)
    for group, aligned in zip(table.groups, table.aligned((0,))):
        _launch(
            kernels.scale_kernel, group.num_chunks,
            table.addresses, table.num_tensors, 0, table.chunks, table.num_chunks, group.first_chunk,
            value, value_ptr, None, found_inf,
            DTYPE=_TL_DTYPES[group.dtypes[0]], ALIGNED=aligned, BLOCK=BLOCK_SIZE,
        )  # fmt: skip
    _write_back(copies)


def unscale_and_check_(tensors: list[Tensor], inv_scale: float | Tensor, found_inf: Tensor) -> None:
    _scale(tensors, inv_scale, found_inf)


def scale_(tensors: list[Tensor], coef: float | Tensor) -> None:
    _scale(tensors, coef, None)


@_guarded
def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    if not tensors:
        return
    dense, copies = _dense(tensors)
    table = TABLES.lookup([dense])
    for group, aligned in zip(table.groups, table.aligned((0,))):
        _launch(
            kernels.clamp_kernel, group.num_chunks,
            table.addresses, table.num_tensors, table.chunks, table.num_chunks, group.first_chunk, clip_value,
            DTYPE=_TL_DTYPES[group.dtypes[0]], ALIGNED=aligned, BLOCK=BLOCK_SIZE,
        )  # fmt: skip
    _write_back(copies)


@_guarded
def adaptive_clip_(
    params: list[Tensor],
    grads: list[Tensor],
    clip_factor: float,
    eps: float,
    norm_type: float,
    unitwise: bool,
) -> None:
    if not params:
        return
    dense_params, _ = _dense(params)
    dense_grads, copies = _dense(grads)
    # A unit is a slice along dim 0 of a >= 2-D tensor: a contiguous run of numel / shape[0].
    units = [t.shape[0] if t.ndim >= 2 else 1 for t in params] if unitwise else None
    table = TABLES.lookup([dense_params, dense_grads], units=units)
    if table.num_chunks == 0:  # only empty grads: nothing to clip
        return
    partials = _chunk_partials(table, 2, norm_type)
    coefficients = torch.empty(table.num_segments, dtype=torch.float64, device=partials.device)
    _launch(
        kernels.unit_clip_coefficients_kernel, table.num_segments,
        partials, table.segments, table.num_segments, table.num_chunks, coefficients,
        clip_factor, eps, _inverse(norm_type),
        KIND=_norm_kind(norm_type), BLOCK=PARTIALS_BLOCK,
    )  # fmt: skip
    for group, aligned in zip(table.groups, table.aligned((1,))):
        _launch(
            kernels.scale_kernel, group.num_chunks,
            table.addresses, table.num_tensors, 1, table.chunks, table.num_chunks, group.first_chunk,
            1.0, None, coefficients, None,
            DTYPE=_TL_DTYPES[group.dtypes[1]], ALIGNED=aligned, BLOCK=BLOCK_SIZE,
        )  # fmt: skip
    _write_back(copies)


def _log2(beta: float) -> float:
    """log2(beta) for beta ** step = 2 ** (step * log2(beta)); beta = 0 gives 0 for any step >= 1."""
    return math.log2(beta) if beta > 0 else -math.inf


# --------------------------------------------------------------------------- optimizer updates
#
# adamw_, sgd_ and lion_ share one path: contiguous stand-ins for strided tensors (the written ones
# copied back), one table over [params, grads, *states] (rows kernels.PARAMS, kernels.GRADS, then
# the op's states), one launch per dtype group, the device scalars passed as (value, pointer) pairs.


def _update_table(rows: list[list[Tensor]], **lookup):
    """The table over an update's rows (kernels.PARAMS, kernels.GRADS, then the op's states),
    pointing at contiguous stand-ins for strided tensors; the rows it points at (the caller
    keeps them until the launches are done: the table holds only their addresses); and the
    (original, copy) pairs of the written rows to copy back after the launch. Every tensor
    contiguous, the usual case: one C++ pass reads the rows for both the check and the lookup."""
    scanned = scan(rows)
    if scanned is not None and scanned.contiguous:
        return TABLES.lookup(rows, scanned=scanned, **lookup), rows, []
    dense_rows, copies = [], []
    for row, tensors in enumerate(rows):
        dense, pairs = _dense(tensors)
        dense_rows.append(dense)
        if row != int(kernels.GRADS):  # grads are read, never written
            copies += pairs
    return TABLES.lookup(dense_rows, **lookup), dense_rows, copies


def _update_launches(kernel, table: ChunkTable, vector_rows: tuple[int, ...], dtype_names: tuple[str, ...], args,
                     **constexprs) -> None:  # fmt: skip
    """One launch of an update kernel per dtype group of ``table``: ``args`` after the table's own,
    ``dtype_names`` the kernel's dtype constants of the table's rows, in order; ALIGNED per group
    from the alignment of ``vector_rows`` (the rows the kernel reads and writes element by element)."""
    for group, aligned in zip(table.groups, table.aligned(vector_rows)):
        dtypes = {name: _TL_DTYPES[dtype] for name, dtype in zip(dtype_names, group.dtypes)}
        _launch(
            kernel, group.num_chunks,
            table.addresses, table.num_tensors, table.chunks, table.num_chunks, group.first_chunk, *args,
            **dtypes, **constexprs, ALIGNED=aligned, BLOCK=BLOCK_SIZE,
        )  # fmt: skip


def _grad_args(grad_scale, found_inf, clip_coef) -> tuple:
    """The kernels' grad_scale, grad_scale_ptr, clip_coef, clip_coef_ptr, found_inf arguments."""
    grad_scale_value, grad_scale_ptr = _scalar_args(1.0 if grad_scale is None else grad_scale)
    clip_coef_value, clip_coef_ptr = _scalar_args(1.0 if clip_coef is None else clip_coef)
    return grad_scale_value, grad_scale_ptr, clip_coef_value, clip_coef_ptr, found_inf


@_guarded
def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    max_exp_avg_sqs: list[Tensor] | None,
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    clip_coef: float | Tensor | None,
    decoupled_weight_decay: bool = True,
) -> None:
    if not params:
        return
    amsgrad = max_exp_avg_sqs is not None
    # Rows in the order of kernels.PARAMS .. kernels.MAX_EXP_AVG_SQS.
    rows = [params, grads, exp_avgs, exp_avg_sqs, steps] + ([max_exp_avg_sqs] if amsgrad else [])
    table, dense_rows, copies = _update_table(rows, min_one_chunk=True, arrivals=True)
    _adamw_launches(table, amsgrad, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
                    decoupled_weight_decay=decoupled_weight_decay)  # fmt: skip
    _write_back(copies)
    del dense_rows  # the rows the table pointed at lived until the launches were made


# Rows of the AdamW address table that the kernel reads and writes element by element (the step
# counters are scalars): the rows whose alignment decides between 128-bit and scalar accesses.
_ADAMW_VECTOR_ROWS = (int(kernels.PARAMS), int(kernels.GRADS), int(kernels.EXP_AVGS), int(kernels.EXP_AVG_SQS))
_ADAMW_AMSGRAD_ROWS = _ADAMW_VECTOR_ROWS + (int(kernels.MAX_EXP_AVG_SQS),)
_ADAMW_DTYPES = ("PARAM_DTYPE", "GRAD_DTYPE", "EXP_AVG_DTYPE", "EXP_AVG_SQ_DTYPE", "STEP_DTYPE", "MAX_EXP_AVG_SQ_DTYPE")


def _adamw_launches(table: ChunkTable, amsgrad: bool, *, lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                    found_inf, clip_coef, decoupled_weight_decay=True) -> None:  # fmt: skip
    # Adam's L2 term only where it adds something (torch skips weight_decay 0: 0 * a nan param is
    # nan); weight_decay 0 otherwise decays by exactly 1, the AdamW kernel without a new variant.
    l2 = not decoupled_weight_decay and weight_decay != 0
    _update_launches(
        kernels.adamw_kernel, table, _ADAMW_AMSGRAD_ROWS if amsgrad else _ADAMW_VECTOR_ROWS, _ADAMW_DTYPES,
        (table.segments, table.num_segments, table.arrivals, *_scalar_args(lr), beta1, beta2, _log2(beta1),
         _log2(beta2), eps, weight_decay, *_grad_args(grad_scale, found_inf, clip_coef)),
        **({} if amsgrad else {"MAX_EXP_AVG_SQ_DTYPE": None}),
        L2=l2, MAXIMIZE=maximize, UNSCALE=grad_scale is not None, CLIP=clip_coef is not None,
    )  # fmt: skip


@_guarded
def sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    clip_coef: float | Tensor | None,
) -> None:
    if not params:
        return
    # Rows kernels.PARAMS, kernels.GRADS (and kernels.MOMENTUM_BUFFERS).
    table, dense_rows, copies = _update_table([params, grads] + ([momentum_buffers] if momentum_buffers is not None else []))
    _sgd_launches(table, momentum_buffers is not None, lr=lr, momentum=momentum, dampening=dampening,
                  weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                  grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)  # fmt: skip
    _write_back(copies)
    del dense_rows  # the rows the table pointed at lived until the launches were made


_SGD_ROWS = (int(kernels.PARAMS), int(kernels.GRADS))
_SGD_MOMENTUM_ROWS = _SGD_ROWS + (int(kernels.MOMENTUM_BUFFERS),)
_SGD_DTYPES = ("PARAM_DTYPE", "GRAD_DTYPE", "MOMENTUM_BUFFER_DTYPE")


def _sgd_launches(table: ChunkTable, with_buffers: bool, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                  first_step, grad_scale, found_inf, clip_coef) -> None:  # fmt: skip
    _update_launches(
        kernels.sgd_kernel, table, _SGD_MOMENTUM_ROWS if with_buffers else _SGD_ROWS, _SGD_DTYPES,
        (*_scalar_args(lr), momentum, dampening, weight_decay, *_grad_args(grad_scale, found_inf, clip_coef)),
        **({} if with_buffers else {"MOMENTUM_BUFFER_DTYPE": None}),
        WEIGHT_DECAY=weight_decay != 0, FIRST_STEP=first_step and with_buffers, NESTEROV=nesterov and with_buffers,
        MAXIMIZE=maximize, UNSCALE=grad_scale is not None, CLIP=clip_coef is not None,
    )  # fmt: skip


@_guarded
def lion_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    clip_coef: float | Tensor | None,
) -> None:
    if not params:
        return
    table, dense_rows, copies = _update_table([params, grads, exp_avgs])  # rows PARAMS, GRADS, EXP_AVGS
    _lion_launches(table, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                   grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)  # fmt: skip
    _write_back(copies)
    del dense_rows  # the rows the table pointed at lived until the launches were made


_LION_ROWS = (int(kernels.PARAMS), int(kernels.GRADS), int(kernels.EXP_AVGS))


def _lion_launches(table: ChunkTable, *, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf,
                   clip_coef) -> None:  # fmt: skip
    _update_launches(
        kernels.lion_kernel, table, _LION_ROWS, ("PARAM_DTYPE", "GRAD_DTYPE", "EXP_AVG_DTYPE"),
        (*_scalar_args(lr), beta1, beta2, weight_decay, *_grad_args(grad_scale, found_inf, clip_coef)),
        MAXIMIZE=maximize, UNSCALE=grad_scale is not None, CLIP=clip_coef is not None,
    )  # fmt: skip


# --------------------------------------------------------------------------- the step plan


class _WatchedGrads:
    """A table row that follows the grads of some entries of fastopt.optim's step plan's
    GradWatch (``fastopt.backends.watched``): re-pointed only when they moved."""

    __slots__ = ("column", "table", "row")

    def __init__(self, watch, ranges: list[tuple[int, int]], table: ChunkTable, row: int):
        self.column, self.table, self.row = WatchedColumn(watch, ranges), table, row

    def follow(self) -> bool:
        """Point the row at this step's grads; False when the table cannot run them (a grad of
        another dtype, or strided)."""
        moved = self.column.follow()
        if moved:
            self.table.point_row_at(self.row, pointer_column_of(self.column.addresses))
        return moved is not None


class _PlannedTable:
    """The table of one update op in one optimizer step plan on one stream: built once, then only
    its grads row follows the new grads (and its params row a param whose storage moved). With
    the plan's GradWatch, the grads row follows the watch (``_WatchedGrads``) and the params row
    stays: a param whose storage moved voids the step plan and its watch."""

    __slots__ = ("table", "param_layout", "grad_dtypes", "watched")

    def __init__(self, table: ChunkTable, params: list[Tensor], signature: tuple, watched):
        self.table, self.grad_dtypes = table, signature[1]
        self.param_layout = (signature[0], numel_column(params).tobytes())
        self.watched = None if watched is None else _WatchedGrads(
            watched[0], [(watched[1], len(params))], table, int(kernels.GRADS)
        )  # fmt: skip

    def follow(self, params: list[Tensor], grads: list[Tensor]) -> bool:
        """Point the table at these grads and params; False when it cannot run them: grads of
        another dtype or strided, or a param swapped (``p.data = x``: same tensor, another
        storage) for one of another dtype, size or layout."""
        if self.watched is not None:
            return self.watched.follow()
        # The grads' pointers first: that pass brings the new grads' metadata into the cache for
        # the dtype and contiguity passes that follow.
        self.table.point_row_to(int(kernels.GRADS), grads)
        if self.grad_dtypes != dtype_signature([grads])[0] or not all(map(Tensor.is_contiguous, grads)):
            return False
        if not self.table.point_row_to(int(kernels.PARAMS), params):
            return True  # the usual step: no param moved, nothing more to read
        layout = (dtype_signature([params])[0], numel_column(params).tobytes())
        return layout == self.param_layout and all(map(Tensor.is_contiguous, params))


# Per update op: the names of its lists in a plan's ``lists``, in the order of its table's rows.
_PLANNED_ROWS = {
    "adamw_": ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs"),
    "sgd_": ("params", "grads", "momentum_buffers"),
    "lion_": ("params", "grads", "exp_avgs"),
}


def _planned_table(op: str, lists: dict[str, list[Tensor]], plan: dict) -> tuple[list[list[Tensor]], ChunkTable | None]:
    """The op's rows from ``lists`` (absent or None lists left out), and the plan's table for them
    (made on the first call), pointed at this call's grads and params; None where the op's full
    path must run instead (strided tensors, CUDA-graph capture: its tables are private). Called
    under the device guard. The key names the op: a plan shared by two ops keeps a table for each.
    With the step plan's GradWatch (``plan["watch"]``), the grads list is filled only when the
    table is made, or for the full path."""
    rows = [lists[name] for name in _PLANNED_ROWS[op] if lists.get(name) is not None]
    params, grads = rows[0], rows[1]
    device = params[0].device
    watched = plan.get("watch")
    if capturing(device):
        fill_lists(watched)
        return rows, None
    key = ("triton", op, stream_key(device))
    entry = plan.get(key)
    if entry is not None and not entry.follow(params, grads):
        entry = None  # built anew below, or the full path for strided tensors
        del plan[key]
    if entry is None:
        fill_lists(watched)
    if entry is None and all(all(map(Tensor.is_contiguous, t)) for t in rows):
        signature = dtype_signature(rows)
        per_tensor_step = op == "adamw_"  # a step counter per tensor: a chunk even when empty, arrivals
        table = ChunkTable(rows, signature, list(map(Tensor.numel, params)), None, per_tensor_step, per_tensor_step)
        table.point_to(rows)
        entry = plan[key] = _PlannedTable(table, params, signature, watched)
    return rows, None if entry is None else entry.table


def multi_tensor_norm_planned(plan: dict, norm_type: float, per_tensor: bool, found_inf: Tensor | None = None):
    """``multi_tensor_norm`` of the grads that fastopt.optim's step plan holds for one device
    (``plan["watch"]``: its GradWatch and the entries' ranges; ``plan["device"]``): the plan keeps
    the table, whose row follows the watch (``_WatchedGrads``). The grads are made Python tensors
    only for the table's first build, and for the full path (strided grads, CUDA-graph capture)."""
    watch, ranges = plan["watch"]
    device = plan["device"]
    with _on(device):
        if capturing(device):  # the op's private tables; the plan's stays for the eager steps
            grads = grads_of(watch, ranges)
            return multi_tensor_norm.__wrapped__(grads, norm_type, per_tensor, found_inf)
        key = ("triton", "multi_tensor_norm", stream_key(device))
        watched = plan.get(key)
        if watched is None or not watched.follow():
            plan.pop(key, None)
            grads = grads_of(watch, ranges)
            if not grads or not all(map(Tensor.is_contiguous, grads)):
                return multi_tensor_norm.__wrapped__(grads, norm_type, per_tensor, found_inf)
            table = ChunkTable([grads], dtype_signature([grads]), list(map(Tensor.numel, grads)), None, False, False)
            table.point_to([grads])
            watched = plan[key] = _WatchedGrads(watch, ranges, table, 0)
        return _norm_of_table(watched.table, norm_type, per_tensor, found_inf)


_PLANNED_DOC = """``{op}`` for a caller that owns ``plan`` (a dict, empty at first) and promises that,
    while it keeps it, ``lists`` holds the very same params and states (same tensors, same
    storage, validated by ``fastopt.ops.{op}``) and grads of the same shapes, checked by
    ``fastopt.ops.check_replacement`` (fastopt.optim's step plan). The plan keeps the op's
    table, private to it; a call re-reads only the grads (dtype, contiguity, pointers) and the
    params' pointers (``p.data = x`` keeps the param but moves its storage; the params' dtypes
    and sizes are re-read only then): four C passes over two lists, where a cached ``{op}``
    reads every list. States are trusted to keep their storage, as the step plan trusts them.
    Falls back to ``{op}`` for non-contiguous tensors and during CUDA-graph capture (whose
    tables are private)."""


def adamw_planned_(lists: dict[str, list[Tensor]], plan: dict, **hyper) -> None:
    if not lists["params"]:
        return
    with _on(lists["params"][0].device):
        rows, table = _planned_table("adamw_", lists, plan)
        amsgrad = len(rows) == 6
        if table is None:
            adamw_(*rows[:5], max_exp_avg_sqs=rows[5] if amsgrad else None, **hyper)
        else:
            _adamw_launches(table, amsgrad, **hyper)


def sgd_planned_(lists: dict[str, list[Tensor]], plan: dict, **hyper) -> None:
    if not lists["params"]:
        return
    with _on(lists["params"][0].device):
        rows, table = _planned_table("sgd_", lists, plan)
        with_buffers = len(rows) == 3
        if table is None:
            sgd_(rows[0], rows[1], rows[2] if with_buffers else None, **hyper)
        else:
            _sgd_launches(table, with_buffers, **hyper)


def lion_planned_(lists: dict[str, list[Tensor]], plan: dict, **hyper) -> None:
    if not lists["params"]:
        return
    with _on(lists["params"][0].device):
        rows, table = _planned_table("lion_", lists, plan)
        if table is None:
            lion_(*rows, **hyper)
        else:
            _lion_launches(table, **hyper)


adamw_planned_.__doc__ = _PLANNED_DOC.format(op="adamw_")
sgd_planned_.__doc__ = _PLANNED_DOC.format(op="sgd_")
lion_planned_.__doc__ = _PLANNED_DOC.format(op="lion_")
