"""Train a small character-level GPT with fastopt: the production training loop, end to end.

Warmup + cosine learning rate (torch's schedulers), AMP (bf16 autocast; fp16 + GradScaler on
CUDA), gradient accumulation (clipped once per optimizer step), clipping by global norm or AGC
inside the optimizer's step (fastopt.optim.AdamW, or Adam, SGD or Lion with --optimizer), a spike
guard, a device-side training monitor, checkpoints with a bit-exact resume, and a PNG of loss,
grad norm, learning rate and skipped steps.

The corpus is generated, not downloaded: the docstrings of a fixed list of standard-library
modules, which every Python installation has.

    python examples/train_gpt.py                      # 15 s on an idle 2-core CPU (100 steps), loss falls
    python examples/train_gpt.py --compare-torch      # the same steps with torch's pipeline too
    python examples/train_gpt.py --optimizer lion --compare-torch   # fastopt's Lion vs a foreach Lion
    python examples/train_gpt.py --device cuda --amp fp16 --layers 12 --width 768 --context 256 \\
        --batch-size 64 --steps 5000                  # a GPU-sized run
    python examples/train_gpt.py --steps 200 --stop-at 100    # preempted: checkpoint at step 100
    python examples/train_gpt.py --steps 200 --resume runs/train_gpt/checkpoint.pt  # bit-exact
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastopt
from fastopt.benchmark.cases import ForeachLion, agc_per_tensor_loop
from fastopt.monitor import TrainingMonitor

# With the other defaults, a step costs 2.4 CPU-seconds on the 2-core machine of README.md (1.2-2.4 s
# of wall time on its two idle cores): 100 steps stay under the docstring's 4 minutes.
DEFAULT_STEPS = 100

# --optimizer: fastopt's optimizer, torch's counterpart (--compare-torch; torch has no Lion: a
# foreach Lion of torch ops, the benchmark's Lion baseline), and the defaults of --lr and
# --weight-decay. Lion: the paper's advice, an lr 3-10x smaller and a weight decay 3-10x larger
# than AdamW's (3x here: at 10x this example's 100 steps learn little). SGD: momentum
# (--momentum) and L2 weight decay, as torch's; Adam: L2 weight decay.
OPTIMIZERS = {
    "adamw": (fastopt.optim.AdamW, torch.optim.AdamW, {"lr": 3e-3, "weight_decay": 0.1}),
    "adam": (fastopt.optim.Adam, torch.optim.Adam, {"lr": 3e-3, "weight_decay": 0.0}),
    "sgd": (fastopt.optim.SGD, torch.optim.SGD, {"lr": 0.3, "weight_decay": 0.0}),
    "lion": (fastopt.optim.Lion, ForeachLion, {"lr": 1e-3, "weight_decay": 0.3}),
}

CORPUS_MODULES = [
    "json", "collections", "itertools", "functools", "textwrap", "string", "random", "statistics",
    "fractions", "decimal", "heapq", "bisect", "pathlib", "argparse", "logging", "contextlib",
    "dataclasses", "enum", "abc", "copy", "pprint", "shutil", "tempfile", "csv", "operator",
]  # fmt: skip


# --------------------------------------------------------------------------- data


def build_corpus() -> str:
    """Docstrings of standard-library modules and their public members, in a fixed order."""
    pieces = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        pieces.append(inspect.getdoc(module) or "")
        for member_name in sorted(dir(module)):
            if not member_name.startswith("_"):
                doc = inspect.getdoc(getattr(module, member_name, None))
                if doc:
                    pieces.append(doc)
    return "\n\n".join(pieces)


class CharData:
    def __init__(self, text: str, context: int):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.tokens = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        self.context = context

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, step: int, micro_step: int, batch_size: int, device):
        """The batch of a given (step, micro step): a pure function of them, so that a resumed
        run sees exactly the batches the uninterrupted one would have."""
        generator = torch.Generator().manual_seed(1_000_003 * step + micro_step)
        starts = torch.randint(len(self.tokens) - self.context - 1, (batch_size,), generator=generator)
        window = torch.stack([self.tokens[s : s + self.context + 1] for s in starts.tolist()])
        return window[:, :-1].to(device), window[:, 1:].to(device)


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- training


def make_scheduler(optimizer, args):
    warmup = max(1, int(args.steps * args.warmup_fraction))
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.steps - warmup), eta_min=args.lr * 0.1),
        ],
        milestones=[warmup],
    )


class Run:
    """One training run: model, optimizer, scheduler, scaler and metrics, for one pipeline."""

    def __init__(self, args, data: CharData, pipeline: str):
        self.args, self.data, self.pipeline = args, data, pipeline
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.model = GPT(data.vocab_size, args.context, args.width, args.layers, args.heads).to(self.device)
        named_body = [(n, p) for n, p in self.model.named_parameters() if not n.startswith("head.")]
        self.body = [p for _, p in named_body]
        head = list(self.model.head.parameters())
        groups = [{"params": self.body}, {"params": head, "agc_clip_factor": None}]  # NFNets: no AGC on the head
        fastopt_cls, torch_cls, _ = OPTIMIZERS[args.optimizer]
        hyper = {"lr": args.lr, "weight_decay": args.weight_decay}
        if args.optimizer in ("adamw", "adam"):
            hyper["betas"] = (0.9, 0.95)
        elif args.optimizer == "sgd":
            hyper["momentum"] = args.momentum
        if pipeline == "fastopt":
            names = [n for n, _ in named_body] + [f"head.{n}" for n, _ in self.model.head.named_parameters()]
            self.monitor = TrainingMonitor(history=max(args.steps, 1), names=names)
            self.optimizer = fastopt_cls(
                groups, **hyper,
                max_grad_norm=args.max_grad_norm if args.clip == "norm" else None,
                agc_clip_factor=args.agc_clip_factor if args.clip == "agc" else None,
                spike_guard=args.spike_guard, monitor=self.monitor,
            )  # fmt: skip
            scaler_cls = fastopt.amp.GradScaler
        else:
            self.monitor = None
            self.optimizer = torch_cls(groups, **hyper)
            scaler_cls = torch.amp.GradScaler
        self.scheduler = make_scheduler(self.optimizer, args)
        self.scaler = scaler_cls(self.device.type, enabled=args.amp == "fp16")
        self.step = 0
        self.metrics = {"loss": [], "lr": [], "grad_norm": [], "skipped": [], "step_ms": []}

    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "metrics": self.metrics,
            # What the fastopt run logs: its counters and monitor, so curves continue on resume.
            "stats": getattr(self.optimizer, "stats", None),
            "monitor": self.monitor.state_dict() if self.monitor else None,
        }

    def load(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.metrics = state["metrics"]
        if self.monitor is not None:
            self.optimizer.stats = state["stats"]
            self.monitor.load_state_dict(state["monitor"])

    def train_step(self) -> None:
        args = self.args
        started = time.perf_counter()
        self.optimizer.zero_grad()
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(args.accumulate):
            inputs, targets = self.data.batch(self.step, micro_step, args.batch_size, self.device)
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / args.accumulate
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        grad_norm = self._clip_and_step()
        self.scheduler.step()
        # Reading values back syncs the device: done once per step here for the plots; a real
        # run would read them only every --log-every steps.
        self.metrics["loss"].append(loss_sum.item())
        self.metrics["lr"].append(self.scheduler.get_last_lr()[0])
        self.metrics["grad_norm"].append(grad_norm.item())
        if self.pipeline == "fastopt":
            self.metrics["skipped"].append(int(self.optimizer.stats["skipped_steps"].item()))
        else:
            self.metrics["skipped"].append(self.metrics.get("torch_skipped", 0))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.metrics["step_ms"].append((time.perf_counter() - started) * 1e3)
        self.step += 1

    def _clip_and_step(self) -> torch.Tensor:
        args = self.args
        if self.pipeline == "fastopt":  # clipping (and the overflow check) happen inside the step
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return self.optimizer.stats["grad_norm"]
        self.scaler.unscale_(self.optimizer)
        if args.clip == "agc":
            agc_per_tensor_loop(self.body, args.agc_clip_factor)  # AGC as torch users loop it today
        norm_bound = args.max_grad_norm if args.clip == "norm" else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), norm_bound)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.metrics["torch_skipped"] = self.metrics.get("torch_skipped", 0) + 1
        return grad_norm


def plot(runs: list[Run], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for run in runs:
        steps = range(1, len(run.metrics["loss"]) + 1)
        for ax, key in zip(axes.flat, ("loss", "grad_norm", "lr", "skipped")):
            ax.plot(steps, run.metrics[key], label=run.pipeline, alpha=0.85)
    for ax, title in zip(axes.flat, ("training loss", "grad norm (before clipping)", "learning rate", "skipped steps")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default (an option that states its own keeps it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default: " in text else super()._get_help_string(action)


def _per_optimizer(key: str) -> str:
    return ", ".join(f"{name} {defaults[key]:g}" for name, (_, _, defaults) in OPTIMIZERS.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro batches per optimizer step")
    parser.add_argument("--context", type=int, default=64, help="characters per sequence")
    parser.add_argument("--width", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument(
        "--optimizer", choices=list(OPTIMIZERS), default="adamw",
        help="fastopt.optim's AdamW, Adam, SGD or Lion; --compare-torch runs torch.optim's (Lion: a foreach Lion)",
    )  # fmt: skip
    parser.add_argument(
        "--lr", type=float, help=f"peak learning rate (default: by --optimizer: {_per_optimizer('lr')})"
    )
    parser.add_argument(
        "--weight-decay", type=float,
        help="decoupled (adamw, lion) or L2 (adam, sgd) weight decay (default: by --optimizer: "
        f"{_per_optimizer('weight_decay')})",
    )  # fmt: skip
    parser.add_argument("--momentum", type=float, default=0.9, help="with --optimizer sgd")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps warming up linearly")
    parser.add_argument("--clip", choices=["norm", "agc", "none"], default="norm", help="clip by global norm or AGC")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="with --clip norm")
    parser.add_argument("--agc-clip-factor", type=float, default=0.02, help="with --clip agc")
    parser.add_argument("--spike-guard", type=float, default=None, help="skip steps whose grad norm jumps k-fold")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16", help="fp16 uses a GradScaler")
    parser.add_argument("--compare-torch", action="store_true", help="also run torch's pipeline on the same steps")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("runs/train_gpt"), help="metrics, plot and checkpoint"
    )
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    parser.add_argument("--resume", type=pathlib.Path, help="a checkpoint to continue from")
    parser.add_argument("--stop-at", type=int, default=0, help="stop after this step, saving a checkpoint (preemption)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines (step 1 is always logged)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation")
    args = parser.parse_args(argv)
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        parser.error("--amp fp16 needs a CUDA device (use bf16 on CPU)")
    if args.amp == "none":
        args.amp = None
    for key, value in OPTIMIZERS[args.optimizer][2].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The first line comes before the corpus and the models are built, so a run is seen to start.
    print(f"train_gpt: {args.steps} steps of {args.accumulate} x {args.batch_size} sequences of {args.context} "
          f"characters, {args.layers} layers of width {args.width}, on {args.device}; building the corpus",
          flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    data = CharData(build_corpus(), args.context)
    runs = [Run(args, data, "fastopt")] + ([Run(args, data, "torch")] if args.compare_torch else [])
    if args.resume:
        for run, state in zip(runs, torch.load(args.resume, weights_only=False)["runs"]):
            run.load(state)
    params = sum(p.numel() for p in runs[0].model.parameters())
    print(f"{params / 1e6:.2f} M params, {len(data.tokens) / 1e3:.0f} K characters, vocab {data.vocab_size}, "
          f"device {args.device}, amp {args.amp}, clip {args.clip}, {args.optimizer} (lr {args.lr:g}, "
          f"weight decay {args.weight_decay:g})", flush=True)  # fmt: skip
    while runs[0].step < args.steps:
        for run in runs:
            run.train_step()
        step = runs[0].step
        if step % args.log_every == 0 or step in (1, args.steps):
            line = f"step {step:5d}"
            for run in runs:
                line += f" | {run.pipeline}: loss {run.metrics['loss'][-1]:.4f} {run.metrics['step_ms'][-1]:6.1f} ms"
            if runs[0].monitor is not None:
                summary = runs[0].monitor.summary(top=1)
                line += f" | grad norm {summary['grad_norm']:.3f} clip rate {summary['clip_rate']:.2f}"
                line += f" skipped {summary['skipped_steps']}"
            print(line, flush=True)
        stopping = step == args.stop_at
        if stopping or (args.checkpoint_every and step % args.checkpoint_every == 0):
            torch.save({"runs": [run.state() for run in runs]}, args.out / "checkpoint.pt")
        if stopping:
            print(f"stopped at step {step}; resume with --resume {args.out / 'checkpoint.pt'}")
            break
    results = {run.pipeline: run.metrics for run in runs}
    (args.out / "metrics.json").write_text(json.dumps(results))
    if plot(runs, args.out / "training.png"):
        print(f"wrote {args.out / 'training.png'}")
    if args.compare_torch:
        ours, theirs = (torch.tensor(run.metrics["loss"]) for run in runs)
        median_ms = [sorted(run.metrics["step_ms"])[len(run.metrics["step_ms"]) // 2] for run in runs]
        print(f"largest loss difference fastopt vs torch: {(ours - theirs).abs().max().item():.2e}; "
              f"median step: fastopt {median_ms[0]:.1f} ms, torch {median_ms[1]:.1f} ms")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
