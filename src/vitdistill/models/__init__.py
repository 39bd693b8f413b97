"""Models: timm by name plus small-image presets, safe weight loading/saving, and layer taps.

Importing this package registers the vitdistill presets (``vitd_tiny_patch4_28``,
``resnetd_small_28``, ...) with timm, so ``timm.create_model`` and :func:`create_model` find them.
"""

from . import presets
from .build import (
    ModelError,
    count_params,
    create_model,
    load_checkpoint,
    load_weights,
    read_state_dict,
    save_weights,
)
from .presets import PRESET_NAMES, SmallStemResNet
from .taps import LayerTap, TapError, layer_module_name, num_tappable_layers, tokens_to_map

__all__ = [
    "presets",
    "PRESET_NAMES",
    "SmallStemResNet",
    "ModelError",
    "create_model",
    "load_checkpoint",
    "read_state_dict",
    "save_weights",
    "load_weights",
    "count_params",
    "LayerTap",
    "TapError",
    "layer_module_name",
    "num_tappable_layers",
    "tokens_to_map",
]
