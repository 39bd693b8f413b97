"""``dearkd``: DearKD, data-efficient early knowledge distillation (Chen et al., CVPR 2022).

Stage 1 gives the ViT the CNN's inductive bias early: logit distillation through the
distillation token plus alignment of early student blocks to early CNN stages. Stage 2 sets the
ViT free: ground truth only, the teacher is never run and the aligners leave the optimizer. MHCA
(convolutional attention) in the early blocks is an architecture choice: ``model.mhca.blocks``.
"""

from __future__ import annotations

from torch import Tensor

from ..losses import hard_kd_loss, hidden_alignment_loss, soft_kd_loss
from .base import Distiller, MethodError, register_method
from .deit import require_distillation_token
from .features import build_aligners, layer_pairs, ordered

#: the paper's switch point is not public; METHODS.md's default is the first 5/6 of the epochs
DEFAULT_STAGE1_FRACTION = 5 / 6


@register_method("dearkd")
class DearKD(Distiller):
    """Stage 1 (epoch < switch_epoch): ``(1-alpha)*CE(cls, y) + alpha*KD(dist, t)
    + hidden_weight * mean_pairs MSE(aligner(H_s), LN(F_t))``.
    Stage 2: ``(1-alpha)*CE(cls, y) + alpha*CE(dist, y)``. Inference averages the two heads.

    ``switch_epoch`` is the first (0-based) epoch of stage 2; null means round(5/6 * epochs), and
    ``switch_epoch = epochs`` distils to the end (the one-stage ablation). ``hidden_weight: 0``
    turns the hidden alignment off (the logit-only ablation).
    """

    param_defaults = {"switch_epoch": None, "alpha": 0.5, "kd_mode": "hard", "temperature": 1.0,
                      "student_layers": [1, 2], "teacher_layers": [1, 2], "hidden_weight": 1.0}
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        require_distillation_token(self.student, "dearkd")
        if p["kd_mode"] not in ("soft", "hard"):
            raise MethodError(f"method 'dearkd': kd_mode='{p['kd_mode']}' must be soft or hard")
        if p["switch_epoch"] is None:
            p["switch_epoch"] = round(DEFAULT_STAGE1_FRACTION * self.epochs)
        if not (isinstance(p["switch_epoch"], int) and 0 <= p["switch_epoch"] <= self.epochs):
            raise MethodError(f"method 'dearkd': switch_epoch={p['switch_epoch']} must be an integer in "
                              f"[0, train.epochs={self.epochs}] (the first epoch of stage 2; null = 5/6 of the epochs)")
        self.s_layers, self.t_layers = layer_pairs(p, "dearkd")
        self.use_hidden = p["hidden_weight"] > 0
        if self.use_hidden:
            self.s_tap, self.t_tap, self.aligners = build_aligners(self.student, self.teacher, self.s_layers,
                                                                   self.t_layers)

    def stage_for_epoch(self, epoch: int) -> int:
        return 1 if epoch < self.params["switch_epoch"] else 2

    def trainable_modules(self):
        return [self.student, self.aligners] if self.stage == 1 and self.use_hidden else [self.student]

    def forward_train(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        a = self.params["alpha"]
        if self.stage == 2:
            cls_logits, dist_logits = self.student(images)
            losses = {"ce": (1 - a) * self.ce(cls_logits, targets), "ce_dist": a * self.ce(dist_logits, targets)}
            return (cls_logits + dist_logits) / 2, losses

        if self.use_hidden:
            (cls_logits, dist_logits), s_maps = self.s_tap(images, need_logits=True)
            t_logits, t_maps = self.run_teacher(images, self.t_tap, need_logits=True)
        else:
            cls_logits, dist_logits = self.student(images)
            t_logits = self.teacher_forward(images)
        if self.params["kd_mode"] == "hard":
            kd = hard_kd_loss(dist_logits, t_logits)
        else:
            kd = soft_kd_loss(dist_logits, t_logits, self.params["temperature"])
        losses = {"ce": (1 - a) * self.ce(cls_logits, targets), "kd": a * kd}
        if self.use_hidden:
            pairs = zip(self.aligners, ordered(s_maps, self.s_layers), ordered(t_maps, self.t_layers))
            hidden = sum(hidden_alignment_loss(aligner(s).float(), t.float()) for aligner, s, t in pairs)
            losses["hidden"] = self.params["hidden_weight"] * hidden / len(self.aligners)
        return (cls_logits + dist_logits) / 2, losses
