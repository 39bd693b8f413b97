"""``spectralkd``: SpectralKD (Tian et al., 2024/25), logit KD plus parameter-free Fourier feature alignment.

Student and teacher layer maps are paired (explicitly, or ``auto``: from the teacher's layer-intensity
curve on training images, docs/methods.md §2.1-2.2), pooled to a common shape and compared in the
2-D Fourier domain (``losses.spectral_alignment_loss``, §2.3). Nothing is trained besides the student.
``feature_loss: spatial`` swaps in the plain spatial MSE at the same pairs (the control).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from ..analysis.model_analysis import analyze_layers
from ..analysis.spectrum import select_layer_pairs
from ..data.subsets import balanced_loader
from ..losses import spatial_mse_loss, spectral_alignment_loss
from ..models import LayerTap, TapError, num_tappable_layers
from ..rng import seeded_rng
from .base import Distiller, KDMode, LogitKDParams, MethodError, TeacherOutputs, register_method
from .features import ordered

FEATURE_LOSSES = {"fft": ("fft", spectral_alignment_loss), "spatial": ("feature", spatial_mse_loss)}
AUTO = "auto"
#: batch size of the teacher analysis behind ``auto`` pairs
AUTO_BATCH_SIZE = 100
Layers = list[int | str] | Literal["auto"]


@dataclass
class SpectralKDParams(LogitKDParams):
    alpha: float = 0.9
    temperature: float = 1.0
    kd_mode: KDMode = "soft"
    fft_weight: float = 0.2  # 0 turns the feature loss off
    student_layers: Layers = AUTO
    teacher_layers: Layers = AUTO
    feature_loss: Literal["fft", "spatial"] = "fft"  # spatial: plain MSE at the same pairs (the control)
    auto_images: int = 1000  # class-balanced training images behind the auto pairs
    auto_first: int | float = 2  # auto: pairs among the teacher's early layers (count, or fraction of depth)
    auto_last: int | float = 2

    def validate(self) -> None:
        super().validate()
        self.require(self.fft_weight >= 0, "fft_weight", self.fft_weight, "must be >= 0 (0 turns the feature loss off)")
        self.require(self.auto_images >= 1, "auto_images", self.auto_images, "must be a positive integer")
        s, t = self.student_layers, self.teacher_layers
        if s == AUTO or t == AUTO:
            self.require(s == t, "student_layers", s, f"and teacher_layers={t!r}: set both to 'auto' (pairs chosen "
                         "from the teacher's layer intensity) or both to lists of layer indices")
        else:
            self.require(len(s) == len(t) and len(s) > 0, "student_layers", s,
                         f"and teacher_layers={t!r} must be non-empty lists of the same length")


@register_method("spectralkd")
class SpectralKD(Distiller):
    """``(1-alpha)*CE_ls(s, y) + alpha*tau^2*KL(p_t || p_s) + fft_weight * mean_pairs L_fft(H_s, H_t)``.

    Losses are logged as ``ce``, ``kd`` and ``fft`` (``feature`` with ``feature_loss: spatial``); a
    zero weight skips that term's computation but keeps its name (value 0). ``kd_mode: hard`` uses the
    cross-entropy to the teacher's argmax. ``student_layers: auto`` and ``teacher_layers: auto`` pick
    the pairs in :meth:`prepare` from ``auto_images`` class-balanced training images: the teacher's
    ``auto_first`` most intense early layers and ``auto_last`` most intense late layers, paired first
    with first and last with last (``analysis.select_layer_pairs``).
    """

    Params = SpectralKDParams
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        self.feature_name, self.feature_fn = FEATURE_LOSSES[p.feature_loss]
        self.s_tap: LayerTap | None = None
        self.t_tap: LayerTap | None = None
        self.s_layers: list[int | str] = []
        self.t_layers: list[int | str] = []
        self.auto = p.student_layers == AUTO
        if self.auto:
            self._check_auto_counts()
        else:
            self._build_taps(p.student_layers, p.teacher_layers)

    # -- taps ----------------------------------------------------------------------------------
    def _check_auto_counts(self) -> None:
        """Fail at build time (not after the analysis) when auto_first/auto_last cannot fit the depths."""
        n_s, n_t = num_tappable_layers(self.student), num_tappable_layers(self.teacher)
        for name, model, n in (("student", self.student, n_s), ("teacher", self.teacher, n_t)):
            if n < (2 if name == "teacher" else 1):
                raise MethodError(f"method 'spectralkd': layer pairs 'auto' need a {name} with indexable layers; "
                                  f"{type(model).__name__} has {n}")
        try:
            select_layer_pairs([0.0] * n_t, n_s, self.params.auto_first, self.params.auto_last)
        except ValueError as e:
            raise MethodError(f"method.params.auto_first={self.params.auto_first!r}, "
                              f"auto_last={self.params.auto_last!r} for a {n_s}-layer student and a "
                              f"{n_t}-layer teacher: {e}") from None

    def _build_taps(self, s_layers: list[int | str], t_layers: list[int | str]) -> None:
        for side, model, layers in (("student", self.student, s_layers), ("teacher", self.teacher, t_layers)):
            try:
                tap = LayerTap(model, layers)
            except TapError as e:
                raise MethodError(f"method.params.{side}_layers={list(layers)}: {e}") from None
            if side == "student":
                self.s_tap = tap
            else:
                self.t_tap = tap
        self.s_layers, self.t_layers = list(s_layers), list(t_layers)

    @property
    def pairs(self) -> list[tuple[int | str, int | str]]:
        """The (student_layer, teacher_layer) pairs in use (empty until ``prepare`` for ``auto``)."""
        return list(zip(self.s_layers, self.t_layers))

    # -- auto pairs -----------------------------------------------------------------------------
    def prepare(self, train_set: Dataset, seed: int) -> None:
        """For ``auto`` pairs: the teacher's layer intensity on ``auto_images`` class-balanced training
        images drawn with ``seed`` (the same pairs on resume), then ``select_layer_pairs``."""
        p = self.params
        if not self.auto or p.fft_weight == 0:
            return
        n = min(p.auto_images, len(train_set))
        device = next(self.teacher.parameters()).device
        with seeded_rng(seed):
            loader = balanced_loader(train_set, n, seed, batch_size=min(AUTO_BATCH_SIZE, n))
            stats = analyze_layers(self.teacher, loader, max_images=n, device=device, progress=False)
        intensity = [stats[i]["intensity"] for i in sorted(stats)]
        pairs = select_layer_pairs(intensity, num_tappable_layers(self.student),
                                   p.auto_first, p.auto_last)
        self._build_taps([s for s, _ in pairs], [t for _, t in pairs])
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"spectralkd: auto layer pairs from the teacher's intensity on {n} training images (seed {seed}): "
                  f"student_layers {self.s_layers} <- teacher_layers {self.t_layers}", flush=True)

    # -- training -------------------------------------------------------------------------------
    def teacher_request(self):
        p = self.params
        return p.alpha > 0, (self.t_tap if p.fft_weight > 0 else None)

    def forward_train(self, images: Tensor, targets: Tensor, teacher: TeacherOutputs | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        a, w = p.alpha, p.fft_weight
        use_features = w > 0
        if use_features and self.s_tap is None:
            raise MethodError("method 'spectralkd': layer pairs are 'auto' but prepare(train_set, seed) has not "
                              "run; the trainer calls it before the first step")
        teacher = teacher or self.teacher_outputs(images)
        if use_features:
            logits, s_maps = self.s_tap(images, need_logits=True)
        else:
            logits = self.student(images)

        zero = logits.new_zeros((), dtype=torch.float32)
        kd = zero if a == 0 else p.kd_loss(logits, teacher.logits)
        feature = (self.feature_fn(ordered(s_maps, self.s_layers), ordered(teacher.maps, self.t_layers))
                   if use_features else zero)
        return logits, {"ce": (1 - a) * self.ce(logits, targets), "kd": a * kd, self.feature_name: w * feature}
