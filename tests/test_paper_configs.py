"""The ImageNet paper recipes build with random weights and run two optimisation steps on random images."""

import math
from pathlib import Path

import pytest

from vitdistill.config import load_config
from vitdistill.data import datasets
from vitdistill.engine import load_checkpoint
from vitdistill.engine.trainer import train

IMAGENET = Path(__file__).resolve().parents[1] / "configs" / "imagenet"
# bf16 autocast (the recipes' amp) is emulated, ~10x slower, on CPUs without native bf16: one recipe keeps it
AMP_RECIPE = "spectralkd_deit_tiny.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in IMAGENET.glob("*.yaml")))
def test_imagenet_recipe_runs_two_steps(name, tmp_path, monkeypatch):
    # 4 random test images (not 32): the end-of-run evaluation at 224 px is not what this test is about
    monkeypatch.setitem(datasets.RANDOM_SIZES, "val", 4)
    cfg = load_config(IMAGENET / name, [
        f"run.output_dir={tmp_path}", "data.name=random", "data.root=null", "data.batch_size=2",
        "data.eval_batch_size=4", "data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.warmup_epochs=0", "train.device=cpu", *([] if name == AMP_RECIPE else ["train.amp=false"]),
    ])
    assert cfg.data.img_size == 224 and cfg.train.amp == (name == AMP_RECIPE)
    summary = train(cfg, quiet=True)
    state = load_checkpoint(Path(summary["run"]) / "last.pt")
    assert state["step"] == 2
    losses = [k for k in state["history"][0] if k.startswith("train_") and k not in ("train_loss", "train_top1")]
    assert losses, "no loss terms logged"
    bad = {k: state["history"][0][k] for k in losses if not math.isfinite(state["history"][0][k])}
    assert not bad, f"non-finite loss terms after two steps: {bad}"
