"""The distiller contract and the method registry.

A method wraps the student (and a frozen teacher) and returns the loss terms; the trainer sums
them and knows nothing else about the method. The teacher is deliberately *not* a registered
submodule: it never enters the optimizer, the checkpoint, DDP or ``.train()``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset


class MethodError(ValueError):
    """A user-facing problem with ``method.name`` or ``method.params``."""


class Distiller(nn.Module):
    """Base class: student only, cross-entropy on the ground truth."""

    #: names and defaults of ``method.params`` this method accepts
    param_defaults: dict[str, Any] = {}
    #: whether the method needs a teacher
    needs_teacher: bool = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: dict[str, Any],
                 label_smoothing: float = 0.0, epochs: int = 1) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # unregistered on purpose, see module docstring
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.params = {**self.param_defaults, **params}
        self.label_smoothing = label_smoothing
        self.epochs = epochs
        self.stage = 1

    # -- the contract -------------------------------------------------------------------------
    def forward_train(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(images)
        return logits, {"ce": self.ce(logits, targets)}

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

    def forward(self, images: Tensor, targets: Tensor | None = None, epoch: int = 0):
        # DDP only hooks forward(), so training goes through here too.
        if self.training:
            return self.forward_train(images, targets, epoch)
        return self.forward_eval(images)

    def ce(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy on hard labels or on mixup's soft targets."""
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def teacher_forward(self, images: Tensor) -> Tensor:
        """Teacher logits, computed without autograd bookkeeping."""
        return self.run_teacher(images)[0]

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

    def to(self, *args, **kwargs):  # the teacher is unregistered, so move it by hand
        if self.teacher is not None:
            self.teacher.to(*args, **kwargs)
        return super().to(*args, **kwargs)


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


def build_method(name: str, params: dict[str, Any], student: nn.Module, teacher: nn.Module | None,
                 label_smoothing: float = 0.0, epochs: int = 1) -> Distiller:
    cls = get_method(name)
    unknown = sorted(set(params) - set(cls.param_defaults))
    if unknown:
        raise MethodError(f"method '{name}' got unknown params {unknown}; valid: {sorted(cls.param_defaults)}")
    if cls.needs_teacher and teacher is None:
        raise MethodError(f"method '{name}' needs a teacher: set teacher.name (and teacher.checkpoint)")
    return cls(student, teacher, dict(params), label_smoothing=label_smoothing, epochs=epochs)
