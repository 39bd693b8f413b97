"""Online data-free training: the training "loader" that makes its own images (docs/methods.md §1.7).

An epoch is ``datafree.rounds_per_epoch`` rounds. A round synthesises one batch from the teacher against the
*current* student (the synthesiser of ``datafree.synthesizer``, the ``synthesis`` losses plus the adversarial
term), appends it to the image bank, then yields ``datafree.steps_per_round`` minibatches drawn from the bank
(uniformly, with replacement, from the newest ``datafree.bank_size`` images), each through the run's train
augmentation. Where :meth:`OnlineDataFree.relabels` says so, the trainer replaces a minibatch's labels with
:meth:`OnlineDataFree.soft_targets` of the teacher's logits on the exact (augmented, mixed) images, from the one
teacher forward the method's own losses read too; otherwise the synthesis labels are the targets.

Every round writes a row of ``rounds.csv`` (at each checkpoint) and, every ``samples_every`` rounds,
``samples.png``. Round ``r`` is seeded by (run seed, r), and the bank and the synthesiser's state are part of
the checkpoint, so a resumed run replays the rounds of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bank import ImageBank
from ..config import Config
from ..data import build_transforms
from ..io import atomic_write_text
from ..synthesis import class_diversity, from_uint8, save_grid, to_uint8
from ..synthesizers import InversionObjective, build_synthesizer, round_labels

__all__ = ["OnlineDataFree"]

ROUND_SEED_STRIDE = 1_000_003
DRAW_SEED_OFFSET = 2**32  # the student draws of round r use a stream apart from its synthesis


class OnlineDataFree:
    def __init__(self, cfg: Config, student: nn.Module, teacher: nn.Module, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, run_dir: Path) -> None:
        f, syn, d = cfg.datafree, cfg.synthesis, cfg.data
        self.cfg, self.student, self.teacher, self.device, self.run_dir = cfg, student, teacher, device, run_dir
        self.num_classes, self.mean, self.std = num_classes, mean, std
        self.seed = cfg.run.seed
        self.transform = build_transforms(d, True, mean, std)
        shape = (d.in_chans, d.img_size, d.img_size)
        # what the bank's images depend on: shards made under another fingerprint are never reused
        fingerprint = json.dumps({"datafree": dataclasses.asdict(f), "synthesis": dataclasses.asdict(syn),
                                  "seed": self.seed, "teacher": dataclasses.asdict(cfg.teacher),
                                  "student": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(d)},
                                 sort_keys=True)
        self.bank = ImageBank(run_dir / "bank", fingerprint)
        self.synthesizer = build_synthesizer(f, syn, num_classes, shape, mean, std, self.seed, device)
        self.log: list[dict[str, Any]] = []
        self.epoch = 0

    def __len__(self) -> int:
        f = self.cfg.datafree
        return f.rounds_per_epoch * f.steps_per_round

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        f, batch_size = self.cfg.datafree, self.cfg.data.batch_size
        for _ in range(f.rounds_per_epoch):
            round_index = self.bank.rounds
            self.synthesize_round(round_index)
            images, labels = self.bank.tensors(f.bank_size)
            g = torch.Generator().manual_seed(self.seed * ROUND_SEED_STRIDE + round_index + DRAW_SEED_OFFSET)
            for _ in range(f.steps_per_round):
                idx = torch.randint(len(labels), (batch_size,), generator=g)
                yield torch.stack([self.transform(images[i]) for i in idx]), labels[idx]

    # -- one round --------------------------------------------------------------------------------
    def synthesize_round(self, round_index: int) -> None:
        f, syn = self.cfg.datafree, self.cfg.synthesis
        labels = round_labels(self.num_classes, syn.batch_size, syn.per_class, round_index).to(self.device)
        student = self.student
        was_training = student.training
        grad_flags = [p.requires_grad for p in student.parameters()]
        student.eval().requires_grad_(False)  # synthesis differentiates through the student, never into it
        try:
            start = time.perf_counter()
            # the first round warms a generator up: there is no student worth contending with yet
            adversary = student if f.adversarial_weight > 0 and round_index > 0 else None
            with InversionObjective(self.teacher, syn, f.adversarial_weight, f.adversarial_temperature,
                                    f.adversarial_agree_only) as objective:
                steps = f.first_round_steps if round_index == 0 else f.synthesis_steps
                x, labels, terms = self.synthesizer.synthesize(objective, labels, self.seed * ROUND_SEED_STRIDE
                                                               + round_index, adversary, steps)
            images = to_uint8(x, self.mean, self.std)
            seconds = time.perf_counter() - start
            stored = from_uint8(images, self.mean, self.std).to(self.device)  # what the student will train on
            with torch.inference_mode():
                t_logits, s_logits = self.teacher(stored).float(), student(stored).float()
        finally:
            student.train(was_training)
            for p, flag in zip(student.parameters(), grad_flags):
                p.requires_grad_(flag)
        t_prob = t_logits.softmax(1)
        row = {"round": round_index + 1, "epoch": self.epoch + 1, "bank_images": len(self.bank) + len(images),
               "teacher_top1": 100.0 * float((t_logits.argmax(1) == labels).float().mean()),
               "teacher_confidence": float(t_prob.amax(1).mean()),
               "agreement": 100.0 * float((s_logits.argmax(1) == t_logits.argmax(1)).float().mean()),
               "class_diversity": class_diversity(self.teacher, stored, labels),
               "synthesis_s": seconds, **{f"syn_{k}": v for k, v in terms.items()}}
        self.bank.append(images, labels.cpu())
        self.log.append(row)
        if (round_index + 1) % f.samples_every == 0:
            save_grid(images, labels.cpu(), self.run_dir / "samples.png")

    # -- targets ------------------------------------------------------------------------------------
    def relabels(self, stage: int) -> bool:
        """Whether the student's targets in ``stage`` are the teacher's outputs on its very (augmented, mixed)
        images (:meth:`soft_targets`), rather than the synthesis labels (or mixup's soft labels)."""
        f = self.cfg.datafree
        return (f.targets if stage == 1 else f.stage2_targets) == "teacher"

    def soft_targets(self, teacher_logits: Tensor) -> Tensor:
        return F.softmax(teacher_logits.float() / self.cfg.datafree.target_temperature, dim=1)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.bank.rounds, "synthesizer": self.synthesizer.state_dict(), "log": list(self.log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load(state["rounds"])
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.log = list(state["log"])

    def write_log(self) -> None:
        if not self.log:
            return
        columns = list(self.log[0])
        lines = [",".join(columns)] + [",".join(f"{row.get(k, ''):.6g}" if isinstance(row.get(k), float)
                                                else str(row.get(k, "")) for k in columns) for row in self.log]
        atomic_write_text(self.run_dir / "rounds.csv", "\n".join(lines) + "\n")

    def export_bank(self) -> Path:
        """The whole bank as ``<run>/bank/images.safetensors``, usable as ``data.synthetic``."""
        d = self.cfg.data
        path = self.run_dir / "bank" / "images.safetensors"
        self.bank.export(path, {"dataset": d.name, "in_chans": str(d.in_chans), "img_size": str(d.img_size)})
        return path
