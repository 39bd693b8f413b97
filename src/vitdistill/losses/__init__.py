"""Pure loss functions (no imports of methods or engine)."""

from vitdistill.losses.hidden import Aligner, aligned_mse_loss, hidden_alignment_loss, normalize_teacher_map
from vitdistill.losses.kd import hard_kd_loss, logit_kd_loss, soft_kd_loss
from vitdistill.losses.spectral import spatial_mse_loss, spectral_alignment_loss

__all__ = ["Aligner", "aligned_mse_loss", "hard_kd_loss", "hidden_alignment_loss", "logit_kd_loss", "normalize_teacher_map", "soft_kd_loss",
           "spatial_mse_loss", "spectral_alignment_loss"]
