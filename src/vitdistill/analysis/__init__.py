"""Spectral analysis of teacher and student features (SpectralKD): spectra, intensity, pairs, plots."""

from .model_analysis import analyze_layers, attention_distances, balanced_indices, balanced_loader
from .plots import plot_attention_distance, plot_intensity, plot_spectra
from .report import AnalysisError, analyze_models
from .spectrum import (
    SpectrumAccumulator,
    average_attention_distance,
    channel_spectrum,
    curve_closeness,
    layer_intensity,
    normalized_depth,
    select_layer_pairs,
    spatial_spectrum_energy,
)

__all__ = [
    "AnalysisError",
    "SpectrumAccumulator",
    "analyze_layers",
    "analyze_models",
    "attention_distances",
    "average_attention_distance",
    "balanced_indices",
    "balanced_loader",
    "channel_spectrum",
    "curve_closeness",
    "layer_intensity",
    "normalized_depth",
    "plot_attention_distance",
    "plot_intensity",
    "plot_spectra",
    "select_layer_pairs",
    "spatial_spectrum_energy",
]
