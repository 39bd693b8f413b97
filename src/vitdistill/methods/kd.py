"""``kd``: logit distillation (Hinton et al. 2015), soft or hard, the first control for every method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Distiller, KDMode, LogitKDParams, TeacherOutputs, register_method


@dataclass
class KDParams(LogitKDParams):
    alpha: float = 0.5
    temperature: float = 4.0
    kd_mode: KDMode = "soft"


@register_method("kd")
class KD(Distiller):
    """``(1 - alpha) * CE(s, y) + alpha * KD(s, t)``; ``KD`` as in :class:`LogitKDParams` (docs/methods.md §3.2)."""

    Params = KDParams
    needs_teacher = True

    def teacher_request(self):
        return True, None

    def forward_train(self, images: Tensor, targets: Tensor, teacher: TeacherOutputs | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        teacher_logits = (teacher or self.teacher_outputs(images)).logits
        p = self.params
        return logits, {"ce": (1 - p.alpha) * self.ce(logits, targets), "kd": p.alpha * p.kd_loss(logits, teacher_logits)}
