"""Tests for vitdistill.data: IDX reader, dataset location and loading, subsets, transforms, Mixup."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdistill.config import AugmentConfig, DataConfig
from vitdistill.data import (
    DATASET_NAMES,
    DataError,
    build_data,
    build_transforms,
    class_balanced_subset,
    dataset_stats,
    find_fashion_mnist,
    read_idx,
)
from vitdistill.data import datasets as data_datasets

# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, type_code: int, gz: bool = False) -> None:
    """Write an IDX file by hand: 2 zero bytes, type code, ndim, big-endian dims, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    payload = header + array.astype(big).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_tiny_fashion(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> dict:
    """A miniature Fashion-MNIST in IDX format; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, 0x08, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, 0x08, gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """Hide every default Fashion-MNIST location so only what a test provides can be found."""
    monkeypatch.setattr(data_datasets, "DEFAULT_SEARCH_DIRS", [])
    monkeypatch.delenv(data_datasets.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def fashion_folder() -> Path:
    # The real data is a requirement of the suite (make test / .ci/run install it): fail, never skip.
    return find_fashion_mnist()


@pytest.fixture(scope="module")
def fashion(fashion_folder):
    return build_data(DataConfig(root=str(fashion_folder), download=False), seed=0)


# ----------------------------------------------------------------------------- IDX reader


def test_read_idx_uint8_raw_and_gz_match_hand_written_bytes(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    write_idx(tmp_path / "a-idx3-ubyte", array, 0x08)
    write_idx(tmp_path / "a-idx3-ubyte.gz", array, 0x08, gz=True)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        t = read_idx(tmp_path / name)
        assert t.dtype == torch.uint8
        assert tuple(t.shape) == (2, 3, 4)
        assert torch.equal(t, torch.from_numpy(array))


def test_read_idx_other_types(tmp_path):
    ints = np.array([-1, 256, 70000, -(2**31)], dtype=np.int64)
    write_idx(tmp_path / "i32", ints, 0x0C)
    t = read_idx(tmp_path / "i32")
    assert t.dtype == torch.int32 and t.tolist() == ints.tolist()
    floats = np.array([[0.5, -2.25], [1e6, 3.0]])
    write_idx(tmp_path / "f32", floats, 0x0D)
    t = read_idx(tmp_path / "f32")
    assert t.dtype == torch.float32 and t.tolist() == floats.tolist()
    shorts = np.array([-300, 300], dtype=np.int64)
    write_idx(tmp_path / "i16", shorts, 0x0B)
    assert read_idx(tmp_path / "i16").tolist() == [-300, 300]


def test_read_idx_rejects_bad_files(tmp_path):
    good = np.zeros((4, 5), dtype=np.uint8)
    write_idx(tmp_path / "ok", good, 0x08)
    (tmp_path / "truncated").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    (tmp_path / "notidx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    (tmp_path / "badtype").write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00")
    for name, needle in (("truncated", "truncated"), ("notidx", "not an IDX"), ("badtype", "0x07")):
        with pytest.raises(DataError, match=needle) as e:
            read_idx(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing")


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_sizes_shapes_labels(fashion):
    assert len(fashion.train) == 60000 and len(fashion.val) == 10000
    assert fashion.num_classes == 10
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert fashion.train_indices is None
    assert fashion.mixup_fn is None
    for ds in (fashion.train, fashion.val):
        x, y = ds[7]
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and tuple(x.shape) == (1, 28, 28)
        assert isinstance(y, int)
        assert 0 <= int(ds.targets.min()) and int(ds.targets.max()) == 9
        assert ds.images.dtype == torch.uint8  # kept compact in memory
    # balanced dataset: 6000 per class in train, 1000 in test
    assert torch.bincount(fashion.train.targets).tolist() == [6000] * 10
    assert torch.bincount(fashion.val.targets).tolist() == [1000] * 10


def test_fashion_mnist_items_match_raw_idx(fashion, fashion_folder):
    mean, std = fashion.mean, fashion.std
    assert mean == dataset_stats("fashion-mnist")[0] and len(mean) == 1
    for ds, split in ((fashion.train, "train"), (fashion.val, "t10k")):
        raw_images = read_idx(next(fashion_folder.glob(f"{split}-images-idx3-ubyte*")))
        raw_labels = read_idx(next(fashion_folder.glob(f"{split}-labels-idx1-ubyte*")))
        for i in (0, 1234, len(ds) - 1):
            x, y = ds[i]
            pixels = x * std[0] + mean[0]  # undo the normalisation
            assert torch.allclose(pixels[0], raw_images[i].float() / 255, atol=1e-5)
            assert y == int(raw_labels[i])


def test_fashion_mnist_three_channels_and_resize(fashion_folder):
    b = build_data(DataConfig(root=str(fashion_folder), in_chans=3, img_size=32, download=False), seed=0)
    x, _ = b.val[3]
    assert tuple(x.shape) == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale repeated
    assert len(b.mean) == 3 and b.mean[0] == b.mean[2] == dataset_stats("fashion-mnist")[0][0]


def test_fashion_mnist_fraction_subset(fashion, fashion_folder):
    cfg = DataConfig(root=str(fashion_folder), fraction=0.01, download=False)
    b = build_data(cfg, seed=3)
    assert len(b.train) == 600 and len(b.train_indices) == 600
    full = fashion.train.targets
    assert Counter(full[b.train_indices].tolist()) == {c: 60 for c in range(10)}
    for j in (0, 599):
        x, y = b.train[j]
        x_full, y_full = fashion.train[b.train_indices[j]]
        assert y == y_full and torch.equal(x, x_full)
    assert len(b.val) == 10000  # the test split is never subsampled
    # subset_seed overrides the run seed
    b_other = build_data(cfg, seed=4)
    b_fixed = build_data(
        DataConfig(root=str(fashion_folder), fraction=0.01, subset_seed=3, download=False), 99
    )
    assert b_other.train_indices != b.train_indices
    assert b_fixed.train_indices == b.train_indices


def test_missing_fashion_mnist_gives_one_clear_error(no_default_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        build_data(DataConfig(root=str(empty), download=False), seed=0)
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg
    assert str(empty) in msg and "VITDISTILL_DATA" in msg and "download" in msg
    assert msg.count("Fashion-MNIST IDX files") == 1  # one error, not one per place searched


def test_fashion_mnist_search_order_env_and_root(no_default_data, monkeypatch, tmp_path):
    env_root = tmp_path / "envdata"
    arrays = write_tiny_fashion(env_root / "fashion-mnist", gz=True)
    monkeypatch.setenv("VITDISTILL_DATA", str(env_root))
    assert find_fashion_mnist() == env_root / "fashion-mnist"
    b = build_data(DataConfig(download=False), seed=0)
    assert len(b.train) == 20 and len(b.val) == 10
    x, y = b.train[5]
    assert torch.allclose(
        x[0] * b.std[0] + b.mean[0], torch.from_numpy(arrays["train"][0][5]).float() / 255, atol=1e-5
    )
    assert y == int(arrays["train"][1][5])
    # an explicit root (uncompressed files) comes before the environment variable
    root = tmp_path / "explicit"
    write_tiny_fashion(root, n_train=30, n_test=10, gz=False)
    assert find_fashion_mnist(root) == root
    assert len(build_data(DataConfig(root=str(root), download=False), seed=0).train) == 30


# ----------------------------------------------------------------------------- subsets


def test_class_balanced_subset_counts_seed_and_order():
    targets = [0] * 100 + [1] * 50 + [2] * 7 + [3] * 1
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    targets = torch.tensor(targets)[perm]  # classes interleaved
    idx = class_balanced_subset(targets, 0.1, seed=1)
    counts = Counter(targets[idx].tolist())
    assert counts == {0: 10, 1: 5, 2: 1, 3: 1}  # round(0.1 * n_c), at least one
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert all(0 <= i < len(targets) for i in idx)
    assert class_balanced_subset(targets, 0.1, seed=1) == idx
    assert class_balanced_subset(targets.tolist(), 0.1, seed=1) == idx  # list input, same result
    assert class_balanced_subset(targets, 0.1, seed=2) != idx
    assert class_balanced_subset(targets, 1.0, seed=5) == list(range(len(targets)))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(DataError, match="fraction"):
            class_balanced_subset(targets, bad, seed=0)


# ----------------------------------------------------------------------------- other datasets


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="imagenet21k"), seed=0)
    assert "imagenet21k" in str(e.value)
    for name in DATASET_NAMES:
        assert name in str(e.value)


def test_random_dataset_honours_size_and_channels():
    b = build_data(DataConfig(name="random", img_size=64, in_chans=3), seed=0)
    assert (len(b.train), len(b.val), b.num_classes) == (64, 32, 10)
    x, y = b.train[0]
    assert tuple(x.shape) == (3, 64, 64) and x.dtype == torch.float32 and 0 <= y < 10
    again = build_data(DataConfig(name="random", img_size=64, in_chans=3), seed=0)
    assert torch.equal(again.train[0][0], x)


def test_cifar_missing_without_download_names_root(tmp_path):
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="cifar10", root=str(tmp_path), download=False), seed=0)
    assert str(tmp_path) in str(e.value) and "download" in str(e.value)


def _write_image_folder(root: Path, size=(24, 20)) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")


def test_imagefolder_builds_with_grayscale_and_resize(tmp_path):
    _write_image_folder(tmp_path)
    b = build_data(DataConfig(name="imagefolder", root=str(tmp_path), img_size=16, in_chans=1), seed=0)
    assert b.class_names == ["cat", "dog"] and b.num_classes == 2
    assert len(b.train) == 6 and len(b.val) == 6
    x, y = b.train[4]
    assert tuple(x.shape) == (1, 16, 16) and y == 1
    b3 = build_data(DataConfig(name="imagefolder", root=str(tmp_path), img_size=16, in_chans=3), seed=0)
    assert tuple(b3.val[0][0].shape) == (3, 16, 16)
    assert b3.mean == dataset_stats("imagefolder")[0]


def test_imagefolder_reports_corrupt_image_by_path(tmp_path):
    _write_image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)
    assert str(bad) in str(e.value) and "1 unreadable" in str(e.value)


def test_imagefolder_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "nope")), seed=0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)
    assert str(tmp_path / "val") in str(e.value)


# ----------------------------------------------------------------------------- transforms, mixup


def test_dataset_stats_channels():
    assert dataset_stats("fashion-mnist") == ((0.2860,), (0.3530,))
    mean3, std3 = dataset_stats("fashion-mnist", 3)
    assert mean3 == (0.2860,) * 3 and std3 == (0.3530,) * 3
    mean1, _ = dataset_stats("cifar10", 1)
    assert len(mean1) == 1 and mean1[0] == pytest.approx(0.299 * 0.4914 + 0.587 * 0.4822 + 0.114 * 0.4465)
    with pytest.raises(DataError, match="fashion-mnist"):
        dataset_stats("nope")


def test_train_transforms_augment_and_eval_does_not():
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    mean, std = (0.5,), (0.25,)
    base = build_transforms(DataConfig(), False, mean, std)(img)
    assert torch.allclose(base, (img.float() / 255 - 0.5) / 0.25, atol=1e-5)
    # eval ignores augmentation settings entirely
    aug = AugmentConfig(crop_padding=4, hflip=1.0, random_erasing=1.0, randaugment="rand-m9-mstd0.5")
    assert torch.equal(build_transforms(DataConfig(augment=aug), False, mean, std)(img), base)
    flipped = build_transforms(DataConfig(augment=AugmentConfig(hflip=1.0)), True, mean, std)(img)
    assert torch.equal(flipped, base.flip(-1))
    erased = build_transforms(DataConfig(augment=AugmentConfig(random_erasing=1.0)), True, mean, std)(img)
    assert erased.shape == base.shape and not torch.equal(erased, base)
    crop = build_transforms(DataConfig(augment=AugmentConfig(crop_padding=4)), True, mean, std)
    outs = [crop(img) for _ in range(20)]
    assert all(o.shape == (1, 28, 28) for o in outs) and any(not torch.equal(o, base) for o in outs)


def test_randaugment_on_gray_and_rgb_and_bad_spec():
    for in_chans, src in ((1, (1, 28, 28)), (3, (3, 32, 32)), (3, (1, 28, 28))):
        cfg = DataConfig(
            img_size=32, in_chans=in_chans, augment=AugmentConfig(randaugment="rand-m9-n3-mstd0.5")
        )
        tf = build_transforms(cfg, True, (0.5,) * in_chans, (0.5,) * in_chans)
        for _ in range(10):
            out = tf(torch.randint(0, 256, src, dtype=torch.uint8))
            assert out.shape == (in_chans, 32, 32) and out.dtype == torch.float32
    with pytest.raises(DataError, match="rand-q9"):
        build_transforms(DataConfig(augment=AugmentConfig(randaugment="rand-q9")), True, (0.5,), (0.5,))


def test_transforms_accept_pil_rgb_to_gray():
    pil = Image.fromarray(np.full((10, 14, 3), (255, 0, 0), dtype=np.uint8))
    out = build_transforms(DataConfig(img_size=8, in_chans=1), False, (0.0,), (1.0,))(pil)
    assert out.shape == (1, 8, 8)
    assert torch.allclose(out, torch.full((1, 8, 8), 76 / 255), atol=2 / 255)  # luminance of pure red


def test_mixup_off_by_default_and_timm_mixup_when_on():
    from timm.data import Mixup

    assert build_data(DataConfig(name="random"), seed=0).mixup_fn is None
    cfg = DataConfig(name="random", augment=AugmentConfig(mixup=0.8, cutmix=1.0))
    b = build_data(cfg, seed=0, label_smoothing=0.1)
    assert isinstance(b.mixup_fn, Mixup)
    assert b.mixup_fn.label_smoothing == 0.1 and b.mixup_fn.num_classes == 10
    x = torch.stack([b.train[i][0] for i in range(8)])
    y = torch.tensor([b.train[i][1] for i in range(8)])
    mx, my = b.mixup_fn(x, y)
    assert mx.shape == x.shape and my.shape == (8, 10)
    assert torch.allclose(my.sum(1), torch.ones(8)) and my.max() < 1.0  # soft, smoothed targets


# ----------------------------------------------------------------------------- mixup / cutmix change the batch
# timm's Mixup (mode "batch", the one build_mixup makes) mixes image i with image B-1-i, i.e. with
# x.flip(0), in place, and returns targets lam * onehot(y) + (1 - lam) * onehot(y.flip(0))
# (timm/data/mixup.py: Mixup._mix_batch and mixup_target).


def _batch_and_mixup(augment: AugmentConfig, batch: int = 8):
    b = build_data(DataConfig(name="random", augment=augment), seed=0)
    x = torch.stack([b.train[i][0] for i in range(batch)])
    y = torch.arange(batch)  # distinct labels: y[i] != y[B-1-i], so lam can be read off the targets
    return b, x, y


def _soft_targets_ok(my, batch, num_classes):
    assert my.shape == (batch, num_classes)
    torch.testing.assert_close(my.sum(1), torch.ones(batch))
    assert (my >= 0).all()


def test_mixup_blends_the_batch_with_its_reverse():
    np.random.seed(0)  # timm draws lam with numpy
    b, x, y = _batch_and_mixup(AugmentConfig(mixup=0.8))
    assert b.mixup_fn is not None and b.num_classes == 10
    mx, my = b.mixup_fn(x.clone(), y)  # timm mixes in place: keep the input
    assert mx.shape == x.shape and not torch.equal(mx, x)
    _soft_targets_ok(my, 8, 10)
    lam = my[0, y[0]].item()
    assert 0.0 < lam < 1.0
    rows = torch.arange(8)
    torch.testing.assert_close(my[rows, y], torch.full((8,), lam))
    torch.testing.assert_close(my[rows, y.flip(0)], torch.full((8,), 1 - lam))
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x.flip(0), atol=1e-5, rtol=0)


def test_cutmix_pastes_a_box_from_the_reverse_batch():
    np.random.seed(0)
    b, x, y = _batch_and_mixup(AugmentConfig(cutmix=1.0))
    assert b.mixup_fn is not None
    mx, my = b.mixup_fn(x.clone(), y)
    assert mx.shape == x.shape and not torch.equal(mx, x)
    _soft_targets_ok(my, 8, 10)
    lam = my[0, y[0]].item()
    assert 0.0 < lam < 1.0
    # the changed pixels form one box, the same in every image, filled from the reversed batch
    changed = (mx != x).any(0).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    expected = x.clone()
    expected[:, :, box[0], box[1]] = x.flip(0)[:, :, box[0], box[1]]
    assert torch.equal(mx, expected)
    # the targets give the box its share of the label: 1 - lam = box area / image area
    area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
    assert 1 - lam == pytest.approx(area / (28 * 28), abs=1e-6)
    torch.testing.assert_close(my[torch.arange(8), y.flip(0)], torch.full((8,), 1 - lam))


def test_no_mixup_function_when_mixup_and_cutmix_are_zero():
    from vitdistill.data import build_mixup

    off = DataConfig(name="random", augment=AugmentConfig(mixup=0.0, cutmix=0.0, random_erasing=0.5, hflip=0.5))
    assert build_data(off, seed=0).mixup_fn is None
    assert build_mixup(off, num_classes=10) is None
    assert build_mixup(DataConfig(augment=AugmentConfig(cutmix=0.5)), num_classes=10) is not None
