"""Spectral analysis of teacher and student features (SpectralKD): spectra, intensity, pairs, plots."""

from .plots import plot_attention_distance, plot_intensity, plot_spectra
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
    "average_attention_distance",
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
