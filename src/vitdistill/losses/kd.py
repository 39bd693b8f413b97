"""Logit distillation losses (Hinton et al. 2015; DeiT's hard distillation), as pure functions.

Both take raw logits of shape (B, num_classes). Neither detaches the teacher: the caller runs the
teacher without gradients (frozen, under ``torch.inference_mode()``), which leaves mutual-learning
setups possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hard_kd_loss", "logit_kd_loss", "soft_kd_loss"]


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be (batch, classes) and of the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def soft_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, summed over classes, averaged over the batch.

    This is PyTorch's ``reduction='batchmean'``: the true per-sample KL divergence, averaged over the
    B samples, and the ``tau^2`` factor keeps the gradient scale independent of the temperature
    (Hinton et al.). SpectralKD uses this convention. DeiT's soft distillation
    (``deit/losses.py``) instead computes ``F.kl_div(log_softmax(s/tau), log_softmax(t/tau),
    reduction='sum', log_target=True) * tau^2 / s.numel()``, i.e. divides the sum by ``B * C``: its
    value is this one divided by the number of classes C (1000x smaller on ImageNet). To reproduce
    DeiT's weighting, divide this loss by C (or scale its weight accordingly).

    Computed in float32 (log-softmax over logits that may come from autocast).
    """
    _check_logits(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tau = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (tau * tau)


def hard_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of the student to the teacher's top-1 class (DeiT's hard distillation), batch mean.

    Ties in the teacher's logits go to the lowest class index (``argmax``).
    """
    _check_logits(student_logits, teacher_logits)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = teacher_logits.argmax(dim=-1)
    return F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str, temperature: float = 1.0
                  ) -> torch.Tensor:
    """``mode='soft'``: :func:`soft_kd_loss` at ``temperature``; ``mode='hard'``: :func:`hard_kd_loss`."""
    if mode == "hard":
        return hard_kd_loss(student_logits, teacher_logits)
    if mode == "soft":
        return soft_kd_loss(student_logits, teacher_logits, temperature)
    raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
