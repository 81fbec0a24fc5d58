"""The optimisation helpers every training stage shares: the learning-rate schedule and early stopping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` × ``steps``, then cosine decay to a tenth of the peak learning rate."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, round(warmup * steps)), num_training_steps=max(1, steps), min_lr_rate=0.1
    )


class EarlyStopping:
    """Keeps the trainable weights of the best held-out objective; says stop after ``patience`` rises in a row."""

    def __init__(self, patience: int, parameters: Iterable[torch.nn.Parameter], min_delta: float = 1e-4) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.parameters = list(parameters)
        self.best = math.inf
        self.best_step = 0
        self.worse = 0
        self._best_weights: list[torch.Tensor] | None = None

    def update(self, value: float, step: int) -> bool:
        """Record a held-out value; ``True`` when training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.worse = value, step, 0
            self._best_weights = [p.detach().clone() for p in self.parameters]
            return False
        self.worse += 1
        return self.patience > 0 and self.worse >= self.patience

    def restore(self) -> bool:
        """Put the best weights back (``False`` when none were recorded)."""
        if self._best_weights is None:
            return False
        with torch.no_grad():
            for parameter, best in zip(self.parameters, self._best_weights, strict=True):
                parameter.copy_(best)
        return True
