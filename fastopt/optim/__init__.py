"""Drop-in optimizers: ``fastopt.optim.AdamW`` for ``torch.optim.AdamW``."""

from fastopt.optim.adamw import AdamW

__all__ = ["AdamW"]
