"""Host time of fastopt's Python side, whatever the device: what a step or a call costs before any
kernel runs.

    python bench/host_overhead.py [--params 5000] [--steps 20]
    python bench/host_overhead.py --versus-torch [--params 5000] [--steps 20]
    python bench/host_overhead.py --functional [--params 5000] [--steps 20]
    python bench/host_overhead.py --refresh [--params 5000] [--steps 20]
    python bench/host_overhead.py --backend triton [--params 5000] [--steps 20]
    python bench/host_overhead.py --backend cuda [--params 5000] [--steps 20]   # after python csrc/emulation/build.py

Without ``--backend``: the median host milliseconds of ``fastopt.optim.AdamW.step`` with in-step
clipping, the backend replaced by one that launches nothing; the first step (full validation of
every list) apart from the later ones (the reused step plan: only the new grads are checked), and
with ``flat_states`` / ``flat_grads``; then the same steps on the cpu backend with its kernels.

``--functional``: ``fastopt.adamw_``, ``clip_grad_norm_``, ``multi_tensor_norm`` and
``unscale_and_check_`` with real CPU kernels, their lists checked in the CPU extension's one C++
pass and (``fastopt.ops._one_pass_check`` patched out) by the Python checks alone, against
torch's nearest call (``torch._fused_adamw_``, ``clip_grad_norm_(foreach=True)``, ``_foreach_norm``,
``_amp_foreach_non_finite_check_and_unscale_``), in rotating rounds.

``--refresh``: where a later step's host time goes, the backend launching nothing (needs the CPU
extension): the step plan's ``GradWatch.refresh`` with flat grads (called over and over), right
after every grad was re-made, and at once again; ``grads_are`` (flat grads' check in
``zero_grad``); and the step with its refresh stubbed (its Python alone), with caches warm from the
step before and right after the grads were re-made. Ten times ``--steps`` calls each.

``--versus-torch``: a whole clipped step with the real CPU kernels against torch's
``AdamW(fused=True)`` + ``clip_grad_norm_(foreach=True)``, alternating in the same run.

With ``--backend triton`` or ``--backend cuda``: that backend's own preparation, its launches
stubbed (so it runs on CPU tensors, no GPU needed): Triton's kernel launches are recorded instead
of run; the CUDA backend's ``torch.ops.fastopt.*`` calls return at once (the Python in front of
the extension), and then run for real on the emulated build of ``csrc/cuda/host_runtime.cpp``
(``fastopt._C_emulated``, CPU tensors; ``python csrc/emulation/build.py`` makes it) with every
kernel launch returning before its grid runs: the extension's host work (argument conversion by
``torch.ops``, checks, table lookup by layout and stream, the address column's refresh and
upload, the arrival counters' reset) is timed, its kernels are not. Reported, over one list of
``--params`` tensors:

- ``cached adamw_``: one backend ``adamw_`` call whose layout is cached (grads re-made for
  each call, as zero_grad(set_to_none=True) + backward make them);
- ``planned adamw_``: the call as fastopt.optim.AdamW makes it from its second step on, with
  its step plan (``adamw_planned_``, where the backend has one: for cuda the extension's
  ``UpdatePlan``, whose steps return at once in the first run, as torch.ops' calls do), on grads
  nothing has touched since they were made;
- ``planned, in a step``: the same after the step plan's Python check of the new grads
  (``ops.check_replacement``, not timed), as inside ``AdamW.step`` without the CPU extension;
- ``planned, grads watched``: as inside ``AdamW.step`` with the CPU extension, for a backend that
  reads the grads from the step plan's ``GradWatch`` (refreshed first, not timed): their addresses
  are read in C++, no grad is put in a Python list;
- ``optimizer step``: a whole ``AdamW.step`` with clipping on that backend, launches stubbed;
- (cuda, ``with host_runtime.cpp``) ``torch.ops binding``: what handing the lists to C++ through
  ``torch.ops`` costs (traced calls and dispatch modes; eager calls take the extension's eager
  entry, which reads the lists in place), the emulated ``adamw_`` rejected at its first check (no
  params) with the other four lists given, less the same call with every list empty.

Grads are re-made every step, as zero_grad(set_to_none=True) + backward make them.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import types

import torch

import fastopt
from fastopt import backends, ops
from fastopt.optim.optimizer import _grad_watch_type

SIZE = 17  # elements per tensor: small, so that the host work is what is measured


def no_op_backend() -> types.SimpleNamespace:
    """A backend whose ops return at once; like the cpu and triton backends, it takes the step
    plan's grads from its GradWatch (no Python list of grads is filled)."""

    def multi_tensor_norm(tensors, norm_type, per_tensor, found_inf=None):
        total = torch.zeros(())
        return (total, torch.zeros(len(tensors))) if per_tensor else total

    def multi_tensor_norm_planned(plan, norm_type, per_tensor, found_inf=None):
        total = torch.zeros(())
        return (total, torch.zeros(sum(count for _, count in plan["watch"][1]))) if per_tensor else total

    nothing = lambda *args, **kwargs: None  # noqa: E731
    return types.SimpleNamespace(
        READS_GRAD_WATCH=True, multi_tensor_norm=multi_tensor_norm, multi_tensor_norm_planned=multi_tensor_norm_planned,
        adamw_=nothing, adamw_planned_=nothing,
    )  # fmt: skip


def stubbed_backend(name: str):
    """The backend module with its launches stubbed (this process only)."""
    if name == "triton":
        from fastopt.backends import triton as module
        from fastopt.backends.triton import launch

        launch._launch = lambda kernel, num_programs, *args, **kwargs: launch.LAUNCHES.update([kernel.fn.__name__])
        return module
    if name == "cuda":
        from fastopt.backends import cuda as module

        def multi_tensor_norm(tensors, norm_type, per_tensor, found_inf):
            return torch.zeros(()), torch.zeros(len(tensors) if per_tensor else 0)

        nothing = lambda *args, **kwargs: None  # noqa: E731
        stub = types.SimpleNamespace(
            multi_tensor_norm=multi_tensor_norm, unscale_and_check_=nothing, scale_=nothing, clamp_=nothing,
            adaptive_clip_=nothing, adamw_=nothing,
        )  # fmt: skip

        if hasattr(module, "_EXTENSION"):  # the planned updates' UpdatePlan: its steps return at once
            plan = types.SimpleNamespace(step=lambda *args: 0)
            module._EXTENSION = types.SimpleNamespace(UpdatePlan=lambda *args: plan)
        if hasattr(module, "_OPS"):  # the module's handle on torch.ops.fastopt, and on its eager entries
            module._OPS = stub
            module._EAGER = None
        else:

            class TorchWithStubbedOps:  # the module's `torch`, whose torch.ops.fastopt.* return at once
                ops = types.SimpleNamespace(fastopt=stub)

                def __getattr__(self, name):
                    return getattr(torch, name)

            module.torch = TorchWithStubbedOps()
        return module
    raise SystemExit(f"--backend must be triton or cuda, got {name!r}")


def emulated_cuda_backend():
    """fastopt.backends.cuda on the emulated build of csrc/cuda/host_runtime.cpp, its launches returning before their
    grids run; None when that build is missing or older than its ``_skip_grids`` hook."""
    try:
        extension = importlib.import_module("fastopt._C_emulated")
    except ImportError:
        return None
    if not hasattr(extension, "_skip_grids"):
        return None
    from fastopt.backends import cuda as module

    extension._skip_grids(True)
    module._OPS = torch.ops.fastopt_emulated
    module._EXTENSION = extension  # the planned updates' UpdatePlan, on the emulated build too
    module._EAGER = extension if hasattr(extension, "adamw_") else None  # the ops' eager entries
    return module


def binding_times(num_params: int, steps: int) -> tuple[float, float]:
    """torch.ops' conversion of four lists of ``num_params`` tensors for the emulated adamw_ (see
    the module doc): median and min milliseconds."""
    tensors = [[torch.randn(SIZE) for _ in range(num_params)] for _ in range(3)] + [
        [torch.zeros(()) for _ in range(num_params)]
    ]
    given, empty = [], []
    for _ in range(steps + 1):
        for lists, times in ((tensors, given), ([[]] * 4, empty)):
            started = time.perf_counter()
            try:
                torch.ops.fastopt_emulated.adamw_([], *lists, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, [], 1.0, None,
                                                  None, 1.0, None)  # fmt: skip
            except RuntimeError:  # "params must not be empty", before any other work
                times.append(time.perf_counter() - started)
    # Differences of the medians and of the minimums (a difference per call is as noisy as both).
    return _median_ms(given[1:]) - _median_ms(empty[1:]), (min(given[1:]) - min(empty[1:])) * 1e3


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def optimizer_step_times(backend, num_params: int, steps: int, flat: bool = False) -> list[float]:
    """Host seconds of each ``AdamW.step`` (clipped), the first one included. Grads are re-made
    for every step, or with ``flat`` (flat_states and flat_grads) zeroed in their buffer by
    ``zero_grad()``, as a training loop would; neither is timed. ``backend`` None: the backend
    fastopt picks (real kernels)."""
    if backend is not None:
        backends.select = lambda device: backend  # this process only
    params = [torch.nn.Parameter(torch.randn(SIZE)) for _ in range(num_params)]
    optimizer = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, flat_states=flat, flat_grads=flat)
    times = []
    for _ in range(steps + 1):
        if flat:
            optimizer.zero_grad()
        else:
            for p in params:
                p.grad = torch.ones(SIZE)
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def versus_torch(num_params: int, rounds: int, size: int = 16) -> dict[str, float]:
    """A whole clipped step over ``num_params`` tensors of ``size`` elements on the backend fastopt
    picks for CPU tensors (real kernels), against torch's ``AdamW(fused=True)`` after
    ``clip_grad_norm_(foreach=True)`` on a copy, in rounds that alternate which runs first. Grads
    are re-made before every step, untimed, as backward makes them. Medians in ms, and the
    median of the per-round ratios."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(size)) for _ in range(num_params)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ours_opt = fastopt.optim.AdamW(ours, lr=1e-3, max_grad_norm=1.0)
    theirs_opt = torch.optim.AdamW(theirs, lr=1e-3, fused=True)

    def ours_step() -> float:
        for p in ours:
            p.grad = torch.randn(size)
        started = time.perf_counter()
        ours_opt.step()
        return time.perf_counter() - started

    def theirs_step() -> float:
        for p in theirs:
            p.grad = torch.randn(size)
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
        theirs_opt.step()
        return time.perf_counter() - started

    for _ in range(3):  # warm-up: fastopt's first step builds its plan
        ours_step(), theirs_step()
    ours_times, theirs_times = [], []
    for r in range(rounds):
        if r % 2:
            ours_times.append(ours_step()), theirs_times.append(theirs_step())
        else:
            theirs_times.append(theirs_step()), ours_times.append(ours_step())
    ratios = [t / o for o, t in zip(ours_times, theirs_times)]
    return {"fastopt": _median_ms(ours_times), "torch": _median_ms(theirs_times), "ratio": statistics.median(ratios)}


def functional_times(num_params: int, rounds: int, size: int = 16) -> dict[str, dict[str, float]]:
    """The public functional ops and clip_grad_norm_ on the backend fastopt picks for CPU tensors
    (real kernels), over ``num_params`` tensors of ``size`` elements: each with its lists checked
    in the CPU extension's one pass ("one pass") and with the Python checks only ("python"), and
    torch's nearest equivalent, in rounds that rotate which runs first. Medians in ms."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(num_params)]
    for p in params:
        p.grad = torch.randn(size)
    grads = [p.grad for p in params]
    data = [p.detach() for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros(size) for _ in params], [torch.zeros(size) for _ in params]
    steps_ = [torch.zeros(()) for _ in params]
    found_inf, inv_scale = torch.zeros(1), torch.ones(1)
    adamw_hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    calls = {
        "adamw_": (
            lambda: fastopt.adamw_(data, grads, exp_avgs, exp_avg_sqs, steps_, **adamw_hyper),
            lambda: torch._fused_adamw_(data, grads, exp_avgs, exp_avg_sqs, [], steps_, amsgrad=False,
                                        maximize=False, **adamw_hyper),
        ),
        "clip_grad_norm_": (
            lambda: fastopt.clip_grad_norm_(params, 1e9),
            lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
        ),
        "multi_tensor_norm": (
            lambda: fastopt.multi_tensor_norm(grads),
            lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))),
        ),
        "unscale_and_check_": (
            lambda: fastopt.unscale_and_check_(grads, inv_scale, found_inf),
            lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale),
        ),
    }  # fmt: skip
    one_pass = ops._one_pass_check
    variants = {"one pass": one_pass, "python": lambda: None}

    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    results = {}
    for name, (ours, theirs) in calls.items():
        times: dict[str, list[float]] = {"one pass": [], "python": [], "torch": []}
        for variant in variants.values():  # warm-up
            ops._one_pass_check = variant
            ours()
        theirs()
        for r in range(rounds):
            order = list(times)[r % 3 :] + list(times)[: r % 3]
            for label in order:
                if label == "torch":
                    times[label].append(timed(theirs))
                else:
                    ops._one_pass_check = variants[label]
                    times[label].append(timed(ours))
        ops._one_pass_check = one_pass
        results[name] = {label: _median_ms(values) for label, values in times.items()}
    return results


def backend_call_times(backend, num_params: int, steps: int) -> dict[str, tuple[float, float] | None]:
    params = [torch.randn(SIZE) for _ in range(num_params)]
    exp_avgs, exp_avg_sqs = [torch.zeros(SIZE) for _ in params], [torch.zeros(SIZE) for _ in params]
    steps_ = [torch.zeros(()) for _ in params]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False, grad_scale=None,
                 found_inf=None, clip_coef=torch.ones(()))  # fmt: skip

    shapes = [tuple(p.size()) for p in params]
    written = ops.WrittenSpans.of(params)

    def timed(call, checked: bool = False) -> tuple[float, float]:
        times, grads = [], None
        for _ in range(steps + 1):  # the first call builds the tables
            # The old grads go before the new ones are made, as zero_grad(set_to_none=True) frees
            # them before backward makes new ones. Made while the old ones lived, their freeing
            # left thousands of chunks in glibc's fast bins, which the call's first large
            # allocation merged (0.7 ms of a cached adamw_ over 5,000 params here): work a
            # training step's forward and backward do, whose large allocations come after the frees.
            grads = None
            grads = [torch.ones(SIZE) for _ in params]
            if checked:  # as in AdamW.step: the step plan has just checked the new grads
                ops.check_replacement("grads", grads, shapes, params[0].device, written)
            started = time.perf_counter()
            call(grads)
            times.append(time.perf_counter() - started)
        return _median_ms(times[1:]), min(times[1:]) * 1e3

    results: dict[str, tuple[float, float] | None] = {
        "cached adamw_": timed(
            lambda grads: backend.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps_, max_exp_avg_sqs=None, **hyper)
        )
    }
    planned = getattr(backend, "adamw_planned_", None)
    plan: dict = {}
    lists = dict(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps_)
    results["planned adamw_"] = None if planned is None else timed(
        lambda grads: planned({**lists, "grads": grads}, plan, **hyper)
    )  # fmt: skip
    results["planned, in a step"] = None if planned is None else timed(
        lambda grads: planned({**lists, "grads": grads}, plan, **hyper), checked=True
    )  # fmt: skip
    watch_type = _grad_watch_type()
    if planned is not None and watch_type is not None and getattr(backend, "READS_GRAD_WATCH", False):
        results["planned, grads watched"] = watched_call_times(planned, lists, hyper, watch_type, steps)
    return results


def watched_call_times(planned, lists: dict, hyper: dict, watch_type, steps: int) -> tuple[float, float]:
    """The planned call as AdamW.step makes it with the CPU extension: the grads read from the step
    plan's GradWatch (refreshed first, untimed: the step plan's check), never put in a list."""
    holders = [torch.nn.Parameter(p) for p in lists["params"]]  # the watch reads each one's .grad
    lists = {**lists, "params": holders, "grads": [None] * len(holders)}
    for holder in holders:
        holder.grad = torch.ones(SIZE)
    n = len(holders)
    watch = watch_type([holders], list(range(n)), [lists["grads"]] * n, list(range(n)), [])
    plan: dict = {"watch": (watch, 0)}
    times = []
    for _ in range(steps + 1):  # the first call builds the tables
        for holder in holders:
            holder.grad = torch.ones(SIZE)
        assert watch.refresh() >= 0
        started = time.perf_counter()
        planned(lists, plan, **hyper)
        times.append(time.perf_counter() - started)
        watch.release()
    return _median_ms(times[1:]), min(times[1:]) * 1e3


def refresh_times(num_params: int, calls: int) -> dict[str, tuple[float, float]]:
    """See ``--refresh`` in the module doc: median and min ms of each probe."""
    watch_type = _grad_watch_type()
    if watch_type is None:
        raise SystemExit("--refresh needs the CPU extension (its GradWatch)")
    backends.select = lambda device: no_op_backend()  # this process only
    extension = importlib.import_module(watch_type.__module__)
    results = {}

    def stepped(flat: bool):
        params = [torch.nn.Parameter(torch.randn(SIZE)) for _ in range(num_params)]
        optimizer = fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, flat_states=flat, flat_grads=flat)
        for _ in range(3):
            optimizer.zero_grad()
            if not flat:
                for p in params:
                    p.grad = torch.ones(SIZE)
            optimizer.step()
        return params, optimizer

    def summary(seconds: list[float]) -> tuple[float, float]:
        return _median_ms(seconds), min(seconds) * 1e3

    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    _, optimizer = stepped(flat=True)
    watch = optimizer._step_plan.watch
    results["refresh, flat grads, over and over"] = summary([timed(watch.refresh) for _ in range(calls)])
    params, optimizer = stepped(flat=False)
    watch = optimizer._step_plan.watch
    after_new, again, views = [], [], []
    for _ in range(calls):
        for p in params:
            p.grad = torch.ones(SIZE)
        grads = [p.grad for p in params]
        after_new.append(timed(watch.refresh))
        again.append(timed(watch.refresh))
        views.append(timed(lambda: extension.grads_are(params, grads)))
        watch.release()
        del grads  # the next grads may take this step's memory, as after zero_grad() + backward
    results["refresh after re-making the grads"] = summary(after_new)
    results["refresh at once again"] = summary(again)
    results["grads_are (zero_grad's check)"] = summary(views)
    optimizer._step_plan.watch = types.SimpleNamespace(refresh=lambda: 0, release=lambda: None, fill_lists=lambda: None)
    results["step, refresh stubbed, warm"] = summary([timed(optimizer.step) for _ in range(calls)])
    cold = []
    for _ in range(calls):
        for p in params:
            p.grad = torch.ones(SIZE)
        cold.append(timed(optimizer.step))
    results["step, refresh stubbed, grads re-made"] = summary(cold)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", choices=["triton", "cuda"], default=None,
                        help="measure this backend's own preparation, its launches stubbed")  # fmt: skip
    parser.add_argument("--versus-torch", action="store_true",
                        help="a whole step with the real CPU kernels against torch's fused AdamW + clip_grad_norm_, "
                             "16-element tensors")  # fmt: skip
    parser.add_argument("--functional", action="store_true",
                        help="the functional ops and clip_grad_norm_ with the one-pass and the Python checks, against "
                             "torch's nearest equivalents, 16-element tensors")  # fmt: skip
    parser.add_argument("--refresh", action="store_true",
                        help="where a later step's host time goes: the step plan's grad check and the step's Python")
    args = parser.parse_args()

    print(f"fastopt {fastopt.__version__}, torch {torch.__version__}, {args.params} params, {torch.get_num_threads()} threads")
    if args.versus_torch:
        name = backends.select(torch.device("cpu")).__name__
        result = versus_torch(args.params, args.steps)
        print(f"clipped AdamW step over {args.params} tensors of 16 elements, median of {args.steps} alternating rounds:")
        print(f"  fastopt ({name}): {result['fastopt']:.2f} ms; torch AdamW(fused=True) + clip_grad_norm_(foreach=True):"
              f" {result['torch']:.2f} ms; ratio (median of rounds) {result['ratio']:.3g}x")
        return
    if args.refresh:
        calls = 10 * args.steps
        print(f"the step plan's grad check and the step's Python, backend launching nothing, median (min) ms of {calls} calls:")
        for probe, (median, least) in refresh_times(args.params, calls).items():
            print(f"  {probe + ':':<40}{median:6.3f} ({least:.3f})")
        return
    if args.functional:
        name = backends.select(torch.device("cpu")).__name__
        print(f"functional calls over {args.params} tensors of 16 elements ({name}), median ms of {args.steps} rotating"
              " rounds: lists checked in one C++ pass / by the Python checks only; torch's nearest equivalent")
        for op, ms in functional_times(args.params, args.steps).items():
            print(f"  {op:<20}{ms['one pass']:8.2f} / {ms['python']:8.2f}   torch {ms['torch']:8.2f}"
                  f"   ({ms['torch'] / ms['one pass']:.2g}x torch's speed with the one pass)")
        return
    if args.backend is None:
        times = optimizer_step_times(no_op_backend(), args.params, args.steps)
        print("backend replaced by one that launches nothing:")
        print(f"  first step (full validation): {times[0] * 1e3:.1f} ms host")
        print(f"  later steps (reused plan):    {_median_ms(times[1:]):.2f} ms host (median of {args.steps})")
        times = optimizer_step_times(no_op_backend(), args.params, args.steps, flat=True)
        print(f"  flat grads and states:        {_median_ms(times[1:]):.2f} ms host (min {min(times[1:]) * 1e3:.2f})")
        cpu = backends.status("cpu")
        if cpu.available:
            print("the cpu backend, its real kernels (17-element tensors: the kernels' own work is a few microseconds):")
            for flat in (False, True):
                times = optimizer_step_times(cpu.module, args.params, args.steps, flat=flat)
                label = "flat grads and states:" if flat else "later steps (reused plan):"
                print(f"  {label:<30}{_median_ms(times[1:]):.2f} ms (min {min(times[1:]) * 1e3:.2f})")
        return

    backend = stubbed_backend(args.backend)
    if args.backend == "triton":
        import triton

        print(f"triton {triton.__version__}")
    how = "torch.ops.fastopt.* return at once" if args.backend == "cuda" else "launches stubbed"
    print(f"backend {args.backend}, {how} (median and min of {args.steps} calls, grads re-made for each):")
    report(backend, args.params, args.steps)
    if args.backend == "cuda":
        backend = emulated_cuda_backend()
        if backend is None:
            print("with host_runtime.cpp: n/a (fastopt._C_emulated is missing or stale: python csrc/emulation/build.py)")
            return
        print("backend cuda with host_runtime.cpp (fastopt._C_emulated, CPU tensors), kernel launches return before their grids run:")
        report(backend, args.params, args.steps)
        ms = binding_times(args.params, args.steps)
        print(f"  {'torch.ops binding:':<26}{ms[0]:.2f} ms host"
              f" (min {ms[1]:.2f}; four lists; eager calls skip it)")


def report(backend, num_params: int, steps: int) -> None:
    for name, ms in backend_call_times(backend, num_params, steps).items():
        figure = "n/a (the backend has none)" if ms is None else f"{ms[0]:.2f} ms host (min {ms[1]:.2f})"
        print(f"  {name + ':':<26}{figure}")
    times = optimizer_step_times(backend, num_params, steps)
    first = times[0] * 1e3
    print(f"  {'optimizer step:':<26}{_median_ms(times[1:]):.2f} ms host (clipped; first step {first:.1f} ms)")
    times = optimizer_step_times(backend, num_params, steps, flat=True)
    print(f"  {'step, flat storage:':<26}{_median_ms(times[1:]):.2f} ms host (min {min(times[1:]) * 1e3:.2f})")


if __name__ == "__main__":
    main()
