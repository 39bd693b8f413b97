"""Per-image transforms built from ``DataConfig`` (torchvision v2 on uint8 tensors), and Mixup.

Images reach these transforms either as uint8 tensors ``(C, H, W)`` (the in-memory datasets:
Fashion-MNIST, CIFAR, random) or as PIL images (ImageFolder); both leave as a normalised float
tensor ``(in_chans, img_size, img_size)``. PIL is used per item only when RandAugment is on,
because timm's RandAugment works on PIL images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..config import DataConfig
from .idx import DataError

__all__ = [
    "PrepareImage",
    "ToChannels",
    "ToNormalizedFloat",
    "build_mixup",
    "build_transforms",
    "dataset_stats",
]

# Per-dataset normalisation statistics. Grayscale datasets have one value; RGB ones three.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3053,), (0.3759,)),  # of the 8x8 images, all 1,797
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
    "random": ((0.5,), (0.5,)),
}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL / torchvision rgb_to_grayscale


def dataset_stats(name: str, in_chans: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default (mean, std) of a dataset, in [0, 1] pixel units.

    Without ``in_chans`` the dataset's own channel count is returned (1 for grayscale data). With
    it, grayscale stats are repeated to 3 channels, and RGB stats are reduced to one luminance
    channel (the same weights the grayscale conversion uses).
    """
    if name not in _STATS:
        raise DataError(f"no default statistics for dataset '{name}'; known: {sorted(_STATS)}")
    mean, std = _STATS[name]
    if in_chans is None or in_chans == len(mean):
        return mean, std
    if in_chans == 3 and len(mean) == 1:
        return mean * 3, std * 3
    if in_chans == 1 and len(mean) == 3:
        return (sum(w * m for w, m in zip(_LUMA, mean)),), (sum(w * s for w, s in zip(_LUMA, std)),)
    raise DataError(f"in_chans={in_chans} must be 1 or 3")


class ToChannels:
    """Make a ``(C, H, W)`` image tensor have ``in_chans`` channels.

    Grayscale is repeated to 3 channels; RGB becomes luminance for 1 channel; an alpha channel is
    dropped. A plain class (not a lambda) so DataLoader workers can pickle it.
    """

    def __init__(self, in_chans: int) -> None:
        self.in_chans = in_chans  # 1 or 3, checked with the data section (config.validate_data)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c in (2, 4):  # gray+alpha / RGB+alpha
            img = img[..., : c - 1, :, :]
            c -= 1
        if c == self.in_chans:
            return img
        if c == 1:  # -> 3
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
        if c == 3:  # -> 1
            return F.rgb_to_grayscale(img, num_output_channels=1)
        raise DataError(f"cannot convert an image with {c} channels to data.in_chans={self.in_chans}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


class PrepareImage:
    """PIL image or uint8 tensor -> plain uint8 tensor ``(in_chans, img_size, img_size)``.

    Fuses what every pipeline does first (to tensor, channels, short-side resize + centre crop)
    into one step that costs nothing when the source already has the right size and channels.
    """

    def __init__(self, in_chans: int, img_size: int) -> None:
        self.channels = ToChannels(in_chans)
        self.img_size = img_size

    def __call__(self, img: Any) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = F.pil_to_tensor(img)
        elif isinstance(img, torch.Tensor):
            img = img.as_subclass(torch.Tensor)  # drop any tv_tensors wrapper
            if img.ndim == 2:
                img = img.unsqueeze(0)
        else:
            raise DataError(f"expected a PIL image or a (C, H, W) tensor, got {type(img).__name__}")
        size = self.img_size
        if tuple(img.shape[-2:]) == (size, size):
            return self.channels(img)
        expand = img.shape[-3] == 1 and self.channels.in_chans == 3
        if not expand:  # drop channels before resizing, add them after: resize as few as possible
            img = self.channels(img)
        img = F.center_crop(F.resize(img, size, antialias=True), [size, size])
        return self.channels(img) if expand else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.channels.in_chans}, img_size={self.img_size})"


class ToNormalizedFloat:
    """uint8 ``(C, H, W)`` -> float32 ``(x / 255 - mean) / std`` in one fused step."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if any(s <= 0 for s in std):
            raise DataError(f"data.std={list(std)} must be positive")
        self.mean = list(mean)
        self.std = list(std)
        self._shift = torch.tensor([255.0 * m for m in mean]).view(-1, 1, 1)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = img.as_subclass(torch.Tensor)
        if img.dtype != torch.uint8:
            raise DataError(f"expected a uint8 image before normalisation, got {img.dtype}")
        return (img.to(torch.float32) - self._shift).mul_(self._scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _randaugment(spec: str, img_size: int, mean: Sequence[float]) -> Callable:
    """timm's RandAugment from its string spec, with hparams scaled to the image size like timm's own."""
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(max(0, min(255, round(255 * m))) for m in mean)
    hparams: dict[str, Any] = {
        "translate_const": int(img_size * 0.45),
        # PIL needs an int fill for grayscale ("L") images and a tuple for RGB
        "img_mean": fill[0] if len(fill) == 1 else fill,
    }
    try:
        return rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise DataError(
            f"data.augment.randaugment='{spec}' is not a valid timm RandAugment spec ({e or 'bad format'}); "
            "expected e.g. 'rand-m9-mstd0.5' or 'rand-m7-n2-mstd0.5-inc1'"
        ) from None


def build_transforms(
    cfg: DataConfig, train: bool, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Any], torch.Tensor]:
    """The per-image pipeline: channels, resize, [crop, flip, RandAugment], normalise, [erasing].

    ``train=False`` gives the evaluation pipeline (channels, resize, normalise only). ``mean`` and
    ``std`` must have ``cfg.in_chans`` values. Resizing is a no-op when the source already has
    ``img_size``; non-square sources are resized on the short side and centre-cropped.
    """
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        raise DataError(
            f"mean={list(mean)} and std={list(std)} must have data.in_chans={cfg.in_chans} values"
        )
    size = cfg.img_size
    ops: list[Callable] = [PrepareImage(cfg.in_chans, size)]
    if train:
        a = cfg.augment
        if a.crop_padding > 0:
            ops.append(v2.RandomCrop(size, padding=a.crop_padding))
        if a.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(a.hflip))
        if a.randaugment:
            ops += [v2.ToPILImage(), _randaugment(a.randaugment, size, mean), v2.PILToTensor()]
    ops.append(ToNormalizedFloat(mean, std))
    if train and cfg.augment.random_erasing > 0:
        from timm.data.random_erasing import RandomErasing

        ops.append(RandomErasing(probability=cfg.augment.random_erasing, mode="pixel", device="cpu"))
    return v2.Compose(ops)


def build_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float = 0.0) -> Callable | None:
    """timm ``Mixup`` (batch-level mixup/cutmix with soft targets) or None when both are off.

    The returned callable maps ``(images, int targets)`` to ``(mixed images, soft targets)`` and
    needs an even batch size, so train loaders should use ``drop_last=True``.
    """
    a = cfg.augment
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
