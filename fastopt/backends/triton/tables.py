"""Device-resident metadata that lets one kernel launch walk any number of tensors.

torch and apex pass tensor pointers by value in the kernel arguments (at most a few dozen per
launch); here they live in device memory instead, in two tables per list of tensors:

- the **address table**, int64 ``[lists, tensors]``: each tensor's ``data_ptr()``; a kernel loads
  its tensor's address and casts it to a typed pointer (``.to(tl.pointer_type(tl.float32))``);
- the **chunk table**, int64 ``[4, chunks]``: chunk c is elements ``[START, END)`` of tensor
  ``TENSOR``, inside segment ``SEGMENT`` (the tensor itself, or for AGC one unit of it). A launch
  runs one program per chunk, so it is one launch whatever the tensor count;
- the **segment table**, int64 ``[3, segments]``: each segment's tensor, first chunk and chunk
  count, which the second pass of a reduction reads to reduce a segment's partials in order.

Tensors are ordered by their dtypes (one dtype per list: a *group*), so that each group's chunks
form one range: one launch per group, with the element types as compile-time constants.

The tables are built on the host with vectorised torch (no Python loop per tensor or chunk),
copied to the device once, and cached while the tensors keep their sizes and dtypes, one table
per stream (two streams running one layout at once share no address row and no arrival
counter). Only the address table is refreshed, in place, row by row, when the pointers change
(grads re-allocated by ``zero_grad(set_to_none=True)``, contiguous stand-ins of strided tensors);
a row's address column is made in one C pass, and with it whether every pointer of the row is
16-byte aligned (which lets a launch use 128-bit accesses: ``ChunkTable.aligned``).

During CUDA-graph capture a call gets a private table (``TableCache``): a graph bakes in the
table's device address and replays its uploads, so that table is never rewritten nor evicted,
and the host buffers its uploads read stay alive with it.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import functools
import itertools
import operator

import torch
from torch import Tensor

BLOCK_SIZE = 1024  # elements a program handles per vector step
CHUNK_SIZE = 32 * BLOCK_SIZE  # elements per program: large tensors run as many programs
VECTOR_BYTES = 16  # a 128-bit load or store

_dtype_of = operator.attrgetter("dtype")


@dataclasses.dataclass(frozen=True)
class Group:
    """Tensors whose lists have these dtypes, and the range of chunks that covers them."""

    dtypes: tuple[torch.dtype, ...]  # one per list
    first_chunk: int
    num_chunks: int


def dtype_signature(lists: list[list[Tensor]]) -> tuple:
    """Per list: its one dtype, or the tuple of its tensors' dtypes when they differ."""
    signature = []
    for tensors in lists:
        dtypes = set(map(_dtype_of, tensors))
        signature.append(dtypes.pop() if len(dtypes) == 1 else tuple(map(_dtype_of, tensors)))
    return tuple(signature)


# Small integer codes for the dtypes that fastopt.ops admits, to group tensors with torch ops.
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _group_tensors(signature: tuple, num_tensors: int) -> list[tuple[tuple, Tensor | None]]:
    """The dtype combinations present (in a fixed order), each with its tensors' indices (None
    for a single combination: every tensor, in order)."""
    if not any(isinstance(entry, tuple) for entry in signature):
        return [(signature, None)]
    columns = [entry if isinstance(entry, tuple) else (entry,) * num_tensors for entry in signature]
    # One integer per tensor naming its combination: sum of code * 4**list.
    keys = sum(torch.tensor([_DTYPE_CODES[d] for d in column]) * 4**i for i, column in enumerate(columns))

    def key(combination: tuple) -> int:
        return sum(_DTYPE_CODES[d] * 4**i for i, d in enumerate(combination))

    combinations = sorted(set(zip(*columns)), key=key)
    return [(combination, (keys == key(combination)).nonzero().squeeze(1)) for combination in combinations]


def _first_of_each(counts: Tensor) -> Tensor:
    """Exclusive prefix sum: where each run of ``counts`` starts."""
    return torch.cumsum(counts, 0) - counts


def _group_rows(tensor_ids: Tensor, numels: Tensor, units: Tensor, min_one_chunk: bool, chunk_offset: int,
                segment_offset: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Chunk rows [4, chunks] and segment rows [3, segments] for one group's tensors."""
    units = units[tensor_ids]
    unit_length = numels[tensor_ids] // units.clamp_min(1)
    # Segments: unit u of tensor t covers elements [u * length, (u + 1) * length).
    segment_of = torch.repeat_interleave(torch.arange(len(tensor_ids)), units)
    unit_index = torch.arange(len(segment_of)) - _first_of_each(units)[segment_of]
    segment_tensor = tensor_ids[segment_of]
    segment_length = unit_length[segment_of]
    segment_start = unit_index * segment_length
    chunk_counts = (segment_length + CHUNK_SIZE - 1) // CHUNK_SIZE
    if min_one_chunk:  # a program per tensor even when empty (AdamW still counts its step)
        chunk_counts = chunk_counts.clamp_min(1)
    segment_first_chunk = _first_of_each(chunk_counts)
    # Chunks: consecutive CHUNK_SIZE slices of each segment.
    chunk_segment = torch.repeat_interleave(torch.arange(len(segment_of)), chunk_counts)
    chunk_start = segment_start[chunk_segment] + (
        torch.arange(len(chunk_segment)) - segment_first_chunk[chunk_segment]
    ) * CHUNK_SIZE
    segment_end = segment_start + segment_length
    chunk_end = torch.minimum(chunk_start + CHUNK_SIZE, segment_end[chunk_segment])
    chunks = torch.stack([segment_tensor[chunk_segment], chunk_segment + segment_offset, chunk_start, chunk_end])
    segments = torch.stack([segment_tensor, segment_first_chunk + chunk_offset, chunk_counts])
    return chunks, segments


def _to_device(host: Tensor, device: torch.device, staging: list[Tensor] | None = None) -> Tensor:
    """Copy host metadata to the device without synchronising (an async copy). ``staging``
    (a list, during CUDA-graph capture) keeps the host buffer alive: a captured copy reads it
    again at every replay. Pinned memory is not allocated during capture (its allocator queries
    events, which capture forbids in torch < 2.10): a captured copy from pageable memory works."""
    if device.type != "cuda":
        return host.to(device)
    if staging is not None:
        staging.append(host)
        return host.to(device, non_blocking=True)
    return host.pin_memory().to(device, non_blocking=True)


class ChunkTable:
    """The address, chunk and segment tables of one layout of tensor lists (see module doc).

    Attributes: ``addresses``, ``chunks``, ``segments`` (device tensors), ``num_tensors``,
    ``num_chunks``, ``num_segments``, ``groups`` and, when built with ``arrivals=True``,
    ``arrivals`` (int32 per segment, zero between launches, for kernels that must know which
    program of a tensor finishes last). Tables are used on the stream of the calling op; the
    address table is rewritten in place, stream-ordered after the launches that read it before.

    ``aligned(rows)``: per group, whether its launch may use 128-bit accesses on those rows of
    the address table (every such pointer 16-byte aligned and every chunk starting at a whole
    block). A table built with ``capturing=True`` keeps its host staging buffers (a captured
    graph reads them at every replay) and is never pointed elsewhere.
    """

    def __init__(self, lists: list[list[Tensor]], signature: tuple, numels: list[int], units: list[int] | None,
                 min_one_chunk: bool, arrivals: bool, capturing: bool = False):  # fmt: skip
        device = lists[0][0].device
        self.capturing = capturing
        self._staging: list[Tensor] | None = [] if capturing else None
        self.num_tensors = len(numels)
        numel_column = torch.tensor(numels, dtype=torch.int64)
        unit_column = torch.ones_like(numel_column) if units is None else torch.tensor(units, dtype=torch.int64)
        all_chunks, all_segments, self.groups = [], [], []
        self._group_tensors: list[Tensor | None] = []
        num_chunks = num_segments = 0
        for dtypes, tensor_ids in _group_tensors(signature, self.num_tensors):
            self._group_tensors.append(tensor_ids)
            if tensor_ids is None:
                tensor_ids = torch.arange(self.num_tensors)
            chunks, segments = _group_rows(
                tensor_ids, numel_column, unit_column, min_one_chunk, num_chunks, num_segments
            )
            self.groups.append(Group(dtypes, num_chunks, chunks.shape[1]))
            all_chunks.append(chunks)
            all_segments.append(segments)
            num_chunks += chunks.shape[1]
            num_segments += segments.shape[1]
        self.num_chunks, self.num_segments = num_chunks, num_segments
        # Whole tensors start their chunks at whole blocks; units (rows) of a tensor only when
        # their length is whole blocks. (Python ints: no tensor value is read on the host.)
        self._whole_blocks = units is None or all((n // u) % BLOCK_SIZE == 0 for n, u in zip(numels, units) if u > 1)
        # Per group, its tensors' positions (None: all of them), to check alignment per group.
        self._group_positions = [None if ids is None else _positions(ids) for ids in self._group_tensors]
        self.chunks = _to_device(torch.cat(all_chunks, dim=1).contiguous(), device, self._staging)
        self.segments = _to_device(torch.cat(all_segments, dim=1).contiguous(), device, self._staging)
        self.arrivals = torch.zeros(num_segments, dtype=torch.int32, device=device) if arrivals else None
        self._rows: list = [None] * len(lists)  # each row's pointer column, as last uploaded
        self._host = torch.zeros((len(lists), self.num_tensors), dtype=torch.int64)  # the same, as a tensor
        self._misaligned: list[list[bool] | None] = [None] * len(lists)  # per row, per group
        self.addresses = torch.empty((len(lists), self.num_tensors), dtype=torch.int64, device=device)

    def point_to(self, lists: list[list[Tensor]]) -> bool:
        """Make the address table hold these tensors' pointers; True when it had to change."""
        return self.point_to_columns([_pointer_column(tensors) for tensors in lists])

    def point_to_columns(self, columns: list) -> bool:
        """``point_to`` with each row's pointers given, an int64 column (``pointer_column_of``)."""
        changed = [row for row, pointers in enumerate(columns) if self._set_row(row, pointers)]
        if changed:
            self._upload(None if len(changed) == len(columns) else changed)
        return bool(changed)

    def point_row_to(self, row: int, tensors: list[Tensor]) -> bool:
        """Make one row of the address table (e.g. the grads') hold these tensors' pointers."""
        return self.point_row_at(row, _pointer_column(tensors))

    def point_row_at(self, row: int, pointers) -> bool:
        """``point_row_to`` with the pointers given, an int64 column (``pointer_column_of``)."""
        if not self._set_row(row, pointers):
            return False
        self._upload([row])
        return True

    def _set_row(self, row: int, pointers) -> bool:
        if self._rows[row] is not None and _same_column(pointers, self._rows[row]):
            return False
        if self.capturing and self._rows[row] is not None:
            raise RuntimeError("fastopt: a table captured in a CUDA graph cannot point elsewhere")
        _write_row(self._host, row, pointers)
        self._rows[row] = pointers
        # Per group: whether a pointer of this row is not 16-byte aligned (its low bits, or'ed).
        self._misaligned[row] = [_low_bits(pointers, ids) != 0 for ids in self._group_positions]
        return True

    def _upload(self, rows: list[int] | None) -> None:
        """Copy the host rows (all when None) to the device table, stream-ordered."""
        if self.addresses.device.type != "cuda":
            if rows is None:
                self.addresses.copy_(self._host)
            else:
                for row in rows:
                    self.addresses[row].copy_(self._host[row])
            return
        for row in [None] if rows is None else rows:
            source = self._host if row is None else self._host[row]
            target = self.addresses if row is None else self.addresses[row]
            target.copy_(_to_device_source(source, self._staging), non_blocking=True)

    def aligned(self, rows: tuple[int, ...]) -> list[bool]:
        """Per group: whether every pointer of these rows is 16-byte aligned (and the chunks
        start at whole blocks), so that its launch may use 128-bit loads and stores."""
        if not self._whole_blocks:
            return [False] * len(self.groups)
        return [not any(self._misaligned[row][group] for row in rows) for group in range(len(self.groups))]


# Address columns: one C-level pass over the tensors (numpy where present, else the array module)
# that keeps no Python object per tensor (each pointer's int is freed as the next is read: a
# list of 5,000 fresh ints costs more than the pass), and neither a torch op nor a value read
# from a tensor.
try:
    import numpy
except ImportError:  # pragma: no cover (numpy comes with triton's interpreter and most torch installs)
    numpy = None


def _pointer_column(tensors: list[Tensor]):
    if numpy is not None:
        return numpy.fromiter(map(Tensor.data_ptr, tensors), numpy.int64, len(tensors))
    return array.array("q", map(Tensor.data_ptr, tensors))


def pointer_column_of(addresses: Tensor):
    """An int64 CPU tensor of pointers as an address column (a copy: the tensor may be reused)."""
    if numpy is not None:
        return addresses.numpy().copy()
    return array.array("q", addresses.tolist())


def scanner():
    """The CPU extension's ``scan_lists`` (one C++ pass over tensor lists: addresses, dtype codes,
    sizes, contiguity), or None without the extension (then the columns are made in Python, as above)."""
    from fastopt.backends import cpu  # the cpu backend's module loads the extension once

    return None if cpu._C is None or numpy is None else cpu._C.scan_lists


@dataclasses.dataclass(frozen=True)
class Scanned:
    """What one ``scan_lists`` pass read of some lists: each list's address column (a row of a
    buffer made for this scan, kept by the table it points), the dtype codes and the first list's
    sizes (bytes, the table key's), and whether every tensor is contiguous."""

    columns: list
    dtype_codes: bytes
    numel_bytes: bytes
    contiguous: bool


def scan(lists: list[list[Tensor]]) -> Scanned | None:
    """``lists`` read in one C++ pass; None without the CPU extension or for lists that are not
    Python lists."""
    scan_lists = scanner()
    if scan_lists is None or not all(type(tensors) is list for tensors in lists):
        return None
    addresses = torch.empty((len(lists), len(lists[0])), dtype=torch.int64)
    dtype_codes, numel_bytes, contiguous = scan_lists(lists, addresses)
    return Scanned(list(addresses.numpy()), dtype_codes, numel_bytes, contiguous)


def _same_column(a, b) -> bool:
    return bool(numpy.array_equal(a, b)) if numpy is not None else a == b


def numel_column(tensors: list[Tensor]):
    """The tensors' sizes, an int64 column (``_pointer_column``'s pass: no int kept per tensor;
    ``.tobytes()`` makes it a key that is hashed and compared in C)."""
    if numpy is not None:
        return numpy.fromiter(map(Tensor.numel, tensors), numpy.int64, len(tensors))
    return array.array("q", map(Tensor.numel, tensors))


def _positions(tensor_ids: Tensor):
    """A group's tensor indices, in the form ``_low_bits`` indexes a column with."""
    return tensor_ids.numpy() if numpy is not None else tensor_ids.tolist()


def _write_row(host: Tensor, row: int, column) -> None:
    """``host[row] = column`` (through a numpy view where present: a torch index costs more)."""
    if numpy is not None:
        host.numpy()[row] = column
    else:
        host[row] = torch.frombuffer(column, dtype=torch.int64)


def _low_bits(column, positions) -> int:
    """The low 4 bits of the pointers at ``positions`` (all when None), or'ed together."""
    if numpy is not None:
        selected = column if positions is None else column[positions]
        return int(numpy.bitwise_or.reduce(selected, initial=0)) & (VECTOR_BYTES - 1)
    selected = column if positions is None else map(column.__getitem__, positions)
    return functools.reduce(operator.or_, selected, 0) & (VECTOR_BYTES - 1)


def _to_device_source(host: Tensor, staging: list[Tensor] | None) -> Tensor:
    """A copy of ``host`` that an async copy to the device may read while ``host`` changes:
    pinned, or (during capture) pageable and kept alive with the table."""
    if staging is not None:
        staging.append(host.clone())
        return staging[-1]
    return host.pin_memory()


def stream_key(device: torch.device):
    """What tells apart the streams that may use one layout's table at the same time (their
    arrival counters and address rows must not be shared): the current stream of ``device``."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TableCache:
    """ChunkTables by layout (device, stream, dtypes, sizes, units), least recently used dropped
    first.

    During CUDA-graph capture a call gets a private table instead, keyed by its pointers too,
    never evicted nor rewritten (the graph holds its device address and replays its copies):
    an eager call with the same layout after the capture, or any number of other layouts, cannot
    change what the graph's kernels read.

    ``hits``, ``misses`` and ``pointer_refreshes`` count what the lookups did (``captured``: how
    many private tables capture made).
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._tables: collections.OrderedDict[tuple, ChunkTable] = collections.OrderedDict()
        self._captured: dict[tuple, ChunkTable] = {}
        self.hits = self.misses = self.pointer_refreshes = 0

    @property
    def captured(self) -> int:
        return len(self._captured)

    def lookup(self, lists: list[list[Tensor]], *, units: list[int] | None = None, min_one_chunk: bool = False,
               arrivals: bool = False, scanned: Scanned | None = None) -> ChunkTable:  # fmt: skip
        """The table for these lists (all of one length, on one device, at least one tensor),
        pointing at these tensors. ``units[i]``: how many equal segments tensor i splits into
        (default 1); ``min_one_chunk``: give empty tensors a chunk too; ``scanned``: ``scan(lists)``
        when the caller has it."""
        device = lists[0][0].device
        # One C++ pass reads the addresses, dtypes and sizes (no Python object per tensor).
        if scanned is None:
            scanned = scan(lists)
        if scanned is not None:
            dtype_codes, numel_bytes, columns = scanned.dtype_codes, scanned.numel_bytes, scanned.columns
        else:
            dtype_codes, numel_bytes, columns = dtype_signature(lists), numel_column(lists[0]).tobytes(), None
        units_key = None if units is None else tuple(units)
        key = (device, stream_key(device), dtype_codes, numel_bytes, units_key, min_one_chunk, arrivals)

        def made(for_capture: bool = False) -> ChunkTable:
            self.misses += 1
            numels = list(map(Tensor.numel, lists[0]))
            return ChunkTable(lists, dtype_signature(lists), numels, units, min_one_chunk, arrivals, for_capture)

        if capturing(device):
            pointers = columns if columns is not None else [_pointer_column(tensors) for tensors in lists]
            key += (tuple(itertools.chain.from_iterable(map(int, column) for column in pointers)),)
            table = self._captured.get(key)
            if table is None:
                table = self._captured[key] = made(for_capture=True)
                table.point_to(lists)
            else:
                self.hits += 1
            return table
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = made()
            if len(self._tables) > self.capacity:
                self._tables.popitem(last=False)
        else:
            self.hits += 1
            self._tables.move_to_end(key)
        if table.point_to(lists) if columns is None else table.point_to_columns(columns):
            self.pointer_refreshes += 1
        return table

    def clear(self) -> None:
        """Forget every table, but those captured in CUDA graphs (which may still replay)."""
        self._tables.clear()
        self.hits = self.misses = self.pointer_refreshes = 0

    def release_captured(self) -> None:
        """Forget the tables made during CUDA-graph capture: only once every graph captured with
        fastopt's Triton ops is gone (a replay would read freed memory)."""
        self._captured.clear()
