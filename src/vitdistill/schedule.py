"""Learning-rate schedules (steps, not epochs, so that a resumed run continues on the same curve)."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate at an optimisation step: linear warm-up, then cosine decay to ``min_lr``."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))
