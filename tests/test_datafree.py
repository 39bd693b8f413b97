"""Online data-free training: the adversarial term, the synthesisers, the image bank, resumption, and that no
real training image is read."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch

from test_trainer import read_metrics
from vitdistill.config import ConfigError, SynthesisConfig, TeacherConfig, config_from_dict
from vitdistill.data import datasets, find_fashion_mnist, load_synthetic
from vitdistill.engine import load_checkpoint
from vitdistill.engine.online import OnlineDataFree
from vitdistill.engine.trainer import train
from vitdistill.io import read_safetensors, write_safetensors
from vitdistill.losses.inversion import adversarial_divergence, js_divergence
from vitdistill.methods import kd
from vitdistill.models.factory import build_model
from vitdistill.synthesizers import GeneratorSynthesizer, InversionObjective, PixelSynthesizer, round_labels

TEACHER = "weights/resnetd_small_28_fmnist.safetensors"
MEAN, STD = (0.2860,), (0.3530,)


def _js_reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    def softmax(z):
        e = np.exp(z / t - (z / t).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p, q = softmax(a), softmax(b)
    m = (p + q) / 2
    return 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)


def test_adversarial_term_is_zero_on_agreement_and_grows_with_disagreement():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    assert adversarial_divergence(t, t.clone(), 2.0, agree_only=False).abs().item() < 1e-7
    noise = torch.randn(16, 10, generator=g, dtype=torch.float64)
    values = [adversarial_divergence(t, t + s * noise, 1.0, agree_only=False).item() for s in (0.1, 0.5, 2.0, 8.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] <= math.log(2)
    s = t + 2.0 * noise
    np.testing.assert_allclose(js_divergence(t, s, 1.7).numpy(), _js_reference(t.numpy(), s.numpy(), 1.7), rtol=2e-5)  # float32 inside
    # agree_only: rows whose top classes differ do not count
    agree = (t.argmax(1) == s.argmax(1)).numpy()
    assert 0 < agree.sum() < len(agree)
    expected = (_js_reference(t.numpy(), s.numpy(), 1.0) * agree).mean()
    assert adversarial_divergence(t, s, 1.0, agree_only=True).item() == pytest.approx(expected, rel=2e-5)


def _teacher() -> torch.nn.Module:
    cfg = TeacherConfig(name="resnetd_small_28", checkpoint=TEACHER)
    return build_model(cfg, 10, 1, 28).eval().requires_grad_(False)


def _syn() -> SynthesisConfig:
    return SynthesisConfig(per_class=4, batch_size=16, bn_weight=0.1, tv_weight=0.05, diversity_weight=1.0,
                           boundary_weight=1.0, warmup_iterations=0)


def _generator(seed: int) -> GeneratorSynthesizer:
    return GeneratorSynthesizer(10, (1, 28, 28), MEAN, STD, steps=3, lr=1e-3, latent_dim=16, width=8, seed=seed,
                                images_per_round=16)


def test_generator_images_are_valid_pixels_seeded_and_leave_both_models_alone():
    teacher = _teacher()
    student = build_model(TeacherConfig(name="vitd_tiny_patch4_28", kwargs={"depth": 1, "embed_dim": 32}), 10, 1, 28)
    student.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in [*teacher.state_dict().items(), *student.state_dict().items()]}
    labels = round_labels(10, 16, 4, 0)

    def run(seed: int, round_seed: int) -> torch.Tensor:
        with InversionObjective(teacher, _syn(), adversarial_weight=1.0) as objective:
            return _generator(seed).synthesize(objective, labels, round_seed, student)[0]

    a, b, c, d = run(0, 7), run(0, 7), run(1, 7), run(0, 8)
    lo, hi = (0 - MEAN[0]) / STD[0], (1 - MEAN[0]) / STD[0]
    assert a.shape == (16, 1, 28, 28) and a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    after = [*teacher.state_dict().items(), *student.state_dict().items()]
    assert all(torch.equal(before[k], v) for k, v in after)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_generator_adds_images_per_round_fresh_draws_per_round():
    teacher = _teacher()
    gen = GeneratorSynthesizer(10, (1, 28, 28), MEAN, STD, steps=2, lr=1e-3, latent_dim=16, width=8, seed=0,
                               images_per_round=48)
    labels = round_labels(10, 16, 4, 0)
    with InversionObjective(teacher, _syn()) as objective:
        x, y, _ = gen.synthesize(objective, labels, 0)
    assert x.shape == (48, 1, 28, 28) and y.shape == (48,)
    assert torch.equal(torch.bincount(y, minlength=10)[:4], torch.full((4,), 12))


def test_pixel_synthesis_warm_starts_from_the_previous_batch():
    teacher = _teacher()
    labels = round_labels(10, 16, 4, 0)
    cold = PixelSynthesizer((1, 28, 28), MEAN, STD, _syn(), steps=2, warm_start=False)
    warm = PixelSynthesizer((1, 28, 28), MEAN, STD, _syn(), steps=2, warm_start=True)
    with InversionObjective(teacher, _syn()) as objective:
        first = warm.synthesize(objective, labels, 0)[0]
        cold.synthesize(objective, labels, 0)
        second_warm = warm.synthesize(objective, labels, 1)[0]
        second_cold = cold.synthesize(objective, labels, 1)[0]
    # two steps move pixels little: a warm start stays near the previous batch, a cold one does not
    assert (second_warm - first).abs().mean() < 0.5 * (second_cold - first).abs().mean()


@pytest.fixture
def online_values(tmp_path):
    return {
        "run": {"name": "online", "output_dir": str(tmp_path / "runs"), "seed": 5},
        "data": {"name": "fashion-mnist", "batch_size": 16, "eval_batch_size": 1000,
                 "augment": {"crop_padding": 2, "hflip": 0.5}},
        "model": {"name": "vitd_tiny_patch4_28", "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
        "teacher": {"name": "resnetd_small_28", "checkpoint": TEACHER},
        "method": {"name": "kd", "params": {"alpha": 0.5, "kd_mode": "soft"}},
        "synthesis": {"per_class": 4, "batch_size": 16, "bn_weight": 0.1, "tv_weight": 0.05,
                      "diversity_weight": 1.0, "boundary_weight": 1.0, "warmup_iterations": 0},
        "datafree": {"online": True, "rounds_per_epoch": 2, "steps_per_round": 2, "synthesis_steps": 2, "first_round_steps": 3,
                     "latent_dim": 16, "generator_width": 8, "samples_every": 1, "images_per_round": 32},
        "train": {"epochs": 3, "lr": 2e-3, "warmup_epochs": 0, "log_interval": 1000},
    }


def _rounds(run_dir):
    with open(run_dir / "rounds.csv") as f:
        return [{k: v for k, v in row.items() if k != "synthesis_s"} for row in csv.DictReader(f)]


def _bank(run_dir):
    return [read_safetensors(p)[0] for p in sorted((run_dir / "bank").glob("round_*.safetensors"))]


@pytest.mark.parametrize("synthesizer", ["generator", "pixel"])
def test_killed_online_run_resumes_to_the_same_bank_and_metrics(online_values, tmp_path, killed_run, synthesizer):
    values = {**online_values, "datafree": {**online_values["datafree"], "synthesizer": synthesizer,
                                            "images_per_round": 32 if synthesizer == "generator" else 16}}
    full = train(config_from_dict({**values, "run": {**values["run"], "name": "full"}}), quiet=True)
    cfg = config_from_dict({**values, "run": {**values["run"], "name": "killed"}})
    killed_run(cfg, kd.KD, 6)  # in epoch 2, after its first round
    killed = tmp_path / "runs" / "killed"
    assert load_checkpoint(killed / "last.pt")["online"]["rounds"] == 2
    assert len(_bank(killed)) == 3  # a shard made after the checkpoint: resumption makes it again
    resumed = train(cfg, resume=True, quiet=True)

    a, b = _bank(tmp_path / "runs" / "full"), _bank(killed)
    assert len(a) == len(b) == 6
    assert all(torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert read_metrics(killed) == read_metrics(tmp_path / "runs" / "full")
    assert _rounds(killed) == _rounds(tmp_path / "runs" / "full") and len(_rounds(killed)) == 6
    assert resumed["last_top1"] == full["last_top1"] and full["train_images"] == len(a) * len(a[0]["labels"])
    exported = read_safetensors(killed / "bank" / "images.safetensors")[0]
    assert torch.equal(exported["images"], torch.cat([x["images"] for x in a]))
    reused = load_synthetic(config_from_dict({"data": {"synthetic": str(killed / "bank" / "images.safetensors")}}).data, 10)
    assert len(reused) == full["train_images"]  # the bank is a train split for another run


def test_online_run_reads_no_training_image_and_keeps_the_teacher_frozen(online_values, tmp_path, monkeypatch):
    """Only the two test files present; the teacher is checked at every forward."""
    folder = tmp_path / "test-only"
    folder.mkdir()
    for path in find_fashion_mnist().iterdir():
        if path.name.startswith("t10k"):
            shutil.copy(path, folder / path.name)
    states, in_synthesis, step_calls = [], [False], []
    original = torch.nn.Module.__call__

    def watch(module, *args, **kwargs):
        if module is teacher_ref.get("t"):
            states.append((module.training, any(p.requires_grad for p in module.parameters())))
            step_calls.extend([] if in_synthesis[0] else [1])
        return original(module, *args, **kwargs)

    synthesize_round = OnlineDataFree.synthesize_round

    def flagged_round(self, round_index):
        in_synthesis[0] = True
        try:
            synthesize_round(self, round_index)
        finally:
            in_synthesis[0] = False

    teacher_ref = {}
    from vitdistill.engine import trainer as trainer_module

    build = trainer_module.build_models

    def build_and_watch(*args):
        student, teacher = build(*args)
        teacher_ref["t"] = teacher
        teacher_ref["before"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        return student, teacher

    monkeypatch.setattr(trainer_module, "build_models", build_and_watch)
    monkeypatch.setattr(torch.nn.Module, "__call__", watch)
    monkeypatch.setattr(OnlineDataFree, "synthesize_round", flagged_round)
    values = {**online_values, "data": {**online_values["data"], "root": str(folder), "download": False},
              "train": {**online_values["train"], "epochs": 1}}
    summary = train(config_from_dict(values), quiet=True)
    # the relabelling and the KD term read one teacher forward per student step (2 rounds x 2 steps)
    assert summary["last_top1"] is not None and len(step_calls) == 4 and len(states) > 4
    assert all(s == (False, False) for s in states)
    after = teacher_ref["t"].state_dict()
    assert all(torch.equal(teacher_ref["before"][k], v) for k, v in after.items())


def test_online_run_without_any_real_image_when_evaluation_is_off(online_values, tmp_path, monkeypatch):
    def no_files(*args, **kwargs):
        raise AssertionError("a Fashion-MNIST file was read")

    monkeypatch.setattr(datasets, "load_fashion_mnist", no_files)
    monkeypatch.setattr(datasets, "find_fashion_mnist", no_files)
    values = {**online_values, "train": {**online_values["train"], "epochs": 1, "eval_every": 0}}
    summary = train(config_from_dict(values), quiet=True)
    assert summary["best_top1"] is None and summary["last_top1"] is None
    assert (tmp_path / "runs" / "online" / "last.safetensors").is_file()


def test_offline_synthetic_set_trains_with_only_the_test_files(tmp_path):
    """The fixed DF-DearKD path: `data.synthetic` with only the t10k files on disk."""
    folder = tmp_path / "test-only"
    folder.mkdir()
    for path in find_fashion_mnist().iterdir():
        if path.name.startswith("t10k"):
            shutil.copy(path, folder / path.name)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    write_safetensors(tmp_path / "set.safetensors", {"images": images, "labels": torch.arange(64) % 10},
                      {"dataset": "fashion-mnist", "in_chans": "1", "img_size": "28"})
    values = {"run": {"name": "offline", "output_dir": str(tmp_path / "runs")},
              "data": {"name": "fashion-mnist", "root": str(folder), "download": False,
                       "synthetic": str(tmp_path / "set.safetensors"), "batch_size": 32, "eval_batch_size": 2000},
              "model": {"name": "vitd_tiny_patch4_28", "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
              "train": {"epochs": 1, "warmup_epochs": 0}}
    assert train(config_from_dict(values), quiet=True)["last_top1"] is not None


@pytest.mark.parametrize("override, message", [
    ({"synthesizer": "gan"}, "datafree.synthesizer='gan' must be generator or pixel"),
    ({"targets": "soft"}, "datafree.targets='soft' must be teacher or labels"),
    ({"bank_size": 4}, "datafree.bank_size=4 must be null or at least data.batch_size=16"),
    ({"images_per_round": 8}, "datafree.images_per_round=8 must be a multiple of synthesis.batch_size=16"),
])
def test_bad_datafree_values_are_named(online_values, override, message):
    values = {**online_values, "datafree": {**online_values["datafree"], **override}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config_from_dict(values)


def test_online_runs_refuse_replayed_views_and_teacher_caches(online_values, tmp_path):
    with pytest.raises(ConfigError, match="data.replay=true replays views of a real training split"):
        config_from_dict({**online_values, "data": {**online_values["data"], "replay": True}})
    with pytest.raises(ConfigError, match="teacher.cache=.* needs teacher.name and a real training split"):
        config_from_dict({**online_values, "teacher": {**online_values["teacher"], "cache": str(tmp_path)}})
