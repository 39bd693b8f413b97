"""Start a student from trained weights (``model.init``): every tensor but the classifier head(s), the position
embedding resampled when the patch grid changes (docs/methods.md §3.7)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .build import ModelError, read_state_dict

__all__ = ["head_keys", "init_from_trained", "trained_state_dict"]


def trained_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The student weights of a run folder (its ``last.safetensors``, else ``last.pt``), a training checkpoint
    (``.pt``: the ``student.`` entries) or a weights file (``.safetensors`` / ``.pt`` state dict)."""
    p = Path(path)
    if p.is_dir():
        found = [p / name for name in ("last.safetensors", "last.pt") if (p / name).is_file()]
        if not found:
            raise ModelError(f"model.init='{p}' is a folder without last.safetensors or last.pt (not a finished run?)")
        p = found[0]
    if not p.is_file():
        raise ModelError(f"model.init='{p}' does not exist (give a run folder, last.pt or a .safetensors file)")
    state = read_state_dict(p)
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return student or state


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier(s) (``get_classifier()``: one head, or a distilled model's two)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = heads if isinstance(heads, tuple | list) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return {f"{name}.{k}" for name, module in model.named_modules() if id(module) in ids
            for k in module.state_dict()}


def _resample_pos_embed(model: nn.Module, posemb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old, new = posemb.shape[1] - prefix, target.shape[1] - prefix
    old_side, new_side = math.isqrt(old), math.isqrt(new)
    if old_side ** 2 != old or new_side ** 2 != new:
        raise ModelError(f"model.init: cannot resample a position embedding of {old} patches to {new} (not square grids)")
    return resample_abs_pos_embed(posemb, [new_side, new_side], [old_side, old_side], num_prefix_tokens=prefix)


def init_from_trained(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load ``path``'s student weights into ``model``; heads whose shape differs (another class count) keep their
    fresh initialisation, a position embedding of another grid is resampled (timm's bicubic resampling); any
    other missing, unexpected or mis-shaped tensor is an error. Returns what was loaded, re-initialised and
    resampled."""
    source = trained_state_dict(path)
    own = model.state_dict()
    heads = head_keys(model)
    loaded, resampled, fresh, problems = {}, [], [], []
    for key, value in own.items():
        if key not in source:
            (fresh if key in heads else problems).append(key if key in heads else f"{key} (missing)")
        elif source[key].shape == value.shape:
            loaded[key] = source[key]
        elif key in heads:
            fresh.append(key)
        elif key == "pos_embed":
            loaded[key] = _resample_pos_embed(model, source[key], value)
            resampled.append(key)
        else:
            problems.append(f"{key} ({tuple(source[key].shape)} in the file, {tuple(value.shape)} here)")
    problems += [f"{k} (unexpected)" for k in source if k not in own]
    if problems:
        raise ModelError(f"model.init='{path}' does not fit {type(model).__name__}: {', '.join(problems[:5])}"
                         f"{' ...' if len(problems) > 5 else ''}; the model name and kwargs must be the trained ones")
    model.load_state_dict({**own, **loaded}, strict=True)
    return {"loaded": sorted(loaded), "reinitialised": sorted(fresh), "resampled": resampled}
