"""``feature_mse``: plain feature regression at chosen layers (FitNets-style), a control for DearKD
and SpectralKD: the same layers, aligners and teacher, but no early-stage schedule, no
normalisation trick, no spectrum."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Distiller, LayerPairParams, TeacherOutputs, register_method
from .features import build_aligners, paired_alignment_loss


@dataclass
class FeatureMSEParams(LayerPairParams):
    weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.require(self.weight >= 0, "weight", self.weight, "must be >= 0")


@register_method("feature_mse")
class FeatureMSE(Distiller):
    """``CE(s, y) + weight * mean_pairs MSE(aligner(H_s), H_t)`` on raw teacher maps."""

    Params = FeatureMSEParams
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.s_layers, self.t_layers = self.params.student_layers, self.params.teacher_layers
        self.s_tap, self.t_tap, self.aligners = build_aligners(self.student, self.teacher, self.s_layers, self.t_layers)

    def trainable_modules(self):
        return [self.student, self.aligners]

    def teacher_request(self):
        return False, self.t_tap

    def forward_train(self, images: Tensor, targets: Tensor, teacher: TeacherOutputs | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, s_maps = self.s_tap(images, need_logits=True)
        t_maps = (teacher or self.teacher_outputs(images)).maps
        return logits, {"ce": self.ce(logits, targets), "feature": self.params.weight * self.alignment_loss(s_maps, t_maps)}

    def alignment_loss(self, s_maps: dict, t_maps: dict) -> Tensor:
        """Plain MSE of the aligned student maps to the raw teacher maps, mean over the layer pairs (unweighted)."""
        return paired_alignment_loss(self.aligners, s_maps, t_maps, self.s_layers, self.t_layers, normalize=False)
