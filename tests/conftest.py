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


@pytest.fixture
def killed_run(monkeypatch):
    """``killed_run(cfg, method_cls, step)`` trains ``cfg`` until the ``step``-th call of
    ``method_cls.forward_train`` raises KeyboardInterrupt (a simulated kill), then removes the patch
    so that the run can be resumed."""
    from vitdistill.engine.trainer import train

    def run(cfg, method_cls, step: int) -> None:
        original, calls = method_cls.forward_train, [0]

        def dying(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                raise KeyboardInterrupt("simulated kill")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(method_cls, "forward_train", dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                train(cfg, quiet=True)
        finally:
            monkeypatch.setattr(method_cls, "forward_train", original)
    return run
