"""Model presets, create_model, and safe weight loading/saving."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import timm
import torch
import torch.nn as nn

from vitdistill.models import (
    PRESET_NAMES,
    ModelError,
    count_params,
    create_model,
    load_weights,
    save_weights,
)


def _build(name: str = "vitd_tiny_patch4_28", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 1)
    return create_model(name, **kwargs).eval()


def _same_outputs(a: nn.Module, b: nn.Module, size: int = 28) -> bool:
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# ------------------------------------------------------------------------------------------ presets
def test_presets_are_registered_with_timm():
    assert set(PRESET_NAMES) <= set(timm.list_models())
    model = timm.create_model("vitd_tiny_patch4_28", pretrained=False, depth=2, embed_dim=64, num_heads=2)
    assert len(model.blocks) == 2 and model.embed_dim == 64
    assert not any(timm.is_model_pretrained(n) for n in PRESET_NAMES)


PARAM_RANGES = {
    "vitd_tiny_patch4_28": (1.0e6, 1.4e6),
    "vitd_tiny_patch4_28_distilled": (1.0e6, 1.4e6),
    "vitd_small_patch4_28": (4.0e6, 6.0e6),
    "caitd_small_patch4_28": (3.5e6, 6.0e6),
    "resnetd_small_28": (0.25e6, 0.4e6),
    "resnetd_tiny_28": (0.06e6, 0.1e6),
    "swind_tiny_28": (1.0e6, 1.5e6),
    "swind_tiny_32": (1.0e6, 1.5e6),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_param_counts_and_defaults(name):
    model = timm.create_model(name)
    low, high = PARAM_RANGES[name]
    assert low <= count_params(model) <= high
    size = 32 if name.endswith("_32") else 28
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 1, size, size))  # defaults: 1 channel, 10 classes
    assert out.shape == (2, 10)


def test_teachers_are_several_times_the_student():
    student = count_params(timm.create_model("vitd_tiny_patch4_28"))
    assert 3.5 <= count_params(timm.create_model("vitd_small_patch4_28")) / student <= 5.5
    assert 3.0 <= count_params(timm.create_model("caitd_small_patch4_28")) / student <= 5.5


def test_vit_presets_structure():
    vit = timm.create_model("vitd_tiny_patch4_28")
    assert len(vit.blocks) == 6 and vit.num_prefix_tokens == 1 and vit.global_pool == "token"
    assert tuple(vit.patch_embed.grid_size) == (7, 7)
    dist = timm.create_model("vitd_tiny_patch4_28_distilled")
    assert dist.num_prefix_tokens == 2 and isinstance(dist.head_dist, nn.Linear)
    cait = timm.create_model("caitd_small_patch4_28")
    assert len(cait.blocks) == 8 and len(cait.blocks_token_only) == 2


def test_resnet_small_stem_and_feature_info():
    model = timm.create_model("resnetd_small_28")
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert [f["reduction"] for f in model.feature_info] == [1, 1, 2, 4, 8]
    with torch.no_grad():
        feats = model.eval().forward_intermediates(torch.randn(2, 1, 28, 28), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [28, 28, 14, 7, 4]
    assert [f.shape[1] for f in feats] == [info["num_chs"] for info in model.feature_info]
    # overrides reach the timm ResNet constructor
    deeper = timm.create_model("resnetd_small_28", layers=(2, 2, 2, 2), channels=(32, 64, 128, 256))
    assert len(deeper.layer3) == 2 and deeper.conv1.out_channels == 32
    # features_only (timm's feature extraction) works with the corrected reductions
    fx = timm.create_model("resnetd_small_28", features_only=True, out_indices=(1, 2))
    assert fx.feature_info.reduction() == [1, 2]


def test_swin_presets_windows_fit_the_grids():
    for name, grids in [("swind_tiny_28", [14, 7, 4]), ("swind_tiny_32", [16, 8, 4])]:
        model = timm.create_model(name).eval()
        size = 32 if name.endswith("_32") else 28
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 1, size, size), intermediates_only=True)
        assert [f.shape[-1] for f in feats] == grids


# ------------------------------------------------------------------------------------- create_model
def test_create_model_passes_img_size_only_where_accepted():
    vit = _build(img_size=32)
    assert tuple(vit.patch_embed.grid_size) == (8, 8)
    resnet = _build("resnetd_small_28", img_size=32, in_chans=3, num_classes=7)  # CNN: img_size dropped
    with torch.no_grad():
        assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    plain = _build("resnet18", img_size=28)  # any timm model by name
    assert plain.fc.out_features == 10


def test_unknown_name_suggests_close_names():
    with pytest.raises(ModelError) as e:
        create_model("vitd_tiny_patch4_2", num_classes=10, in_chans=1)
    assert "vitd_tiny_patch4_28" in str(e.value) and "unknown model 'vitd_tiny_patch4_2'" in str(e.value)
    with pytest.raises(ModelError, match="resnet18"):
        create_model("resnet_18", num_classes=10, in_chans=1)


def test_bad_kwarg_is_named():
    with pytest.raises(ModelError, match="'not_a_kwarg'"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, not_a_kwarg=3)
    with pytest.raises(ModelError, match="'depth'"):
        create_model("resnetd_small_28", num_classes=10, in_chans=1, depth=3)
    with pytest.raises(ModelError, match="vitd_tiny_patch4_28"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, embed_dim=100, num_heads=3)


def test_pretrained_preset_is_refused_with_checkpoint_hint():
    with pytest.raises(ModelError) as e:
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, pretrained=True)
    assert "no pretrained weights" in str(e.value) and "checkpoint" in str(e.value)


def test_pretrained_offline_error_mentions_network_and_checkpoint(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("not reached")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError) as e:
        create_model("resnet18", num_classes=10, in_chans=3, pretrained=True)
    msg = str(e.value)
    assert "network" in msg and "checkpoint" in msg and "resnet18" in msg


# --------------------------------------------------------------------------------------- weights I/O
def test_safetensors_round_trip(tmp_path):
    model = _build()
    path = save_weights(model, tmp_path / "w.safetensors", {"epoch": "3", "model": "vitd_tiny_patch4_28"})
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temp file left behind
    state, meta = load_weights(path)
    assert meta == {"epoch": "3", "model": "vitd_tiny_patch4_28"}
    assert state.keys() == model.state_dict().keys()
    torch.manual_seed(123)  # different random init, then the checkpoint overwrites it
    loaded = create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=str(path))
    assert _same_outputs(model, loaded)


def test_resnet_round_trip_keeps_batchnorm_buffers(tmp_path):
    model = _build("resnetd_small_28").train()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28))  # move BN running stats away from their init
    save_weights(model, tmp_path / "r.safetensors")
    loaded = create_model(
        "resnetd_small_28", num_classes=10, in_chans=1, checkpoint=tmp_path / "r.safetensors"
    )
    assert torch.equal(loaded.bn1.running_mean, model.bn1.running_mean)
    assert _same_outputs(model, loaded)


def test_save_weights_rejects_bad_metadata_without_writing(tmp_path):
    with pytest.raises(ModelError, match="metadata"):
        save_weights(_build(), tmp_path / "w.safetensors", {"epoch": 3})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("layout", ["raw", "model", "state_dict", "student", "ddp"])
def test_pt_checkpoints_load_with_weights_only(tmp_path, layout):
    model = _build()
    state = model.state_dict()
    if layout == "raw":
        obj = state
    elif layout == "model":
        obj = {"model": state, "epoch": 4}
    elif layout == "state_dict":
        obj = {"state_dict": state}
    elif layout == "student":  # a vitdistill training checkpoint: the Distiller's state_dict
        distiller = {f"student.{k}": v for k, v in state.items()}
        distiller["aligners.0.weight"] = torch.zeros(3)
        distiller["teacher.fc.weight"] = torch.zeros(3)
        obj = {"model": distiller, "optimizer": {"lr": 0.1}, "epoch": 2}
    else:
        obj = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    loaded = create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=path)
    assert _same_outputs(model, loaded)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=tmp_path / "nope.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".bin"])
def test_random_bytes_are_not_a_checkpoint(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ModelError, match="not a valid checkpoint"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("model: vitd_tiny_patch4_28\nlr: 0.001\n")
    with pytest.raises(ModelError, match="not a valid checkpoint"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=path)


def test_pickle_of_non_tensors_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pt"
    torch.save({"model": {"blocks.0.weight": [1, 2, 3]}}, path)
    with pytest.raises(ModelError, match="not a valid checkpoint"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=path)


class _Exploit:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": exploit}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(ModelError, match="not a valid checkpoint"):
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, checkpoint=path)
    assert not marker.exists()


def test_key_and_shape_mismatch_are_listed(tmp_path):
    path = save_weights(_build(), tmp_path / "w.safetensors")
    with pytest.raises(ModelError) as e:
        create_model("vitd_tiny_patch4_28", num_classes=10, in_chans=1, depth=4, checkpoint=path)
    msg = str(e.value)
    assert "unexpected keys" in msg and "blocks.4." in msg and "depth" in msg
    with pytest.raises(ModelError) as e:
        create_model("vitd_tiny_patch4_28", num_classes=5, in_chans=1, checkpoint=path)
    assert "shape mismatches" in str(e.value) and "head.weight" in str(e.value)
    with pytest.raises(ModelError) as e:
        create_model("vitd_tiny_patch4_28_distilled", num_classes=10, in_chans=1, checkpoint=path)
    assert "missing keys" in str(e.value) and "dist_token" in str(e.value)


def test_count_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    assert count_params(model) == 3 * 4 + 4 + 4 * 2 + 2
    assert count_params(model, trainable_only=True) == 3 * 4 + 4 + 2
