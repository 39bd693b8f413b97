import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: pretrained lookups fail fast

# Fixed intra-op threads keep results reproducible run to run; OMP_NUM_THREADS=1 lets the suite share
# the cores with another job without OpenMP spin-waits slowing both down many times over.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def tiny_cfg_values(tmp_path):
    """A small but real run on Fashion-MNIST: a 1-block ViT on 1% of the training set."""
    return {
        "run": {"name": "tiny", "output_dir": str(tmp_path / "runs"), "seed": 3},
        "data": {"name": "fashion-mnist", "fraction": 0.01, "batch_size": 32, "eval_batch_size": 1000},
        "model": {"name": "vitd_tiny_patch4_28", "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
        "train": {"epochs": 3, "lr": 2e-3, "warmup_epochs": 0.5, "log_interval": 1000},
    }
