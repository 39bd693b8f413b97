"""Figures for the SpectralKD analysis (Agg canvas, no pyplot state); each PNG is written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..io import atomic_open
from .spectrum import normalized_depth

__all__ = ["plot_attention_distance", "plot_intensity", "plot_spectra"]


def _as_array(x: Tensor | Sequence | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _new_figure(figsize: tuple[float, float] = (6.0, 4.0)) -> Figure:
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG, atomically."""
    with atomic_open(path) as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    return Path(path)


def _check_curves(curves: Mapping, what: str) -> None:
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"{what} must be a non-empty mapping of name -> values, got {type(curves).__name__}")


def plot_intensity(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    normalize_depth: bool = True,
    title: str = "Layer intensity vs depth",
) -> Path:
    """One intensity-vs-depth line per model (x = relative depth in [0, 1], or layer index)."""
    _check_curves(curves, "curves")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, values in curves.items():
        y = _as_array(values)
        if y.ndim != 1 or y.size == 0:
            raise ValueError(f"curve {name!r} must be a non-empty 1-D sequence, got shape {y.shape}")
        x = normalized_depth(y.size) if normalize_depth else np.arange(y.size)
        ax.plot(x, y, marker="o", markersize=3, label=str(name))
    ax.set_xlabel("normalised depth" if normalize_depth else "layer")
    ax.set_ylabel("layer intensity  mean_k S[k]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_spectra(
    spectra: Mapping[str, Tensor | Sequence[float]],
    path: str | os.PathLike,
    title: str = "Channel spectra",
    log_scale: bool = False,
) -> Path:
    """``S_l[k]`` against normalised frequency k/C for k = 0 .. C//2 (positive half), one line per entry."""
    _check_curves(spectra, "spectra")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, values in spectra.items():
        s = _as_array(values)
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"spectrum {name!r} must be a non-empty 1-D sequence, got shape {s.shape}")
        c = s.size
        k = np.arange(c // 2 + 1)
        ax.plot(k / c, s[: c // 2 + 1], label=str(name))
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("normalised frequency k / C")
    ax.set_ylabel("S[k]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_attention_distance(
    distances: Mapping[str, Sequence[float] | Tensor | np.ndarray] | Tensor | np.ndarray,
    path: str | os.PathLike,
    title: str = "Mean attention distance",
    normalize_depth: bool = False,
) -> Path:
    """Attention distance (patch units) against layer.

    ``distances`` maps a model name to per-layer values (1-D: one line) or to a (layers, heads) array
    (a dot per head plus a line through the per-layer mean); a bare (layers, heads) array is one model.
    """
    if isinstance(distances, Tensor | np.ndarray):
        distances = {"model": distances}
    _check_curves(distances, "distances")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, values) in enumerate(distances.items()):
        d = _as_array(values)
        if d.ndim not in (1, 2) or d.size == 0:
            raise ValueError(f"distances for {name!r} must be (layers,) or (layers, heads), got shape {d.shape}")
        n_layers = d.shape[0]
        x = np.asarray(normalized_depth(n_layers)) if normalize_depth else np.arange(n_layers, dtype=np.float64)
        color = f"C{i % 10}"
        if d.ndim == 2:
            xs = np.repeat(x, d.shape[1])
            ax.scatter(xs, d.reshape(-1), s=10, alpha=0.5, color=color)
            d = d.mean(axis=1)
        ax.plot(x, d, marker="o", markersize=3, color=color, label=str(name))
    ax.set_xlabel("normalised depth" if normalize_depth else "layer")
    ax.set_ylabel("mean attention distance (patches)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)

