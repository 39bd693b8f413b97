"""Models from their config sections, and the metadata that rebuilds a student from a bare weights file."""

from __future__ import annotations

import dataclasses
import json

from torch import nn

from ..config import Config, ModelConfig, TeacherConfig, resolve_path
from .build import ModelError, create_model, load_checkpoint
from .finetune import init_from_trained
from .mhca import apply_mhca

__all__ = ["build_model", "model_metadata"]


def build_model(mcfg: ModelConfig | TeacherConfig, num_classes: int, in_chans: int, img_size: int,
                verbose: bool = False) -> nn.Module:
    """A model from its config section: timm by name, MHCA where asked, then local weights
    (``verbose``: say what ``model.init`` loaded)."""
    model = create_model(mcfg.name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                         pretrained=mcfg.pretrained, **mcfg.kwargs)
    mhca = getattr(mcfg, "mhca", None)
    if mhca is not None and mhca.blocks:
        try:
            apply_mhca(model, mhca.blocks, mhca.locality_strength, mhca.pos_drop)
        except (ValueError, TypeError) as e:
            raise ModelError(f"model.mhca.blocks={mhca.blocks} for '{mcfg.name}': {e}") from None
    if mcfg.checkpoint:
        load_checkpoint(model, resolve_path(mcfg.checkpoint))
    if getattr(mcfg, "init", None):
        report = init_from_trained(model, resolve_path(mcfg.init))
        if verbose:
            print(f"model.init: {len(report['loaded'])} tensors from '{mcfg.init}'; fresh: {report['reinitialised'] or 'none'}"
                  f"; resampled: {report['resampled'] or 'none'}", flush=True)
    return model


def model_metadata(cfg: Config, num_classes: int) -> dict[str, str]:
    """What `export`/`eval` need to rebuild the student from a bare safetensors file."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("checkpoint", "pretrained", "init")}
    return {"model": json.dumps(model), "num_classes": str(num_classes), "in_chans": str(cfg.data.in_chans),
            "img_size": str(cfg.data.img_size), "dataset": cfg.data.name}
