"""Model-level SpectralKD analysis: per-layer spectra and intensity over many images, attention distance.

The pure number crunching lives in :mod:`.spectrum`; this module runs models over a loader (eval mode,
no autograd) and feeds it. Layers are the integer ``LayerTap`` indices (ViT/CaiT blocks, Swin stages,
ResNet stem + stages).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from timm.layers import Attention
from torch import Tensor, nn

from ..models.mhca import MHCAttention, attention_probs
from ..models.taps import LayerTap, layer_module_name, model_patch_grid, num_tappable_layers, place_tokens
from .spectrum import SpectrumAccumulator, average_attention_distance, normalized_depth

__all__ = ["analyze_layers", "attention_distances", "block_paths", "layer_table"]


def _images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


def _loader_size(loader: Iterable, max_images: int | None) -> int | None:
    n = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[attr-defined]
    if n is None:
        return max_images
    return n if max_images is None else min(n, max_images)


def _progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _EvalMode:
    """Eval mode for the block, the previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


# ----------------------------------------------------------------------------- spectra


def block_paths(model: nn.Module) -> list[str]:
    """Module paths of every transformer block in depth order: ``layers.i.blocks.j`` for Swin (the blocks
    inside its stages), ``blocks.i`` for ViT/DeiT/CaiT. For a ViT these are the same layers as the
    integer indices; for Swin they are finer than the stage outputs the indices give."""
    stages = getattr(model, "layers", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and all(hasattr(s, "blocks") for s in stages):
        return [f"layers.{i}.blocks.{j}" for i, stage in enumerate(stages) for j in range(len(stage.blocks))]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
        return [f"blocks.{i}" for i in range(len(blocks))]
    raise ValueError(f"{type(model).__name__} has no transformer blocks (no 'blocks' or Swin-style "
                     f"'layers.i.blocks'); analyse its layers by index instead")


def analyze_layers(
    model: nn.Module,
    loader: Iterable,
    max_images: int | None = 1000,
    layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    per_block: bool = False,
) -> dict[int, dict[str, Any]]:
    """Channel spectrum, intensity and spatial energy of each layer over up to ``max_images`` images.

    ``layers``: ``LayerTap`` indices (negative ones count from the end); default every tappable layer.
    ``per_block``: the layers are the model's transformer blocks instead (:func:`block_paths`; for Swin
    every block inside the stages), indexed by position in that list.
    Returns ``{layer (absolute index): {"spectrum", "intensity", "spatial_energy", "n_images", "depth",
    "module"}}`` in layer order, ``depth`` being the relative depth in [0, 1] among all the layers.
    ``device``: where the images go (default: the model's device; the model is not moved). Runs in
    eval mode under ``torch.inference_mode()``, with a tqdm bar when ``progress`` and stderr is a terminal.
    """
    if per_block:
        paths = block_paths(model)
    else:
        n = num_tappable_layers(model)
        if n == 0:
            raise ValueError(f"{type(model).__name__} has no indexable layers (no feature_info); cannot analyse it")
        paths = [layer_module_name(model, i) for i in range(n)]
    n_layers = len(paths)
    wanted = list(range(n_layers)) if layers is None else list(layers)
    for i in wanted:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ValueError(f"layer {i!r} is out of range for {type(model).__name__}: valid indices are "
                             f"0..{n_layers - 1} (or -{n_layers}..-1 from the end)")
    absolute = sorted({i % n_layers for i in wanted})
    tap = LayerTap(model, [paths[i] for i in absolute] if per_block else absolute)
    device = torch.device(device) if device is not None else _model_device(model)
    acc = SpectrumAccumulator(max_images)
    bar = _progress_bar(_loader_size(loader, max_images), f"analysing {type(model).__name__}", progress)
    try:
        with _EvalMode(model), torch.inference_mode():
            for batch in loader:
                images = _images(batch)
                left = acc.remaining(absolute[0])
                if left is not None:
                    if left == 0:
                        break
                    images = images[:left]
                _, maps = tap(images.to(device), need_logits=False)
                if per_block:
                    maps = {i: maps[paths[i]] for i in absolute}
                acc.update(maps)
                if bar is not None:
                    bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    result = acc.result()
    if not result:
        raise ValueError("the loader gave no images to analyse")
    depth = normalized_depth(n_layers)
    return {int(layer): {**result[layer], "depth": depth[int(layer)], "module": paths[layer]} for layer in absolute}


# ----------------------------------------------------------------------------- attention distance


def _talking_head_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """CaiT's talking-heads attention: the softmax over keys after the pre-softmax head mixing
    (``proj_l``), i.e. proper distributions (B, heads, N, N); the post-softmax ``proj_w`` mixing is left out."""
    b, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = qkv[0] * attn.scale, qkv[1]
    logits = attn.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return logits.softmax(dim=-1)


def _is_talking_head(attn: nn.Module) -> bool:
    return all(hasattr(attn, a) for a in ("qkv", "proj_l", "proj_w", "num_heads", "scale"))


def _probs_fn(attn: nn.Module):
    if isinstance(attn, Attention | MHCAttention):
        return attention_probs
    if _is_talking_head(attn):
        return _talking_head_probs
    return None


def _attention_blocks(model: nn.Module) -> list[nn.Module]:
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    attns = [getattr(b, "attn", None) for b in blocks] if isinstance(blocks, nn.Sequential | nn.ModuleList) else []
    if not attns or any(a is None or _probs_fn(a) is None for a in attns):
        hint = (" Swin's shifted-window attention is not supported" if hasattr(model, "layers") and "Swin" in name
                else "")
        raise ValueError(
            f"attention distance needs ViT-style blocks (model.blocks[i].attn a timm Attention, MHCAttention or "
            f"CaiT talking-heads attention); {name} has none.{hint}")
    return attns


def attention_distances(
    model: nn.Module,
    loader: Iterable,
    max_images: int | None = 1000,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Mean attention distance (patch units) per block and head over up to ``max_images`` images: (blocks, heads).

    For timm ViT-style models whose ``blocks[i].attn`` is a timm ``Attention``, an ``MHCAttention`` or
    CaiT's talking-heads attention (its patch blocks; the class-attention blocks are not counted).
    Each attention's input is caught with a forward pre-hook, its probabilities recomputed without
    dropout and reduced at once by ``average_attention_distance`` (prefix tokens dropped). Raises
    ``ValueError`` naming the model class for other models (Swin, CNNs).
    """
    attns = _attention_blocks(model)
    device = torch.device(device) if device is not None else _model_device(model)
    sums: list[Tensor | None] = [None] * len(attns)
    current: dict[str, Any] = {}

    def make_hook(i: int, attn: nn.Module):
        fn = _probs_fn(attn)

        def hook(_module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else kwargs["x"]
            grid, prefix = place_tokens(x.shape[1], int(getattr(model, "num_prefix_tokens", 0) or 0),
                                        model_patch_grid(model, current["images"].shape[-2:]), square_fallback=True)
            d = average_attention_distance(fn(attn, x), grid, prefix) * x.shape[0]
            sums[i] = d if sums[i] is None else sums[i] + d

        return hook

    handles = [a.register_forward_pre_hook(make_hook(i, a), with_kwargs=True) for i, a in enumerate(attns)]
    seen = 0
    bar = _progress_bar(_loader_size(loader, max_images), f"attention {type(model).__name__}", progress)
    try:
        with _EvalMode(model), torch.inference_mode():
            for batch in loader:
                images = _images(batch)
                if max_images is not None:
                    if seen >= max_images:
                        break
                    images = images[: max_images - seen]
                current["images"] = images
                model(images.to(device))
                seen += len(images)
                if bar is not None:
                    bar.update(len(images))
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    if seen == 0:
        raise ValueError("the loader gave no images for the attention distance")
    return torch.stack([s / seen for s in sums]).cpu().numpy()


def layer_table(stats: dict[Hashable, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{layer, depth, intensity, n_images, channels, spectrum}`` of :func:`analyze_layers` output."""
    return [{"layer": layer, "depth": s["depth"], "intensity": s["intensity"], "n_images": s["n_images"],
             "channels": int(s["spectrum"].numel()), "spectrum": s["spectrum"].tolist()}
            for layer, s in stats.items()]
