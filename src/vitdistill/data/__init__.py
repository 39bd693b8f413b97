"""Datasets, class-balanced subsets and transforms for vitdistill (knows no model).

The trainer and CLI call ``build_data(cfg.data, seed, label_smoothing)`` and get a ``DataBundle``.
"""

from .datasets import (
    DATASET_NAMES,
    DEFAULT_SEARCH_DIRS,
    ENV_VAR,
    FASHION_MNIST_CLASSES,
    DataBundle,
    TensorImageDataset,
    build_data,
    find_fashion_mnist,
    load_fashion_mnist,
    load_synthetic,
    load_test_split,
    test_split_config,
)
from .idx import DataError, read_idx
from .subsets import class_balanced_subset
from .transforms import (
    PrepareImage,
    ToChannels,
    ToNormalizedFloat,
    build_mixup,
    build_transforms,
    dataset_stats,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_SEARCH_DIRS",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "DataBundle",
    "DataError",
    "PrepareImage",
    "TensorImageDataset",
    "ToChannels",
    "ToNormalizedFloat",
    "build_data",
    "build_mixup",
    "build_transforms",
    "class_balanced_subset",
    "dataset_stats",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_synthetic",
    "load_test_split",
    "read_idx",
    "test_split_config",
]
