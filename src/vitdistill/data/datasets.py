"""Dataset builders: Fashion-MNIST (embedded default), CIFAR-10/100, ImageFolder, random.

Small datasets are held as one uint8 tensor in memory (``TensorImageDataset``) so an item costs
a tensor slice plus the v2 transforms, never a PIL decode. Every problem a user can cause (no
data found, corrupt image, bad name) becomes one ``DataError`` that names the path or value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..config import DataConfig, config_from_dict, validate_data
from ..io import SAFETENSORS_ERRORS, read_safetensors
from .idx import DataError, read_idx
from .subsets import class_balanced_subset
from .transforms import build_mixup, build_transforms, dataset_stats

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_SEARCH_DIRS",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "DataBundle",
    "TensorImageDataset",
    "build_data",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_synthetic",
    "load_test_split",
]

DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "digits", "imagefolder", "random")
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0  # a fixed split: every run sees the same test images
ENV_VAR = "VITDISTILL_DATA"
# Searched (in this order, after cfg.root and $VITDISTILL_DATA) for the Fashion-MNIST IDX files.
# Relative entries are relative to the working directory at call time. Tests may replace this list.
DEFAULT_SEARCH_DIRS: list[str] = ["./data/fashion-mnist", "./data", "/usr/share/datasets/fashion-mnist"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# split -> (images file, labels file), without the optional .gz suffix
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
RANDOM_SIZES = {"train": 64, "val": 32, "num_classes": 10}
IMAGE_CHECK_LIMIT = 10  # bad image paths listed in an error message


@dataclass
class DataBundle:
    """What the trainer needs from the data side: datasets, label space, subset, batch-level mixing."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    train_indices: list[int] | None  # into the full train split when data.fraction < 1, else None
    mixup_fn: Callable | None
    mean: tuple[float, ...] = field(default=())  # the normalisation used (in_chans values)
    std: tuple[float, ...] = field(default=())


class TensorImageDataset(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)`` plus integer labels, transformed per item."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.ndim == 3:  # (N, H, W) grayscale: a view, no copy
            images = images.unsqueeze(1)
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise DataError(
                f"images {tuple(images.shape)} and targets {tuple(targets.shape)} do not match: "
                "expected (N, C, H, W) and (N,)"
            )
        self.images = images
        self.targets = targets
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def subset(self, indices: Sequence[int]) -> TensorImageDataset:
        """A compact copy holding only ``indices`` (keeps ``targets`` available, unlike ``Subset``)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImageDataset(self.images[idx], self.targets[idx], self.transform, self.classes)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _find_idx(folder: Path, base: str) -> Path | None:
    """The IDX file ``base`` in ``folder``, gzipped or not, with '-' or '.' before 'idx'."""
    names = [base, base.replace("-idx", ".idx")]
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _has_fashion_mnist(folder: Path, splits: Sequence[str]) -> bool:
    return all(_find_idx(folder, base) is not None for split in splits for base in FASHION_MNIST_FILES[split])


def _search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    """Folders that may hold the IDX files, in priority order, each also with its usual subfolders."""
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        bases.append(Path(env).expanduser())
    bases += [Path(d).expanduser() for d in DEFAULT_SEARCH_DIRS]
    out: list[Path] = []
    for base in bases:
        # the folder itself, the project layout, and torchvision's download layout
        for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
            if folder not in out:
                out.append(folder)
    return out


def _not_found_message(searched: Sequence[Path], extra: str = "", files: str = "") -> str:
    places = "\n".join(f"  - {p}" for p in searched)
    files = files or ("train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                      "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")
    return (
        f"Fashion-MNIST IDX files ({files}) were not found in any of:\n"
        f"{places}\n{extra}"
        "Fix: install Debian's package dataset-fashion-mnist (`apt-get update && apt-get install "
        "dataset-fashion-mnist`, files go to /usr/share/datasets/fashion-mnist/), or set "
        f"${ENV_VAR} / data.root to a folder holding the four files, or allow the torchvision "
        "download with data.download=true on a machine with network access."
    )


def find_fashion_mnist(root: str | os.PathLike[str] | None = None, splits: Sequence[str] = ("train", "test")) -> Path:
    """The folder holding the Fashion-MNIST IDX files of ``splits`` (all four files by default; a
    data-free run asks for the two test files only).

    Search order: ``root``, ``$VITDISTILL_DATA``, then ``DEFAULT_SEARCH_DIRS``; each folder is also
    tried with a ``fashion-mnist`` and a ``FashionMNIST/raw`` (torchvision) subfolder.
    """
    searched = _search_dirs(root)
    for folder in searched:
        if _has_fashion_mnist(folder, splits):
            return folder
    files = ", ".join(f"{b}[.gz]" for split in splits for b in FASHION_MNIST_FILES[split])
    raise DataError(_not_found_message(searched, files=files))


def load_fashion_mnist(folder: str | os.PathLike[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 28, 28), int64 labels (N,)) of ``split`` ('train' or 'test') from IDX files."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split '{split}' is not one of {sorted(FASHION_MNIST_FILES)}")
    folder = Path(folder)
    paths = [_find_idx(folder, base) for base in FASHION_MNIST_FILES[split]]
    if paths[0] is None or paths[1] is None:
        raise DataError(f"'{folder}' lacks the Fashion-MNIST {split} files {FASHION_MNIST_FILES[split]}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise DataError(
            f"'{paths[0]}' should hold uint8 images (N, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"'{paths[1]}' holds {tuple(labels.shape)} labels for {images.shape[0]} images in '{paths[0]}'"
        )
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DataError(f"'{paths[1]}' has labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels


def _fashion_mnist(cfg: DataConfig, with_train: bool) -> tuple[TensorImageDataset | None, TensorImageDataset, list[str]]:
    try:
        folder = find_fashion_mnist(cfg.root, ("train", "test") if with_train else ("test",))
    except DataError:
        if not cfg.download:
            raise
        folder = None
    if folder is not None:
        train = load_fashion_mnist(folder, "train") if with_train else None
        test = load_fashion_mnist(folder, "test")
    else:
        target = Path(cfg.root).expanduser() if cfg.root else Path("data")
        try:
            from torchvision.datasets import FashionMNIST

            splits = [FashionMNIST(str(target), train=t, download=True) for t in (True, False)]
        except Exception as e:  # network / disk errors of any kind: report them with the search
            why = f"The torchvision download into '{target}' also failed: {type(e).__name__}: {e}\n"
            raise DataError(_not_found_message(_search_dirs(cfg.root), why)) from None
        train, test = ((s.data, s.targets.long()) for s in splits)
    return TensorImageDataset(*train) if train else None, TensorImageDataset(*test), list(FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- CIFAR


def _cifar(cfg: DataConfig) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if cfg.name == "cifar10" else tvd.CIFAR100
    root = Path(cfg.root) if cfg.root else Path("data")
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=cfg.download)
        except Exception as e:  # missing files (RuntimeError) or a failed download (URLError, OSError)
            hint = (
                "the download failed; fetch it on a machine with network access"
                if cfg.download
                else "set data.download=true to let torchvision download it"
            )
            raise DataError(
                f"{cfg.name} not found in data.root '{root}' ({type(e).__name__}: {e}); {hint}, or point "
                f"data.root at a folder holding torchvision's '{cls.base_folder}'"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> NCHW
        out.append(TensorImageDataset(images, ds.targets, classes=ds.classes))
    return out[0], out[1], list(out[0].classes or [])


# ----------------------------------------------------------------------------- ImageFolder


def _load_image(path: str) -> Any:
    """ImageFolder loader that names the file when it cannot be read (module level: picklable)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None


def _is_bad_image(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return False
    except Exception:
        return True


def _check_images(paths: Sequence[str], where: Path) -> None:
    """Open every image header (PIL verify) now, so a corrupt file fails here and not in a worker."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        bad = [p for p, is_bad in zip(paths, pool.map(_is_bad_image, paths, chunksize=64)) if is_bad]
    if bad:
        listed = "\n".join(f"  - {p}" for p in bad[:IMAGE_CHECK_LIMIT])
        more = f"\n  ... and {len(bad) - IMAGE_CHECK_LIMIT} more" if len(bad) > IMAGE_CHECK_LIMIT else ""
        raise DataError(
            f"{len(bad)} unreadable or corrupt image(s) under '{where}':\n{listed}{more}\n"
            "Remove or replace them."
        )


def _image_folder(cfg: DataConfig) -> tuple[Dataset, Dataset, list[str]]:
    from torchvision.datasets import ImageFolder

    if not cfg.root:
        raise DataError(
            "data.name=imagefolder needs data.root: a folder with train/ and val/ (or test/) subfolders"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root '{root}' does not exist (expected train/ and val/ or test/ inside)")
    train_dir = root / "train"
    val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        missing = [
            str(p)
            for p, ok in ((train_dir, train_dir.is_dir()), (root / "val", val_dir is not None))
            if not ok
        ]
        raise DataError(
            f"imagefolder data.root '{root}' is missing {' and '.join(missing)}; expected "
            "train/<class>/<image> and val/<class>/<image> (or test/...)"
        )
    splits = []
    for folder in (train_dir, val_dir):
        try:
            ds = ImageFolder(str(folder), loader=_load_image)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"'{folder}' is not a usable image folder: {e}") from None
        _check_images([p for p, _ in ds.samples], folder)
        splits.append(ds)
    train, val = splits
    if train.classes != val.classes:
        raise DataError(
            f"class folders differ between '{train_dir}' {train.classes} and '{val_dir}' {val.classes}; "
            "both splits need the same class subfolders"
        )
    return train, val, list(train.classes)


# ----------------------------------------------------------------------------- digits


def digits_split(labels: torch.Tensor, test_fraction: float = DIGITS_TEST_FRACTION,
                 seed: int = DIGITS_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train, test) indices: per class a seeded shuffle, its first ``round(test_fraction * n_c)`` to test."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in sorted(set(labels.tolist())):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = round(test_fraction * len(idx))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def _digits() -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 16 grey levels, no download), as uint8;
    the pipeline upsamples them to ``data.img_size``. The split is fixed (``digits_split``), not the run's seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.name='digits' needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    images = torch.from_numpy((d.images * 255.0 / 16.0).round()).to(torch.uint8)
    labels = torch.from_numpy(d.target).long()
    train, test = digits_split(labels)
    classes = [str(i) for i in range(10)]
    return (TensorImageDataset(images[train], labels[train], classes=classes),
            TensorImageDataset(images[test], labels[test], classes=classes), classes)


# ----------------------------------------------------------------------------- random


def _random(cfg: DataConfig, seed: int) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    """Random uint8 images and labels at the configured size: smoke tests of large-image configs."""
    g = torch.Generator().manual_seed(int(seed))
    n_cls = RANDOM_SIZES["num_classes"]
    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    out = []
    for n in (RANDOM_SIZES["train"], RANDOM_SIZES["val"]):
        images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        out.append(TensorImageDataset(images, torch.randint(0, n_cls, (n,), generator=g)))
    return out[0], out[1], [f"class_{i}" for i in range(n_cls)]


# ----------------------------------------------------------------------------- synthetic


def load_synthetic(cfg: DataConfig, num_classes: int) -> TensorImageDataset:
    """The images ``cfg.synthetic`` written by ``vitdistill synthesize`` (safetensors: uint8 ``images``
    (N, C, H, W), int64 ``labels``) as a train split for ``cfg.name``, whose test split and classes they
    were made for, at ``cfg.img_size`` and ``cfg.in_chans``."""
    p = Path(str(cfg.synthetic)).expanduser()
    if not p.is_file():
        raise DataError(f"data.synthetic '{p}' does not exist; write it with `vitdistill synthesize CONFIG`")
    try:
        tensors, meta = read_safetensors(p)
        images, labels = tensors["images"], tensors["labels"]
    except (*SAFETENSORS_ERRORS, KeyError) as e:
        raise DataError(f"data.synthetic '{p}' is not a synthesised image file ({type(e).__name__}: {e})") from None
    if meta.get("dataset") != cfg.name:
        raise DataError(f"data.synthetic '{p}' was synthesised for dataset '{meta.get('dataset')}', "
                        f"but data.name is '{cfg.name}'; the test split must be the one the teacher knows")
    expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DataError(f"data.synthetic '{p}': images must be uint8 (N, {', '.join(map(str, expected))}) for "
                        f"data.in_chans={cfg.in_chans} and data.img_size={cfg.img_size}, got {images.dtype} "
                        f"{tuple(images.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"data.synthetic '{p}' has labels outside 0..{num_classes - 1}")
    return TensorImageDataset(images, labels)


# ----------------------------------------------------------------------------- entry point


def _targets(ds: Dataset) -> list[int] | torch.Tensor:
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise DataError(
            f"dataset {type(ds).__name__} exposes no targets; cannot take a class-balanced subset"
        )
    return targets


def _splits(cfg: DataConfig, seed: int, with_train: bool) -> tuple[Dataset | None, Dataset, list[str]]:
    """(train, test, class names); ``with_train=False`` reads no training image (Fashion-MNIST, random)."""
    if cfg.name not in DATASET_NAMES:
        raise DataError(f"data.name='{cfg.name}' is not a known dataset; valid: {', '.join(DATASET_NAMES)}")
    if cfg.name == "fashion-mnist":
        return _fashion_mnist(cfg, with_train)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    if cfg.name == "digits":
        return _digits()
    if cfg.name == "imagefolder":
        return _image_folder(cfg)
    return _random(cfg, seed)


def _normalization(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    default_mean, default_std = dataset_stats(cfg.name, cfg.in_chans)
    return (tuple(cfg.mean) if cfg.mean is not None else default_mean,
            tuple(cfg.std) if cfg.std is not None else default_std)


def test_split_config(values: dict[str, Any], name: str | None = None, root: str | None = None) -> DataConfig:
    """The data section that evaluates a model trained with data section ``values`` (a dict; unknown keys
    dropped): its test split only (no subset, augmentation or synthetic set), ``name``/``root`` overriding."""
    values = {k: v for k, v in values.items() if k in DataConfig.__dataclass_fields__}
    if name:
        values["name"] = name
    if root:
        values["root"] = root
    values.update(fraction=1.0, augment={}, synthetic=None)
    return config_from_dict({"data": values}).data


def load_test_split(cfg: DataConfig, seed: int = 0) -> tuple[Dataset, list[str], tuple[float, ...], tuple[float, ...]]:
    """The test split (eval transforms), its class names and the normalisation, without reading the
    training split where the dataset allows it: what a data-free job may know of the data."""
    validate_data(cfg)
    _, val, class_names = _splits(cfg, seed, with_train=False)
    mean, std = _normalization(cfg)
    val.transform = build_transforms(cfg, False, mean, std)  # type: ignore[attr-defined]
    return val, class_names, mean, std


def _no_images(cfg: DataConfig) -> TensorImageDataset:
    return TensorImageDataset(torch.zeros((0, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=torch.uint8),
                              torch.zeros(0, dtype=torch.long))


def build_data(cfg: DataConfig, seed: int, label_smoothing: float = 0.0, real_train: bool = True,
               evaluation: bool = True) -> DataBundle:
    """Build train/val datasets, the class-balanced train subset, transforms and Mixup from ``cfg``.

    The subset uses ``cfg.subset_seed`` when set, else ``seed`` (the run seed). With ``cfg.synthetic`` the
    train split is that file's images; with ``real_train=False`` (online data-free training) it is empty.
    Either way the real training split is not read (Fashion-MNIST, random). With ``evaluation=False`` a
    data-free run does not read the test split either (``val`` is empty) and so reads no real image at all
    (Fashion-MNIST, whose class names are known without its files).
    """
    validate_data(cfg)
    use_real_train = real_train and not cfg.synthetic
    if evaluation or use_real_train:
        train, val, class_names = _splits(cfg, seed, with_train=use_real_train)
    elif cfg.name == "fashion-mnist":  # its class names are known without its files
        train, val, class_names = None, _no_images(cfg), list(FASHION_MNIST_CLASSES)
    else:
        raise DataError(f"a data-free run without evaluation reads no real image only on fashion-mnist; "
                        f"data.name='{cfg.name}' needs its test split for the class names: set train.eval_every >= 1")
    if cfg.synthetic:
        train = load_synthetic(cfg, len(class_names))
    elif not real_train:
        train = _no_images(cfg)
    assert train is not None
    mean, std = _normalization(cfg)
    train.transform = build_transforms(cfg, True, mean, std)  # type: ignore[attr-defined]
    val.transform = build_transforms(cfg, False, mean, std)  # type: ignore[attr-defined]

    train_indices: list[int] | None = None
    if cfg.fraction < 1.0:
        subset_seed = cfg.subset_seed if cfg.subset_seed is not None else seed
        train_indices = class_balanced_subset(_targets(train), cfg.fraction, subset_seed)
        train = (
            train.subset(train_indices)
            if isinstance(train, TensorImageDataset)
            else Subset(train, train_indices)
        )

    num_classes = len(class_names)
    return DataBundle(
        train=train,
        val=val,
        num_classes=num_classes,
        class_names=class_names,
        train_indices=train_indices,
        mixup_fn=build_mixup(cfg, num_classes, label_smoothing),
        mean=mean,
        std=std,
    )
