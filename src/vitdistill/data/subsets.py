"""Class-balanced, seeded subsets of a training set (the "data-efficient" fractions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .idx import DataError

__all__ = ["class_balanced_subset"]


def class_balanced_subset(targets: Sequence[int] | torch.Tensor, fraction: float, seed: int) -> list[int]:
    """Indices of ``round(fraction * n_c)`` (at least one) samples of every class ``c``, sorted.

    Each class keeps the same share so a small fraction does not drop rare classes, and the
    choice depends only on ``seed`` (a private ``torch.Generator``) so a run folder's subset can be
    reproduced exactly.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"data.fraction={fraction} must be in (0, 1]")
    t = torch.as_tensor(targets, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise DataError("cannot take a subset of an empty dataset (no targets)")
    generator = torch.Generator().manual_seed(int(seed))
    chosen: list[torch.Tensor] = []
    for c in torch.unique(t).tolist():  # sorted, so the generator is consumed in a fixed order
        members = torch.nonzero(t == c).flatten()
        k = max(1, round(fraction * members.numel()))
        perm = torch.randperm(members.numel(), generator=generator)
        chosen.append(members[perm[:k]])
    return sorted(torch.cat(chosen).tolist())
