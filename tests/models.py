"""Small real models and a training loop that runs the same steps for any optimizer."""

from __future__ import annotations

import copy

import torch
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab=50, width=32, layers=2, context=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        # No biases: a key bias has zero gradient up to rounding (softmax ignores it), and Adam would
        # turn that rounding noise into full-size steps, so no two implementations could agree.
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, bias=False)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 5))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


MODELS = {"mlp": mlp, "transformer": TinyTransformer, "convnet": convnet}


def batch(name: str, step: int):
    """A deterministic batch (inputs, targets) for a model kind."""
    gen = torch.Generator().manual_seed(1000 + step)
    if name == "transformer":
        tokens = torch.randint(0, 50, (4, 16), generator=gen)
        return tokens, torch.roll(tokens, -1, dims=1)
    if name == "convnet":
        return torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    return torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def loss_of(name: str, model: nn.Module, step: int) -> torch.Tensor:
    inputs, targets = batch(name, step)
    if inputs.is_floating_point():
        inputs = inputs.to(next(model.parameters()).dtype)
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def make_model(name: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype)


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def train(name, model, optimizer, steps, *, before_step=None, scheduler=None, start=0):
    """Plain training steps; ``before_step(model, optimizer)`` runs between backward and step
    (e.g. torch's clip_grad_norm_). Returns the losses."""
    losses = []
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss = loss_of(name, model, step)
        loss.backward()
        if before_step is not None:
            before_step(model, optimizer)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
    return losses
