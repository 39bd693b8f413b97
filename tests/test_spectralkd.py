"""SpectralKD: the loss terms against independent references, auto pairs, validation, a real training step."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitdistill.analysis import analyze_layers, select_layer_pairs
from vitdistill.config import ConfigError, DataConfig, config_from_dict
from vitdistill.data import build_data
from vitdistill.data.subsets import balanced_loader
from vitdistill.engine import load_checkpoint
from vitdistill.engine.trainer import train
from vitdistill.losses import soft_kd_loss, spatial_mse_loss, spectral_alignment_loss
from vitdistill.methods import MethodError, build_method
from vitdistill.models import LayerTap, create_model

STUDENT = {"name": "vitd_tiny_patch4_28", "kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2}}
TEACHER = {"name": "caitd_small_patch4_28", "kwargs": {"depth": 6, "embed_dim": 48, "num_heads": 2}}
PAIRS = {"student_layers": [0, 1, 3], "teacher_layers": [0, 4, 5]}


def models(seed=0):
    torch.manual_seed(seed)
    student = create_model(STUDENT["name"], num_classes=10, in_chans=1, img_size=28, **STUDENT["kwargs"])
    teacher = create_model(TEACHER["name"], num_classes=10, in_chans=1, img_size=28, **TEACHER["kwargs"])
    return student, teacher


def method(params, label_smoothing=0.1, seed=0):
    student, teacher = models(seed)
    m = build_method("spectralkd", params, student, teacher, label_smoothing=label_smoothing)
    return m.eval()  # deterministic student forward (no drop-path) so references can be recomputed


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_losses_match_independent_references():
    x, y = batch()
    m = method({**PAIRS, "alpha": 0.7, "temperature": 2.0, "fft_weight": 0.3})
    logits, losses = m.forward_train(x, y)
    assert set(losses) == {"ce", "kd", "fft"}
    with torch.no_grad():
        s_logits, t_logits = m.student(x), m.teacher(x)
        _, s_maps = LayerTap(m.student, PAIRS["student_layers"])(x, need_logits=False)
        _, t_maps = LayerTap(m.teacher, PAIRS["teacher_layers"])(x, need_logits=False)
    assert torch.allclose(logits, s_logits, atol=1e-6)
    ce = F.cross_entropy(s_logits, y, label_smoothing=0.1)
    kd = soft_kd_loss(s_logits, t_logits, 2.0)
    fft = spectral_alignment_loss([s_maps[i] for i in PAIRS["student_layers"]],
                                  [t_maps[i] for i in PAIRS["teacher_layers"]])
    assert torch.allclose(losses["ce"], 0.3 * ce, atol=1e-6)
    assert torch.allclose(losses["kd"], 0.7 * kd, atol=1e-6)
    assert torch.allclose(losses["fft"], 0.3 * fft, rtol=1e-5)
    assert losses["kd"] > 0 and losses["fft"] > 0  # so the comparisons above can fail

    spatial = method({**PAIRS, "alpha": 0.7, "temperature": 2.0, "fft_weight": 0.3, "feature_loss": "spatial"})
    _, s_losses = spatial.forward_train(x, y)
    assert set(s_losses) == {"ce", "kd", "feature"}
    ref = spatial_mse_loss([s_maps[i] for i in PAIRS["student_layers"]], [t_maps[i] for i in PAIRS["teacher_layers"]])
    assert torch.allclose(s_losses["feature"], 0.3 * ref, rtol=1e-5)
    assert not torch.allclose(s_losses["feature"], losses["fft"])


def test_no_kd_no_fft_is_label_smoothed_ce_and_hard_mode_uses_argmax():
    x, y = batch()
    m = method({**PAIRS, "alpha": 0.0, "fft_weight": 0.0})
    logits, losses = m.forward_train(x, y)
    total = sum(losses.values())
    assert torch.allclose(total, F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)
    assert losses["kd"] == 0 and losses["fft"] == 0

    hard = method({**PAIRS, "alpha": 1.0, "kd_mode": "hard", "fft_weight": 0.0})
    logits, losses = hard.forward_train(x, y)
    with torch.no_grad():
        t_top = hard.teacher(x).argmax(1)
    assert torch.allclose(losses["kd"], F.cross_entropy(logits, t_top), atol=1e-6)
    assert losses["ce"] == 0


def test_teacher_gets_no_gradients_and_student_does():
    x, y = batch()
    m = method({**PAIRS, "fft_weight": 1.0})
    m.train()
    _, losses = m(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(p.grad is not None for p in m.student.parameters() if p.requires_grad)
    assert [list(mod.parameters()) for mod in m.trainable_modules()] == [list(m.student.parameters())]
    # the feature term alone reaches the student's first block
    m.zero_grad()
    only_fft = method({**PAIRS, "alpha": 0.0, "fft_weight": 1.0})
    _, losses = only_fft.forward_train(x, y)
    losses["fft"].backward()
    assert only_fft.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_params_name_the_value_and_what_is_valid():
    student, teacher = models()
    with pytest.raises(MethodError, match=r"student_layers=\[0, 7\].*valid indices are 0\.\.3"):
        build_method("spectralkd", {"student_layers": [0, 7], "teacher_layers": [0, 1]}, student, teacher)
    with pytest.raises(MethodError, match=r"teacher_layers=\[0, 9\].*valid indices are 0\.\.5"):
        build_method("spectralkd", {"student_layers": [0, 1], "teacher_layers": [0, 9]}, student, teacher)
    with pytest.raises(ConfigError, match=r"method.params.feature_loss: expected one of fft, spatial, got 'dct'"):
        build_method("spectralkd", {**PAIRS, "feature_loss": "dct"}, student, teacher)
    with pytest.raises(ConfigError, match=r"method.params.alpha=1.5 must be in \[0, 1\]"):
        build_method("spectralkd", {**PAIRS, "alpha": 1.5}, student, teacher)
    with pytest.raises(ConfigError, match=r"method.params.fft_weight=-0.1 must be >= 0"):
        build_method("spectralkd", {**PAIRS, "fft_weight": -0.1}, student, teacher)
    with pytest.raises(ConfigError, match="set both to 'auto'"):
        build_method("spectralkd", {"student_layers": "auto", "teacher_layers": [0, 1]}, student, teacher)
    with pytest.raises(ConfigError, match="same length"):
        build_method("spectralkd", {"student_layers": [0, 1], "teacher_layers": [0]}, student, teacher)
    with pytest.raises(MethodError, match=r"auto_first=3, auto_last=2 for a 4-layer student"):
        build_method("spectralkd", {"auto_first": 3, "auto_last": 2}, student, teacher)


@pytest.fixture(scope="module")
def small_train_set():
    return build_data(DataConfig(fraction=0.01), seed=0).train  # 600 real Fashion-MNIST images


def test_auto_pairs_are_valid_deterministic_and_follow_the_teacher_intensity(small_train_set, capsys):
    params = {"auto_images": 60, "auto_first": 2, "auto_last": 1}
    a, b = method(params), method(params)
    assert a.pairs == [] and a.s_tap is None
    with pytest.raises(MethodError, match="prepare"):
        a.forward_train(*batch())
    rng = torch.get_rng_state()
    a.prepare(small_train_set, seed=5)
    assert torch.equal(rng, torch.get_rng_state())  # the training RNG stream is untouched
    b.prepare(small_train_set, seed=5)
    assert a.pairs == b.pairs and len(a.pairs) == 3
    assert all(0 <= s < 4 and 0 <= t < 6 for s, t in a.pairs)
    assert [s for s, _ in a.pairs] == [0, 1, 3]  # first with first, last with last
    out = capsys.readouterr().out
    assert out.count("spectralkd: auto layer pairs") == 2 and str(a.s_layers) in out

    # the same choice from the analysis API on the same images
    stats = analyze_layers(a.teacher, balanced_loader(small_train_set, 60, 5, batch_size=60), max_images=60,
                           progress=False)
    assert a.pairs == select_layer_pairs([stats[i]["intensity"] for i in range(6)], 4, 2, 1)
    _, losses = a.forward_train(*batch())
    assert set(losses) == {"ce", "kd", "fft"} and math.isfinite(losses["fft"].item())


def test_training_steps_through_the_trainer(tmp_path):
    values = {
        "run": {"name": "skd", "output_dir": str(tmp_path / "runs"), "seed": 2},
        "data": {"fraction": 0.01, "batch_size": 16, "eval_batch_size": 1000},
        "model": STUDENT,
        "teacher": {**TEACHER, "checkpoint": None},
        "method": {"name": "spectralkd", "params": {"student_layers": "auto", "teacher_layers": "auto",
                                                     "auto_images": 40}},
        "train": {"epochs": 1, "lr": 1e-3, "warmup_epochs": 0, "label_smoothing": 0.1,
                  "max_steps_per_epoch": 3, "log_interval": 1000},
    }
    summary = train(config_from_dict(values), quiet=True)
    state = load_checkpoint(Path(summary["run"]) / "last.pt")
    assert state["step"] == 3
    row = state["history"][0]
    assert {"train_ce", "train_kd", "train_fft"} <= set(row)
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("train_ce", "train_kd", "train_fft"))
    assert not any(k.startswith("teacher.") for k in state["model"])  # the teacher stays out of the checkpoint
