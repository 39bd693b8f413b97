"""``feature_mse``: plain feature regression at chosen layers (FitNets-style), a control for DearKD
and SpectralKD: the same layers, aligners and teacher, but no early-stage schedule, no
normalisation trick, no spectrum."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import Distiller, register_method
from .features import build_aligners, layer_pairs, ordered


@register_method("feature_mse")
class FeatureMSE(Distiller):
    """``CE(s, y) + weight * mean_pairs MSE(aligner(H_s), H_t)`` on raw teacher maps."""

    param_defaults = {"student_layers": [1, 2], "teacher_layers": [1, 2], "weight": 1.0}
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.s_layers, self.t_layers = layer_pairs(self.params, "feature_mse")
        self.s_tap, self.t_tap, self.aligners = build_aligners(self.student, self.teacher, self.s_layers, self.t_layers)

    def trainable_modules(self):
        return [self.student, self.aligners]

    def forward_train(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits, s_maps = self.s_tap(images, need_logits=True)
        _, t_maps = self.run_teacher(images, self.t_tap, need_logits=False)
        pairs = zip(self.aligners, ordered(s_maps, self.s_layers), ordered(t_maps, self.t_layers))
        mse = sum(F.mse_loss(aligner(s).float(), t.float()) for aligner, s, t in pairs) / len(self.aligners)
        return logits, {"ce": self.ce(logits, targets), "feature": self.params["weight"] * mse}
