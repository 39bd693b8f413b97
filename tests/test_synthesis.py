"""DF-DearKD image synthesis: the inversion losses against brute-force references, the optimisation of a
batch, and the `synthesize` job (outputs, exact resume, use as a train split, clear errors)."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vitdistill import synthesis
from vitdistill.cli import main
from vitdistill.config import REPO_ROOT as REPO
from vitdistill.config import ConfigError, SynthesisConfig, load_config
from vitdistill.data import DataError, build_data
from vitdistill.losses.inversion import (
    BatchNormStatistics,
    boundary_preserving_loss,
    image_l2,
    intra_divergence_loss,
    logit_margin_loss,
    total_variation_l2,
)
from vitdistill.models import create_model, load_checkpoint, save_weights
from vitdistill.synthesis import run_synthesis, synthesis_labels, synthesize_batch


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return net.eval()


def test_batchnorm_statistics_loss_matches_reference():
    net = _bn_net()
    stats = BatchNormStatistics(net, first_multiplier=10.0)
    x = torch.randn(5, 1, 8, 8)
    net(x)
    inputs = [net[0](x), net[:4](x)]  # what each BN layer sees
    expected = 0.0
    for weight, bn, h in zip((10.0, 1.0), (net[1], net[4]), inputs):
        per_channel = h.transpose(0, 1).reshape(h.shape[1], -1)
        mean, var = per_channel.mean(1), ((per_channel - per_channel.mean(1, keepdim=True)) ** 2).mean(1)
        expected += weight * (((mean - bn.running_mean) ** 2).sum().sqrt() + ((var - bn.running_var) ** 2).sum().sqrt())
    torch.testing.assert_close(stats.loss(), expected)
    stats.remove()
    assert not net[1]._forward_hooks


def test_batchnorm_statistics_zero_when_batch_matches_running_stats():
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 5, 5)
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    stats = BatchNormStatistics(bn)
    bn(x)
    assert stats.loss().item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BatchNormStatistics(nn.Linear(2, 2))


def test_total_variation_and_l2_match_loops():
    x = torch.randn(2, 2, 4, 5)
    ref = 0.0
    for img in x:
        dh = sum((img[c, i + 1, j] - img[c, i, j]) ** 2 for c in range(2) for i in range(3) for j in range(5))
        dw = sum((img[c, i, j + 1] - img[c, i, j]) ** 2 for c in range(2) for i in range(4) for j in range(4))
        ref += (dh.sqrt() + dw.sqrt()) / 2
    torch.testing.assert_close(total_variation_l2(x), ref)
    assert total_variation_l2(torch.full((3, 1, 6, 6), 0.7)).item() == 0.0
    torch.testing.assert_close(image_l2(x), (x[0].pow(2).sum().sqrt() + x[1].pow(2).sum().sqrt()) / 2)


def _dist(f, i, j):
    a, b = f[i] / f[i].norm(), f[j] / f[j].norm()
    return float(((a - b) ** 2).sum())


def test_intra_divergence_matches_pairwise_reference_and_ignores_order_and_scale():
    torch.manual_seed(1)
    f, y = torch.randn(7, 5), torch.tensor([0, 0, 1, 1, 1, 2, 0])
    pairs = [(i, j) for i, j in itertools.permutations(range(7), 2) if y[i] == y[j]]
    ref = -sum(_dist(f, i, j) for i, j in pairs) / len(pairs)
    assert intra_divergence_loss(f, y).item() == pytest.approx(ref, rel=1e-5)
    perm = torch.randperm(7)
    assert intra_divergence_loss(f[perm] * 3.0, y[perm]).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="two images of the same class"):
        intra_divergence_loss(f[:3], torch.tensor([0, 1, 2]))


def test_boundary_preserving_matches_reference_and_vanishes_for_separated_classes():
    torch.manual_seed(2)
    f, y, margin = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 2]), 0.3
    terms = []
    for i in range(6):
        same = [j for j in range(6) if j != i and y[j] == y[i]]
        other = [k for k in range(6) if y[k] != y[i]]
        if same:
            terms.append(max(0.0, max(_dist(f, i, j) for j in same) - min(_dist(f, i, k) for k in other) + margin))
    assert boundary_preserving_loss(f, y, margin).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # two tight clusters on opposite axes: every class spread is far inside the other class's distance
    tight = torch.tensor([[1.0, 0.01], [1.0, -0.01], [-1.0, 0.01], [-1.0, -0.01]])
    assert boundary_preserving_loss(tight, torch.tensor([0, 0, 1, 1]), margin).item() == 0.0


def test_logit_margin_loss_matches_reference():
    z, y = torch.tensor([[3.0, 1.0, 0.0], [0.5, 0.2, 0.4], [0.0, 2.0, 2.5]]), torch.tensor([0, 0, 1])
    # margins z_y - max_other: 2.0, 0.1, -0.5; hinge at 1.0: 0, 0.9, 1.5
    assert logit_margin_loss(z, y, 1.0).item() == pytest.approx((0 + 0.9 + 1.5) / 3)


def test_synthesis_labels_are_balanced_and_every_batch_holds_whole_groups():
    labels = synthesis_labels(num_classes=5, images_per_class=6, per_class=3)
    assert len(labels) == 30 and torch.bincount(labels).tolist() == [6] * 5
    for batch in labels.split(6):  # batch_size 6 = 2 classes x 3
        assert sorted(torch.bincount(batch, minlength=5).tolist()) == [0, 0, 0, 3, 3]


def _teacher(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnetd_small_28", num_classes=num_classes, in_chans=1).eval().requires_grad_(False)


def test_synthesize_batch_lowers_the_loss_stays_in_range_and_is_seeded():
    teacher, labels = _teacher(), torch.tensor([0, 0, 3, 3])
    load_checkpoint(teacher, REPO / "weights" / "resnetd_small_28_fmnist.safetensors")  # a teacher that responds
    mean, std = (0.3,), (0.4,)
    syn = SynthesisConfig(per_class=2, batch_size=4, iterations=1, warmup_iterations=0, diversity_weight=1.0,
                          boundary_weight=1.0)
    _, first = synthesize_batch(teacher, labels, syn, (1, 28, 28), mean, std, seed=5)
    syn.iterations = 40
    x, last = synthesize_batch(teacher, labels, syn, (1, 28, 28), mean, std, seed=5)
    assert x.shape == (4, 1, 28, 28)
    assert last["ce"] < 0.5 * first["ce"] and last["loss"] < first["loss"]
    assert x.min() >= (0 - 0.3) / 0.4 - 1e-6 and x.max() <= (1 - 0.3) / 0.4 + 1e-6
    again, _ = synthesize_batch(teacher, labels, syn, (1, 28, 28), mean, std, seed=5)
    assert torch.equal(x, again)
    assert not any(m._forward_hooks for m in teacher.modules())
    with pytest.raises(ValueError, match="frozen teacher in eval mode"):
        synthesize_batch(teacher.train(), labels, syn, (1, 28, 28), mean, std, seed=5)


@pytest.fixture
def synth_cfg(tmp_path):
    weights = tmp_path / "teacher.safetensors"
    save_weights(_teacher(), weights)
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "run.name=syn", "data.name=random",
                 f"teacher.checkpoint={weights}", "synthesis.images_per_class=4", "synthesis.per_class=2",
                 "synthesis.batch_size=8", "synthesis.iterations=3", "synthesis.warmup_iterations=1",
                 "train.device=cpu"]
    return lambda *extra: load_config("configs/fashion_mnist/synthesize.yaml", overrides + list(extra))


def _teacher_hits_on_stored_set(cfg, path) -> torch.Tensor:
    """Whether the teacher classifies each stored image as its label, measured here: the uint8 set read back
    through the data pipeline (``data.synthetic``, normalised as for training) and the teacher rebuilt from
    its file."""
    cfg.data.synthetic = str(path)
    train_split = build_data(cfg.data, seed=0).train
    stored = load_file(str(path))
    assert torch.equal(train_split.targets, stored["labels"])
    images = torch.stack([train_split[i][0] for i in range(len(train_split))])
    teacher = create_model(cfg.teacher.name, num_classes=10, in_chans=1, img_size=28)
    load_checkpoint(teacher, cfg.teacher.checkpoint)
    with torch.no_grad():
        return teacher.eval()(images).argmax(1) == stored["labels"]


def test_synthesize_writes_the_set_and_a_resumed_job_equals_an_uninterrupted_one(synth_cfg, tmp_path, monkeypatch):
    # the trained teacher: after 3 iterations it gets some of each batch right and some wrong (a random
    # teacher calls nearly everything one class, which any set of images would score alike)
    trained = f"teacher.checkpoint={REPO / 'weights' / 'resnetd_small_28_fmnist.safetensors'}"
    summary = run_synthesis(synth_cfg(trained), quiet=True)
    run = tmp_path / "runs" / "syn"
    full = load_file(str(run / "images.safetensors"))
    assert full["images"].dtype == torch.uint8 and full["images"].shape == (40, 1, 28, 28)
    assert torch.bincount(full["labels"]).tolist() == [4] * 10
    assert summary["images"] == 40 and 0 < summary["class_diversity"] <= 4
    assert {"samples.png", "synthesis.csv", "summary.json", "config.yaml"} <= {p.name for p in run.iterdir()}
    rows = (run / "synthesis.csv").read_text().splitlines()
    assert len(rows) == 1 + 5  # header + one line per batch of 8
    # the recorded top-1, per batch and overall, is the teacher's on the stored (uint8) images, to the image
    hits = _teacher_hits_on_stored_set(synth_cfg(trained), run / "images.safetensors").float()
    per_batch = [100.0 * float(h.mean()) for h in hits.split(8)]
    assert 0 < min(per_batch) < max(per_batch) < 100  # varied, so misplaced images or labels would show
    column = rows[0].split(",").index("teacher_top1")
    assert [float(r.split(",")[column]) for r in rows[1:]] == pytest.approx(per_batch, abs=1e-6)
    top1 = 100.0 * float(hits.mean())
    assert summary["teacher_top1_on_synthetic"] == pytest.approx(top1, abs=1e-6)
    assert json.loads((run / "summary.json").read_text())["teacher_top1_on_synthetic"] == pytest.approx(top1, abs=1e-6)
    # an interrupted job: two shards never written; the rerun makes only those, identically
    for shard in ("batch_00001.safetensors", "batch_00004.safetensors"):
        (run / "shards" / shard).unlink()
    (run / "images.safetensors").unlink()
    remade = []
    original = synthesis.synthesize_batch
    monkeypatch.setattr(synthesis, "synthesize_batch",
                        lambda teacher, labels, *a, **k: remade.append(labels.tolist()) or original(teacher, labels, *a, **k))
    run_synthesis(synth_cfg(trained), quiet=True)
    assert remade == [full["labels"][8:16].tolist(), full["labels"][32:40].tolist()]  # batches 1 and 4 only
    resumed = load_file(str(run / "images.safetensors"))
    assert torch.equal(resumed["images"], full["images"]) and torch.equal(resumed["labels"], full["labels"])
    # shards made under another config are never mixed in
    with pytest.raises(ConfigError, match="made with another synthesis config"):
        run_synthesis(synth_cfg(trained, "synthesis.lr=0.05"), quiet=True)


def test_synthesis_noise_differs_per_batch_and_per_seed_and_repeats_for_the_same_config(synth_cfg, tmp_path):
    # 40 images in two batches of 20 that hold the same labels (2 of each class): only their noise differs
    def images(name, *extra):
        run_synthesis(synth_cfg("synthesis.batch_size=20", f"run.name={name}", *extra), quiet=True)
        return load_file(str(tmp_path / "runs" / name / "images.safetensors"))

    a, again = images("a"), images("again")
    assert torch.equal(a["labels"][:20], a["labels"][20:])
    assert not torch.equal(a["images"][:20], a["images"][20:])  # each batch starts from its own noise
    # the same config in a fresh folder: the same images, byte for byte (the file's header is not: safetensors
    # writes its metadata keys in hash order)
    assert torch.equal(again["images"], a["images"]) and torch.equal(again["labels"], a["labels"])
    other = images("other", "run.seed=1")
    assert torch.equal(other["labels"], a["labels"])
    for mine in (other["images"][:20], other["images"][20:]):  # another run seed shares no batch's noise
        assert not torch.equal(mine, a["images"][:20]) and not torch.equal(mine, a["images"][20:])


def test_synthetic_set_is_a_train_split_and_trains(synth_cfg, tmp_path):
    run_synthesis(synth_cfg(), quiet=True)
    path = tmp_path / "runs" / "syn" / "images.safetensors"
    cfg = load_config("configs/fashion_mnist/df_dearkd.yaml", [
        "data.name=random", f"data.synthetic={path}", f"run.output_dir={tmp_path / 'runs'}", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.warmup_epochs=0", "data.batch_size=8", "train.device=cpu",
        f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}"])
    data = build_data(cfg.data, seed=0)
    assert len(data.train) == 40 and len(data.val) == 32  # synthetic train, the dataset's own test split
    from vitdistill.engine.trainer import train

    summary = train(cfg, quiet=True)
    assert summary["train_images"] == 40
    cfg.data.name = "fashion-mnist"
    with pytest.raises(DataError, match="synthesised for dataset 'random'"):
        build_data(cfg.data, seed=0)
    path.unlink()  # evaluating the student needs the test split only, not the synthetic set
    assert main(["eval", str(tmp_path / "runs" / "df_dearkd" / "last.pt"), "--device", "cpu"]) == 0


def test_synthetic_train_split_reads_no_real_training_image(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from vitdistill.data import datasets

    path = tmp_path / "set.safetensors"
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    save_file({"images": images, "labels": torch.arange(20) % 10}, str(path), metadata={"dataset": "fashion-mnist"})
    real = datasets.load_fashion_mnist

    def test_split_only(folder, split):
        assert split == "test", "the real training split was read"
        return real(folder, split)

    monkeypatch.setattr(datasets, "load_fashion_mnist", test_split_only)
    cfg = load_config(None, [f"data.synthetic={path}"]).data
    data = build_data(cfg, seed=0)
    assert len(data.train) == 20 and len(data.val) == 10000
    cfg.img_size = 32
    with pytest.raises(DataError, match=r"must be uint8 \(N, 1, 32, 32\)"):
        build_data(cfg, seed=0)


def test_last_batch_with_one_class_is_refused_before_any_work(synth_cfg):
    # 40 images in batches of 38: the last batch holds 2 images, one group of per_class=2, one class
    with pytest.raises(ConfigError, match="the last batch of the 40 images would hold one class"):
        run_synthesis(synth_cfg("synthesis.batch_size=38"), quiet=True)
    run_synthesis(synth_cfg("synthesis.batch_size=36"), quiet=True)  # the last batch: 4 images, 2 classes
    # without the feature boundary one class per batch is fine, and a logit boundary needs no pairs
    load_config(None, ["synthesis.per_class=1", "synthesis.boundary=logit", "synthesis.boundary_weight=1",
                       "synthesis.diversity_weight=0"])


@pytest.mark.parametrize("override, message", [
    ("synthesis.batch_size=7", "synthesis.batch_size=7 must be a multiple of synthesis.per_class=2"),
    ("synthesis.boundary=edge", "synthesis.boundary='edge' must be feature, logit or none"),
    ("synthesis.iterations=0", "synthesis.iterations=0 must be at least 1"),
])
def test_bad_synthesis_values_are_named(synth_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        synth_cfg(override)


def test_cli_synthesize_without_teacher_weights_says_what_is_missing(capsys, tmp_path):
    rc = main(["synthesize", "configs/fashion_mnist/synthesize.yaml", "teacher.checkpoint=null",
               f"run.output_dir={tmp_path}"])
    assert rc == 2
    assert "synthesize needs a trained teacher" in capsys.readouterr().err


def test_cli_synthesize_prints_the_summary(synth_cfg, capsys, tmp_path):
    weights = tmp_path / "teacher.safetensors"
    rc = main(["synthesize", "configs/fashion_mnist/synthesize.yaml", "--quiet", "data.name=random",
               f"teacher.checkpoint={weights}", f"run.output_dir={tmp_path / 'cli'}", "synthesis.images_per_class=2",
               "synthesis.per_class=2", "synthesis.batch_size=20", "synthesis.iterations=2",
               "synthesis.warmup_iterations=0", "train.device=cpu"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["images"] == 20
