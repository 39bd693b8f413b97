"""Build timm models by name and load or save their weights safely.

Every user-caused problem (unknown model name, bad constructor argument, missing or invalid
checkpoint file, mismatching weights, pretrained weights offline) raises :class:`ModelError` with a
message that names the bad value and what would be valid.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from ..errors import VitdistillError
from ..io import SAFETENSORS_ERRORS, read_safetensors, write_safetensors
from . import presets  # noqa: F401  (registers the vitdistill presets with timm)

__all__ = [
    "ModelError",
    "create_model",
    "load_checkpoint",
    "read_state_dict",
    "save_weights",
    "load_weights",
    "count_params",
]

# prefixes that wrappers add to parameter names: DDP / DataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# vitdistill training checkpoints store the Distiller's state: the student lives under this prefix
_STUDENT_PREFIX = "student."


class ModelError(VitdistillError, ValueError):
    """A user-facing model problem; the message names the bad value and what is valid."""


#: what ``torch.load(weights_only=True)`` raises on a corrupt or crafted file: random bytes can fail
#: anywhere inside the restricted unpickler, not only with UnpicklingError
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
                     ImportError, IndexError, KeyError, UnicodeDecodeError, zipfile.BadZipFile, OSError)

def _suggest(name: str, candidates: list[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:
        # substring matches help for partial names such as 'vit_tiny'
        close = [c for c in candidates if name.lower() in c.lower()][:n]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    if ":" in name:  # 'hf-hub:org/repo' and similar sources are resolved by timm itself
        return
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ModelError(
            f"unknown model '{name}'{_suggest(arch, timm.list_models())} "
            "(any name from timm.list_models() or a vitdistill preset: "
            f"{', '.join(presets.PRESET_NAMES)})"
        )


_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model, dropping img_size for models whose class does not take it (CNNs)."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        match = _UNEXPECTED_KWARG.search(str(e))
        if match is None:
            raise ModelError(f"could not build model '{name}' with arguments {kwargs}: {e}") from None
        bad = match.group(1)
        if bad == "img_size" and "img_size" in kwargs:
            rest = {k: v for k, v in kwargs.items() if k != "img_size"}
            return _build(name, pretrained, rest)
        raise ModelError(
            f"model '{name}' does not accept the argument '{bad}' (given {bad}={kwargs.get(bad)!r}); "
            "remove it from the model kwargs"
        ) from None


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model (or a vitdistill preset) by name.

    ``img_size`` is passed only to models that take it (ViT, CaiT, Swin); CNNs such as ResNet work
    at any size and do not. ``kwargs`` are timm constructor overrides (``depth``, ``embed_dim``,
    ``drop_path_rate``, ...). ``pretrained=True`` downloads timm's weights (network needed);
    ``checkpoint`` loads a local ``.safetensors`` / ``.pt`` / ``.pth`` file after building, strictly.
    """
    _check_name(name)
    overrides: dict[str, Any] = dict(kwargs)
    overrides["num_classes"] = num_classes
    overrides["in_chans"] = in_chans
    if img_size is not None:
        overrides["img_size"] = img_size
    if pretrained:
        arch = name.split(".", 1)[0]
        if ":" not in name and not timm.is_model_pretrained(name) and not timm.is_model_pretrained(arch):
            raise ModelError(
                f"model '{name}' has no pretrained weights in timm (the vitdistill presets never do); "
                "set pretrained: false and, to start from trained weights, point checkpoint: at a local "
                ".safetensors/.pt file"
            )
        try:
            model = _build(name, True, overrides)
        except ModelError:
            raise
        except Exception as e:  # network, hub and cache errors come in many types
            raise ModelError(
                f"could not load pretrained weights for '{name}': {type(e).__name__}: {str(e).rstrip('.')}. "
                "Pretrained weights need network access to the Hugging Face hub or the model's URL; "
                "offline, download them elsewhere and set pretrained: false with checkpoint: <local file>"
            ) from None
    else:
        try:
            model = _build(name, False, overrides)
        except ModelError:
            raise
        except (AssertionError, ValueError, RuntimeError) as e:
            raise ModelError(f"could not build model '{name}' with arguments {overrides}: {e}") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _is_safetensors_file(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    keys = list(state_dict)
    if any(k.startswith(_STUDENT_PREFIX) for k in keys):
        state_dict = {
            k[len(_STUDENT_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_STUDENT_PREFIX)
        }
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a weights-only ``torch.save`` file.

    Accepts a raw state_dict or a dict holding it under ``'model'`` or ``'state_dict'``; a vitdistill
    training checkpoint's ``'student.'`` prefix and DDP/compile prefixes are stripped. Pickles are
    loaded with ``weights_only=True``, so a file that would run code is refused, never executed.
    """
    p = Path(path)
    if not p.is_file():
        hint = "it is a folder" if p.is_dir() else "it does not exist"
        raise ModelError(f"checkpoint '{p}' cannot be read: {hint}")
    invalid = (
        f"checkpoint '{p}' is not a valid checkpoint: expected a .safetensors file or a .pt/.pth file "
        "written by torch.save holding a state_dict (or a dict with a 'model' or 'state_dict' entry)"
    )
    obj: Any
    if p.suffix == ".safetensors" or _is_safetensors_file(p):
        try:
            obj, _ = read_safetensors(p)
        except SAFETENSORS_ERRORS as e:
            raise ModelError(f"{invalid} ({type(e).__name__}: {e})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns about unusual pickle protocols before refusing them
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{invalid} ({type(e).__name__}: {detail})") from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{invalid} (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{invalid} (entries that are not tensors: {', '.join(map(str, bad[:5]))})")
    return _strip_prefix(dict(obj))


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a local weights file into ``model`` strictly (every key present, every shape equal)."""
    state_dict = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:5])}{more}")
        raise ModelError(
            f"checkpoint '{path}' does not fit model {type(model).__name__}: {'; '.join(parts)}. "
            "Check that the model name and kwargs (num_classes, in_chans, img_size, depth, ...) match "
            "those the checkpoint was trained with"
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def save_weights(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a model's state_dict (or a state_dict) to ``path`` as safetensors, atomically."""
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ModelError(f"safetensors metadata must map str to str; bad entries: {bad}")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    # independent contiguous CPU copies: safetensors refuses tensors that share memory
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    return write_safetensors(path, tensors, metadata)


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written by :func:`save_weights`: ``(state_dict, metadata)``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file '{p}' does not exist")
    try:
        return read_safetensors(p)
    except SAFETENSORS_ERRORS as e:
        raise ModelError(
            f"weights file '{p}' is not a valid safetensors file ({type(e).__name__}: {e})"
        ) from None


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
