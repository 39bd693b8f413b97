"""DearKD's early hidden alignment: aligners and the normalised-MSE loss (docs/methods.md §1.2).

A trainable :class:`Aligner` maps a student token map to a CNN teacher map's shape, which is compared
with the teacher map standardised over channels at every location.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Aligner", "aligned_mse_loss", "normalize_teacher_map", "hidden_alignment_loss"]


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

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.student_channels, *self.student_grid)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"Aligner expects a student map of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
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


def aligned_mse_loss(aligner: Aligner, student_map: torch.Tensor, teacher_map: torch.Tensor, normalize: bool
                     ) -> torch.Tensor:
    """``MSE(aligner(student_map), T)``, mean over all elements, in float32: ``T`` is the teacher map,
    standardised over channels (:func:`normalize_teacher_map`) when ``normalize``.

    The token-wise aligners (``conv1x1``, ``deconv``) map each student token ``u`` to a patch ``y = u W + b``
    of teacher positions, so the sum of squares over tokens is expanded as
    ``sum ||u W||^2 + 2 (u W).b + ||b||^2 - 2 (u W + b).p + ||p||^2`` with ``p`` the token's teacher patch and
    ``||u W||^2 = u (W W^T) u``: the aligned map is never built, and a step costs two large matmuls
    (``P W^T`` forward, ``U^T P`` for the weight gradient) instead of the transposed convolution's three, with
    no elementwise passes over its output (docs/methods.md §1.2). ``P W^T`` runs in the autocast dtype when
    autocast is on, as the convolution would; the rest in float32. Other kinds use the direct formula.
    """
    aligner.check_input(student_map)
    if teacher_map.dim() != 4 or teacher_map.shape[1:] != (aligner.teacher_channels, *aligner.teacher_grid) \
            or teacher_map.shape[0] != student_map.shape[0]:
        raise ValueError(
            f"teacher map must have shape ({student_map.shape[0]}, {aligner.teacher_channels}, "
            f"{aligner.teacher_grid[0]}, {aligner.teacher_grid[1]}) for this aligner, got {tuple(teacher_map.shape)}")
    if aligner.kind not in ("conv1x1", "deconv"):
        aligned = aligner(student_map).float()
        return hidden_alignment_loss(aligned, teacher_map) if normalize else F.mse_loss(aligned, teacher_map.float())
    device = student_map.device.type
    fast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    b, (hs, ws), ct = student_map.shape[0], aligner.student_grid, aligner.teacher_channels
    fh, fw = aligner.teacher_grid[0] // hs, aligner.teacher_grid[1] // ws
    with torch.autocast(device, enabled=False):
        # weight as (Cs, fh*fw*Ct): a transposed conv stores (Cs, Ct, fh, fw), a 1x1 conv (Ct, Cs, 1, 1)
        w = aligner.proj.weight.float()
        w = w.permute(0, 2, 3, 1) if aligner.kind == "deconv" else w.permute(1, 2, 3, 0)
        w = w.reshape(w.shape[0], -1)
        bias = aligner.proj.bias.float().repeat(fh * fw)
        u = student_map.float().permute(0, 2, 3, 1).reshape(b * hs * ws, -1)
        # the teacher patch of each token, its fh*fw positions x Ct channels in the order of w's columns
        p = teacher_map.float().reshape(b, ct, hs, fh, ws, fw).permute(0, 2, 4, 3, 5, 1).reshape(-1, fh * fw, ct)
        p = (F.layer_norm(p, (ct,), eps=1e-5) if normalize else p).reshape(u.shape[0], -1)
        cross = (p.to(fast) @ w.t().to(fast)).float()  # (tokens, Cs): P W^T
        total = ((u @ (w @ w.t())) * u).sum() + 2 * u.sum(0) @ (w @ bias) + u.shape[0] * bias.dot(bias) \
            - 2 * (u * cross).sum() - 2 * bias.dot(p.sum(0)) + p.square().sum()
    return total / p.numel()
