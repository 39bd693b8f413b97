"""The distiller contract and the method registry.

A method wraps the student (and a frozen teacher) and returns the loss terms; the trainer sums
them and knows nothing else about the method. A new method is one file in this folder (a
:class:`Distiller` subclass with ``@register_method`` and, if it takes params, a :class:`MethodParams`
dataclass), one import in ``methods/__init__.py`` and one YAML.

The rules the trainer relies on:

- **Teacher.** The teacher is deliberately *not* a registered submodule: it never enters the
  optimizer, the checkpoint, DDP or ``.train()``. It is frozen and in eval mode, and follows every
  device/dtype move of the distiller (``.to()``, ``.cuda()``, ``.half()``, ...: see ``_apply``).
- **Order of calls.** ``__init__`` (models on the CPU) -> ``.to(device)`` -> :meth:`prepare` (once per
  process, also on resume) -> :meth:`on_stage_change` for the first epoch's stage -> ``forward_train``
  per step. ``prepare`` may read data and build taps but must not create parameters (the optimizer
  is built after it; parameters made later would never train).
- **Stages.** :meth:`stage_for_epoch` must be non-decreasing in the epoch: stages change one way. At
  a change the trainer calls :meth:`on_stage_change` and drops from the optimizer every parameter
  outside :meth:`trainable_modules` for good (their optimizer state is discarded).
- **Teacher outputs.** :meth:`teacher_request` says what this step's losses read from the teacher in the
  current stage (logits, a tap's maps, or nothing); :meth:`teacher_outputs` runs the teacher once for that,
  stopping at the deepest tapped layer when no logits are needed. The trainer may compute them itself (one
  forward shared with the data-free relabelling) and hand them to ``forward_train(..., teacher=...)``; a
  method given none computes its own.
- **Losses.** ``forward_train`` returns the logits used for the train accuracy and a dict of named
  scalar losses; the trainer sums them and logs each as ``train_<name>``, averaged over all images
  of the epoch. Return the same names on every step (use a zero tensor for a term that is off) so
  that the per-epoch averages are comparable.
- **Evaluation.** ``forward_eval`` gives the logits the test accuracy is measured on. The EMA copy
  (``train.ema``) is a copy of the student alone and is evaluated by calling it directly, so a
  student's own eval-mode forward must already give the prediction (timm's distilled models average
  their two heads in eval mode).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import VitdistillError
from ..losses import logit_kd_loss
from ..schema import check, parse_section

KDMode = Literal["soft", "hard"]


class MethodError(VitdistillError, ValueError):
    """A user-facing problem with ``method.name``, ``method.params`` or the models a method gets."""


@dataclass
class TeacherOutputs:
    """What the teacher said about one batch: its logits (None when not asked for) and the tapped maps."""

    logits: Tensor | None
    maps: dict[Any, Tensor] = field(default_factory=dict)


@dataclass
class MethodParams:
    """Base of every method's ``method.params``: typed fields, parsed like the config sections (coercion,
    closest-key suggestions), then :meth:`validate` checks the ranges."""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming ``method.params.<key>``, the bad value and what is valid."""

    @staticmethod
    def require(ok: bool, name: str, value: Any, valid: str) -> None:
        check(ok, f"method.params.{name}={value!r} {valid}")


@dataclass
class LogitKDParams(MethodParams):
    """Logit distillation shared by kd, deit, dearkd and spectralkd: ``kd_mode: soft`` is
    ``tau^2 * KL(p_t || p_s)`` (batchmean), ``kd_mode: hard`` the cross-entropy to the teacher's argmax."""

    alpha: float = 0.5  # weight of the KD term; the label term gets 1 - alpha
    temperature: float = 1.0
    kd_mode: KDMode = "soft"

    def validate(self) -> None:
        self.require(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "must be in [0, 1]")
        self.require(self.temperature > 0, "temperature", self.temperature, "must be > 0")

    def kd_loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return logit_kd_loss(student_logits, teacher_logits, self.kd_mode, self.temperature)


@dataclass
class LayerPairParams(MethodParams):
    """Student layer ``student_layers[i]`` is matched to teacher layer ``teacher_layers[i]`` (``LayerTap``
    indices or dotted module paths)."""

    student_layers: list[int | str] = dataclasses.field(default_factory=lambda: [1, 2])
    teacher_layers: list[int | str] = dataclasses.field(default_factory=lambda: [1, 2])

    def validate(self) -> None:
        s, t = self.student_layers, self.teacher_layers
        check(isinstance(s, list) and isinstance(t, list) and len(s) == len(t) and len(s) > 0,
              f"method.params.student_layers={s!r} and teacher_layers={t!r} must be non-empty lists of the same "
              "length (one teacher layer per student layer)")


class Distiller(nn.Module):
    """Base class: student only, cross-entropy on the ground truth."""

    #: the dataclass of ``method.params`` (fields and defaults); ``MethodParams`` takes none
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: whether the method needs a teacher
    needs_teacher: ClassVar[bool] = False
    method_name: ClassVar[str]

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: MethodParams,
                 label_smoothing: float = 0.0, epochs: int = 1) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # unregistered on purpose, see module docstring
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.params = params
        self.label_smoothing = label_smoothing
        self.epochs = epochs
        self.stage = 1

    # -- the contract -------------------------------------------------------------------------
    def forward_train(self, images: Tensor, targets: Tensor, teacher: TeacherOutputs | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"ce": self.ce(logits, targets)}

    def teacher_request(self) -> tuple[bool, Any]:
        """(logits needed, LayerTap or None) for the current stage; ``(False, None)``: the teacher is not run."""
        return False, None

    def forward_eval(self, images: Tensor) -> Tensor:
        return self.student(images)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student]

    def prepare(self, train_set: Dataset, seed: int) -> None:
        """Called once before training (and again on resume) with the training set: methods that
        decide something from data (e.g. SpectralKD's ``auto`` layer pairs) do it here,
        deterministically in ``seed``. Must not create parameters."""

    def stage_for_epoch(self, epoch: int) -> int:
        return 1

    def on_stage_change(self, stage: int) -> None:
        self.stage = stage

    # -- helpers ------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """The student's own exemptions (pos_embed, cls/dist tokens, ...), under this module's names;
        timm's optimizer factory reads this."""
        names = self.student.no_weight_decay() if hasattr(self.student, "no_weight_decay") else set()
        return {f"student.{n}" for n in names}

    def forward(self, images: Tensor, targets: Tensor | None = None, teacher: TeacherOutputs | None = None):
        # DDP only hooks forward(), so training goes through here too.
        if self.training:
            return self.forward_train(images, targets, teacher)
        return self.forward_eval(images)

    def ce(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy on hard labels or on mixup's soft targets."""
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def teacher_outputs(self, images: Tensor, logits: bool = False) -> TeacherOutputs | None:
        """One teacher forward for what :meth:`teacher_request` asks (plus the logits when ``logits``);
        None when nothing is asked."""
        need_logits, tap = self.teacher_request()
        need_logits = need_logits or logits
        if not need_logits and tap is None:
            return None
        return TeacherOutputs(*self.run_teacher(images, tap, need_logits))

    def run_teacher(self, images: Tensor, tap: Any = None, need_logits: bool = True
                    ) -> tuple[Tensor | None, dict[Any, Tensor]]:
        """Teacher logits and (through ``tap``, a LayerTap on the teacher) intermediate maps."""
        with torch.inference_mode():
            if tap is None:
                logits, maps = self.teacher(images), {}
            else:
                logits, maps = tap(images, need_logits=need_logits)
        # inference tensors cannot be saved for backward by the losses: hand back ordinary tensors
        return (None if logits is None else logits.clone()), {k: v.clone() for k, v in maps.items()}

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half(), .float() ... all end here; the teacher is unregistered, so move it too
        if self.teacher is not None:
            self.teacher._apply(fn)
        return super()._apply(fn, recurse)


_METHODS: dict[str, type[Distiller]] = {}


def register_method(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = cls
        cls.method_name = name
        return cls
    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Distiller]:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MethodError(f"unknown method.name '{name}'{hint}; registered methods: {list_methods()}")
    return _METHODS[name]


def parse_method_params(name: str, params: dict[str, Any] | None) -> MethodParams:
    """``method.params`` of method ``name`` as its typed, range-checked ``Params`` dataclass."""
    parsed = parse_section(get_method(name).Params, dict(params or {}), "method.params")
    parsed.validate()
    return parsed


def build_method(name: str, params: dict[str, Any] | MethodParams | None, student: nn.Module,
                 teacher: nn.Module | None, label_smoothing: float = 0.0, epochs: int = 1) -> Distiller:
    cls = get_method(name)
    if not isinstance(params, MethodParams):
        params = parse_method_params(name, params)
    if cls.needs_teacher and teacher is None:
        raise MethodError(f"method '{name}' needs a teacher: set teacher.name (and teacher.checkpoint)")
    return cls(student, teacher, params, label_smoothing=label_smoothing, epochs=epochs)
