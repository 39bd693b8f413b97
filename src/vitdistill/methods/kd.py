"""``kd``: logit distillation (Hinton et al. 2015), soft or hard, the first control for every method."""

from __future__ import annotations

from torch import Tensor

from ..losses import hard_kd_loss, soft_kd_loss
from .base import Distiller, MethodError, register_method


@register_method("kd")
class KD(Distiller):
    """``(1 - alpha) * CE(s, y) + alpha * KD(s, t)``.

    ``mode: soft`` uses ``tau^2 * KL(p_t || p_s)`` summed over classes and averaged over the batch
    (PyTorch's ``batchmean``; DeiT's soft loss divides by B*C instead, i.e. is C times smaller);
    ``mode: hard`` is the cross-entropy to the teacher's argmax.
    """

    param_defaults = {"alpha": 0.5, "temperature": 4.0, "mode": "soft"}
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.params["mode"] not in ("soft", "hard"):
            raise MethodError(f"method 'kd': mode='{self.params['mode']}' must be soft or hard")
        if not 0.0 <= self.params["alpha"] <= 1.0:
            raise MethodError(f"method 'kd': alpha={self.params['alpha']} must be in [0, 1]")

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.params["mode"] == "hard":
            return hard_kd_loss(student_logits, teacher_logits)
        return soft_kd_loss(student_logits, teacher_logits, self.params["temperature"])

    def forward_train(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        a = self.params["alpha"]
        return logits, {"ce": (1 - a) * self.ce(logits, targets), "kd": a * self.kd_loss(logits, teacher_logits)}
