"""The committed teacher weights load and reproduce, on 1,000 class-balanced test images, the top-1 and mean
loss BENCHMARKS.md records for them (the full-test-set accuracy is the benchmark's; 10,000 images through a
CaiT would cost the suite two minutes per file on 2 CPU cores)."""

import re
from pathlib import Path

import pytest
import torch

from vitdistill.config import DataConfig
from vitdistill.data import build_data
from vitdistill.data.subsets import balanced_loader
from vitdistill.engine import evaluate
from vitdistill.engine.distributed import DistInfo
from vitdistill.models import create_model

REPO = Path(__file__).resolve().parents[1]
# name in BENCHMARKS.md: (preset, weights, a floor far below the recorded accuracy: catches a wrong or
# broken file on its own)
SHIPPED = {
    "resnetd_small_28": ("resnetd_small_28", REPO / "weights" / "resnetd_small_28_fmnist.safetensors", 90.0),
    "caitd_small_patch4_28": ("caitd_small_patch4_28", REPO / "weights" / "caitd_small_patch4_28_fmnist.safetensors",
                              80.0),
    "caitd_small_patch4_28_kd": ("caitd_small_patch4_28",
                                 REPO / "weights" / "caitd_small_patch4_28_kd_fmnist.safetensors", 80.0),
}
IMAGES = 1000  # benchmarks/teachers.py CHECK_IMAGES
# One image is 0.1 points here. Another BLAS or CPU can sum the logits in another order and flip the arg-max
# of an image or two on a decision boundary; allow 5 images, nothing more. The mean loss moves by rounding
# only (1e-6 relative), while the two CaiT files, level in top-1 within 0.7 points, differ by 3% in loss.
FLIPPED_IMAGES_ALLOWED = 5
LOSS_RTOL = 1e-3


def recorded(name: str) -> tuple[float, float]:
    text = (REPO / "BENCHMARKS.md").read_text()
    match = re.search(rf"shipped-teacher-check {name} ([0-9.]+) ([0-9.]+)\)", text)
    assert match, f"BENCHMARKS.md records no check for the shipped {name}"
    return float(match.group(1)), float(match.group(2))


@pytest.fixture(scope="module")
def test_loader():
    return balanced_loader(build_data(DataConfig(), seed=0).val, IMAGES, seed=0, batch_size=500)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_teacher_reproduces_its_recorded_check(name, test_loader):
    preset, weights, floor = SHIPPED[name]
    model = create_model(preset, num_classes=10, in_chans=1, img_size=28, checkpoint=str(weights))
    assert len(test_loader.dataset) == IMAGES
    metrics = evaluate(model, test_loader, torch.device("cpu"), DistInfo())
    top1, loss = recorded(name)
    assert metrics["top1"] >= floor
    assert metrics["top1"] == pytest.approx(top1, abs=FLIPPED_IMAGES_ALLOWED * 100 / IMAGES)
    assert metrics["loss"] == pytest.approx(loss, rel=LOSS_RTOL)


def test_the_check_tells_the_two_cait_files_apart():
    (_, a), (_, b) = recorded("caitd_small_patch4_28"), recorded("caitd_small_patch4_28_kd")
    assert abs(a - b) > 10 * LOSS_RTOL * max(a, b)
