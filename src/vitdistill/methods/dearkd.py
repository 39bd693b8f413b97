"""``dearkd``: DearKD, data-efficient early knowledge distillation (Chen et al., CVPR 2022).

Stage 1 gives the ViT the CNN's inductive bias early: logit distillation through the
distillation token plus alignment of early student blocks to early CNN stages. Stage 2 sets the
ViT free: ground truth only, the teacher is never run and the aligners leave the optimizer. MHCA
(convolutional attention) in the early blocks is an architecture choice: ``model.mhca.blocks``.
See docs/methods.md §1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import (
    Distiller,
    KDMode,
    LayerPairParams,
    LogitKDParams,
    MethodError,
    TeacherOutputs,
    register_method,
)
from .deit import require_distillation_token
from .features import build_aligners, paired_alignment_loss

#: the paper's switch point is not public; our default is the first 5/6 of the epochs (docs/methods.md §1.4)
DEFAULT_STAGE1_FRACTION = 5 / 6


def switch_epoch_for(epochs: int, switch_epoch: int | None = None) -> int:
    """The first (0-based) epoch of stage 2: as configured, or 5/6 of the epochs (``epochs``: no stage 2)."""
    return round(DEFAULT_STAGE1_FRACTION * epochs) if switch_epoch is None else switch_epoch


@dataclass
class DearKDParams(LogitKDParams, LayerPairParams):
    switch_epoch: int | None = None  # first (0-based) epoch of stage 2; null: round(5/6 * train.epochs)
    alpha: float = 0.5
    temperature: float = 1.0
    kd_mode: KDMode = "hard"
    hidden_weight: float = 1.0  # 0 turns the hidden alignment off (the logit-only ablation)

    def validate(self) -> None:
        LogitKDParams.validate(self)
        LayerPairParams.validate(self)
        self.require(self.hidden_weight >= 0, "hidden_weight", self.hidden_weight, "must be >= 0")


@register_method("dearkd")
class DearKD(Distiller):
    """Stage 1 (epoch < switch_epoch): ``(1-alpha)*CE(cls, y) + alpha*KD(dist, t)
    + hidden_weight * mean_pairs MSE(aligner(H_s), LN(F_t))``.
    Stage 2: ``(1-alpha)*CE(cls, y) + alpha*CE(dist, y)``. Inference averages the two heads.

    ``switch_epoch = epochs`` distils to the end (the one-stage ablation).
    """

    Params = DearKDParams
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        require_distillation_token(self.student, "dearkd")
        self.switch_epoch = switch_epoch_for(self.epochs, p.switch_epoch)
        if not 0 <= self.switch_epoch <= self.epochs:
            raise MethodError(f"method.params.switch_epoch={p.switch_epoch} must be an integer in "
                              f"[0, train.epochs={self.epochs}] (the first epoch of stage 2; null = 5/6 of the epochs)")
        self.s_layers, self.t_layers = p.student_layers, p.teacher_layers
        self.use_hidden = p.hidden_weight > 0
        if self.use_hidden:
            self.s_tap, self.t_tap, self.aligners = build_aligners(self.student, self.teacher, self.s_layers,
                                                                   self.t_layers)

    def stage_for_epoch(self, epoch: int) -> int:
        return 1 if epoch < self.switch_epoch else 2

    def trainable_modules(self):
        return [self.student, self.aligners] if self.stage == 1 and self.use_hidden else [self.student]

    def teacher_request(self):
        if self.stage == 2:
            return False, None
        return True, (self.t_tap if self.use_hidden else None)

    def forward_train(self, images: Tensor, targets: Tensor, teacher: TeacherOutputs | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        a = p.alpha
        if self.stage == 2:
            cls_logits, dist_logits = self.student(images)
            losses = {"ce": (1 - a) * self.ce(cls_logits, targets), "ce_dist": a * self.ce(dist_logits, targets)}
            return (cls_logits + dist_logits) / 2, losses

        teacher = teacher or self.teacher_outputs(images)
        if self.use_hidden:
            (cls_logits, dist_logits), s_maps = self.s_tap(images, need_logits=True)
        else:
            cls_logits, dist_logits = self.student(images)
        losses = {"ce": (1 - a) * self.ce(cls_logits, targets), "kd": a * p.kd_loss(dist_logits, teacher.logits)}
        if self.use_hidden:
            losses["hidden"] = p.hidden_weight * self.alignment_loss(s_maps, teacher.maps)
        return (cls_logits + dist_logits) / 2, losses

    def alignment_loss(self, s_maps: dict, t_maps: dict) -> Tensor:
        """The hidden alignment, mean over the layer pairs (unweighted)."""
        return paired_alignment_loss(self.aligners, s_maps, t_maps, self.s_layers, self.t_layers, normalize=True)
