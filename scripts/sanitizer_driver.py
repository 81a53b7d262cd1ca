"""Run every fastopt op once on one backend, over small mixed tensor lists, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitizer_driver.py

(with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so memcheck sees each tensor as its own allocation).
The lists mix 0-d, zero-element, odd-sized and chunk-crossing tensors, transposed, strided and
misaligned views (a view starting one element into its buffer), fp32 / bf16 / fp16, and a list
of 600 small tensors; the ops: multi_tensor_norm (2, inf, 1; per-tensor; with found_inf),
unscale_and_check_ (clean and with an inf), scale_, clamp_, clip_grad_norm_, clip_grad_value_,
adaptive_clip_grad_, adamw_ (plain; AMSGrad with grad_scale, clip_coef and found_inf; skipped on
found_inf; bf16 params with fp32 states; Adam's L2 weight decay), sgd_ (plain; momentum: the first
step with Nesterov and device scalars, a later step, one skipped on found_inf; bf16 params with fp32
buffers), lion_ (fp32 with device scalars; bf16 params with fp32 states; skipped on found_inf),
fastopt.optim.AdamW(amsgrad=True, max_grad_norm=1.0)
stepped through fastopt.amp.GradScaler, and AdamW with AGC in the step. Every result is also
computed by the torch backend on CPU copies of the same inputs and compared, loosely (this is a
memory check, not a precision test); the comparison runs on the CPU, so that besides fastopt's
kernels the device runs little more than copies and fills.

Exit status: 0 all ran and matched; 1 an exception (or, under compute-sanitizer with
--error-exitcode 1, a sanitizer error); 2 cannot run here (no GPU, backend unavailable);
3 some result differs from the torch backend's.

To check the driver itself without a GPU: ``python scripts/sanitizer_driver.py --device cpu
--backend torch`` (or ``--backend triton`` with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import traceback

# Run as `python scripts/sanitizer_driver.py`, sys.path[0] is scripts/: put the checkout first, so
# that its in-place build of fastopt._C is the one imported (gpu_check.sh sets PYTHONPATH too).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# Not wrapped in a function: a clear line, not a traceback, when torch is missing.
try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    print(f"sanitizer_driver: cannot import torch ({exc}); run it with the python that has torch", file=sys.stderr)
    sys.exit(2)

import fastopt  # noqa: E402 - after the check above
from fastopt import backends  # noqa: E402

CANNOT_RUN, MISMATCH = 2, 3

SHAPES = [(), (0,), (1,), (7,), (3, 5), (0, 4), (33, 17), (4, 3, 3, 3), (129,), (2, 0, 3), (70_001,), (257, 131)]
VIEWS = ("contiguous", "offset", "transposed", "step")  # offset: starts one element into its buffer


def make_tensor(shape, dtype, view, generator, *, positive=False):
    """A CPU tensor of ``shape`` laid out as ``view`` (when the shape allows it)."""
    numel = math.prod(shape)
    if numel == 0 or len(shape) == 0:
        view = "contiguous"
    if view == "transposed" and len(shape) < 2:
        view = "offset"

    def randn(base_shape):
        t = torch.randn(base_shape, generator=generator)
        return (t.abs() if positive else t).to(dtype)

    if view == "offset":  # misaligned: the data pointer is one element past an aligned buffer
        base = randn((*shape[:-1], shape[-1] + 1))
        return base[..., 1:]
    if view == "transposed":
        return randn(tuple(reversed(shape))).permute(*reversed(range(len(shape))))
    if view == "step":
        return randn((2 * shape[0], *shape[1:]))[::2]
    return randn(shape)


def to_device(t, device):
    """The same layout on ``device``: the whole buffer is copied, then viewed as ``t`` is."""
    if t._base is None:
        return t.detach().clone().to(device)
    base = t._base.detach().clone().to(device)
    return base.as_strided(t.size(), t.stride(), t.storage_offset())


def cpu_copy(t):
    return to_device(t, torch.device("cpu"))


def tensor_list(shapes, dtypes, generator, *, shift=0, positive=False):
    dtypes = list(dtypes)
    return [
        make_tensor(shape, dtypes[i % len(dtypes)], VIEWS[(i + shift) % len(VIEWS)], generator, positive=positive)
        for i, shape in enumerate(shapes)
    ]


def many_small_shapes(generator, count=600):
    sizes = torch.randint(0, 300, (count,), generator=generator).tolist()
    return [(n,) for n in sizes]


class Driver:
    def __init__(self, device: torch.device, backend: str, check: bool = True):
        self.device, self.backend, self.check = device, backend, check
        self.cases = self.mismatches = self.errors = self.rejected = 0

    @staticmethod
    def _close(pairs, loose):
        """One allclose over all pairs of a tolerance class (per-tensor calls cost ms each on a CPU)."""
        rtol, atol = (2e-2, 1e-3) if loose else (1e-4, 1e-6)
        flat = [torch.cat([t.detach().cpu().double().reshape(-1) for t in side] + [torch.zeros(0, dtype=torch.float64)])
                for side in zip(*pairs)] if pairs else [torch.zeros(0)] * 2  # fmt: skip
        return torch.allclose(flat[0], flat[1], rtol=rtol, atol=atol, equal_nan=True)

    def compare(self, on_device, reference):
        """Each (name, tensor, dtype) of the device's results against the CPU reference's."""
        for (name, got, _), (_, want, _) in zip(on_device, reference, strict=True):
            if got.shape != want.shape:
                raise AssertionError(f"{name}: shape {tuple(got.shape)}, the torch backend's {tuple(want.shape)}")
        for loose in (False, True):
            chosen = [(got, want) for (_, got, dtype), (_, want, _) in zip(on_device, reference)
                      if (dtype in (torch.bfloat16, torch.float16)) == loose]  # fmt: skip
            if self._close(chosen, loose):
                continue
            for (name, got, dtype), (_, want, _) in zip(on_device, reference):  # name the first that differs
                if (dtype in (torch.bfloat16, torch.float16)) == loose and not self._close([(got, want)], loose):
                    worst = (got.detach().cpu().double() - want.detach().double()).abs().max().item()
                    raise AssertionError(f"{name}: differs from the torch backend (max abs diff {worst:.3g})")

    def run(self, label, fn):
        """``fn(device, backend_context)`` runs the op on the device; returns (device result,
        CPU result) as lists of (name, tensor, dtype) compared pairwise."""
        self.cases += 1
        try:
            reference = None
            if self.check:  # forced: CPU tensors would otherwise run on the cpu backend where it is built
                with fastopt.use_backend("torch"):
                    reference = fn(torch.device("cpu"))
        except (TypeError, ValueError) as exc:  # the ops' validation refuses it: nothing to check
            self.rejected += 1
            print(f"  rejected  {label}: {type(exc).__name__}: {exc}"[:300])
            return
        except Exception as exc:  # noqa: BLE001
            self.errors += 1
            print(f"  ERROR     {label}: the torch backend on CPU raised {type(exc).__name__}: {exc}"[:300])
            return
        try:
            with fastopt.use_backend(self.backend):
                on_device = fn(self.device)
            if reference is not None:
                self.compare(on_device, reference)
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, in this case's name
        except AssertionError as exc:
            self.mismatches += 1
            print(f"  MISMATCH  {label}: {exc}"[:300])
            return
        except Exception as exc:  # noqa: BLE001 - report every case, then fail at the end
            self.errors += 1
            print(f"  ERROR     {label}: {type(exc).__name__}: {exc}"[:300])
            traceback.print_exc(limit=4)
            return
        print(f"  ok        {label}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check this driver itself")
    parser.add_argument("--backend", default="cuda", help="fastopt backend to run the ops on (default: cuda)")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the comparison with the torch backend (racecheck, synccheck)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        print(f"sanitizer_driver: cannot run: torch {torch.__version__} sees no GPU ({why}); run it on the GPU "
              "machine (make gpu-check), or check the driver itself with --device cpu --backend torch",
              file=sys.stderr)  # fmt: skip
        return CANNOT_RUN
    try:
        status = backends.status(args.backend)  # this backend alone: no other one is imported
    except ValueError as exc:
        print(f"sanitizer_driver: {exc}", file=sys.stderr)
        return CANNOT_RUN
    if not status.available:
        print(f"sanitizer_driver: cannot run: backend {args.backend!r} unavailable: {status.reason}", file=sys.stderr)
        return CANNOT_RUN
    print(f"sanitizer_driver: fastopt backend {args.backend!r} on {device}; torch {torch.__version__}")
    driver = Driver(device, args.backend, check=not args.no_check)
    generator = torch.Generator().manual_seed(0)
    float_lists = {
        "fp32": tensor_list(SHAPES, [torch.float32], generator),
        "bf16": tensor_list(SHAPES, [torch.bfloat16], generator, shift=1),
        "fp16": tensor_list(SHAPES, [torch.float16], generator, shift=2),
        "mixed": tensor_list(SHAPES, [torch.float32, torch.bfloat16, torch.float16], generator, shift=3),
        "600 small": tensor_list(many_small_shapes(generator), [torch.float32], generator),
        "zero-element only": tensor_list([(0,), (2, 0), (0, 0, 3)], [torch.float32], generator),
    }

    def on(device, tensors):
        return [to_device(t, device) for t in tensors]

    def flag(device, value=0.0):
        return torch.full((1,), value, device=device)

    for list_name, tensors in float_lists.items():
        loose = torch.bfloat16 if any(t.dtype != torch.float32 for t in tensors) else torch.float32
        for p, per_tensor in ((2.0, False), (math.inf, True), (1.0, True)):

            def norm(device, tensors=tensors, p=p, per_tensor=per_tensor):
                found_inf = flag(device)
                result = fastopt.multi_tensor_norm(on(device, tensors), p, per_tensor=per_tensor, found_inf=found_inf)
                total, norms = result if per_tensor else (result, torch.zeros(0))
                return [("total", total, loose), ("norms", norms, loose), ("found_inf", found_inf, torch.float32)]

            driver.run(f"multi_tensor_norm p={p} per_tensor={per_tensor} [{list_name}]", norm)

        for poisoned in (False, True):

            def unscale(device, tensors=tensors, poisoned=poisoned):
                ts, found_inf = on(device, tensors), flag(device)
                big = max(ts, key=lambda t: t.numel())
                if poisoned and big.numel():  # an inf in the middle of the largest tensor, through its view
                    index = torch.unravel_index(torch.tensor(big.numel() // 2), big.shape)
                    big[tuple(int(i) for i in index)] = float("inf")
                fastopt.unscale_and_check_(ts, torch.full((1,), 0.5, device=device), found_inf)
                return [(f"t{i}", t, t.dtype) for i, t in enumerate(ts)] + [("found_inf", found_inf, torch.float32)]

            driver.run(f"unscale_and_check_ {'with an inf' if poisoned else 'clean'} [{list_name}]", unscale)

        def scale_and_clamp(device, tensors=tensors):
            ts = on(device, tensors)
            fastopt.scale_(ts, torch.full((1,), 0.25, device=device))
            fastopt.scale_(ts, 3.0)
            fastopt.ops.clamp_(ts, 0.5)
            return [(f"t{i}", t, t.dtype) for i, t in enumerate(ts)]

        driver.run(f"scale_ + clamp_ [{list_name}]", scale_and_clamp)

    # Ops over params with grads: clipping, AGC.
    for dtype in (torch.float32, torch.bfloat16):
        params_cpu = tensor_list(SHAPES, [dtype], generator)
        grads_cpu = tensor_list(SHAPES, [dtype], generator, shift=1)

        def parameters(device, params_cpu=params_cpu, grads_cpu=grads_cpu):
            params = [torch.nn.Parameter(to_device(p, device).contiguous()) for p in params_cpu]
            for param, grad in zip(params, grads_cpu):
                param.grad = to_device(grad, device)  # a view: written through
            return params

        def grads_of(params):
            return [(f"grad{i}", p.grad, p.dtype) for i, p in enumerate(params)]

        name = str(dtype).removeprefix("torch.")

        def clip_norm(device, parameters=parameters):
            params = parameters(device)
            total = fastopt.clip_grad_norm_(params, 0.5)
            return [("total", total, params[0].dtype)] + grads_of(params)

        def clip_value(device, parameters=parameters):
            params = parameters(device)
            fastopt.clip_grad_value_(params, 0.1)
            return grads_of(params)

        def agc(device, parameters=parameters):
            params = parameters(device)
            fastopt.adaptive_clip_grad_(params, 0.01, 1e-3)
            return grads_of(params)

        driver.run(f"clip_grad_norm_ [{name}]", clip_norm)
        driver.run(f"clip_grad_value_ [{name}]", clip_value)
        driver.run(f"adaptive_clip_grad_ [{name}]", agc)

    def device_scalars(device, skip):
        """lr, grad_scale, clip_coef and found_inf (1: skip the step) as device tensors."""
        return dict(
            lr=torch.tensor(1e-3, device=device),
            grad_scale=torch.full((1,), 4.0, device=device),
            clip_coef=torch.tensor(0.5, device=device),
            found_inf=flag(device, 1.0 if skip else 0.0),
        )

    # adamw_: plain; AMSGrad with grad_scale / clip_coef / found_inf = 0; skipped (found_inf = 1);
    # bf16 params and grads with fp32 states; a tensor lr; Adam's L2 weight decay.
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    for label, param_dtype, state_dtype, amsgrad, extras, skip, decoupled in (
        ("fp32", torch.float32, torch.float32, False, False, False, True),
        ("fp32 amsgrad + grad_scale + clip_coef + found_inf=0 + tensor lr", torch.float32, torch.float32, True, True,
         False, True),
        ("fp32 amsgrad, found_inf=1 (nothing may change)", torch.float32, torch.float32, True, True, True, True),
        ("bf16 params, fp32 states, amsgrad", torch.bfloat16, torch.float32, True, False, False, True),
        ("bf16 params and states", torch.bfloat16, torch.bfloat16, False, True, False, True),
        ("Adam's L2 weight decay, fp32, amsgrad + device scalars", torch.float32, torch.float32, True, True, False,
         False),
    ):  # fmt: skip
        params_cpu = tensor_list(SHAPES, [param_dtype], generator)
        grads_cpu = tensor_list(SHAPES, [param_dtype], generator, shift=1)
        exp_avgs_cpu = tensor_list(SHAPES, [state_dtype], generator, shift=2)
        exp_avg_sqs_cpu = tensor_list(SHAPES, [state_dtype], generator, shift=3, positive=True)
        max_sqs_cpu = tensor_list(SHAPES, [state_dtype], generator, positive=True) if amsgrad else None

        def adamw(device, params_cpu=params_cpu, grads_cpu=grads_cpu, exp_avgs_cpu=exp_avgs_cpu,
                  exp_avg_sqs_cpu=exp_avg_sqs_cpu, max_sqs_cpu=max_sqs_cpu, extras=extras, skip=skip,
                  decoupled=decoupled):  # fmt: skip
            params, grads = on(device, params_cpu), on(device, grads_cpu)
            exp_avgs, exp_avg_sqs = on(device, exp_avgs_cpu), on(device, exp_avg_sqs_cpu)
            max_sqs = None if max_sqs_cpu is None else on(device, max_sqs_cpu)
            steps = [torch.full((), 3.0, device=device) for _ in params]
            kwargs = dict(hyper, decoupled_weight_decay=decoupled)
            if extras:
                kwargs.update(device_scalars(device, skip))
            fastopt.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs=max_sqs, **kwargs)
            out = []
            for i in range(len(params)):
                out += [(f"param{i}", params[i], param_dtype), (f"exp_avg{i}", exp_avgs[i], state_dtype),
                        (f"exp_avg_sq{i}", exp_avg_sqs[i], state_dtype),
                        (f"step{i}", steps[i], torch.float32)]  # fmt: skip
                if max_sqs is not None:
                    out.append((f"max_exp_avg_sq{i}", max_sqs[i], state_dtype))
            return out

        driver.run(f"adamw_ [{label}]", adamw)

    # sgd_: no momentum; the first momentum step (buffers only written) with Nesterov and device
    # scalars, then a later step (buffers read); a skipped step; bf16 params with fp32 buffers.
    for label, param_dtype, buffer_dtype, sgd_options, extras, skip in (
        ("fp32, no momentum, weight decay", torch.float32, None, {"weight_decay": 0.01}, False, False),
        ("fp32 momentum, first step, Nesterov + device scalars", torch.float32, torch.float32,
         {"momentum": 0.9, "nesterov": True, "first_step": True}, True, False),
        ("bf16 params, fp32 buffers, momentum + dampening + weight decay", torch.bfloat16, torch.float32,
         {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}, False, False),
        ("fp32 momentum, found_inf=1 (nothing may change)", torch.float32, torch.float32, {"momentum": 0.9}, True,
         True),
    ):  # fmt: skip
        params_cpu = tensor_list(SHAPES, [param_dtype], generator)
        grads_cpu = tensor_list(SHAPES, [param_dtype], generator, shift=1)
        buffers_cpu = tensor_list(SHAPES, [buffer_dtype], generator, shift=2) if buffer_dtype else None

        def sgd(device, params_cpu=params_cpu, grads_cpu=grads_cpu, buffers_cpu=buffers_cpu, sgd_options=sgd_options,
                extras=extras, skip=skip):  # fmt: skip
            params, grads = on(device, params_cpu), on(device, grads_cpu)
            buffers = None if buffers_cpu is None else on(device, buffers_cpu)
            kwargs = {"lr": 1e-3, **sgd_options, **(device_scalars(device, skip) if extras else {})}
            fastopt.sgd_(params, grads, buffers, **kwargs)
            out = [(f"param{i}", p, p.dtype) for i, p in enumerate(params)]
            return out + [(f"momentum_buffer{i}", b, b.dtype) for i, b in enumerate(buffers or [])]

        driver.run(f"sgd_ [{label}]", sgd)

    # lion_: fp32 with device scalars; bf16 params with fp32 states; a skipped step.
    for label, param_dtype, state_dtype, extras, skip in (
        ("fp32, device scalars", torch.float32, torch.float32, True, False),
        ("bf16 params, fp32 states", torch.bfloat16, torch.float32, False, False),
        ("fp32, found_inf=1 (nothing may change)", torch.float32, torch.float32, True, True),
    ):
        params_cpu = tensor_list(SHAPES, [param_dtype], generator)
        grads_cpu = tensor_list(SHAPES, [param_dtype], generator, shift=1)
        exp_avgs_cpu = tensor_list(SHAPES, [state_dtype], generator, shift=2)

        def lion(device, params_cpu=params_cpu, grads_cpu=grads_cpu, exp_avgs_cpu=exp_avgs_cpu, extras=extras,
                 skip=skip):  # fmt: skip
            params, grads, exp_avgs = on(device, params_cpu), on(device, grads_cpu), on(device, exp_avgs_cpu)
            kwargs = {"lr": 1e-4, "weight_decay": 0.1, **(device_scalars(device, skip) if extras else {})}
            fastopt.lion_(params, grads, exp_avgs, **kwargs)
            out = [(f"param{i}", p, p.dtype) for i, p in enumerate(params)]
            return out + [(f"exp_avg{i}", m, m.dtype) for i, m in enumerate(exp_avgs)]

        driver.run(f"lion_ [{label}]", lion)

    # The drop-ins: AdamW(amsgrad, in-step clipping) through GradScaler, two steps; AGC in the step.
    for label, options in (
        ("amsgrad, max_grad_norm=1.0, GradScaler", {"amsgrad": True, "max_grad_norm": 1.0}),
        ("agc_clip_factor=0.01", {"agc_clip_factor": 0.01}),
    ):
        params_cpu = tensor_list(SHAPES, [torch.float32], generator)
        grads_cpu = tensor_list(SHAPES, [torch.float32], generator, shift=1)

        def optimizer_steps(device, params_cpu=params_cpu, grads_cpu=grads_cpu, options=options):
            params = [torch.nn.Parameter(to_device(p, device).contiguous()) for p in params_cpu]
            optimizer = fastopt.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **options)
            scaler = fastopt.amp.GradScaler(device.type, init_scale=4.0) if "max_grad_norm" in options else None
            if scaler is not None:
                scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as a backward would
            for _ in range(2):
                for param, grad in zip(params, grads_cpu):
                    param.grad = to_device(grad, device) * (4.0 if scaler is not None else 1.0)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            out = [(f"param{i}", p, p.dtype) for i, p in enumerate(params)]
            for i, p in enumerate(params):
                state = optimizer.state[p]
                out += [(f"{key}{i}", value, torch.float32) for key, value in sorted(state.items())
                        if isinstance(value, torch.Tensor)]  # fmt: skip
            return out

        driver.run(f"fastopt.optim.AdamW [{label}]", optimizer_steps)

    if device.type == "cuda":
        torch.cuda.synchronize()
    ok = driver.cases - driver.mismatches - driver.errors - driver.rejected
    print(
        f"sanitizer_driver: {driver.cases} cases: {ok} ok, "
        f"{driver.mismatches} mismatched, {driver.errors} raised, {driver.rejected} rejected by validation"
    )
    if driver.errors:
        return 1
    return MISMATCH if driver.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
