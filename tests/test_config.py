from pathlib import Path

import pytest
import torch

from vitdistill.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from vitdistill.methods import build_method, get_method
from vitdistill.models.factory import build_model


def test_defaults_round_trip(tmp_path):
    cfg = config_from_dict({})
    save_config(cfg, tmp_path / "c.yaml")
    assert config_to_dict(load_config(tmp_path / "c.yaml")) == config_to_dict(cfg)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'epochs'"):
        config_from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        config_from_dict({"trian": {}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": {"fraction": 1.5}}, r"data.fraction=1.5 must be in \(0, 1\]"),
        ({"train": {"epochs": "ten"}}, r"train.epochs: expected an integer, got 'ten'"),
        ({"train": {"amp_dtype": "fp8"}}, r"train.amp_dtype='fp8' must be bfloat16 or float16"),
        ({"data": {"in_chans": 2}}, r"data.in_chans=2 must be 1 or 3"),
        ({"train": {"device": "tpu"}}, r"train.device='tpu'"),
        ({"data": {"augment": {"hflip": 2}}}, r"data.augment.hflip=2.0 must be a probability"),
    ],
)
def test_bad_values_name_value_and_valid_range(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_dotted_overrides_and_number_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string; we accept it as a number
    cfg = load_config(path, ["train.epochs=5", "method.params.alpha=0.5", "data.augment.mixup=0.2", "teacher.name=null"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 5
    assert cfg.method.params == {"alpha": 0.5}
    assert cfg.data.augment.mixup == pytest.approx(0.2)
    assert cfg.teacher.name is None


def test_override_errors():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
        load_config(None, ["train.epochz=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    tagged = tmp_path / "tagged.yaml"  # executable YAML tags are refused by safe_load
    tagged.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tagged)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(SHIPPED) >= 10


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_config_loads_and_builds_its_method(path):
    """Every shipped config parses, its method params are typed and in range, and the method builds on
    its own student and teacher. The models live on the meta device (shapes without values, so the
    ImageNet-size teachers cost no time): every check of layers, heads and map shapes still runs."""
    cfg = load_config(path)
    if cfg.method.name == "none" and not cfg.method.params:
        return  # teacher and synthesis configs train the model alone: nothing more to build
    cfg.model.checkpoint = cfg.teacher.checkpoint = None
    d = cfg.data
    with torch.device("meta"):
        student = build_model(cfg.model, 10, d.in_chans, d.img_size)
        teacher = build_model(cfg.teacher, 10, d.in_chans, d.img_size) if cfg.teacher.name else None
        distiller = build_method(cfg.method.name, cfg.method.params, student, teacher, epochs=cfg.train.epochs)
    assert isinstance(distiller.params, get_method(cfg.method.name).Params)
