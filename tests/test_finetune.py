"""Fine-tuning from trained students (model.init) and the digits downstream set."""

import pytest
import torch
import torch.nn.functional as F

from vitdistill.config import ConfigError, ModelConfig, config_from_dict
from vitdistill.data.datasets import _digits, digits_split
from vitdistill.engine.trainer import train
from vitdistill.models import ModelError, save_weights
from vitdistill.models.factory import build_model

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def test_the_digits_split_is_stratified_seeded_and_disjoint():
    train_set, test_set, classes = _digits()
    assert len(train_set) + len(test_set) == 1797 and classes == [str(i) for i in range(10)]
    labels = torch.cat([train_set.targets, test_set.targets])
    tr, te = digits_split(labels)
    assert not set(tr) & set(te) and sorted(tr + te) == list(range(1797))
    for c in range(10):
        n = int((labels == c).sum())
        assert int((labels[te] == c).sum()) == round(0.2 * n)  # every class in the test split at its share
    assert digits_split(labels) == (tr, te) and digits_split(labels, seed=1)[1] != te
    assert train_set.images.dtype == torch.uint8 and int(train_set.images.max()) == 255


def _trained(tmp_path, name="vitd_tiny_patch4_28", classes=10, img_size=28):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, kwargs=TINY), classes, 1, img_size)
    path = tmp_path / f"{name}.safetensors"
    save_weights(model, path)
    return model, path


@pytest.mark.parametrize("name", ["vitd_tiny_patch4_28", "vitd_tiny_patch4_28_distilled"])
def test_init_loads_every_weight_but_the_head(tmp_path, name):
    source, path = _trained(tmp_path, name)
    torch.manual_seed(1)
    model = build_model(ModelConfig(name=name, kwargs=TINY, init=str(path)), 3, 1, 28)
    heads = {k for k in model.state_dict() if k.startswith(("head.", "head_dist."))}
    assert heads == ({"head.weight", "head.bias"} | ({"head_dist.weight", "head_dist.bias"} if "distilled" in name else set()))
    for key, value in model.state_dict().items():
        if key in heads:
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, source.state_dict()[key]), key
    same_classes = build_model(ModelConfig(name=name, kwargs=TINY, init=str(path)), 10, 1, 28)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same_classes.state_dict().items())


def test_position_embeddings_are_resampled_to_a_new_image_size(tmp_path):
    source, path = _trained(tmp_path)
    model = build_model(ModelConfig(name="vitd_tiny_patch4_28", kwargs=TINY, init=str(path)), 10, 1, 36)
    old, new = source.pos_embed.detach(), model.pos_embed.detach()
    prefix = model.num_prefix_tokens
    assert new.shape == (1, prefix + 81, 32)
    assert torch.equal(new[:, :prefix], old[:, :prefix])  # class token's embedding kept as it was
    grid = old[:, prefix:].reshape(1, 7, 7, 32).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(9, 9), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(new[:, prefix:], reference.permute(0, 2, 3, 1).reshape(1, 81, 32), atol=1e-5)
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_a_distilled_student_fine_tunes_on_digits_from_a_run_folder(tmp_path):
    values = {"run": {"name": "pre", "output_dir": str(tmp_path / "runs"), "seed": 0},
              "data": {"fraction": 0.01, "batch_size": 32},
              "model": {"name": "vitd_tiny_patch4_28_distilled", "kwargs": TINY},
              "train": {"epochs": 1, "lr": 1e-3, "warmup_epochs": 0, "log_interval": 1000}}
    train(config_from_dict(values), quiet=True)
    tuned = {**values, "run": {**values["run"], "name": "digits"},
             "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 400},
             "model": {**values["model"], "init": str(tmp_path / "runs" / "pre")},
             "train": {**values["train"], "epochs": 5, "lr": 3e-3}}
    summary = train(config_from_dict(tuned), quiet=True)
    # 10 classes: chance is 10%; this tiny model reached 40 here after 5 short epochs
    assert summary["train_images"] == 1438 and summary["last_top1"] > 30.0


def test_init_names_bad_sources(tmp_path):
    _, path = _trained(tmp_path)
    with pytest.raises(ModelError, match=r"blocks.1.* \(missing\)|does not fit"):
        build_model(ModelConfig(name="vitd_tiny_patch4_28", kwargs={**TINY, "depth": 3}, init=str(path)), 10, 1, 28)
    with pytest.raises(ModelError, match="is a folder without last.safetensors or last.pt"):
        build_model(ModelConfig(name="vitd_tiny_patch4_28", kwargs=TINY, init=str(tmp_path)), 10, 1, 28)
    with pytest.raises(ConfigError, match="give one"):
        config_from_dict({"model": {"init": str(path), "checkpoint": str(path)}})
