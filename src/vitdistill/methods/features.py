"""Shared plumbing for methods that read intermediate layers: layer pairs, taps, aligners."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..losses import Aligner, aligned_mse_loss
from ..models import LayerTap


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects: from its patch embedding when it has one, else its timm cfg."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        return embed.proj.in_channels, *embed.img_size
    return tuple(model.pretrained_cfg["input_size"])


@torch.no_grad()
def probe_map_shapes(tap: LayerTap, model: nn.Module, shape: tuple[int, int, int]) -> dict[Any, tuple[int, ...]]:
    """Shapes (C, H, W) of the tapped maps, from one forward pass on a blank image."""
    was_training = model.training
    model.eval()
    try:
        _, maps = tap(torch.zeros(2, *shape, device=next(model.parameters()).device), need_logits=False)
    finally:
        model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in maps.items()}


def build_aligners(student: nn.Module, teacher: nn.Module, s_layers: list[int], t_layers: list[int]
                   ) -> tuple[LayerTap, LayerTap, nn.ModuleList]:
    """Taps on both models and one aligner per pair mapping the student map onto the teacher's shape."""
    s_tap, t_tap = LayerTap(student, s_layers), LayerTap(teacher, t_layers)
    shape = input_shape(student)
    s_shapes = probe_map_shapes(s_tap, student, shape)
    t_shapes = probe_map_shapes(t_tap, teacher, shape)
    aligners = nn.ModuleList(
        Aligner(s_shapes[s][0], t_shapes[t][0], s_shapes[s][1:], t_shapes[t][1:]) for s, t in zip(s_layers, t_layers))
    return s_tap, t_tap, aligners


def ordered(maps: dict[Any, Tensor], layers: list[Any]) -> list[Tensor]:
    return [maps[layer] for layer in layers]


def paired_alignment_loss(aligners: nn.ModuleList, s_maps: dict, t_maps: dict, s_layers: list[Any],
                          t_layers: list[Any], normalize: bool) -> Tensor:
    """``MSE(aligner(H_s), H_t)`` in float32 (``H_t`` standardised over channels when ``normalize``), mean over
    the layer pairs (unweighted)."""
    pairs = zip(aligners, ordered(s_maps, s_layers), ordered(t_maps, t_layers))
    return sum(aligned_mse_loss(aligner, s, t, normalize) for aligner, s, t in pairs) / len(aligners)
