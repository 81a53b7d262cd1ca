"""Drop-in optimizers on fastopt's fused step: ``fastopt.optim.AdamW`` for ``torch.optim.AdamW``,
``Adam``, ``SGD`` for torch's, and ``Lion``. What they share (clipping and AGC inside the step,
AMP, the spike guard, the monitor, flat storage) is ``FusedOptimizer``'s."""

from fastopt.optim.adam import Adam, AdamW
from fastopt.optim.lion import Lion
from fastopt.optim.optimizer import FusedOptimizer
from fastopt.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "Lion", "FusedOptimizer"]
