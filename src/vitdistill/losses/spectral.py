"""SpectralKD feature losses: 2-D Fourier alignment of student and teacher maps (docs/methods.md §2.3).

Each pair of NCHW maps is average-pooled to a common channel count and grid, then compared as the MSE of
their orthonormal ``rfft2`` coefficients (real and imaginary parts stacked); ``spatial_mse_loss`` is the
plain-MSE control. The Parseval relation between the two losses is derived in docs/methods.md §2.3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "match_channels",
    "match_grids",
    "spatial_mse_loss",
    "spectral_alignment_loss",
    "spectral_features",
]


def _check_map(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an NCHW feature map (4-D tensor), got {shape}")


def _pool_channels(x: Tensor, channels: int) -> Tensor:
    """Adaptive average pooling of the channel axis of an NCHW map to ``channels``."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C): pool along the last axis
    pooled = F.adaptive_avg_pool1d(tokens, channels)
    return pooled.transpose(1, 2).reshape(b, channels, h, w)


def match_channels(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the wider map's channel axis down to the narrower map's channel count.

    Returns ``(s, t)`` with equal channel counts; the narrower side is returned unchanged.
    Non-divisible counts follow ``F.adaptive_avg_pool1d`` (bins may overlap, docs/methods.md §2.3).
    """
    _check_map(s, "student map")
    _check_map(t, "teacher map")
    cs, ct = s.shape[1], t.shape[1]
    if ct > cs:
        t = _pool_channels(t, cs)
    elif cs > ct:
        s = _pool_channels(s, ct)
    return s, t


def match_grids(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the finer spatial grid to the coarser one (per axis, adaptive pooling)."""
    _check_map(s, "student map")
    _check_map(t, "teacher map")
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if tuple(s.shape[-2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[-2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def spectral_features(x: Tensor) -> Tensor:
    """Orthonormal 2-D real FFT over (H, W) in float32, real and imaginary parts stacked last.

    (B, C, H, W) -> (B, C, H, W//2 + 1, 2), a real float32 tensor.
    """
    return torch.view_as_real(torch.fft.rfft2(x.float(), dim=(-2, -1), norm="ortho"))


def _prepare_pairs(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    student_maps, teacher_maps = list(student_maps), list(teacher_maps)
    if len(student_maps) != len(teacher_maps):
        raise ValueError(
            f"need one teacher map per student map: got {len(student_maps)} student maps and "
            f"{len(teacher_maps)} teacher maps"
        )
    if not student_maps:
        raise ValueError("no feature pairs given: student_maps and teacher_maps are empty")
    pairs = []
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        _check_map(s, f"student map {i}")
        _check_map(t, f"teacher map {i}")
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"pair {i}: batch sizes differ (student {tuple(s.shape)} has {s.shape[0]}, "
                f"teacher {tuple(t.shape)} has {t.shape[0]})"
            )
        if t.is_inference():  # teacher run under torch.inference_mode(): such tensors can't be saved for backward
            t = t.clone()
        s, t = match_channels(s.float(), t.float())
        s, t = match_grids(s, t)
        pairs.append((s, t))
    return pairs


def spectral_alignment_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """SpectralKD feature loss: mean over pairs of MSE(rfft2_ortho(s), rfft2_ortho(t)) (real/imag stacked),
    docs/methods.md §2.3.

    Maps are NCHW; channels and grids are matched by average pooling first. Computed in float32
    with autocast disabled. Gradients flow to both sides (detach the teacher yourself if needed).
    """
    device = student_maps[0].device.type if len(student_maps) else "cpu"
    with torch.autocast(device_type=device, enabled=False):
        pairs = _prepare_pairs(student_maps, teacher_maps)
        losses = [F.mse_loss(spectral_features(s), spectral_features(t)) for s, t in pairs]
        return torch.stack(losses).mean()


def spatial_mse_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """The spatial control for the spectral loss: same channel/grid matching, plain MSE, mean over pairs
    (docs/methods.md §2.3, §3.5)."""
    device = student_maps[0].device.type if len(student_maps) else "cpu"
    with torch.autocast(device_type=device, enabled=False):
        pairs = _prepare_pairs(student_maps, teacher_maps)
        losses = [F.mse_loss(s, t) for s, t in pairs]
        return torch.stack(losses).mean()
