"""SpectralKD analysis: channel spectra, layer intensity, pair selection, attention distance.

Pure tensor/number functions (docs/methods.md §2.1, §2.2, §2.4); model plumbing and the CLI live
elsewhere. Maps are NCHW token maps (prefix tokens dropped, patch tokens reshaped to the grid).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SpectrumAccumulator",
    "average_attention_distance",
    "channel_spectrum",
    "curve_closeness",
    "layer_intensity",
    "normalized_depth",
    "select_layer_pairs",
    "spatial_spectrum_energy",
]


def _check_map(x: Tensor, name: str = "feature map") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")


def _per_image_channel_spectrum(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C): |FFT over channels| / C, averaged over positions, float32."""
    c = x.shape[1]
    mag = torch.fft.fft(x.detach().float(), dim=1).abs() / c
    return mag.mean(dim=(2, 3))


def _per_image_spatial_energy(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W//2+1): |rfft2_ortho|^2 averaged over channels, float32."""
    spec = torch.fft.rfft2(x.detach().float(), dim=(-2, -1), norm="ortho")
    return (spec.real.square() + spec.imag.square()).mean(dim=1)


def channel_spectrum(x: Tensor) -> Tensor:
    """Layer spectrum ``S_l[k]``: 1-D FFT over channels per token, divided by C, magnitude, mean over
    batch and positions (docs/methods.md §2.1).

    (B, C, H, W) -> (C,) float32. A map whose every token holds the same value c in all channels gives
    ``|c|`` at k = 0 and 0 elsewhere; ``A cos(2 pi f ch / C)`` over channels gives ``A/2`` at k = f and C - f.
    """
    _check_map(x)
    return _per_image_channel_spectrum(x).mean(dim=0)


def layer_intensity(spectrum: Tensor | Sequence[float]) -> float:
    """Layer intensity ``L(X_l)``: the mean of ``S_l[k]`` over all k (0 .. C-1)."""
    s = torch.as_tensor(spectrum, dtype=torch.float64)
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"spectrum must be a non-empty 1-D sequence, got shape {tuple(s.shape)}")
    return float(s.mean())


def spatial_spectrum_energy(x: Tensor) -> Tensor:
    """Mean over batch and channels of ``|rfft2(x, norm="ortho")|^2``: (B, C, H, W) -> (H, W//2 + 1)."""
    _check_map(x)
    return _per_image_spatial_energy(x).mean(dim=0)


class SpectrumAccumulator:
    """Running per-layer channel spectra and spatial energies over many batches (float64 sums).

    ``update({layer: map})`` once per batch; at most ``max_images`` images per layer are used (later
    images are ignored; ``max_images=None`` takes all). The result equals ``channel_spectrum`` /
    ``spatial_spectrum_energy`` of all used images concatenated into one batch.
    """

    def __init__(self, max_images: int | None = 1000) -> None:
        if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                       or max_images < 1):
            raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
        self.max_images = max_images
        self._spec_sum: dict[Hashable, Tensor] = {}
        self._energy_sum: dict[Hashable, Tensor] = {}
        self._count: dict[Hashable, int] = {}

    def remaining(self, layer: Hashable) -> int | None:
        """How many more images ``layer`` accepts (None: unlimited)."""
        if self.max_images is None:
            return None
        return max(0, self.max_images - self._count.get(layer, 0))

    @property
    def full(self) -> bool:
        """True once every layer seen so far has ``max_images`` images (False before any update)."""
        if self.max_images is None or not self._count:
            return False
        return all(n >= self.max_images for n in self._count.values())

    def update(self, maps: Mapping[Hashable, Tensor]) -> None:
        """Add one batch of NCHW maps, keyed by layer (e.g. block index or module name)."""
        for layer, x in maps.items():
            _check_map(x, f"map for layer {layer!r}")
            left = self.remaining(layer)
            if left is not None:
                x = x[:left]
            if x.shape[0] == 0:
                continue
            spec = _per_image_channel_spectrum(x).sum(dim=0).double().cpu()
            energy = _per_image_spatial_energy(x).sum(dim=0).double().cpu()
            if layer in self._spec_sum:
                if self._spec_sum[layer].shape != spec.shape or self._energy_sum[layer].shape != energy.shape:
                    raise ValueError(
                        f"layer {layer!r}: map shape changed between batches (got C, H, W = "
                        f"{tuple(x.shape[1:])}, earlier spectrum length {self._spec_sum[layer].numel()} "
                        f"and grid {tuple(self._energy_sum[layer].shape)})"
                    )
                self._spec_sum[layer] += spec
                self._energy_sum[layer] += energy
                self._count[layer] += x.shape[0]
            else:
                self._spec_sum[layer] = spec
                self._energy_sum[layer] = energy
                self._count[layer] = x.shape[0]

    def result(self) -> dict[Hashable, dict]:
        """``{layer: {"spectrum": (C,) float64, "intensity": float, "spatial_energy": (H, W//2+1) float64,
        "n_images": int}}`` in first-seen layer order."""
        out: dict[Hashable, dict] = {}
        for layer, n in self._count.items():
            spectrum = self._spec_sum[layer] / n
            out[layer] = {
                "spectrum": spectrum,
                "intensity": layer_intensity(spectrum),
                "spatial_energy": self._energy_sum[layer] / n,
                "n_images": n,
            }
        return out


def normalized_depth(n_layers: int) -> list[float]:
    """Relative depth ``i / (n_layers - 1)`` of each layer, in [0, 1] (a single layer sits at 0.0)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if n_layers == 1:
        return [0.0]
    return [i / (n_layers - 1) for i in range(n_layers)]


def _minmax(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return np.zeros_like(a) if span == 0 else (a - a.min()) / span


def curve_closeness(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """How alike two intensity-vs-depth curves are, in shape and in scale (docs/methods.md §2.4).

    Both curves are resampled by linear interpolation onto ``normalized_depth(max(len(a), len(b)))``.
    Shape: each curve is min-max normalised to [0, 1] first (a constant curve becomes all zeros);
    ``pearson`` is their correlation (NaN when either is constant) and ``mad`` their mean absolute
    difference. Scale: ``log_ratio`` is the mean ``|ln a - ln b|`` of the raw curves, so
    ``exp(log_ratio)`` is the typical factor between the two intensities (NaN unless all values > 0).
    Shape alone can mislead: a nearly flat curve has a noisy min-max shape even when it lies on the
    other curve. Higher r / lower MAD / lower log ratio = closer (e.g. distilled student vs teacher).
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, x in (("a", xa), ("b", xb)):
        if x.ndim != 1 or x.size < 2:
            raise ValueError(f"curve {name} must be a 1-D sequence of at least 2 values, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"curve {name} contains non-finite values: {x.tolist()}")
    n = max(xa.size, xb.size)
    grid = np.asarray(normalized_depth(n))

    def resample(x: np.ndarray) -> np.ndarray:
        return np.interp(grid, np.asarray(normalized_depth(x.size)), x)

    ra, rb = resample(_minmax(xa)), resample(_minmax(xb))
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        r = float("nan")
    else:
        r = float(np.corrcoef(ra, rb)[0, 1])
    positive = bool((xa > 0).all() and (xb > 0).all())
    log_ratio = float(np.abs(np.log(resample(xa)) - np.log(resample(xb))).mean()) if positive else float("nan")
    return {"pearson": r, "mad": float(np.abs(ra - rb).mean()), "log_ratio": log_ratio, "n_points": n}


def _resolve_count(n: int | float, depth: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | float):
        raise ValueError(f"{name} must be an int count or a float fraction in [0, 1], got {n!r}")
    if isinstance(n, float):
        if not 0.0 <= n <= 1.0:
            raise ValueError(f"{name} as a fraction of the student depth must be in [0, 1], got {n}")
        return int(math.floor(n * depth + 0.5))
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def select_layer_pairs(
    teacher_intensity: Sequence[float],
    student_depth: int,
    n_first: int | float = 2,
    n_last: int | float = 2,
) -> list[tuple[int, int]]:
    """Pick (student_layer, teacher_layer) pairs by the SpectralKD guideline (docs/methods.md §2.2).

    Rule (deterministic):

    1. ``n_first`` / ``n_last`` are counts, or floats = fractions of ``student_depth`` (rounded half up).
    2. The teacher's layers are split into an early half ``[0, ceil(Lt/2))`` and a late half
       ``[ceil(Lt/2), Lt)``. From the early half take the ``n_first`` most intense layers, from the late
       half the ``n_last`` most intense (ties go to the layer nearer its edge: lower index early,
       higher index late).
    3. First with first, last with last: the i-th selected early teacher layer (in depth order) is paired
       with student layer i; the j-th selected late teacher layer counted from the end is paired with
       student layer ``student_depth - 1 - j``.

    On a U-shaped curve this pairs the teacher's first/last layers with the student's first/last layers
    (the official DeiT-Tiny <- CaiT-S24 pairs are ``n_first=2, n_last=6``). Returns pairs sorted by
    student layer.
    """
    ti = np.asarray(teacher_intensity, dtype=np.float64)
    if ti.ndim != 1 or ti.size < 2:
        raise ValueError(f"teacher_intensity must be a 1-D sequence of at least 2 layers, got shape {ti.shape}")
    if not np.all(np.isfinite(ti)):
        raise ValueError(f"teacher_intensity contains non-finite values: {ti.tolist()}")
    if isinstance(student_depth, bool) or not isinstance(student_depth, int) or student_depth < 1:
        raise ValueError(f"student_depth must be a positive int, got {student_depth!r}")
    lt = ti.size
    nf = _resolve_count(n_first, student_depth, "n_first")
    nl = _resolve_count(n_last, student_depth, "n_last")
    split = (lt + 1) // 2
    if nf + nl == 0:
        raise ValueError("n_first and n_last are both 0: no layer pairs to select")
    if nf + nl > student_depth:
        raise ValueError(f"n_first + n_last = {nf} + {nl} exceeds the student's {student_depth} layers")
    if nf > split:
        raise ValueError(f"n_first = {nf} exceeds the teacher's early half (layers 0..{split - 1})")
    if nl > lt - split:
        raise ValueError(f"n_last = {nl} exceeds the teacher's late half (layers {split}..{lt - 1})")

    early = sorted(range(split), key=lambda i: (-ti[i], i))[:nf]
    late = sorted(range(split, lt), key=lambda i: (-ti[i], -i))[:nl]
    pairs = [(rank, t) for rank, t in enumerate(sorted(early))]
    pairs += [(student_depth - 1 - rank, t) for rank, t in enumerate(sorted(late, reverse=True))]
    return sorted(pairs)


def _grid_distances(h: int, w: int, device: torch.device) -> Tensor:
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    pos = torch.stack([rows, cols], dim=1)  # row-major token order, as timm flattens patches
    return torch.cdist(pos, pos)


def average_attention_distance(
    attn_probs: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0
) -> Tensor:
    """Mean attention distance per head, in patch units: (B, heads, N, N) -> (heads,) float64.

    Queries and keys that are prefix tokens (cls/dist, the first ``num_prefix_tokens``) are dropped;
    each query's remaining weights are renormalised to sum to 1 over the patch keys (a query with no
    mass on patch keys contributes 0). Then ``sum_k p(q, k) * ||pos(q) - pos(k)||`` (Euclidean, patches
    in row-major order) is averaged over patch queries and batch.
    """
    if not isinstance(attn_probs, Tensor) or attn_probs.dim() != 4 or attn_probs.shape[-1] != attn_probs.shape[-2]:
        shape = tuple(attn_probs.shape) if isinstance(attn_probs, Tensor) else type(attn_probs).__name__
        raise ValueError(f"attn_probs must be (B, heads, N, N), got {shape}")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be two positive ints, got {grid}")
    n = attn_probs.shape[-1]
    if num_prefix_tokens < 0 or n != num_prefix_tokens + h * w:
        raise ValueError(
            f"attention over {n} tokens does not match num_prefix_tokens={num_prefix_tokens} + grid {h}x{w} "
            f"= {num_prefix_tokens + h * w} tokens"
        )
    p = attn_probs.detach()[..., num_prefix_tokens:, num_prefix_tokens:].double()
    mass = p.sum(dim=-1, keepdim=True)
    p = torch.where(mass > 0, p / mass.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(p))
    dist = _grid_distances(h, w, p.device)
    per_query = (p * dist).sum(dim=-1)  # (B, heads, HW)
    return per_query.mean(dim=(0, 2))
