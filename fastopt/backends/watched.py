"""The grads of fastopt.optim's step plan as the GPU backends read them: from its ``GradWatch``.

The step plan's ``GradWatch`` (the CPU extension's, csrc/cpu/step_plan.h) checks every grad once a
step, in C++, as the ops would. A backend that keeps an address table of its own (triton, cuda)
then needs only the grads' addresses: ``WatchedColumn`` has the watch write them into one int64
column (no Python object per grad), and reads nothing at all while the watch's ``layout()``
stays (flat grads, or ``zero_grad(set_to_none=False)``: every grad where and what it was).
"""

from __future__ import annotations

import torch


class WatchedColumn:
    """The addresses of the grads of some entries (``ranges``: (first, count) pairs) of a
    GradWatch, refreshed this step. Made for the grads of now, for which the caller makes its
    table: ``follow()`` says whether that table can run a later step's grads."""

    __slots__ = ("watch", "ranges", "addresses", "layout", "dtypes")

    def __init__(self, watch, ranges: list[tuple[int, int]]):
        self.watch, self.ranges = watch, ranges
        self.addresses = torch.empty(sum(count for _, count in ranges), dtype=torch.int64)
        self.dtypes = self._read()  # None when a grad is strided: no table can be made for them
        self.layout = watch.layout()

    def follow(self) -> bool | None:
        """None: the grads changed dtype or contiguity, the caller's table cannot run them (make
        another). False: they are where they were at the last call. True: some moved, and
        ``addresses`` holds where they are now."""
        layout = self.watch.layout()
        if layout == self.layout:
            return False
        dtypes = self._read()
        if dtypes is None or dtypes != self.dtypes:
            return None
        self.layout = layout
        return True

    def _read(self) -> bytes | None:
        """The grads' addresses into ``addresses``; their dtype codes, or None if one is strided."""
        dtypes, offset = [], 0
        for first, count in self.ranges:
            codes = self.watch.grad_column(first, count, self.addresses[offset : offset + count])
            if codes is None:
                return None
            dtypes.append(codes)
            offset += count
        return b"".join(dtypes)


def fill_lists(watched) -> None:
    """The step plan's lists filled with the grads from its GradWatch (``watched``: the plan's
    ``(watch, first entry)``, or None without one), for a call that takes the grads as tensors: a
    table's first build, or an op's full path."""
    if watched is not None:
        watched[0].fill_lists()


def grads_of(watch, ranges: list[tuple[int, int]]) -> list:
    """The grads of those entries of a GradWatch, as tensors (a table's first build, an op's path)."""
    return [grad for first, count in ranges for grad in watch.grads(first, count)]
