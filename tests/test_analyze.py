"""Model analysis and `vitdistill analyze`: per-layer spectra, report files, closeness, pairs, attention distance."""

import csv
from collections import Counter

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from vitdistill.analysis import analyze_layers, attention_distances, channel_spectrum, select_layer_pairs
from vitdistill.analysis.report import AnalysisError, analyze_models
from vitdistill.cli import main
from vitdistill.config import load_config
from vitdistill.data import TensorImageDataset
from vitdistill.data.subsets import balanced_indices, balanced_loader
from vitdistill.models import LayerTap, create_model, num_tappable_layers

TINY = {
    "vit": ("vitd_tiny_patch4_28", {"depth": 3, "embed_dim": 32, "num_heads": 2}, 28),
    "cait": ("caitd_small_patch4_28", {"depth": 4, "embed_dim": 32, "num_heads": 2}, 28),
    "swin": ("swind_tiny_32", {"embed_dim": 16, "depths": (1, 1, 1), "num_heads": (1, 2, 4)}, 32),
    "resnet": ("resnetd_small_28", {"channels": [8, 16, 16, 32], "layers": [1, 1, 1, 1]}, 28),
}


def tiny(kind, seed=0):
    name, kwargs, size = TINY[kind]
    torch.manual_seed(seed)
    extra = {} if kind == "resnet" else {"img_size": size}
    return create_model(name, num_classes=10, in_chans=1, **extra, **kwargs)


def loader(size=28, n=24, batch_size=10):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 10),
                      batch_size=batch_size)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_one_spectrum_and_intensity_per_layer(kind):
    model = tiny(kind)
    size = TINY[kind][2]
    stats = analyze_layers(model, loader(size), max_images=20, progress=False)
    n = num_tappable_layers(model)
    assert list(stats) == list(range(n)) and n >= 3
    assert [s["n_images"] for s in stats.values()] == [20] * n
    # equal to the reference formula on all 20 images in one batch
    images = torch.cat([x for x, _ in loader(size)])[:20]
    with torch.no_grad():
        _, maps = LayerTap(model.eval(), list(range(n)))(images, need_logits=False)
    for i, s in stats.items():
        ref = channel_spectrum(maps[i]).double()
        assert s["spectrum"].shape == (maps[i].shape[1],)
        assert torch.allclose(s["spectrum"], ref, rtol=1e-5, atol=1e-8)
        assert s["intensity"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert [s["depth"] for s in stats.values()] == pytest.approx(np.linspace(0, 1, n).tolist())


def test_swin_per_block_analysis_reads_every_block_inside_the_stages():
    model = tiny("swin")
    model.layers[1].blocks.append(type(model.layers[1].blocks[0])(  # a stage with two blocks
        dim=32, input_resolution=model.layers[1].blocks[0].input_resolution, num_heads=2, window_size=4,
        shift_size=2))
    stats = analyze_layers(model, loader(32), max_images=20, progress=False, per_block=True)
    paths = ["layers.0.blocks.0", "layers.1.blocks.0", "layers.1.blocks.1", "layers.2.blocks.0"]
    assert [s["module"] for s in stats.values()] == paths
    assert [s["depth"] for s in stats.values()] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # reference: forward hooks on the blocks, NHWC outputs permuted to NCHW
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_hook(lambda m, i, o, p=p: outputs.setdefault(p, o)) for p in paths]
    images = torch.cat([x for x, _ in loader(32)])[:20]
    with torch.no_grad():
        model.eval()(images)
    for h in handles:
        h.remove()
    for i, path in enumerate(paths):
        ref = channel_spectrum(outputs[path].permute(0, 3, 1, 2)).double()
        assert torch.allclose(stats[i]["spectrum"], ref, rtol=1e-5, atol=1e-8)
    # the stage view (integer indices) is the last block of each stage
    stages = analyze_layers(model, loader(32), max_images=20, progress=False)
    assert [s["module"] for s in stages.values()] == ["layers.0", "layers.1", "layers.2"]
    assert stages[1]["intensity"] == pytest.approx(stats[2]["intensity"], rel=1e-6)


def test_per_block_needs_transformer_blocks():
    with pytest.raises(ValueError, match="ResNet has no transformer blocks"):
        analyze_layers(tiny("resnet"), loader(28), max_images=4, progress=False, per_block=True)


def test_balanced_selection_is_seeded_and_balanced():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    a, b = balanced_indices(targets, 30, seed=4), balanced_indices(targets, 30, seed=4)
    assert a == b and len(set(a)) == 30
    assert Counter(int(targets[i]) for i in a) == {0: 10, 1: 10, 2: 10}
    assert balanced_indices(targets, 30, seed=5) != a
    ds = TensorImageDataset(torch.zeros(100, 1, 8, 8, dtype=torch.uint8), targets)
    got = torch.cat([y for _, y in balanced_loader(ds, 12, seed=4, batch_size=5)])
    assert got.tolist() == [int(targets[i]) for i in balanced_indices(targets, 12, seed=4)]


def test_attention_distances_shape_and_uniform_reference():
    vit, cait = tiny("vit"), tiny("cait")
    for model in (vit, cait):
        d = attention_distances(model, loader(), max_images=12)
        assert d.shape == (len(model.blocks), model.blocks[0].attn.num_heads)
        assert np.isfinite(d).all() and (d > 0).all()
    # zero q/k: uniform attention over the patches -> the mean pairwise distance on the 7x7 grid
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight[: 2 * 32].zero_()
            blk.attn.qkv.bias[: 2 * 32].zero_()
    pos = torch.stack(torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij"), -1).reshape(-1, 2)
    expected = torch.cdist(pos, pos).mean().item()
    assert attention_distances(vit, loader(), max_images=12) == pytest.approx(np.full((3, 2), expected), rel=1e-6)
    with pytest.raises(ValueError, match="SwinTransformer"):
        attention_distances(tiny("swin"), loader(32))
    with pytest.raises(ValueError, match="SmallStemResNet"):
        attention_distances(tiny("resnet"), loader())


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_closeness_and_pairs(tmp_path):
    teacher, student = tiny("cait"), tiny("vit")
    result = analyze_models({"teacher": teacher, "student": student, "teacher copy": teacher}, loader(), tmp_path,
                            max_images=20, spectra_layers=[0, -1], attention=True, pairs=True, pair_first=1,
                            pair_last=1, progress=False, verbose=False)
    for label, model, stem in (("teacher", teacher, "teacher"), ("student", student, "student"),
                               ("teacher copy", teacher, "teacher_copy")):
        rows = read_rows(tmp_path / f"{stem}_layers.csv")
        assert len(rows) == num_tappable_layers(model) == len(result["models"][label]["intensity"])
        assert [float(r["intensity"]) for r in rows] == pytest.approx(result["models"][label]["intensity"], rel=1e-6)
        spectrum = [float(rows[0][f"s_{k}"]) for k in range(int(rows[0]["channels"]))]
        assert np.mean(spectrum) == pytest.approx(float(rows[0]["intensity"]), rel=1e-5)
    for png in ("intensity.png", "teacher_spectra.png", "student_spectra.png", "attention_distance.png"):
        img = mpimg.imread(tmp_path / png)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50

    assert result["closeness"]["teacher copy"]["pearson"] == pytest.approx(1.0)
    assert result["closeness"]["teacher copy"]["mad"] == pytest.approx(0.0, abs=1e-12)
    c = result["closeness"]["student"]
    assert -1 <= c["pearson"] <= 1 and c["mad"] > 0

    summary = (tmp_path / "summary.md").read_text()
    top = result["models"]["student"]["top_layers"]
    assert len(top) == 3 and f"layer {top[0]['layer']} (depth" in summary
    assert f"pearson {c['pearson']:.4f}" in summary and "## Proposed layer pairs" in summary

    snippet = yaml.safe_load((tmp_path / "pairs.yaml").read_text())
    params = snippet["method"]["params"]
    assert len(params["student_layers"]) == len(params["teacher_layers"]) == 2
    expected = select_layer_pairs(result["models"]["teacher"]["intensity"], 3, 1, 1)
    assert list(zip(params["student_layers"], params["teacher_layers"])) == expected
    assert load_config(tmp_path / "pairs.yaml").method.params == params

    with pytest.raises(AnalysisError, match=r"spectra layer 5 is out of range for 'student': valid indices are 0\.\.2"):
        analyze_models({"student": student}, loader(), tmp_path / "bad", spectra_layers=[5], progress=False)
    with pytest.raises(AnalysisError, match="pairs need two models"):
        analyze_models({"student": student}, loader(), tmp_path / "bad", pairs=True, progress=False)


def test_cli_analyze_with_random_weight_models(tmp_path, capsys):
    out = tmp_path / "analysis"
    rc = main(["analyze", "name:caitd_small_patch4_28", "name:vitd_tiny_patch4_28", "--labels", "cait", "vit",
               "--images", "40", "--batch-size", "20", "--out", str(out), "--pairs", "--attention", "--quiet"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"cait_layers.csv", "vit_layers.csv", "cait_spectra.png", "vit_spectra.png", "intensity.png",
            "attention_distance.png", "summary.md", "pairs.yaml"} <= names
    assert len(read_rows(out / "cait_layers.csv")) == 8 and len(read_rows(out / "vit_layers.csv")) == 6
    assert int(read_rows(out / "vit_layers.csv")[0]["n_images"]) == 40
    printed = capsys.readouterr().out
    params = yaml.safe_load((out / "pairs.yaml").read_text())["method"]["params"]
    assert f"student_layers: {params['student_layers']}".replace("'", "") in printed
    assert "40 class-balanced images (seed 0) of the fashion-mnist test split" in (out / "summary.md").read_text()

    rc = main(["analyze", "name:vitd_tiny_patch4_28", "--spectra-layers", "9", "--images", "10", "--out", str(out)])
    assert rc == 2 and "valid indices are 0..5" in capsys.readouterr().err
    rc = main(["analyze", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert rc == 2 and "neither a file, a run folder" in capsys.readouterr().err


def test_cli_analyze_per_block_swin(tmp_path, capsys):
    out = tmp_path / "swin"
    rc = main(["analyze", "name:swind_tiny_28", "--per-block", "--images", "20", "--out", str(out), "--quiet"])
    assert rc == 0
    rows = read_rows(out / "swind_tiny_28_layers.csv")
    assert [r["module"] for r in rows] == [f"layers.{i}.blocks.{j}" for i in range(3) for j in range(2)]
    assert "| 5 | layers.2.blocks.1 |" in (out / "summary.md").read_text()
    rc = main(["analyze", "name:swind_tiny_28", "name:vitd_tiny_patch4_28", "--per-block", "--pairs",
               "--images", "4", "--out", str(out)])
    assert rc == 2 and "analyse without per-block" in capsys.readouterr().err
