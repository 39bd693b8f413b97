"""``deit``: DeiT's distillation token (Touvron et al. 2021), the baseline DearKD must beat."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import Distiller, KDMode, LogitKDParams, MethodError, TeacherOutputs, register_method


def require_distillation_token(student: nn.Module, method: str) -> None:
    if not hasattr(student, "set_distilled_training"):
        raise MethodError(f"method '{method}' needs a student with a distillation token and a dist head, e.g. "
                          f"model.name=vitd_tiny_patch4_28_distilled (timm's deit_*_distilled_* models)")
    student.set_distilled_training(True)  # two heads in training; their average at inference


@dataclass
class DeiTParams(LogitKDParams):
    alpha: float = 0.5
    temperature: float = 1.0
    kd_mode: KDMode = "hard"  # DeiT's best: the dist head learns the teacher's argmax


@register_method("deit")
class DeiT(Distiller):
    """``(1 - alpha) * CE(cls, y) + alpha * KD(dist, t)``; inference averages the two heads."""

    Params = DeiTParams
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        require_distillation_token(self.student, "deit")

    def teacher_request(self):
        return True, None

    def forward_train(self, images: Tensor, targets: Tensor, teacher: TeacherOutputs | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        cls_logits, dist_logits = self.student(images)
        teacher_logits = (teacher or self.teacher_outputs(images)).logits
        p = self.params
        losses = {"ce": (1 - p.alpha) * self.ce(cls_logits, targets),
                  "kd": p.alpha * p.kd_loss(dist_logits, teacher_logits)}
        return (cls_logits + dist_logits) / 2, losses
