"""Replayable training views: every view a pure function of (run seed, epoch, sample index).

With ``data.replay: true`` (required by ``teacher.cache``) the train split is wrapped in :class:`ReplayableViews`.
Sample ``i`` of epoch ``e`` is augmented with every random source (torch, Python's ``random``, NumPy: the crop box
in whole pixels, the flip, RandAugment's ops and magnitudes, the erasing box) seeded from
``sample_seed(seed, e, i)``; its mixup/cutmix partner is ``partner[i]`` of a seeded permutation of the epoch's
samples, and lambda, the mode and the cutmix box (whole pixels) come from a second seeded stream of the sample.
The partner's view is its own view of that epoch. Nothing depends on the batch size, the worker count, the rank
or what ran before, so a teacher cache made once replays exactly under DDP and after a resume
(docs/methods.md §5.2).

Unlike timm's batch ``Mixup`` (pairs inside a batch, one lambda per batch) the mixing is per sample; the
targets are mixed the same way (label smoothing first, then lambda).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..rng import seeded_rng

__all__ = ["MixSpec", "ReplayableViews", "sample_seed", "view_hash"]

PARTNER_INDEX = -1  # the "sample" whose seed draws an epoch's partner permutation
MIX_STREAM = 1  # the second stream of a sample: mixing, not augmentation
SWITCH_PROB = 0.5  # with mixup and cutmix both on: the chance of cutmix (timm's default)


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed, stable across processes and Python versions (no ``hash()`` randomisation)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def view_hash(view: torch.Tensor) -> int:
    """A signed 63-bit hash of a view's exact bytes (dtype and shape included)."""
    x = view.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{x.dtype}{tuple(x.shape)}".encode(), digest_size=8)
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class MixSpec:
    mixup: float  # Beta alpha; 0: off
    cutmix: float
    label_smoothing: float = 0.0


def _without_transform(dataset: Dataset) -> tuple[Dataset, Callable | None]:
    """A shallow copy of ``dataset`` that returns raw images, and the transform it had."""
    if isinstance(dataset, Subset):
        inner, transform = _without_transform(dataset.dataset)
        return Subset(inner, dataset.indices), transform
    raw = copy.copy(dataset)
    transform = getattr(raw, "transform", None)
    raw.transform = None  # type: ignore[attr-defined]
    return raw, transform


class ReplayableViews(Dataset):
    """``(view, target, label, index)`` of sample ``index`` in the current epoch (:meth:`set_epoch`)."""

    def __init__(self, dataset: Dataset, seed: int, num_classes: int, mix: MixSpec | None = None) -> None:
        self.raw, transform = _without_transform(dataset)
        if transform is None:
            raise ValueError("ReplayableViews needs a dataset with a .transform (the train pipeline)")
        self.transform = transform
        self.seed, self.num_classes = seed, num_classes
        self.mix = mix if mix is not None and (mix.mixup > 0 or mix.cutmix > 0) else None
        self.epoch = 0
        self.partner: torch.Tensor | None = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.mix is not None:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, PARTNER_INDEX))
            self.partner = torch.randperm(len(self), generator=g)

    def view(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample ``index`` augmented as it is in this epoch (before mixing), and its label."""
        image, label = self.raw[index]
        with seeded_rng(sample_seed(self.seed, self.epoch, index)):
            return self.transform(image), int(label)

    def _one_hot(self, label: int) -> torch.Tensor:
        s = self.mix.label_smoothing if self.mix is not None else 0.0
        target = torch.full((self.num_classes,), s / self.num_classes)
        target[label] += 1.0 - s
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, int, int]:
        x, label = self.view(index)
        if self.mix is None:
            return x, label, label, index
        assert self.partner is not None
        partner = int(self.partner[index])
        xp, label_p = self.view(partner)
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, index, MIX_STREAM))
        m = self.mix
        use_cutmix = m.cutmix > 0 and (m.mixup <= 0 or rng.random() < SWITCH_PROB)
        lam = float(rng.beta(m.cutmix, m.cutmix) if use_cutmix else rng.beta(m.mixup, m.mixup))
        if use_cutmix:  # a box of area (1 - lam) in whole pixels, clipped at the borders; lam from its real area
            h, w = x.shape[-2:]
            ch, cw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = xp[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = lam * x + (1.0 - lam) * xp
        target = lam * self._one_hot(label) + (1.0 - lam) * self._one_hot(label_p)
        return x, target, label, index
