"""Training checkpoints and evaluation. The training loop itself is :mod:`vitdistill.engine.trainer`,
imported only where something trains (it pulls in the data pipeline, the methods and timm's optimizers)."""

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, load_trained_model
from .evaluate import evaluate

__all__ = ["CheckpointError", "atomic_torch_save", "evaluate", "load_checkpoint", "load_trained_model"]
