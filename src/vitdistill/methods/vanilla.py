"""``none``: the student trained alone on the ground truth (the no-KD baseline)."""

from .base import Distiller, register_method


@register_method("none")
class Vanilla(Distiller):
    """Cross-entropy (with the configured label smoothing, or mixup targets) only."""
