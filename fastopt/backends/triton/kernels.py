"""Triton kernels of the fastopt ops, each walking a chunk table (see ``tables.py``).

Every per-element kernel is launched with one program per chunk: a program loads its chunk's
row of the table (which tensor, which element range), loads that tensor's address from the
address table and casts it to a typed pointer, then walks the range in ``BLOCK``-element steps.
Offsets are int64 throughout, so a tensor may hold more than 2**31 elements.

Element loops run in two phases: whole blocks without a mask, then the masked rest. In an
``ALIGNED`` launch (the host found every pointer 16 bytes aligned, and chunks start at whole
blocks) the first phase carries ``tl.multiple_of`` / ``tl.max_contiguous`` hints and compiles to
128-bit loads and stores; otherwise it is empty and the masked phase walks the whole chunk. Both
visit the elements in the same order, so results do not depend on alignment.

Reductions are two-stage and deterministic: pass 1 writes one fp64 partial per chunk (and per
input list), pass 2 reduces each tensor's (or unit's) partials in chunk order. No float atomics.

The optimizer updates round as torch's CPU kernels do (csrc/common/element_math.h's ``*_fused``): an
add with alpha, a lerp or an addcmul is one explicit fma, everything else rounds per operation;
SGD, Lion and the AdamW moments match the reference bit for bit under the interpreter.

Scalars that the ops accept as a Python float or a 0-d device tensor arrive as a pair
``(value, value_ptr)``: the tensor is read on the device when ``value_ptr`` is not None.
Python floats are fp64 arguments (annotated ``tl.float64``; a bare float argument would be
rounded to fp32) and are read through ``tl.full(..., tl.float64)``, which keeps their precision
under the interpreter too.
"""

from __future__ import annotations

import functools
import inspect
import os

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# fp32 -> bf16 on the bits, rounding to nearest even, only where it is needed: the interpreter's
# own cast truncates. Compiled for a GPU, the native conversion (cvt.rn.bf16.f32) rounds the same.
EMULATE_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# Bytes of the widest vector access (ld.global.v4.b32): the alignment that ALIGNED launches promise.
VECTOR_BYTES = tl.constexpr(16)

# How pass 1 turns elements into a partial, by norm type.
MAX_ABS = tl.constexpr(0)  # inf-norm: max |x|
SUM_ABS = tl.constexpr(1)  # p = 1: sum |x|
SUM_SQUARES = tl.constexpr(2)  # p = 2: sum x*x
SUM_POWERS = tl.constexpr(3)  # any other p: sum |x|**p

# Rows of the chunk table (int64 [4, num_chunks]) and of the segment table (int64 [3, num_segments]).
CHUNK_TENSOR = tl.constexpr(0)
CHUNK_SEGMENT = tl.constexpr(1)
CHUNK_START = tl.constexpr(2)
CHUNK_END = tl.constexpr(3)
SEGMENT_TENSOR = tl.constexpr(0)
SEGMENT_FIRST_CHUNK = tl.constexpr(1)
SEGMENT_NUM_CHUNKS = tl.constexpr(2)

# Sizes that vary from call to call: compiled once, not once per value (or per value % 16).
_SIZES = ("num_tensors", "num_chunks", "first_chunk", "num_segments", "row")


def _kernel(fn):
    """triton.jit that does not specialise on the size arguments."""
    parameters = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[name for name in _SIZES if name in parameters])


def _without_repatching(jitted):
    """A jitted helper as kernels should call it.

    The interpreter re-patches triton.language on every call of a jitted helper (a few ms, most
    of an interpreted kernel's run time); the launch of the calling kernel has patched it
    already, so under the interpreter the helper runs as its rewritten Python function directly.
    Compiled for a GPU (or with an interpreter that has no ``rewrite``), the jitted helper itself.
    """
    if not isinstance(jitted, InterpretedFunction) or not hasattr(jitted, "rewrite"):
        return jitted

    @functools.wraps(jitted.fn)
    def call_rewritten(*args, **kwargs):
        return jitted.rewrite()(*args, **kwargs)

    return call_rewritten


def _device_function(fn):
    return _without_repatching(triton.jit(fn))


# triton.language's own reductions are jitted helpers too.
_sum = _without_repatching(tl.sum)
_max = _without_repatching(tl.max)


# --------------------------------------------------------------------------- helpers


@_device_function
def _row(table, row, row_length, column):
    """Element [row, column] of a row-major int64 table, with 64-bit index math."""
    return tl.load(table + row_length.to(tl.int64) * row + column)


@_device_function
def _this_chunk(chunks, num_chunks, first_chunk):
    """(chunk, tensor, segment, start, end) of the chunk this program handles."""
    chunk = tl.program_id(0).to(tl.int64) + first_chunk
    tensor = _row(chunks, CHUNK_TENSOR, num_chunks, chunk)
    segment = _row(chunks, CHUNK_SEGMENT, num_chunks, chunk)
    start = _row(chunks, CHUNK_START, num_chunks, chunk)
    end = _row(chunks, CHUNK_END, num_chunks, chunk)
    return chunk, tensor, segment, start, end


@_device_function
def _tensor_pointer(addresses, num_tensors, row, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """The data pointer of ``tensor`` in list ``row`` of the address table, typed as DTYPE;
    with ALIGNED (the host checked every pointer of the launch), marked 16-byte aligned."""
    pointer = _row(addresses, row, num_tensors, tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, VECTOR_BYTES)
    return pointer


@_device_function
def _lanes(BLOCK: tl.constexpr):
    """0 .. BLOCK-1 as int64 offsets (> 2**31 elements are fine), marked contiguous."""
    return tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK).to(tl.int64)


@_device_function
def _full_blocks(start, end, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """How many whole blocks of [start, end) run unmasked: all of them in an ALIGNED launch
    (start is then a multiple of BLOCK and every pointer 16-byte aligned), else none."""
    if ALIGNED:
        result = (end - start) // BLOCK
    else:
        result = start * 0
    return result


@_device_function
def _phase_range(start, end, full, PHASE: tl.constexpr, BLOCK: tl.constexpr):
    """(first offset, block count) of a walk's phase: 0 the unmasked whole blocks, 1 the masked rest."""
    if PHASE == 0:
        first = start
        count = full
    else:
        first = start + full * BLOCK
        count = (end - first + BLOCK - 1) // BLOCK
    return first, count


@_device_function
def _phase_index(first, block, lanes, PHASE: tl.constexpr, BLOCK: tl.constexpr):
    """The element offsets of a phase's block (marked whole-block aligned in the unmasked phase)."""
    offset = first + block * BLOCK
    if PHASE == 0:
        offset = tl.multiple_of(offset, BLOCK)
    return offset + lanes


@_device_function
def _load(pointer, index, mask):
    """Elements ``index`` (0 where ``mask`` is off; every one when mask is None)."""
    if mask is None:
        result = tl.load(pointer + index)
    else:
        result = tl.load(pointer + index, mask=mask, other=0.0)
    return result


@_device_function
def _float64(value):
    """A float argument as an fp64 scalar (the interpreter would take a Python float as fp32)."""
    return tl.full((), value, tl.float64)


@_device_function
def _scalar(value, value_ptr):
    """A scalar argument as fp64: the 0-d tensor's value when one was passed, else the float."""
    if value_ptr is not None:
        result = tl.load(value_ptr).to(tl.float64)
    else:
        result = _float64(value)
    return result


@_device_function
def _div(x, y):
    """IEEE-rounded division (a plain fp32 `/` may be approximate on the GPU)."""
    if x.dtype == tl.float32:
        result = tl.div_rn(x, y)
    else:
        result = x / y
    return result


@_device_function
def _sqrt(x):
    """IEEE-rounded square root, as torch computes it."""
    if x.dtype == tl.float32:
        result = tl.sqrt_rn(x)
    else:
        result = tl.sqrt(x)
    return result


@_device_function
def _to_bfloat16(x):
    """fp32 -> bf16, rounding to nearest even (overflowing to inf); nan becomes the quiet nan
    0x7FC0, as torch's scalar conversion gives. Done on the bits because the interpreter's own
    fp32 -> bf16 cast truncates instead of rounding."""
    bits = tl.where(x != x, 0x7FC00000, x.to(tl.uint32, bitcast=True))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@_device_function
def _to_storage(x, DTYPE: tl.constexpr):
    """A computed value rounded once to its storage dtype."""
    if DTYPE == tl.bfloat16 and EMULATE_BF16:
        result = _to_bfloat16(x.to(tl.float32))
    elif DTYPE == tl.bfloat16:
        result = x.to(tl.float32).to(tl.bfloat16)
    else:
        result = x.to(DTYPE)
    return result


@_device_function
def _maximum_keeping_nan(a, b):
    """Elementwise max where a nan in either operand wins (as torch.maximum)."""
    return tl.where((b > a) | (b != b), b, a)


@_device_function
def _max_keeping_nan(values):
    """Max of a vector where any nan wins (tl.max itself ignores nans)."""
    has_nan = _max((values != values).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), _max(values, axis=0))


@_device_function
def _accumulate(acc, x, p, KIND: tl.constexpr):
    """Fold |x| (as |x|, x*x or |x|**p) into the running per-lane partial."""
    magnitude = tl.abs(x)
    if KIND == MAX_ABS:
        acc = _maximum_keeping_nan(acc, magnitude)
    elif KIND == SUM_ABS:
        acc += magnitude
    elif KIND == SUM_SQUARES:
        acc += x * x
    else:
        # |x|**p = 2**(p * log2|x|); 0 maps to 0, inf to inf, nan stays nan.
        positive = magnitude > 0
        power = tl.exp2(p * tl.log2(tl.where(positive, magnitude, 1.0)))
        acc += tl.where(positive, power, magnitude)
    return acc


@_device_function
def _combine(values, KIND: tl.constexpr):
    """Reduce a vector of partials to one, in a fixed order."""
    if KIND == MAX_ABS:
        result = _max_keeping_nan(values)
    else:
        result = _sum(values, axis=0)
    return result


@_device_function
def _nonfinite(x):
    """1 where x is inf or nan, else 0 (int32, so that a max over lanes says whether any is)."""
    return ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)


@_device_function
def _chunk_partial(x_ptr, start, end, p, KIND: tl.constexpr, ACC_DTYPE: tl.constexpr, CHECK_FINITE: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The partial (max |x| or sum of |x|**p) of elements [start, end) of one tensor, and
    (with CHECK_FINITE) whether any of them is inf or nan."""
    acc = tl.full([BLOCK], 0, ACC_DTYPE)
    nonfinite = tl.full([BLOCK], 0, tl.int32)
    p = p.to(ACC_DTYPE)
    lanes = _lanes(BLOCK)
    full = _full_blocks(start, end, BLOCK, ALIGNED)
    for PHASE in tl.static_range(2):  # unmasked whole blocks (vector loads), then the masked rest
        first, count = _phase_range(start, end, full, PHASE, BLOCK)
        for block in range(0, count):
            index = _phase_index(first, block, lanes, PHASE, BLOCK)
            if PHASE == 0:
                mask = None
            else:
                mask = index < end
            x = _load(x_ptr, index, mask).to(ACC_DTYPE)
            acc = _accumulate(acc, x, p, KIND)
            if CHECK_FINITE:
                nonfinite |= _nonfinite(x)
    if CHECK_FINITE:
        saw_nonfinite = _max(nonfinite, axis=0) > 0
    else:
        saw_nonfinite = False
    return _combine(acc, KIND).to(tl.float64), saw_nonfinite


@_device_function
def _reduce_partials(partials, first, count, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Reduce ``count`` fp64 partials from ``first`` on, in order."""
    acc = tl.full([BLOCK], 0, tl.float64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)  # 64-bit offsets: > 2**31 elements are fine
    for offset in range(first, first + count, BLOCK):
        index = offset + lanes
        partial = tl.load(partials + index, mask=index < first + count, other=0.0)
        if KIND == MAX_ABS:
            acc = _maximum_keeping_nan(acc, partial)
        else:
            acc += partial
    return _combine(acc, KIND)


@_device_function
def _root(reduced, inv_p, KIND: tl.constexpr):
    """The norm from the reduced partials (fp64): reduced ** (1/p) for the summing kinds."""
    if KIND == SUM_SQUARES:
        result = tl.sqrt(reduced)
    elif KIND == SUM_POWERS:
        positive = reduced > 0
        root = tl.exp2(tl.log2(tl.where(positive, reduced, 1.0)) * inv_p)
        result = tl.where(positive, root, reduced)
    else:
        result = reduced
    return result


# --------------------------------------------------------------------------- norms


@_kernel
def chunk_norm_partials_kernel(
    addresses,  # int64 [lists, num_tensors]
    num_tensors,
    chunks,  # int64 [4, num_chunks]
    num_chunks,
    first_chunk,  # this launch's (dtype group's) first chunk
    partials,  # fp64 [lists, num_chunks], out
    p: tl.float64,
    found_inf,  # None, or a float32 flag set to 1.0 when an element of the first list is inf or nan
    FIRST_DTYPE: tl.constexpr,
    SECOND_DTYPE: tl.constexpr,  # None: one list; else the second list's dtype (AGC: params, grads)
    KIND: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor of the launch 16-byte aligned, chunks starting at whole blocks
    BLOCK: tl.constexpr,
):
    """Pass 1 of a norm: one partial per chunk (and per list) of max |x| or sum |x|**p."""
    chunk, tensor, _, start, end = _this_chunk(chunks, num_chunks, first_chunk)
    p = _float64(p)
    # fp64 tensors accumulate in fp64, everything else in fp32.
    first_acc: tl.constexpr = tl.float64 if FIRST_DTYPE == tl.float64 else tl.float32
    x_ptr = _tensor_pointer(addresses, num_tensors, 0, tensor, FIRST_DTYPE, ALIGNED)
    partial, nonfinite = _chunk_partial(x_ptr, start, end, p, KIND, first_acc, found_inf is not None, ALIGNED,
                                        BLOCK)  # fmt: skip
    tl.store(partials + chunk, partial)
    if found_inf is not None:  # the same 1.0 from every program that saw one: no atomics needed
        tl.store(found_inf, 1.0, mask=nonfinite)
    if SECOND_DTYPE is not None:
        second_acc: tl.constexpr = tl.float64 if SECOND_DTYPE == tl.float64 else tl.float32
        y_ptr = _tensor_pointer(addresses, num_tensors, 1, tensor, SECOND_DTYPE, ALIGNED)
        partial, _ = _chunk_partial(y_ptr, start, end, p, KIND, second_acc, False, ALIGNED, BLOCK)
        tl.store(partials + num_chunks.to(tl.int64) + chunk, partial)


@_kernel
def segment_norms_kernel(
    partials,  # fp64 [num_chunks], from pass 1
    segments,  # int64 [3, num_segments]
    num_segments,
    num_chunks,
    norms,  # fp32 [num_tensors], out: one norm per tensor
    total,  # fp32 0-d, out: the norm of everything
    inv_p: tl.float64,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    TOTAL_BLOCK: tl.constexpr,
):
    """Pass 2 of multi_tensor_norm: program s < num_segments reduces tensor s's partials;
    program num_segments reduces all partials into the total, TOTAL_BLOCK wide (it walks every
    chunk: a wide step keeps its chain of dependent loads short at billions of elements)."""
    program = tl.program_id(0).to(tl.int64)
    if program < num_segments:
        tensor = _row(segments, SEGMENT_TENSOR, num_segments, program)
        first = _row(segments, SEGMENT_FIRST_CHUNK, num_segments, program)
        count = _row(segments, SEGMENT_NUM_CHUNKS, num_segments, program)
        norm = _root(_reduce_partials(partials, first, count, KIND, BLOCK), _float64(inv_p), KIND)
        tl.store(norms + tensor, norm.to(tl.float32))
    else:
        everything = _reduce_partials(partials, 0, num_chunks.to(tl.int64), KIND, TOTAL_BLOCK)
        tl.store(total, _root(everything, _float64(inv_p), KIND).to(tl.float32))


@_kernel
def unit_clip_coefficients_kernel(
    partials,  # fp64 [2, num_chunks]: params' then grads' partials, from pass 1
    segments,  # int64 [3, num_segments]: one segment per unit
    num_segments,
    num_chunks,
    coefficients,  # fp64 [num_segments], out
    clip_factor: tl.float64,
    eps: tl.float64,
    inv_p: tl.float64,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AGC pass 2, one program per unit u: max_u = clip_factor * max(||W_u||, eps); the grad's
    factor is max_u / max(||g_u||, 1e-6) where ||g_u|| > max_u, else 1."""
    unit = tl.program_id(0).to(tl.int64)
    clip_factor, eps, inv_p = _float64(clip_factor), _float64(eps), _float64(inv_p)
    first = _row(segments, SEGMENT_FIRST_CHUNK, num_segments, unit)
    count = _row(segments, SEGMENT_NUM_CHUNKS, num_segments, unit)
    param_norm = _root(_reduce_partials(partials, first, count, KIND, BLOCK), inv_p, KIND)
    grad_norm_partials = partials + num_chunks.to(tl.int64)
    grad_norm = _root(_reduce_partials(grad_norm_partials, first, count, KIND, BLOCK), inv_p, KIND)
    # where(x < floor, floor, x) keeps a nan norm nan, as torch's clamp_min does.
    max_norm = clip_factor * tl.where(param_norm < eps, eps, param_norm)
    norm_floor = _float64(1e-6)  # torch's and timm's guard against dividing by a vanishing norm
    divisor = tl.where(grad_norm < norm_floor, norm_floor, grad_norm)
    coefficient = tl.where(grad_norm > max_norm, max_norm / divisor, 1.0)
    tl.store(coefficients + unit, coefficient)


# --------------------------------------------------------------------------- elementwise


@_kernel
def scale_kernel(
    addresses,
    num_tensors,
    row,  # which list of the address table to scale
    chunks,
    num_chunks,
    first_chunk,
    factor: tl.float64,
    factor_ptr,  # None, or a 0-d tensor that overrides ``factor``
    segment_factors,  # None, or fp64 [num_segments]: one factor per segment (AGC units)
    found_inf,  # None, or a float32 flag set to 1.0 when an input element is inf or nan
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x *= factor in place (in fp32, fp64 for fp64 tensors); optionally flag non-finite inputs."""
    _, tensor, segment, start, end = _this_chunk(chunks, num_chunks, first_chunk)
    compute: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    x_ptr = _tensor_pointer(addresses, num_tensors, row, tensor, DTYPE, ALIGNED)
    if segment_factors is not None:
        f = tl.load(segment_factors + segment).to(compute)
    else:
        f = _scalar(factor, factor_ptr).to(compute)
    nonfinite = tl.full([BLOCK], 0, tl.int32)
    lanes = _lanes(BLOCK)
    full = _full_blocks(start, end, BLOCK, ALIGNED)
    for PHASE in tl.static_range(2):  # unmasked whole blocks (vector accesses), then the masked rest
        first, count = _phase_range(start, end, full, PHASE, BLOCK)
        for block in range(0, count):
            index = _phase_index(first, block, lanes, PHASE, BLOCK)
            if PHASE == 0:
                mask = None
            else:
                mask = index < end
            x = _load(x_ptr, index, mask).to(compute)
            if found_inf is not None:  # checked on the input, before scaling, as torch's amp op does
                nonfinite |= _nonfinite(x)
            tl.store(x_ptr + index, _to_storage(x * f, DTYPE), mask=mask)
    if found_inf is not None:
        # Every program that saw one writes the same 1.0: no atomics needed, never cleared.
        tl.store(found_inf, 1.0, mask=_max(nonfinite, axis=0) > 0)


@_kernel
def clamp_kernel(
    addresses,
    num_tensors,
    chunks,
    num_chunks,
    first_chunk,
    clip_value: tl.float64,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x = min(max(x, -clip_value), clip_value) in place; nan stays nan."""
    _, tensor, _, start, end = _this_chunk(chunks, num_chunks, first_chunk)
    x_ptr = _tensor_pointer(addresses, num_tensors, 0, tensor, DTYPE, ALIGNED)
    # The bound in the tensor's dtype (through fp32), as torch rounds a Python clamp value.
    if DTYPE == tl.float64:
        bound = _float64(clip_value)
    else:
        bound = _to_storage(_float64(clip_value).to(tl.float32), DTYPE).to(tl.float32)
    lanes = _lanes(BLOCK)
    full = _full_blocks(start, end, BLOCK, ALIGNED)
    for PHASE in tl.static_range(2):  # unmasked whole blocks (vector accesses), then the masked rest
        first, count = _phase_range(start, end, full, PHASE, BLOCK)
        for block in range(0, count):
            index = _phase_index(first, block, lanes, PHASE, BLOCK)
            if PHASE == 0:
                mask = None
            else:
                mask = index < end
            x = _load(x_ptr, index, mask)
            wide = x.to(bound.dtype)
            clamped = tl.where(wide < -bound, -bound, tl.where(wide > bound, bound, wide))
            tl.store(x_ptr + index, _to_storage(clamped, DTYPE), mask=mask)


# --------------------------------------------------------------------------- optimizer updates

# Rows of the update ops' address tables: params and grads first, then the op's states.
PARAMS = tl.constexpr(0)
GRADS = tl.constexpr(1)
EXP_AVGS = tl.constexpr(2)  # AdamW's and Lion's momentum
EXP_AVG_SQS = tl.constexpr(3)
STEPS = tl.constexpr(4)
MAX_EXP_AVG_SQS = tl.constexpr(5)
MOMENTUM_BUFFERS = tl.constexpr(2)  # SGD's


@_device_function
def _update_chunk(chunks, num_chunks, first_chunk, found_inf):
    """(tensor, segment, start, end, proceed) of the chunk this update program handles. found_inf
    is loaded with the chunk row, not before it: no extra round trip ahead of the first data load.
    When it is set, the range is empty and proceed is false: nothing is read or written."""
    if found_inf is not None:
        proceed = tl.load(found_inf) == 0
    _, tensor, segment, start, end = _this_chunk(chunks, num_chunks, first_chunk)
    if found_inf is not None:
        end = tl.where(proceed, end, start)
    else:
        proceed = start == start
    return tensor, segment, start, end, proceed


@_device_function
def _effective_grad(grad, grad_scale, clip_coef, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, CLIP: tl.constexpr):
    """The grad as an update uses it: negated when maximizing, then / grad_scale, then * clip_coef
    (torch's order; the factors are exact on the negation)."""
    if MAXIMIZE:
        grad = -grad
    if UNSCALE:
        grad = _div(grad, grad_scale)
    if CLIP:
        grad = grad * clip_coef
    return grad


@_device_function
def _fma(a, b, c):
    """a * b + c rounded once (fma.rn on the GPU; the interpreter rounds it once too), where torch's
    CPU kernels fuse (add with alpha, lerp, addcmul: csrc/common/element_math.h's ``*_fused``). The
    scalars are broadcast to c's block: an older tl.fma takes operands of one shape only."""
    return tl.fma(tl.broadcast_to(a, c.shape), tl.broadcast_to(b, c.shape), c)


@_device_function
def _lerp(start, end, weight):
    """torch.lerp as its CPU kernel rounds (exact at both ends): one fma from the start for weights
    below 0.5, from the end above."""
    difference = end - start
    return tl.where(weight < 0.5, _fma(weight, difference, start), _fma(weight - 1.0, difference, end))


@_device_function
def _sign(x):
    """torch.sign as its kernels compute it, (0 < x) - (x < 0): +-1, and +0 for zeros and nan."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


# --------------------------------------------------------------------------- AdamW


@_kernel
def adamw_kernel(
    addresses,  # int64 [5 or 6, num_tensors]: rows PARAMS .. MAX_EXP_AVG_SQS
    num_tensors,
    chunks,
    num_chunks,
    first_chunk,
    segments,  # int64 [3, num_segments]: one segment per tensor
    num_segments,
    arrivals,  # int32 [num_segments], all 0 between launches
    lr: tl.float64,
    lr_ptr,
    beta1: tl.float64,
    beta2: tl.float64,
    log2_beta1: tl.float64,
    log2_beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    grad_scale: tl.float64,
    grad_scale_ptr,
    clip_coef: tl.float64,
    clip_coef_ptr,
    found_inf,  # None, or a float32 flag: when non-zero, nothing changes
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    EXP_AVG_DTYPE: tl.constexpr,
    EXP_AVG_SQ_DTYPE: tl.constexpr,
    STEP_DTYPE: tl.constexpr,
    MAX_EXP_AVG_SQ_DTYPE: tl.constexpr,  # None: no AMSGrad
    L2: tl.constexpr,  # torch.optim.Adam's weight decay (added to the grad) instead of AdamW's decoupled one
    MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr,  # False: no grad_scale, no division
    CLIP: tl.constexpr,  # False: no clip_coef, no multiplication
    ALIGNED: tl.constexpr,  # every vector-accessed pointer 16-byte aligned, chunks at whole blocks
    BLOCK: tl.constexpr,
):
    """One AdamW step (torch.optim.AdamW's formulas and evaluation order) over one chunk; with L2,
    torch.optim.Adam's (``weight_decay * param`` added to the grad, the param not decayed)."""
    tensor, segment, start, end, proceed = _update_chunk(chunks, num_chunks, first_chunk, found_inf)
    compute: tl.constexpr = tl.float64 if PARAM_DTYPE == tl.float64 else tl.float32
    param_ptr = _tensor_pointer(addresses, num_tensors, PARAMS, tensor, PARAM_DTYPE, ALIGNED)
    grad_ptr = _tensor_pointer(addresses, num_tensors, GRADS, tensor, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _tensor_pointer(addresses, num_tensors, EXP_AVGS, tensor, EXP_AVG_DTYPE, ALIGNED)
    exp_avg_sq_ptr = _tensor_pointer(addresses, num_tensors, EXP_AVG_SQS, tensor, EXP_AVG_SQ_DTYPE, ALIGNED)
    step_ptr = _tensor_pointer(addresses, num_tensors, STEPS, tensor, STEP_DTYPE)

    if MAX_EXP_AVG_SQ_DTYPE is not None:
        max_exp_avg_sq_ptr = _tensor_pointer(
            addresses, num_tensors, MAX_EXP_AVG_SQS, tensor, MAX_EXP_AVG_SQ_DTYPE, ALIGNED
        )

    # Scalars of this tensor's update, from its step counter: fp64, as torch forms them.
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    bias_correction1 = 1.0 - tl.exp2(step * _float64(log2_beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * _float64(log2_beta2))).to(compute)
    lr = _scalar(lr, lr_ptr)
    neg_step_size = (-lr / bias_correction1).to(compute)
    if L2:
        l2_weight_decay = _float64(weight_decay).to(compute)
    else:
        decay = (1.0 - lr * _float64(weight_decay)).to(compute)
    grad_scale = _scalar(grad_scale, grad_scale_ptr).to(compute)
    clip_coef = _scalar(clip_coef, clip_coef_ptr).to(compute)
    # Python-float hyperparameters enter torch's fp32 math rounded to fp32.
    lerp_weight = (1.0 - _float64(beta1)).to(compute)
    beta2_c = _float64(beta2).to(compute)
    one_minus_beta2 = (1.0 - _float64(beta2)).to(compute)
    eps_c = _float64(eps).to(compute)

    lanes = _lanes(BLOCK)
    full = _full_blocks(start, end, BLOCK, ALIGNED)
    for PHASE in tl.static_range(2):  # unmasked whole blocks (vector accesses), then the masked rest
        first, count = _phase_range(start, end, full, PHASE, BLOCK)
        for block in range(0, count):
            index = _phase_index(first, block, lanes, PHASE, BLOCK)
            if PHASE == 0:
                mask = None
            else:
                mask = index < end
            param = _load(param_ptr, index, mask).to(compute)
            grad = _load(grad_ptr, index, mask).to(compute)
            exp_avg = _load(exp_avg_ptr, index, mask).to(compute)
            exp_avg_sq = _load(exp_avg_sq_ptr, index, mask).to(compute)

            grad = _effective_grad(grad, grad_scale, clip_coef, MAXIMIZE, UNSCALE, CLIP)
            if L2:
                grad = _fma(param, l2_weight_decay, grad)
            else:
                param = param * decay
            exp_avg = _lerp(exp_avg, grad, lerp_weight)
            exp_avg_sq = _fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2_c)  # addcmul_ after mul_
            second_moment = exp_avg_sq
            if MAX_EXP_AVG_SQ_DTYPE is not None:
                max_exp_avg_sq = _load(max_exp_avg_sq_ptr, index, mask).to(compute)
                max_exp_avg_sq = _maximum_keeping_nan(max_exp_avg_sq, exp_avg_sq)
                tl.store(max_exp_avg_sq_ptr + index, _to_storage(max_exp_avg_sq, MAX_EXP_AVG_SQ_DTYPE), mask=mask)
                second_moment = max_exp_avg_sq
            denom = _div(_sqrt(second_moment), bias_correction2_sqrt) + eps_c
            param = param + _div(exp_avg * neg_step_size, denom)

            tl.store(param_ptr + index, _to_storage(param, PARAM_DTYPE), mask=mask)
            tl.store(exp_avg_ptr + index, _to_storage(exp_avg, EXP_AVG_DTYPE), mask=mask)
            tl.store(exp_avg_sq_ptr + index, _to_storage(exp_avg_sq, EXP_AVG_SQ_DTYPE), mask=mask)

    # Every chunk of a tensor read the old step above; the last one to get here writes the new
    # one (an integer counter, so no float atomics) and resets the counter for the next launch.
    chunks_of_tensor = _row(segments, SEGMENT_NUM_CHUNKS, num_segments, segment)
    is_last = tl.atomic_add(arrivals + segment, 1) == chunks_of_tensor - 1
    tl.store(step_ptr, step.to(STEP_DTYPE), mask=is_last & proceed)
    tl.store(arrivals + segment, 0, mask=is_last)


# --------------------------------------------------------------------------- SGD and Lion


@_kernel
def sgd_kernel(
    addresses,  # int64 [2 or 3, num_tensors]: rows PARAMS, GRADS, MOMENTUM_BUFFERS
    num_tensors,
    chunks,
    num_chunks,
    first_chunk,
    lr: tl.float64,
    lr_ptr,
    momentum: tl.float64,
    dampening: tl.float64,
    weight_decay: tl.float64,
    grad_scale: tl.float64,
    grad_scale_ptr,
    clip_coef: tl.float64,
    clip_coef_ptr,
    found_inf,  # None, or a float32 flag: when non-zero, nothing changes
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    MOMENTUM_BUFFER_DTYPE: tl.constexpr,  # None: no momentum
    WEIGHT_DECAY: tl.constexpr,  # False for weight_decay 0: torch skips the term (0 * a nan param is nan)
    FIRST_STEP: tl.constexpr,  # the buffers hold no history: set to the grad, not read
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr,
    CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One torch.optim.SGD step (its formulas and evaluation order) over one chunk."""
    tensor, _, start, end, _ = _update_chunk(chunks, num_chunks, first_chunk, found_inf)
    compute: tl.constexpr = tl.float64 if PARAM_DTYPE == tl.float64 else tl.float32
    param_ptr = _tensor_pointer(addresses, num_tensors, PARAMS, tensor, PARAM_DTYPE, ALIGNED)
    grad_ptr = _tensor_pointer(addresses, num_tensors, GRADS, tensor, GRAD_DTYPE, ALIGNED)
    if MOMENTUM_BUFFER_DTYPE is not None:
        buffer_ptr = _tensor_pointer(addresses, num_tensors, MOMENTUM_BUFFERS, tensor, MOMENTUM_BUFFER_DTYPE, ALIGNED)

    neg_lr = (-_scalar(lr, lr_ptr)).to(compute)
    grad_scale = _scalar(grad_scale, grad_scale_ptr).to(compute)
    clip_coef = _scalar(clip_coef, clip_coef_ptr).to(compute)
    # Python-float hyperparameters enter torch's fp32 math rounded to fp32.
    weight_decay_c = _float64(weight_decay).to(compute)
    momentum_c = _float64(momentum).to(compute)
    one_minus_dampening = (1.0 - _float64(dampening)).to(compute)

    lanes = _lanes(BLOCK)
    full = _full_blocks(start, end, BLOCK, ALIGNED)
    for PHASE in tl.static_range(2):  # unmasked whole blocks (vector accesses), then the masked rest
        first, count = _phase_range(start, end, full, PHASE, BLOCK)
        for block in range(0, count):
            index = _phase_index(first, block, lanes, PHASE, BLOCK)
            if PHASE == 0:
                mask = None
            else:
                mask = index < end
            param = _load(param_ptr, index, mask).to(compute)
            grad = _load(grad_ptr, index, mask).to(compute)

            grad = _effective_grad(grad, grad_scale, clip_coef, MAXIMIZE, UNSCALE, CLIP)
            # Each add with alpha of torch's is one fma (csrc/common/element_math.h, sgd_update_fused).
            if WEIGHT_DECAY:
                grad = _fma(param, weight_decay_c, grad)
            if MOMENTUM_BUFFER_DTYPE is not None:
                if FIRST_STEP:
                    buffer = grad
                else:  # buf * momentum rounds before the dampened grad is added, as torch's mul_, add_
                    buffer = _fma(grad, one_minus_dampening, _load(buffer_ptr, index, mask).to(compute) * momentum_c)
                tl.store(buffer_ptr + index, _to_storage(buffer, MOMENTUM_BUFFER_DTYPE), mask=mask)
                # The step uses the buffer in the compute dtype, not as rounded for storage (torch's too).
                if NESTEROV:
                    grad = _fma(buffer, momentum_c, grad)
                else:
                    grad = buffer
            param = _fma(grad, neg_lr, param)

            tl.store(param_ptr + index, _to_storage(param, PARAM_DTYPE), mask=mask)


@_kernel
def lion_kernel(
    addresses,  # int64 [3, num_tensors]: rows PARAMS, GRADS, EXP_AVGS
    num_tensors,
    chunks,
    num_chunks,
    first_chunk,
    lr: tl.float64,
    lr_ptr,
    beta1: tl.float64,
    beta2: tl.float64,
    weight_decay: tl.float64,
    grad_scale: tl.float64,
    grad_scale_ptr,
    clip_coef: tl.float64,
    clip_coef_ptr,
    found_inf,  # None, or a float32 flag: when non-zero, nothing changes
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    EXP_AVG_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr,
    CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One Lion step (Chen et al. 2023) over one chunk: the param decayed and moved by lr against
    the sign of lerp(m, g, 1 - beta1), then m = lerp(m, g, 1 - beta2)."""
    tensor, _, start, end, _ = _update_chunk(chunks, num_chunks, first_chunk, found_inf)
    compute: tl.constexpr = tl.float64 if PARAM_DTYPE == tl.float64 else tl.float32
    param_ptr = _tensor_pointer(addresses, num_tensors, PARAMS, tensor, PARAM_DTYPE, ALIGNED)
    grad_ptr = _tensor_pointer(addresses, num_tensors, GRADS, tensor, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = _tensor_pointer(addresses, num_tensors, EXP_AVGS, tensor, EXP_AVG_DTYPE, ALIGNED)

    lr = _scalar(lr, lr_ptr)
    neg_lr = (-lr).to(compute)
    # 1 for weight_decay 0: then p * decay is p, bit for bit (torch skips the multiplication).
    decay = (1.0 - lr * _float64(weight_decay)).to(compute)
    grad_scale = _scalar(grad_scale, grad_scale_ptr).to(compute)
    clip_coef = _scalar(clip_coef, clip_coef_ptr).to(compute)
    one_minus_beta1 = (1.0 - _float64(beta1)).to(compute)
    one_minus_beta2 = (1.0 - _float64(beta2)).to(compute)

    lanes = _lanes(BLOCK)
    full = _full_blocks(start, end, BLOCK, ALIGNED)
    for PHASE in tl.static_range(2):  # unmasked whole blocks (vector accesses), then the masked rest
        first, count = _phase_range(start, end, full, PHASE, BLOCK)
        for block in range(0, count):
            index = _phase_index(first, block, lanes, PHASE, BLOCK)
            if PHASE == 0:
                mask = None
            else:
                mask = index < end
            param = _load(param_ptr, index, mask).to(compute)
            grad = _load(grad_ptr, index, mask).to(compute)
            exp_avg = _load(exp_avg_ptr, index, mask).to(compute)

            grad = _effective_grad(grad, grad_scale, clip_coef, MAXIMIZE, UNSCALE, CLIP)
            # The direction is +-1 or 0: -lr * direction is exact, so the sum rounds once, fused or not.
            direction = _sign(_lerp(exp_avg, grad, one_minus_beta1))
            param = param * decay + neg_lr * direction
            exp_avg = _lerp(exp_avg, grad, one_minus_beta2)

            tl.store(param_ptr + index, _to_storage(param, PARAM_DTYPE), mask=mask)
            tl.store(exp_avg_ptr + index, _to_storage(exp_avg, EXP_AVG_DTYPE), mask=mask)
