"""``spectralkd``: SpectralKD (Tian et al., 2024/25), logit KD plus parameter-free Fourier feature alignment.

Student and teacher layer maps are paired (explicitly, or ``auto``: from the teacher's layer-intensity
curve on training images, METHODS.md section 2.1-2.2), pooled to a common shape and compared in the
2-D Fourier domain (``losses.spectral_alignment_loss``). Nothing is trained besides the student.
``feature_loss: spatial`` swaps in the plain spatial MSE at the same pairs (the control).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from ..losses import hard_kd_loss, soft_kd_loss, spatial_mse_loss, spectral_alignment_loss
from ..models import LayerTap, TapError, num_tappable_layers
from .base import Distiller, MethodError, register_method
from .features import layer_pairs, ordered

FEATURE_LOSSES = {"fft": ("fft", spectral_alignment_loss), "spatial": ("feature", spatial_mse_loss)}
AUTO = "auto"
#: batch size of the teacher analysis behind ``auto`` pairs
AUTO_BATCH_SIZE = 100


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy for the block, then restore their states: the ``auto``
    analysis sees the same augmented images for the same seed and leaves the training RNG untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


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

    param_defaults = {"alpha": 0.9, "temperature": 1.0, "kd_mode": "soft", "fft_weight": 0.2,
                      "student_layers": AUTO, "teacher_layers": AUTO, "feature_loss": "fft",
                      "auto_images": 1000, "auto_first": 2, "auto_last": 2}
    needs_teacher = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        self._check_params(p)
        self.feature_name, self.feature_fn = FEATURE_LOSSES[p["feature_loss"]]
        self.s_tap: LayerTap | None = None
        self.t_tap: LayerTap | None = None
        self.s_layers: list[int] = []
        self.t_layers: list[int] = []
        s, t = p["student_layers"], p["teacher_layers"]
        self.auto = s == AUTO or t == AUTO
        if self.auto:
            if s != AUTO or t != AUTO:
                raise MethodError(f"method 'spectralkd': student_layers={s!r} and teacher_layers={t!r}: set both to "
                                  "'auto' (pairs chosen from the teacher's layer intensity) or both to lists of "
                                  "layer indices")
            self._check_auto_counts()
        else:
            self._build_taps(*layer_pairs(p, "spectralkd"))

    # -- validation and taps --------------------------------------------------------------------
    @staticmethod
    def _check_params(p: dict[str, Any]) -> None:
        def bad(name: str, valid: str) -> MethodError:
            return MethodError(f"method 'spectralkd': {name}={p[name]!r} {valid}")

        if p["kd_mode"] not in ("soft", "hard"):
            raise bad("kd_mode", "must be soft or hard")
        if not (_is_number(p["alpha"]) and 0.0 <= p["alpha"] <= 1.0):
            raise bad("alpha", "must be a number in [0, 1]")
        if not (_is_number(p["temperature"]) and p["temperature"] > 0):
            raise bad("temperature", "must be a number > 0")
        if not (_is_number(p["fft_weight"]) and p["fft_weight"] >= 0):
            raise bad("fft_weight", "must be a number >= 0 (0 turns the feature loss off)")
        if p["feature_loss"] not in FEATURE_LOSSES:
            raise bad("feature_loss", f"must be one of {sorted(FEATURE_LOSSES)} (fft: SpectralKD's Fourier "
                                      "alignment; spatial: plain MSE at the same pairs, the control)")
        if not (isinstance(p["auto_images"], int) and not isinstance(p["auto_images"], bool) and p["auto_images"] >= 1):
            raise bad("auto_images", "must be a positive integer (training images for the auto layer pairs)")

    def _check_auto_counts(self) -> None:
        """Fail at build time (not after the analysis) when auto_first/auto_last cannot fit the depths."""
        from ..analysis.spectrum import select_layer_pairs

        n_s, n_t = num_tappable_layers(self.student), num_tappable_layers(self.teacher)
        for name, model, n in (("student", self.student, n_s), ("teacher", self.teacher, n_t)):
            if n < (2 if name == "teacher" else 1):
                raise MethodError(f"method 'spectralkd': layer pairs 'auto' need a {name} with indexable layers; "
                                  f"{type(model).__name__} has {n}")
        try:
            select_layer_pairs([0.0] * n_t, n_s, self.params["auto_first"], self.params["auto_last"])
        except ValueError as e:
            raise MethodError(f"method 'spectralkd': auto_first={self.params['auto_first']!r}, "
                              f"auto_last={self.params['auto_last']!r} for a {n_s}-layer student and a "
                              f"{n_t}-layer teacher: {e}") from None

    def _build_taps(self, s_layers: list[int], t_layers: list[int]) -> None:
        for side, model, layers in (("student", self.student, s_layers), ("teacher", self.teacher, t_layers)):
            try:
                tap = LayerTap(model, layers)
            except TapError as e:
                raise MethodError(f"method 'spectralkd': {side}_layers={list(layers)}: {e}") from None
            if side == "student":
                self.s_tap = tap
            else:
                self.t_tap = tap
        self.s_layers, self.t_layers = list(s_layers), list(t_layers)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The (student_layer, teacher_layer) pairs in use (empty until ``prepare`` for ``auto``)."""
        return list(zip(self.s_layers, self.t_layers))

    # -- auto pairs -----------------------------------------------------------------------------
    def prepare(self, train_set: Dataset, seed: int) -> None:
        """For ``auto`` pairs: the teacher's layer intensity on ``auto_images`` class-balanced training
        images drawn with ``seed`` (the same pairs on resume), then ``select_layer_pairs``."""
        if not self.auto or self.params["fft_weight"] == 0:
            return
        from ..analysis.model_analysis import analyze_layers, balanced_loader
        from ..analysis.spectrum import select_layer_pairs

        n = min(self.params["auto_images"], len(train_set))
        device = next(self.teacher.parameters()).device
        with _seeded_rng(seed):
            loader = balanced_loader(train_set, n, seed, batch_size=min(AUTO_BATCH_SIZE, n))
            stats = analyze_layers(self.teacher, loader, max_images=n, device=device, progress=False)
        intensity = [stats[i]["intensity"] for i in sorted(stats)]
        pairs = select_layer_pairs(intensity, num_tappable_layers(self.student),
                                   self.params["auto_first"], self.params["auto_last"])
        self._build_taps([s for s, _ in pairs], [t for _, t in pairs])
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"spectralkd: auto layer pairs from the teacher's intensity on {n} training images (seed {seed}): "
                  f"student_layers {self.s_layers} <- teacher_layers {self.t_layers}", flush=True)

    # -- training -------------------------------------------------------------------------------
    def forward_train(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        a, w = p["alpha"], p["fft_weight"]
        use_features = w > 0
        if use_features and self.s_tap is None:
            raise MethodError("method 'spectralkd': layer pairs are 'auto' but prepare(train_set, seed) has not "
                              "run; the trainer calls it before the first step")
        if use_features:
            logits, s_maps = self.s_tap(images, need_logits=True)
            t_logits, t_maps = self.run_teacher(images, self.t_tap, need_logits=a > 0)
        else:
            logits = self.student(images)
            t_logits = self.teacher_forward(images) if a > 0 else None

        zero = logits.new_zeros((), dtype=torch.float32)
        if t_logits is None:
            kd = zero
        elif p["kd_mode"] == "hard":
            kd = hard_kd_loss(logits, t_logits)
        else:
            kd = soft_kd_loss(logits, t_logits, p["temperature"])
        feature = (self.feature_fn(ordered(s_maps, self.s_layers), ordered(t_maps, self.t_layers))
                   if use_features else zero)
        return logits, {"ce": (1 - a) * self.ce(logits, targets), "kd": a * kd, self.feature_name: w * feature}
