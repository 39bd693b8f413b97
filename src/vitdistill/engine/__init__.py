from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from .trainer import Trainer, TrainingError, cosine_with_warmup, evaluate, train

__all__ = ["CheckpointError", "Trainer", "TrainingError", "atomic_torch_save", "cosine_with_warmup", "evaluate",
           "load_checkpoint", "train"]
