"""Class-balanced, seeded selections: subsets of a training set (the "data-efficient" fractions) and
balanced image orders for analyses (SpectralKD's layer intensity, ``vitdistill analyze``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .idx import DataError

__all__ = ["balanced_indices", "balanced_loader", "class_balanced_subset", "dataset_targets"]


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


def dataset_targets(dataset: Dataset) -> list[int]:
    """Integer labels of every item: ``.targets`` when the dataset has them (also through ``Subset``),
    else by iterating the dataset (slow: loads every item)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in torch.as_tensor(targets).flatten().tolist()]
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        return [parent[int(i)] for i in dataset.indices]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def balanced_indices(targets: Sequence[int] | Tensor, n_images: int, seed: int) -> list[int]:
    """The first ``n_images`` of a seeded class-balanced ordering of ``targets``.

    Every class is shuffled with a private generator seeded by ``seed``, then the classes are
    interleaved round-robin (one image of each class in turn, classes in sorted order), so any prefix
    holds the classes in (nearly) equal numbers and each batch mixes classes.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    t = torch.as_tensor(targets, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise ValueError("cannot select images from an empty dataset")
    g = torch.Generator().manual_seed(int(seed))
    per_class = []
    for c in torch.unique(t).tolist():
        members = torch.nonzero(t == c).flatten()
        per_class.append(members[torch.randperm(members.numel(), generator=g)].tolist())
    order: list[int] = []
    for rank in range(max(len(m) for m in per_class)):
        order.extend(m[rank] for m in per_class if rank < len(m))
        if len(order) >= n_images:
            break
    return order[:n_images]


def balanced_loader(dataset: Dataset, n_images: int, seed: int, batch_size: int = 250) -> DataLoader:
    """A loader over ``min(n_images, len(dataset))`` class-balanced images chosen with ``seed`` (see
    :func:`balanced_indices`), in that fixed order, single process."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = min(int(n_images), len(dataset))  # type: ignore[arg-type]
    indices = balanced_indices(dataset_targets(dataset), n, seed)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=0)
