"""Training checkpoints: atomic writes, safe loading (never executes code: weights_only), and the trained
student rebuilt from a checkpoint or an exported weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import config_from_dict, config_to_dict
from ..errors import VitdistillError
from ..io import atomic_open
from ..models import load_weights
from ..models.build import TORCH_LOAD_ERRORS
from ..models.factory import build_model, model_metadata


class CheckpointError(VitdistillError, ValueError):
    """A checkpoint file is missing, corrupt, or not a vitdistill checkpoint."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint written by the trainer, on the CPU, with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{path}' is not a valid vitdistill checkpoint ({first})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"'{path}' is not a vitdistill training checkpoint (expected keys 'model' and 'config')")
    return state


def checkpoint_metadata(ckpt: dict[str, Any]) -> dict[str, str]:
    """The student's metadata (``models.model_metadata``) stored in a training checkpoint; checkpoints
    written before it was stored get it rebuilt from their config and the student's head."""
    if "meta" in ckpt:
        return dict(ckpt["meta"])
    heads = [v for k, v in ckpt["model"].items() if k.startswith("student.") and k.endswith(("head.weight", "fc.weight"))]
    if not heads:
        raise CheckpointError("cannot tell the number of classes from the checkpoint (no head.weight / fc.weight)")
    return model_metadata(config_from_dict(ckpt["config"]), int(heads[0].shape[0]))


def load_trained_model(path: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[nn.Module, dict[str, Any], dict[str, str], dict[str, Any] | None]:
    """Rebuild the student from a training checkpoint (.pt) or a ``.safetensors`` file written by the
    trainer or ``vitdistill export``.

    Returns the model, the data section to evaluate it on, its metadata (``models.model_metadata``) and the
    training checkpoint (None for ``.safetensors``).
    """
    path = Path(path)
    ckpt = None
    if path.suffix == ".safetensors":
        state, meta = load_weights(path)
        if "model" not in meta:
            raise CheckpointError(f"'{path}' has no vitdistill metadata (model); export it with `vitdistill export`")
        data = {"name": meta["dataset"], "in_chans": int(meta["in_chans"]), "img_size": int(meta["img_size"])}
    else:
        ckpt = load_checkpoint(path)
        meta = checkpoint_metadata(ckpt)
        state = {k[len("student."):]: v for k, v in ckpt["model"].items() if k.startswith("student.")}
        data = config_to_dict(config_from_dict(ckpt["config"]))["data"]
    mcfg = config_from_dict({"model": json.loads(meta["model"])}).model
    model = build_model(mcfg, int(meta["num_classes"]), int(meta["in_chans"]), int(meta["img_size"]))
    model.load_state_dict(state)
    return model.to(torch.device(device)), data, meta, ckpt
