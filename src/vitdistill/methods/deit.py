"""``deit``: DeiT's distillation token (Touvron et al. 2021), the baseline DearKD must beat."""

from __future__ import annotations

from torch import Tensor, nn

from ..losses import hard_kd_loss, soft_kd_loss
from .base import Distiller, MethodError, register_method


def require_distillation_token(student: nn.Module, method: str) -> None:
    if not hasattr(student, "set_distilled_training"):
        raise MethodError(f"method '{method}' needs a student with a distillation token and a dist head, e.g. "
                          f"model.name=vitd_tiny_patch4_28_distilled (timm's deit_*_distilled_* models)")
    student.set_distilled_training(True)  # two heads in training; their average at inference


@register_method("deit")
class DeiT(Distiller):
    """``(1 - alpha) * CE(cls, y) + alpha * KD(dist, t)``; inference averages the two heads.

    ``mode: hard`` (DeiT's best) trains the dist head on the teacher's argmax; ``mode: soft`` on
    ``tau^2 * KL`` (batchmean, see :func:`vitdistill.losses.soft_kd_loss`).
    """

    param_defaults = {"alpha": 0.5, "mode": "hard", "temperature": 1.0}
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        require_distillation_token(self.student, "deit")
        if self.params["mode"] not in ("soft", "hard"):
            raise MethodError(f"method 'deit': mode='{self.params['mode']}' must be soft or hard")

    def dist_loss(self, dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.params["mode"] == "hard":
            return hard_kd_loss(dist_logits, teacher_logits)
        return soft_kd_loss(dist_logits, teacher_logits, self.params["temperature"])

    def forward_train(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        cls_logits, dist_logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        a = self.params["alpha"]
        losses = {"ce": (1 - a) * self.ce(cls_logits, targets), "kd": a * self.dist_loss(dist_logits, teacher_logits)}
        return (cls_logits + dist_logits) / 2, losses
