"""Losses that synthesise images from a teacher (DF-DearKD, docs/methods.md §1.5), as pure functions.

DeepInversion's BatchNorm-statistics matching and image priors, and DF-DearKD's boundary-preserving
intra-divergence (same-class images pushed apart, but not past the nearest other class).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNormStatistics", "adversarial_divergence", "boundary_preserving_loss", "image_l2",
           "intra_divergence_loss", "js_divergence", "logit_margin_loss", "total_variation_l2"]


class BatchNormStatistics:
    """Forward hooks on every ``BatchNorm2d`` of a model: after a forward pass, :meth:`loss` is
    ``sum_l w_l (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)`` over the batch the
    layer saw (biased variance, as BN normalises with), with the first layer's weight
    ``first_multiplier`` and the others 1."""

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: DeepInversion needs a BN teacher")
        if any(m.running_mean is None for m in self.layers):
            raise ValueError("a BatchNorm2d layer keeps no running statistics (track_running_stats=False)")
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self._terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self._terms[index] = (torch.linalg.vector_norm(mean - module.running_mean)
                                  + torch.linalg.vector_norm(var - module.running_var))
        return hook

    def loss(self) -> torch.Tensor:
        if any(t is None for t in self._terms):
            raise RuntimeError("BatchNormStatistics.loss() before a forward pass of the model")
        return sum(w * t for w, t in zip(self.weights, self._terms))  # type: ignore[misc]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
    """Smoothness prior: the L2 norm of the differences between vertically and horizontally
    neighbouring pixels, summed over the two directions, averaged over the images of ``x`` (B, C, H, W)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).flatten(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).flatten(1)
    return (dh.norm(dim=1) + dw.norm(dim=1)).mean()


def image_l2(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image, averaged over the batch."""
    return x.flatten(1).norm(dim=1).mean()


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _squared_distances(features: torch.Tensor) -> torch.Tensor:
    f = F.normalize(features.float().flatten(1), dim=1)
    return (f[:, None, :] - f[None, :, :]).pow(2).sum(-1)


def intra_divergence_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-mean_{i != j, y_i = y_j} ||f_i - f_j||^2`` over L2-normalised features (B, D): lower when
    the images of a class are spread out. Needs at least two images of one class in the batch."""
    same, _ = _pair_masks(labels)
    if not same.any():
        raise ValueError("intra_divergence_loss needs at least two images of the same class in the batch")
    return -_squared_distances(features)[same].mean()


def boundary_preserving_loss(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean_i max(0, max_{y_j = y_i} d_ij - min_{y_k != y_i} d_ik + margin)`` with ``d`` the squared
    distance of L2-normalised features: a class may spread only while its farthest member stays
    ``margin`` closer than the nearest image of another class. Anchors ``i`` without a same-class
    partner or without another class in the batch are left out."""
    same, other = _pair_masks(labels)
    d = _squared_distances(features)
    valid = same.any(1) & other.any(1)
    if not valid.any():
        raise ValueError("boundary_preserving_loss needs two classes, one of them twice, in the batch")
    farthest_same = d.masked_fill(~same, float("-inf")).amax(1)
    nearest_other = d.masked_fill(~other, float("inf")).amin(1)
    return F.relu(farthest_same - nearest_other + margin)[valid].mean()


def logit_margin_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean_i max(0, margin - (z_{i, y_i} - max_{c != y_i} z_{i, c}))``: keeps every image at least
    ``margin`` logits inside its class's decision boundary (the logit variant of boundary preservation)."""
    z = logits.float()
    target = z.gather(1, labels[:, None]).squeeze(1)
    runner_up = z.scatter(1, labels[:, None], float("-inf")).amax(1)
    return F.relu(margin - (target - runner_up)).mean()


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (natural log, in [0, ln 2]) of ``softmax(a / T)`` and
    ``softmax(b / T)``: ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``."""
    log_p = F.log_softmax(logits_a.float() / temperature, dim=1)
    log_q = F.log_softmax(logits_b.float() / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(1) + (log_q.exp() * (log_q - log_m)).sum(1))


def adversarial_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                           agree_only: bool = True) -> torch.Tensor:
    """How much the student disagrees with the teacher on a batch: the mean JS divergence of their
    tempered outputs (0 when they agree). Synthesis *maximises* it (Adaptive DeepInversion's competition
    term, ``1 - JS``, up to a constant) to find images the student has not learned yet. With ``agree_only``
    only images on which both still predict the same class count (CMI / Fast-DFKD's mask): once the
    student is wrong on an image, pushing further would only drive it off the class."""
    js = js_divergence(teacher_logits, student_logits, temperature)
    if agree_only:
        js = js * (teacher_logits.argmax(1) == student_logits.argmax(1)).float()
    return js.mean()
