"""Top-1/top-5 accuracy of a model over a loader, reduced over the processes of a distributed run."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from .distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, info: DistInfo,
             amp_ctx: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole loader (all ranks reduced)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss sum
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with amp_ctx or contextlib.nullcontext():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(targets[:, None])
        totals += torch.tensor([len(targets), hit[:, 0].sum().item(), hit.any(1).sum().item(),
                                nn.functional.cross_entropy(logits, targets, reduction="sum").item()],
                               dtype=torch.float64, device=device)
    all_reduce_sum(totals, info)
    model.train(was_training)
    n = max(totals[0].item(), 1.0)
    return {"top1": 100.0 * totals[1].item() / n, "top5": 100.0 * totals[2].item() / n, "loss": totals[3].item() / n}
