"""End-to-end behaviour of the trainer on real Fashion-MNIST images (tiny models, CPU)."""

import csv
import json
import math

import pytest
import torch

from vitdistill.config import config_from_dict
from vitdistill.data import build_data
from vitdistill.engine import load_checkpoint
from vitdistill.engine.trainer import TrainingError, train
from vitdistill.methods import Distiller, register_method
from vitdistill.methods.vanilla import Vanilla
from vitdistill.models import create_model
from vitdistill.schedule import cosine_with_warmup

TIME_COLUMNS = {"images_per_s", "epoch_time_s"}


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(f)]


def test_cosine_schedule_shape():
    lrs = [cosine_with_warmup(s, 100, 10, 1e-3, 1e-6, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[100] == pytest.approx(1e-5)
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.slow
def test_tiny_vit_beats_chance_on_real_images(tiny_cfg_values, tmp_path):
    values = tiny_cfg_values
    values["data"].update(fraction=0.1, batch_size=64)  # 6000 images, 93 steps/epoch
    values["model"]["kwargs"] = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    values["train"].update(epochs=4, warmup_epochs=0.5, eval_every=4)  # ~370 optimisation steps
    summary = train(config_from_dict(values), quiet=True)
    run_dir = tmp_path / "runs" / "tiny"
    # 10 classes: chance is 10%; a few hundred steps must land far above it on the 10k test set
    assert summary["last_top1"] > 65.0, summary
    assert summary["train_images"] == 6000
    for name in ("config.yaml", "metrics.csv", "summary.json", "last.pt", "last.safetensors", "best.safetensors",
                 "subset_indices.json"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {"train_ce", "train_loss", "train_top1", "lr", "val_top1", "val_top5"} <= set(rows[0])
    assert float(rows[-1]["train_ce"]) < float(rows[0]["train_ce"])
    indices = json.loads((run_dir / "subset_indices.json").read_text())
    assert len(indices) == 6000
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["best_top1"] >= saved["last_top1"] == summary["last_top1"]


def test_killed_run_resumes_to_identical_metrics(tiny_cfg_values, tmp_path, killed_run):
    values = tiny_cfg_values
    full = train(config_from_dict({**values, "run": {**values["run"], "name": "full"}}), quiet=True)

    # Same run, killed in the middle of epoch 2 (the 25th training step; epoch 1 has 18 steps).
    cfg = config_from_dict({**values, "run": {**values["run"], "name": "killed"}})
    killed_run(cfg, Vanilla, 25)
    killed_dir = tmp_path / "runs" / "killed"
    assert load_checkpoint(killed_dir / "last.pt")["epoch"] == 1
    assert not (killed_dir / "summary.json").exists()

    with pytest.raises(TrainingError, match="already holds a checkpoint; pass --resume"):
        train(cfg, quiet=True)
    resumed = train(cfg, resume=True, quiet=True)

    assert read_metrics(killed_dir) == read_metrics(tmp_path / "runs" / "full")
    assert resumed["last_top1"] == full["last_top1"]
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")["model"]
    b = load_checkpoint(killed_dir / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def nan_after_20_steps(monkeypatch):
    """A method whose loss turns NaN after its 20th training step, registered for this test only.

    The step counter lives on the instance, so every run starts from 0 whatever ran before; the method
    goes into a copy of the registry that is dropped after the test, so registering it again in the
    next test (or a rerun) does not collide and no other test sees it."""
    from vitdistill.methods import base

    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))

    @register_method("test_nan_after_20_steps")
    class NanAfter20Steps(Distiller):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = 0

        def forward_train(self, images, targets, teacher=None):
            logits, losses = super().forward_train(images, targets, teacher)
            self.steps += 1
            if self.steps > 20:
                losses["ce"] = losses["ce"] * float("nan")
            return logits, losses

    return "test_nan_after_20_steps"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg_values, tmp_path, nan_after_20_steps):
    values = {**tiny_cfg_values, "method": {"name": nan_after_20_steps}}
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, step 3: \{'ce': nan\}"):
        train(config_from_dict(values), quiet=True)
    state = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_refuses_a_different_config(tiny_cfg_values):
    values = {**tiny_cfg_values, "train": {**tiny_cfg_values["train"], "epochs": 1}}
    train(config_from_dict(values), quiet=True)
    changed = {**values, "train": {**values["train"], "lr": 1.0}}
    with pytest.raises(TrainingError, match=r"config differs from the checkpoint's in sections \['train'\]"):
        train(config_from_dict(changed), resume=True, quiet=True)


def test_ema_mixup_and_tensorboard_are_logged(tiny_cfg_values, tmp_path):
    values = tiny_cfg_values
    values["train"].update(epochs=1, ema=True, ema_decay=0.9, tensorboard=True)
    values["data"]["augment"] = {"mixup": 0.2, "cutmix": 1.0, "random_erasing": 0.25}
    summary = train(config_from_dict(values), quiet=True)
    rows = read_metrics(tmp_path / "runs" / "tiny")
    assert "val_ema_top1" in rows[0]
    assert summary["epochs"] == 1
    # the logged EMA accuracy is that of the averaged weights the checkpoint holds, recomputed here by hand
    state = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    student = {k.removeprefix("student."): v for k, v in state["model"].items()}
    assert state["ema"].keys() == student.keys()
    assert any(not torch.equal(state["ema"][k], student[k]) for k in student)  # an average, not a copy
    cfg = config_from_dict(values)
    data = build_data(cfg.data, seed=cfg.run.seed)

    def top1(weights):
        model = create_model(cfg.model.name, num_classes=10, in_chans=1, img_size=28, **cfg.model.kwargs)
        model.load_state_dict(weights)
        model.eval()
        images = torch.stack([data.val[i][0] for i in range(len(data.val))])
        with torch.no_grad():
            predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(1000)])
        return 100.0 * (predicted == data.val.targets).sum().item() / len(data.val)

    ema_top1, student_top1 = top1(state["ema"]), top1(student)
    assert float(rows[0]["val_ema_top1"]) == pytest.approx(ema_top1, abs=1e-6)
    assert float(rows[0]["val_top1"]) == pytest.approx(student_top1, abs=1e-6)
    assert ema_top1 != student_top1  # so the first check tells the EMA's score from the student's
    assert list((tmp_path / "runs" / "tiny" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_torch_compile_switch_trains_like_eager(tiny_cfg_values, tmp_path):
    values = tiny_cfg_values
    values["train"].update(epochs=1, max_steps_per_epoch=4)
    eager = train(config_from_dict(values), quiet=True)
    values["run"]["name"] = "compiled"
    values["train"]["compile"] = True
    compiled = train(config_from_dict(values), quiet=True)
    rows = [read_metrics(tmp_path / "runs" / name)[0] for name in ("tiny", "compiled")]
    assert float(rows[1]["train_ce"]) == pytest.approx(float(rows[0]["train_ce"]), rel=1e-3)
    assert compiled["last_top1"] == pytest.approx(eager["last_top1"], abs=0.5)
