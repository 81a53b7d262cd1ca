"""Workloads named after what users train: parameter shapes and dtypes.

On a GPU the sizes of docs/design.md's anchors; on a CPU the same layouts scaled down, so that a full
run takes minutes on two cores.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# The ops of a transformer-style step (global-norm clipping) and of a conv-net step (AGC).
NORM_CLIP_OPS = (
    "multi_tensor_norm",
    "unscale_and_check_",
    "clip_grad_norm_",
    "adamw step",
    "clip + adamw step",
    "AMP step",
)
AGC_OPS = ("adaptive_clip_grad_", "AGC + adamw step")
# The other optimizers' steps, each against torch's fastest path for it (Lion: a foreach Lion).
OPTIMIZER_OPS = ("sgd step", "clip + sgd step", "adam step", "lion step", "clip + lion step")
ALL_OPS = NORM_CLIP_OPS + AGC_OPS + OPTIMIZER_OPS
# What each family runs when ops are named (``--ops``), in any dtype variant.
FAMILY_OPS = {
    "gpt-like": NORM_CLIP_OPS + OPTIMIZER_OPS,
    "many-small": NORM_CLIP_OPS + OPTIMIZER_OPS,
    "resnet50-like": AGC_OPS + ("sgd step",),  # conv nets: AGC, and SGD with momentum
}
# By default (no ops named) the other optimizers' steps run on the fp32 variant only: they add
# rows of the same kind as AdamW's, so one dtype shows them while keeping `make bench`'s time.
OPTIMIZER_OPS_DEFAULT_DTYPES = ("fp32",)

# dtype variant -> (param dtype, grad dtype); optimizer states take the params' dtype, as in torch.
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-grads": (torch.float32, torch.bfloat16),  # fp32 master params, grads reduced in bf16
}
FAMILIES = ("gpt-like", "many-small", "resnet50-like")
SIZES = ("full", "cpu", "tiny")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    param_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype = torch.float32
    ops: tuple[str, ...] = ALL_OPS

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def state_dtype(self) -> torch.dtype:
        return self.param_dtype  # torch.optim.AdamW keeps exp_avg / exp_avg_sq in the params' dtype

    @property
    def dtype_name(self) -> str:
        for name, dtypes in DTYPES.items():
            if dtypes == (self.param_dtype, self.grad_dtype):
                return name
        return f"{_short(self.param_dtype)}/{_short(self.grad_dtype)}-grads"

    @property
    def key(self) -> str:
        """A short unique label: ``gpt-like/bf16``."""
        return f"{self.name}/{self.dtype_name}"

    def describe(self) -> str:
        dtypes = _short(self.param_dtype)
        if self.grad_dtype != self.param_dtype:
            dtypes += " params, " + _short(self.grad_dtype) + " grads"
        return f"{self.name} ({len(self.shapes)} tensors, {_count(self.numel)} params, {dtypes})"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{1 if n < 100 * scale else 0}f} {suffix}"
    return str(n)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def gpt_shapes(layers: int, width: int, vocab: int, context: int) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a GPT-2-style transformer (12 tensors per block)."""
    block = [
        (width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
        (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,),
    ]  # fmt: skip
    return ((vocab, width), (context, width), *block * layers, (width,), (width,))


def many_small_shapes(count: int, smallest: int, largest: int, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """``count`` 1-D tensors with sizes uniform in [smallest, largest] (biases, norms, LoRA
    adapters): docs/design.md's 5,000 tensors of 256 to 64 K elements hold 164 M params."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(smallest, largest + 1, (count,), generator=generator)
    return tuple((int(n),) for n in sizes.tolist())


def resnet50_shapes(width_divisor: int = 1, num_classes: int = 1000) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of torchvision's ResNet-50: conv weights (out, in, k, k) without bias,
    a BatchNorm weight and bias after each conv, and the fc layer. At full width: 161 tensors,
    25,557,032 params. ``width_divisor`` narrows every layer (the layout stays the same)."""
    shapes: list[tuple[int, ...]] = []

    def conv_bn(out_channels: int, in_channels: int, kernel: int) -> None:
        shapes.extend([(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)])

    stem = 64 // width_divisor
    conv_bn(stem, 3, 7)
    in_channels = stem
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        width //= width_divisor
        out_channels = 4 * width  # bottleneck expansion
        for block in range(blocks):
            conv_bn(width, in_channels, 1)
            conv_bn(width, width, 3)
            conv_bn(out_channels, width, 1)
            if block == 0:  # the projection shortcut of each stage's first block
                conv_bn(out_channels, in_channels, 1)
            in_channels = out_channels
    shapes.extend([(num_classes, in_channels), (num_classes,)])
    return tuple(shapes)


def family_shapes(family: str, size: str) -> tuple[tuple[int, ...], ...]:
    """``size="full"``: docs/design.md's anchors (GPT-like 1.3 B params in 292 tensors; 5,000 small
    tensors, 164 M params; ResNet-50, 25.6 M params). ``size="cpu"``: the same layouts scaled
    down (5.3 M, 2.0 M and 2.0 M params) so that a CPU run takes minutes. ``size="tiny"``: a
    smoke test of the harness (seconds), not a measurement."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    if family == "gpt-like":
        return {
            "full": lambda: gpt_shapes(layers=24, width=2048, vocab=50257, context=2048),
            "cpu": lambda: gpt_shapes(layers=4, width=256, vocab=8192, context=256),
            "tiny": lambda: gpt_shapes(layers=1, width=16, vocab=64, context=16),
        }[size]()
    if family == "many-small":
        counts = {"full": (5000, 256, 65536), "cpu": (1000, 64, 4096), "tiny": (40, 4, 64)}
        return many_small_shapes(*counts[size])
    if family == "resnet50-like":
        divisor = {"full": 1, "cpu": 4, "tiny": 32}[size]
        return resnet50_shapes(width_divisor=divisor, num_classes=10 if size == "tiny" else 1000)
    raise ValueError(f"unknown workload {family!r}; known: {', '.join(FAMILIES)}")


def family_ops(family: str, dtype_name: str, ops: list[str] | None = None) -> tuple[str, ...]:
    """The ops a family runs in a dtype variant. Transformer-like layouts run the norm / clip /
    AdamW / AMP ops and the SGD, Adam and Lion steps; the conv layout runs AGC (what NFNet-style
    conv nets use it for) and the SGD step. Without ``ops`` the SGD, Adam and Lion steps run in
    ``OPTIMIZER_OPS_DEFAULT_DTYPES`` only; ``ops`` named run in every dtype variant."""
    if ops:
        return tuple(op for op in FAMILY_OPS[family] if op in ops)
    if dtype_name in OPTIMIZER_OPS_DEFAULT_DTYPES:
        return FAMILY_OPS[family]
    return tuple(op for op in FAMILY_OPS[family] if op not in OPTIMIZER_OPS)


def default_workloads(
    device: torch.device,
    families: list[str] | None = None,
    dtypes: list[str] | None = None,
    size: str | None = None,
    ops: list[str] | None = None,
) -> list[Workload]:
    """Each family in each dtype variant, with the ops of ``family_ops`` (none left: not listed)."""
    size = size or ("full" if device.type == "cuda" else "cpu")
    workloads = []
    for family in families or FAMILIES:
        shapes = family_shapes(family, size)
        for dtype_name in dtypes or DTYPES:
            param_dtype, grad_dtype = DTYPES[dtype_name]
            family_dtype_ops = family_ops(family, dtype_name, ops)
            if family_dtype_ops:
                workloads.append(Workload(family, shapes, param_dtype, grad_dtype, family_dtype_ops))
    return workloads
