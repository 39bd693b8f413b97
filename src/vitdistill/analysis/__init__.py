"""Spectral analysis of teacher and student features (SpectralKD): spectra, intensity, layer pairs,
attention distance. This package is torch-only (methods import it while training); the plots and the
report of ``vitdistill analyze`` are :mod:`.plots` and :mod:`.report`, imported by name."""

from .model_analysis import analyze_layers, attention_distances
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
    "SpectrumAccumulator",
    "analyze_layers",
    "attention_distances",
    "average_attention_distance",
    "channel_spectrum",
    "curve_closeness",
    "layer_intensity",
    "normalized_depth",
    "select_layer_pairs",
    "spatial_spectrum_energy",
]
