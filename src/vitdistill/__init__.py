"""vitdistill: data-efficient knowledge distillation into vision transformers."""

__version__ = "0.1.0"
