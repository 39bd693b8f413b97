"""Images from a teacher alone: the inversion objective and the two synthesisers of online data-free training
(docs/methods.md §1.5, §1.7).

:class:`InversionObjective` is DeepInversion's loss (cross-entropy to the target labels, BatchNorm statistics,
TV and L2 priors, random roll and flip) plus DF-DearKD's boundary-preserving intra-divergence, and optionally
an adversarial term against a student. Two synthesisers optimise it, one batch per round:

- :class:`PixelSynthesizer` optimises the pixels themselves (the paper's DeepInversion), started from noise
  or from the previous round's images (``warm_start``);
- :class:`GeneratorSynthesizer` optimises a small class-conditional generator whose weights carry over from
  round to round (Fast-DFKD / NAYER style), so a few steps per batch suffice.

Both return images in normalised units inside the valid pixel range, are seeded by (run seed, round), and
never change the teacher or the student (their gradients are taken with ``torch.autograd.grad`` with respect
to the synthesiser's own tensors only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import DataFreeConfig, SynthesisConfig
from .errors import VitdistillError
from .losses.inversion import (
    BatchNormStatistics,
    adversarial_divergence,
    boundary_preserving_loss,
    image_l2,
    intra_divergence_loss,
    logit_margin_loss,
    total_variation_l2,
)
from .schedule import cosine_with_warmup

__all__ = ["ConditionalGenerator", "GeneratorSynthesizer", "InversionObjective", "PixelSynthesizer",
           "SynthesisError", "build_synthesizer", "round_labels"]

LOSS_TERMS = ("ce", "bn", "tv", "l2", "diversity", "boundary")


class SynthesisError(VitdistillError, RuntimeError):
    """The optimisation of a batch diverged."""


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and (when asked) the pooled penultimate features, from one pass (timm's model API)."""
    if not features:
        return teacher(x), None
    h = teacher.forward_features(x)
    return teacher.forward_head(h), teacher.forward_head(h, pre_logits=True).flatten(1)


def require_frozen(teacher: nn.Module) -> None:
    if teacher.training or any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("synthesis needs a frozen teacher in eval mode (teacher.eval().requires_grad_(False)): "
                         "in train mode its BatchNorm layers would use and overwrite the statistics being matched")


def round_labels(num_classes: int, batch_size: int, per_class: int, round_index: int) -> torch.Tensor:
    """The labels of round ``round_index``: ``batch_size / per_class`` consecutive classes (cycling on from
    where the previous round stopped), ``per_class`` images each."""
    groups = batch_size // per_class
    return ((torch.arange(groups) + round_index * groups) % num_classes).repeat_interleave(per_class)


class InversionObjective:
    """The synthesis loss of one view of a batch. ``weights`` of the DeepInversion terms come from the
    ``synthesis`` config section; ``adversarial_weight`` > 0 adds ``-w * adversarial_divergence`` against
    the student passed to :meth:`__call__`. Use as a context manager: the BatchNorm hooks live only while
    synthesising (the teacher runs without them in training)."""

    def __init__(self, teacher: nn.Module, syn: SynthesisConfig, adversarial_weight: float = 0.0,
                 adversarial_temperature: float = 1.0, adversarial_agree_only: bool = True) -> None:
        require_frozen(teacher)
        self.teacher, self.syn = teacher, syn
        self.weights = {"ce": 1.0, "bn": syn.bn_weight, "tv": syn.tv_weight, "l2": syn.l2_weight,
                        "diversity": syn.diversity_weight, "boundary": syn.boundary_weight}
        self.adversarial = (adversarial_weight, adversarial_temperature, adversarial_agree_only)
        self.use_features = syn.diversity_weight > 0 or (syn.boundary == "feature" and syn.boundary_weight > 0)
        self.bn: BatchNormStatistics | None = None

    def __enter__(self) -> InversionObjective:
        self.bn = BatchNormStatistics(self.teacher, self.syn.first_bn_multiplier)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bn is not None:
            self.bn.remove()
            self.bn = None

    def view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A random roll of up to ``jitter`` pixels and (with ``flip``) a horizontal flip, drawn from ``g``."""
        j = self.syn.jitter
        dy, dx = (int(v) for v in torch.randint(-j, j + 1, (2,), generator=g))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.syn.flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(3)
        return x

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
                 student: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.bn is not None, "InversionObjective is used inside a `with` block"
        syn = self.syn
        xj = self.view(x, g)
        logits, feats = teacher_outputs(self.teacher, xj, self.use_features)
        terms = {"ce": F.cross_entropy(logits.float(), labels), "bn": self.bn.loss(), "tv": total_variation_l2(xj),
                 "l2": image_l2(xj)}
        terms["diversity"] = intra_divergence_loss(feats, labels) if syn.diversity_weight > 0 else x.new_zeros(())
        terms["boundary"] = self._boundary(logits, feats, labels)
        total = sum(self.weights[k] * terms[k] for k in LOSS_TERMS)
        weight, temperature, agree_only = self.adversarial
        if student is not None and weight > 0:
            terms["adversarial"] = adversarial_divergence(logits, student(xj), temperature, agree_only)
            total = total - weight * terms["adversarial"]
        if not torch.isfinite(total):
            raise SynthesisError(f"synthesis loss became {total.item()} ({ {k: float(v) for k, v in terms.items()} }); "
                                 "lower synthesis.lr (pixels) or datafree.generator_lr (generator)")
        return total, terms

    def _boundary(self, logits: torch.Tensor, feats: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        syn = self.syn
        if syn.boundary_weight == 0 or syn.boundary == "none":
            return logits.new_zeros(())
        if syn.boundary == "logit":
            return logit_margin_loss(logits, labels, syn.boundary_margin)
        return boundary_preserving_loss(feats, labels, syn.boundary_margin)


def _pixel_range(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return m, s, (0 - m) / s, (1 - m) / s  # the valid pixel range [0, 1] in normalised units


def _step_terms(terms: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
    return {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}


class PixelSynthesizer:
    """DeepInversion: ``steps`` Adam steps (betas 0.5, 0.9, cosine learning rate from ``synthesis.lr``) on
    the pixels of one batch, started from noise or, with ``warm_start``, from the previous batch."""

    def __init__(self, shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
                 syn: SynthesisConfig, steps: int, warm_start: bool = False) -> None:
        self.shape, self.mean, self.std, self.syn = shape, mean, std, syn
        self.steps, self.warm_start = steps, warm_start
        self.previous: torch.Tensor | None = None  # normalised images of the last batch (warm start)

    def synthesize(self, objective: InversionObjective, labels: torch.Tensor, seed: int,
                   student: nn.Module | None = None, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The optimised images (normalised units), their labels and the loss terms of the last step.
        ``steps`` overrides the configured number of optimisation steps (the first round's warm-up)."""
        device, syn = labels.device, self.syn
        g = torch.Generator().manual_seed(seed)
        _, _, lo, hi = _pixel_range(self.mean, self.std, device)
        start = torch.randn((len(labels), *self.shape), generator=g).to(device)
        if self.warm_start and self.previous is not None and len(self.previous) == len(labels):
            start = self.previous.to(device)
        x = start.clamp(lo, hi).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=syn.lr, betas=(0.5, 0.9), eps=1e-8)
        steps = steps or self.steps
        warmup = min(syn.warmup_iterations, steps - 1)
        for it in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_with_warmup(it, steps, warmup, syn.lr, 0.0, 0.0)
            total, terms = objective(x, labels, g, student)
            x.grad, = torch.autograd.grad(total, [x])
            opt.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
        self.previous = x.detach()
        return x.detach(), labels, _step_terms(terms, total)

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state["previous"]


class ConditionalGenerator(nn.Module):
    """``(z, y) -> image``: the latent code times a learned class embedding, a linear layer to a
    ``width*2 x s x s`` map (``s = ceil(img_size / 4)``), two nearest-neighbour upsamplings with 3x3 convs,
    BatchNorm and LeakyReLU, a last 3x3 conv and a sigmoid: pixels in [0, 1], cropped to ``img_size``."""

    def __init__(self, num_classes: int, latent_dim: int, width: int, img_size: int, in_chans: int) -> None:
        super().__init__()
        self.img_size, self.base = img_size, math.ceil(img_size / 4)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, 2 * width * self.base ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, in_chans, 3, padding=1),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * self.embed(labels)).view(len(z), -1, self.base, self.base)
        return torch.sigmoid(self.body(h))[:, :, :self.img_size, :self.img_size]


class GeneratorSynthesizer:
    """A class-conditional generator trained a few steps per round on the inversion objective, each step on
    a fresh draw of latent codes (so it learns the class for every code, not for a few optimised ones); its
    weights and Adam state carry over between rounds. A round's images are ``images_per_round`` fresh draws
    of the updated generator (the labels of the round repeated): a sample costs one forward pass, which is
    what makes a large bank affordable."""

    def __init__(self, num_classes: int, shape: tuple[int, int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], steps: int, lr: float, latent_dim: int, width: int, seed: int,
                 images_per_round: int) -> None:
        self.shape, self.mean, self.std, self.steps, self.latent_dim = shape, mean, std, steps, latent_dim
        self.images_per_round = images_per_round
        with torch.random.fork_rng(devices=[]):  # its initial weights depend on the run seed alone
            torch.manual_seed(seed)
            self.generator = ConditionalGenerator(num_classes, latent_dim, width, shape[1], shape[0])
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))

    def to(self, device: torch.device) -> GeneratorSynthesizer:
        self.generator.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(device)
        return self

    def _draw(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        m, s, _, _ = _pixel_range(self.mean, self.std, labels.device)
        z = torch.randn((len(labels), self.latent_dim), generator=g).to(labels.device)
        return (self.generator(z, labels) - m) / s

    def synthesize(self, objective: InversionObjective, labels: torch.Tensor, seed: int,
                   student: nn.Module | None = None, steps: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """``images_per_round`` images (normalised units), their labels and the loss terms of the last step.
        ``steps`` overrides the configured number of optimisation steps (the first round's warm-up)."""
        g = torch.Generator().manual_seed(seed)
        params = list(self.generator.parameters())
        self.generator.train()
        for _ in range(steps or self.steps):
            total, terms = objective(self._draw(labels, g), labels, g, student)
            for p, grad in zip(params, torch.autograd.grad(total, params)):
                p.grad = grad
            self.optimizer.step()
        with torch.no_grad():
            draws = [self._draw(labels, g) for _ in range(self.images_per_round // len(labels))]
        return torch.cat(draws), labels.repeat(len(draws)), _step_terms(terms, total)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_synthesizer(f: DataFreeConfig, syn: SynthesisConfig, num_classes: int, shape: tuple[int, int, int],
                      mean: tuple[float, ...], std: tuple[float, ...], seed: int,
                      device: torch.device) -> PixelSynthesizer | GeneratorSynthesizer:
    if f.synthesizer == "pixel":
        return PixelSynthesizer(shape, mean, std, syn, f.synthesis_steps, f.warm_start)
    return GeneratorSynthesizer(num_classes, shape, mean, std, f.synthesis_steps, f.generator_lr, f.latent_dim,
                                f.generator_width, seed, f.images_per_round or syn.batch_size).to(device)
