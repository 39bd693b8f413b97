"""DearKD's early hidden alignment: aligners and the normalised-MSE loss (docs/methods.md §1.2).

A trainable :class:`Aligner` maps a student token map to a CNN teacher map's shape, which is compared
with the teacher map standardised over channels at every location.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Aligner", "normalize_teacher_map", "hidden_alignment_loss"]


def _pair(value: Sequence[int] | int, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    pair = tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{what} must be two positive integers (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


class Aligner(nn.Module):
    """Maps a student token map (B, Cs, Hs, Ws) to the teacher map's shape (B, Ct, Ht, Wt).

    The kind depends on the two grids (docs/methods.md §1.2):

    * ``conv1x1``: same grid; a 1x1 convolution (channel projection).
    * ``deconv``: the teacher grid is finer by integer factors ``(fh, fw)`` (e.g. 7x7 -> 14x14); a
      transposed convolution with kernel = stride = ``(fh, fw)``, which upsamples and projects
      channels in one layer (each student token emits an fh x fw patch of teacher positions).
    * ``upsample_conv``: the teacher grid is finer but not by an integer factor (7x7 -> 10x10);
      bilinear upsampling (``align_corners=False``) followed by a 1x1 convolution.
    * ``pool_conv``: the teacher grid is coarser (7x7 -> 4x4) on both axes; adaptive average pooling
      followed by a 1x1 convolution.
    * ``resize_conv``: finer on one axis and coarser on the other; bilinear resize + 1x1 convolution.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        student_grid: Sequence[int] | int,
        teacher_grid: Sequence[int] | int,
    ) -> None:
        super().__init__()
        for name, c in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"{name} must be a positive integer, got {c!r}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.student_grid = _pair(student_grid, "student_grid")
        self.teacher_grid = _pair(teacher_grid, "teacher_grid")
        (hs, ws), (ht, wt) = self.student_grid, self.teacher_grid

        self.resample: nn.Module | None = None
        if (hs, ws) == (ht, wt):
            self.kind = "conv1x1"
            self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        elif ht >= hs and wt >= ws and ht % hs == 0 and wt % ws == 0:
            self.kind = "deconv"
            factor = (ht // hs, wt // ws)
            self.proj = nn.ConvTranspose2d(student_channels, teacher_channels, kernel_size=factor, stride=factor)
        elif ht >= hs and wt >= ws:
            self.kind = "upsample_conv"
            self.resample = nn.Upsample(size=(ht, wt), mode="bilinear", align_corners=False)
            self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        elif ht <= hs and wt <= ws:
            self.kind = "pool_conv"
            self.resample = nn.AdaptiveAvgPool2d((ht, wt))
            self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.kind = "resize_conv"
            self.resample = nn.Upsample(size=(ht, wt), mode="bilinear", align_corners=False)
            self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def describe(self) -> str:
        """One line naming the kind of aligner and the shapes it maps, for logs and run records."""
        (hs, ws), (ht, wt) = self.student_grid, self.teacher_grid
        shapes = f"{self.student_channels}x{hs}x{ws} -> {self.teacher_channels}x{ht}x{wt}"
        if self.kind == "deconv":
            return f"deconv (transposed conv, kernel=stride={tuple(self.proj.stride)}): {shapes}"
        if self.kind == "upsample_conv":
            return f"upsample_conv (bilinear upsample + 1x1 conv): {shapes}"
        if self.kind == "pool_conv":
            return f"pool_conv (adaptive avg pool + 1x1 conv): {shapes}"
        if self.kind == "resize_conv":
            return f"resize_conv (bilinear resize + 1x1 conv): {shapes}"
        return f"conv1x1: {shapes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.student_channels, *self.student_grid)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"Aligner expects a student map of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )
        if self.resample is not None:
            x = self.resample(x)
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def normalize_teacher_map(f: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise a (B, C, H, W) map over channels at every location, with no affine parameters.

    Equals ``F.layer_norm(f.permute(0, 2, 3, 1), (C,), eps=eps).permute(0, 3, 1, 2)`` (biased
    variance, ``eps`` inside the square root, as LayerNorm). Computed in float32.
    """
    if f.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) teacher map, got shape {tuple(f.shape)}")
    c = f.shape[1]
    return F.layer_norm(f.float().permute(0, 2, 3, 1), (c,), eps=eps).permute(0, 3, 1, 2)


def hidden_alignment_loss(aligned: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """``MSE(aligned, normalize_teacher_map(teacher_map))``, mean over all elements (float32).

    ``aligned`` is the aligner's output; both must have the same (B, C, H, W) shape.
    """
    if aligned.shape != teacher_map.shape or aligned.dim() != 4:
        raise ValueError(
            "aligned student map and teacher map must have the same (B, C, H, W) shape, got "
            f"{tuple(aligned.shape)} and {tuple(teacher_map.shape)}"
        )
    return F.mse_loss(aligned.float(), normalize_teacher_map(teacher_map))
