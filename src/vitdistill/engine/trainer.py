"""The training loop. It knows no distillation method: a Distiller returns named losses, we sum them.

Resumability: a checkpoint at the end of every epoch holds everything that influences the rest
of the run (weights, optimizer, scheduler, scaler, EMA, stage, RNG states, metric history), and
the data order of epoch ``e`` depends only on (seed, e). A run resumed from epoch ``e`` therefore
replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.optim
import timm.utils
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..config import Config, config_from_dict, config_to_dict, save_config
from ..data import build_data
from ..errors import VitdistillError
from ..io import atomic_write_text
from ..methods import Distiller, build_method, parse_method_params
from ..models import count_params, save_weights
from ..models.factory import build_model, model_metadata
from ..rng import capture_rng_state, restore_rng_state, seed_everything
from ..schedule import cosine_with_warmup
from ..teacher_cache import TeacherCache, fingerprint, replay_views
from .checkpoint import atomic_torch_save, load_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, setup_distributed
from .evaluate import evaluate
from .online import OnlineDataFree
from .runlog import Progress, TensorBoardLog, versions, write_metrics_csv, write_summary


class TrainingError(VitdistillError, RuntimeError):
    """The run cannot continue (non-finite loss, an existing run folder, ...); the message says why."""


LAST_CHECKPOINT = "last.pt"
#: what a `--branch-from` run's config may change: nothing that alters the epochs already trained
BRANCH_MAY_CHANGE = ("run.name", "run.output_dir", "train.keep_epochs", "method.params.switch_epoch")


def warmup_epochs(warmup: float, epochs: int, quiet: bool = False) -> float:
    """The warm-up in epochs: as configured, or half the run when the configured warm-up is longer than
    the run (a user shortening a run with ``train.epochs=1`` need not know the config's warm-up)."""
    if warmup <= epochs:
        return warmup
    if not quiet:
        print(f"note: train.warmup_epochs={warmup:g} exceeds train.epochs={epochs}; warming up for "
              f"{epochs / 2:g} epochs (half the run) instead", flush=True)
    return epochs / 2


def build_models(cfg: Config, num_classes: int, verbose: bool = False) -> tuple[nn.Module, nn.Module | None]:
    d = cfg.data
    student = build_model(cfg.model, num_classes, d.in_chans, d.img_size, verbose)
    teacher = build_model(cfg.teacher, num_classes, d.in_chans, d.img_size) if cfg.teacher.name else None
    return student, teacher


@dataclass
class _Loaders:
    train: DataLoader | OnlineDataFree
    train_sampler: DistributedSampler | OnlineDataFree  # what set_epoch() is called on
    val: DataLoader
    steps_per_epoch: int


def _val_loader(cfg: Config, data, info: DistInfo) -> DataLoader:
    # evaluation shards are disjoint (no padding), so reduced counts are exact
    val_indices = list(range(info.rank, len(data.val), info.world_size))
    return DataLoader(Subset(data.val, val_indices), batch_size=cfg.data.eval_batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers)


def _steps(cfg: Config, steps: int) -> int:
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def _build_loaders(cfg: Config, data, info: DistInfo) -> _Loaders:
    d = cfg.data
    # DistributedSampler also for one process: its order depends only on (seed, epoch), which
    # is what makes a resumed run replay the same batches.
    sampler = DistributedSampler(data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.run.seed, drop_last=False)
    drop_last = len(sampler) >= d.batch_size  # mixup needs even, full batches; tiny sets keep their one batch
    train = DataLoader(data.train, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers,
                       drop_last=drop_last, pin_memory=info.device.type == "cuda",
                       persistent_workers=d.num_workers > 0)
    steps = _steps(cfg, len(train))
    if steps == 0:
        raise TrainingError(f"the training set ({len(data.train)} images) gives no batch of data.batch_size={d.batch_size}")
    return _Loaders(train, sampler, _val_loader(cfg, data, info), steps)


class Trainer:
    """Builds everything from a Config and runs (or resumes) it. ``fit()`` returns the summary."""

    def __init__(self, cfg: Config, resume: bool = False, quiet: bool = False, branch_from: str | Path | None = None
                 ) -> None:
        self.cfg = cfg
        self.info = setup_distributed(cfg.train.device)
        self.quiet = quiet or not self.info.is_main
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        ckpt_path = self.run_dir / LAST_CHECKPOINT
        if ckpt_path.exists() and not resume:
            raise TrainingError(f"run folder '{self.run_dir}' already holds a checkpoint; pass --resume to continue it, "
                                f"or choose another run.name=... / run.output_dir=...")
        if resume and not ckpt_path.exists():
            raise TrainingError(f"--resume: no checkpoint '{ckpt_path}' to resume from")
        if branch_from is not None and (resume or cfg.datafree.online or not Path(branch_from).is_file()):
            why = ("a branch starts a new run; it cannot be combined with --resume" if resume else
                   "datafree.online keeps its image bank in the run folder; online runs cannot branch"
                   if cfg.datafree.online else "no such checkpoint file")
            raise TrainingError(f"--branch-from '{branch_from}': {why}")
        resume_state = load_checkpoint(ckpt_path) if resume else None
        branch_state = load_checkpoint(branch_from) if branch_from is not None else None

        t = cfg.train
        params = parse_method_params(cfg.method.name, cfg.method.params)  # a bad param fails before any work
        online = cfg.datafree.online
        if online and self.info.enabled:
            raise TrainingError("datafree.online=true runs in one process (the image bank is not sharded); "
                                "start it without torchrun")
        seed_everything(cfg.run.seed + self.info.rank, cfg.run.deterministic)
        self.data = build_data(cfg.data, seed=cfg.run.seed, label_smoothing=t.label_smoothing,
                               real_train=not online, evaluation=t.eval_every > 0)
        student, teacher = build_models(cfg, self.data.num_classes, not self.quiet)
        self.metadata = model_metadata(cfg, self.data.num_classes)
        self.distiller: Distiller = build_method(cfg.method.name, params, student, teacher,
                                                 label_smoothing=t.label_smoothing, epochs=t.epochs)
        self.device = self.info.device
        self.distiller.to(self.device)
        self.distiller.prepare(self.data.train, cfg.run.seed)
        if t.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.online: OnlineDataFree | None = None
        self.cache: TeacherCache | None = None
        self.replay = cfg.data.replay or bool(cfg.teacher.cache)
        if self.replay:  # views a pure function of (seed, epoch, sample), mixed inside the dataset
            self.data.train = replay_views(cfg, self.data.train, self.data.num_classes)
            self.data.mixup_fn = None
        if cfg.teacher.cache:
            self.cache = TeacherCache(cfg.teacher.cache, fingerprint(cfg, len(self.data.train), self.data.train_indices),
                                      t.epochs)
        if online:
            self.online = OnlineDataFree(cfg, self.distiller.student, self.distiller.teacher, self.data.num_classes,
                                         self.data.mean, self.data.std, self.device, self.run_dir)
            self.loaders = _Loaders(self.online, self.online, _val_loader(cfg, self.data, self.info),
                                    _steps(cfg, len(self.online)))
        else:
            self.loaders = _build_loaders(cfg, self.data, self.info)
        self.total_steps = t.epochs * self.loaders.steps_per_epoch
        self.warmup_steps = round(warmup_epochs(t.warmup_epochs, t.epochs, self.quiet) * self.loaders.steps_per_epoch)

        self.optimizer = timm.optim.create_optimizer_v2(self.distiller, opt=t.optimizer, lr=t.lr,
                                                        weight_decay=t.weight_decay)
        for group in self.optimizer.param_groups:
            group["lr_scale"] = group["lr"] / t.lr  # keeps per-group scaling (e.g. layer decay) under our schedule
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp and t.amp_dtype == "float16")
        if t.amp and t.amp_dtype == "float16" and self.device.type != "cuda":
            raise TrainingError("train.amp_dtype=float16 needs CUDA; use bfloat16 on the CPU")
        self.ema = timm.utils.ModelEmaV3(self.distiller.student, decay=t.ema_decay) if t.ema else None
        self.step = 0
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"top1": -1.0}
        self.wall_time = 0.0
        if resume_state is not None:
            self._load_state(resume_state)
        elif branch_state is not None:
            self._check_branch(branch_state, branch_from)
            self._load_state(branch_state, check_config=False)
        else:
            self._apply_stage(self.distiller.stage_for_epoch(0))
        self.model = self._wrap()

        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if self.data.train_indices is not None:
                atomic_write_text(self.run_dir / "subset_indices.json", json.dumps(self.data.train_indices))
        self.tb = TensorBoardLog(self.run_dir / "tensorboard", t.tensorboard and self.info.is_main)

    # -- state ----------------------------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        """The module the loop calls: the distiller, under DDP when distributed, compiled when asked.
        Rebuilt at a stage change, since the set of trainable parameters changes there."""
        model: nn.Module = self.distiller
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    def _apply_stage(self, stage: int) -> None:
        """Enter a stage; parameters outside the method's trainable modules leave the optimizer."""
        self.distiller.on_stage_change(stage)
        keep = {id(p) for m in self.distiller.trainable_modules() for p in m.parameters()}
        for group in self.optimizer.param_groups:
            dropped = [p for p in group["params"] if id(p) not in keep]
            for p in dropped:
                self.optimizer.state.pop(p, None)
                p.requires_grad_(False)
                p.grad = None
            group["params"] = [p for p in group["params"] if id(p) in keep]

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": epoch,  # epochs completed
            "step": self.step,
            "stage": self.distiller.stage,
            "rng": capture_rng_state(),
            "config": config_to_dict(self.cfg),
            "meta": self.metadata,  # what rebuilds the student without guessing (engine.load_trained_model)
            "history": self.history,
            "best": self.best,
            "wall_time": self.wall_time,
            "online": self.online.state_dict() if self.online else None,
        }

    def _check_branch(self, state: dict[str, Any], path: str | Path) -> None:
        """A branch continues another run's checkpoint under a config that may differ in the run's name and
        folder, ``train.keep_epochs`` and ``method.params.switch_epoch``, and only where this run's stages agree
        with the epochs already trained: then it equals an uninterrupted run of its own config."""
        saved, now = config_to_dict(config_from_dict(state["config"])), config_to_dict(self.cfg)
        for values in (saved, now):
            for path in BRANCH_MAY_CHANGE:
                *parents, key = path.split(".")
                section = values
                for name in parents:
                    section = section.get(name) or {}
                section.pop(key, None)
        diff = [k for k in now if saved[k] != now[k]]
        if diff:
            raise TrainingError(f"--branch-from '{path}': the config differs from the checkpoint's in sections {diff}; "
                                f"a branch may change only {', '.join(BRANCH_MAY_CHANGE)}")
        stages = [(row["epoch"], row["stage"], self.distiller.stage_for_epoch(row["epoch"] - 1))
                  for row in state["history"]]
        wrong = [(epoch, was) for epoch, was, would in stages if was != would]
        if wrong:
            raise TrainingError(f"--branch-from '{path}': epoch {wrong[0][0]} ran in stage {wrong[0][1]}, which this "
                                f"config's stages do not (branch at or before the first epoch where they differ)")

    def _load_state(self, state: dict[str, Any], check_config: bool = True) -> None:
        saved = config_from_dict(state["config"])
        if check_config and config_to_dict(saved) != config_to_dict(self.cfg):
            diff = [k for k, v in config_to_dict(self.cfg).items() if config_to_dict(saved)[k] != v]
            raise TrainingError(f"--resume: the config differs from the checkpoint's in sections {diff}; "
                                f"resume with the run's own config.yaml")
        self._apply_stage(state["stage"])
        self.distiller.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.start_epoch = state["epoch"]
        self.step = state["step"]
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.wall_time = state["wall_time"]
        if self.online is not None:
            self.online.load_state_dict(state["online"])
        restore_rng_state(state["rng"])

    def _save(self, epoch: int) -> None:
        if self.info.is_main:
            state = self._state(epoch)
            atomic_torch_save(state, self.run_dir / LAST_CHECKPOINT)
            if epoch in self.cfg.train.keep_epochs:  # a branch point for other runs (--branch-from)
                atomic_torch_save(state, self.run_dir / f"epoch_{epoch:03d}.pt")
            write_metrics_csv(self.run_dir / "metrics.csv", self.history)
            if self.online is not None:
                self.online.write_log()
        barrier(self.info)

    # -- loop -----------------------------------------------------------------------------------
    def _amp(self) -> contextlib.AbstractContextManager:
        t = self.cfg.train
        if not t.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, t.amp_dtype))

    def _set_lr(self) -> float:
        t = self.cfg.train
        lr = cosine_with_warmup(self.step, self.total_steps, self.warmup_steps, t.lr, t.warmup_lr, t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        t, loaders = self.cfg.train, self.loaders
        self.model.train()
        loaders.train_sampler.set_epoch(epoch)
        if self.replay:
            self.data.train.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        progress = Progress(loaders.train, loaders.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}",
                            t.log_interval, not self.quiet)
        start = time.perf_counter()
        for i, batch in enumerate(progress):
            if i >= loaders.steps_per_epoch:
                break
            images, targets = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            # replayed views come mixed already, with their labels and sample indices
            hard_targets = batch[2].to(self.device, non_blocking=True) if self.replay else targets
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.data.mixup_fn is not None:
                images, targets = self.data.mixup_fn(images, targets)
            teacher = None
            if self.cache is not None:
                teacher = self.cache.teacher_outputs(self.distiller, epoch, batch[3], images)
            elif self.online is not None and self.online.relabels(self.distiller.stage):
                # after mixup: the teacher labels the images the student sees, in the forward the method reads too
                teacher = self.distiller.teacher_outputs(images, logits=True)
                targets = self.online.soft_targets(teacher.logits)
            lr = self._set_lr()
            with self._amp():
                logits, losses = self.model(images, targets, teacher)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                values = {k: float(v.detach()) for k, v in losses.items()}
                raise TrainingError(f"non-finite loss at epoch {epoch + 1}, step {i + 1}: {values}; stopping. "
                                    f"The last good checkpoint is kept in '{self.run_dir / LAST_CHECKPOINT}' "
                                    f"(if an epoch had finished); lower train.lr or enable train.clip_grad")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if t.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.distiller.student, step=self.step)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double() * len(images)
            correct += logits.detach().argmax(1).eq(hard_targets).sum()
            seen += len(images)
            progress.update(i + 1, {"loss": loss.item(), "lr": lr})
        progress.close()
        elapsed = time.perf_counter() - start
        names = sorted(sums)
        packed = torch.stack([sums[k] for k in names] + [correct, torch.tensor(seen, dtype=torch.float64, device=self.device)])
        all_reduce_sum(packed, self.info)
        n = packed[-1].item()
        row = {f"train_{k}": packed[j].item() / n for j, k in enumerate(names)}
        row["train_loss"] = sum(row.values())
        row["train_top1"] = 100.0 * packed[-2].item() / n
        row["images_per_s"] = n / elapsed
        return row

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        if self.info.is_main and not self.quiet:
            n_student = count_params(self.distiller.student)
            print(f"run '{self.run_dir}': {self.cfg.model.name} ({n_student / 1e6:.2f}M params), method "
                  f"'{self.cfg.method.name}', {self._train_images()}, {t.epochs} epochs x "
                  f"{self.loaders.steps_per_epoch} steps, device {self.device}, {self.info.world_size} process(es)",
                  flush=True)
        try:
            for epoch in range(self.start_epoch, t.epochs):
                stage = self.distiller.stage_for_epoch(epoch)
                if stage != self.distiller.stage:
                    self._apply_stage(stage)
                    self.model = self._wrap()
                epoch_start = time.perf_counter()
                row: dict[str, Any] = {"epoch": epoch + 1, "stage": self.distiller.stage}
                row.update(self.train_one_epoch(epoch))
                row["lr"] = self.optimizer.param_groups[0]["lr"]
                if t.eval_every and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
                    val = evaluate(self.distiller, self.loaders.val, self.device, self.info, self._amp())
                    row.update({f"val_{k}": v for k, v in val.items()})
                    if self.ema is not None:
                        ema_val = evaluate(self.ema.module, self.loaders.val, self.device, self.info, self._amp())
                        row.update({f"val_ema_{k}": v for k, v in ema_val.items()})
                    if val["top1"] > self.best["top1"]:
                        self.best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch + 1}
                        if self.info.is_main:
                            save_weights(self.distiller.student, self.run_dir / "best.safetensors",
                                         self.metadata)
                self.wall_time += time.perf_counter() - epoch_start
                row["epoch_time_s"] = time.perf_counter() - epoch_start
                self.history.append(row)
                self.tb.log(row, self.step)
                self._save(epoch + 1)
                if not self.quiet:
                    shown = {k: v for k, v in row.items() if k.startswith(("train_", "val_")) or k == "images_per_s"}
                    print(f"epoch {epoch + 1}/{t.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)
            return self._finish()
        finally:
            self.tb.close()

    def _train_images(self) -> str:
        if self.online is None:
            return f"{len(self.data.train)} training images"
        f = self.cfg.datafree
        return (f"no real training image (online {f.synthesizer} synthesis: {f.rounds_per_epoch} rounds of "
                f"{f.images_per_round or self.cfg.synthesis.batch_size} images per epoch)")

    def _finish(self) -> dict[str, Any]:
        last = self.history[-1]
        summary = {
            "run": str(self.run_dir),
            "model": self.cfg.model.name,
            "method": self.cfg.method.name,
            "student_params": count_params(self.distiller.student),
            "train_images": len(self.online.bank) if self.online else len(self.data.train),
            "epochs": self.cfg.train.epochs,
            "seed": self.cfg.run.seed,
            "best_top1": self.best["top1"] if self.best["top1"] >= 0 else None,
            "best_top5": self.best.get("top5"),
            "best_epoch": self.best.get("epoch"),
            "last_top1": last.get("val_top1"),
            "last_top5": last.get("val_top5"),
            "wall_time_s": self.wall_time,
            "world_size": self.info.world_size,
            "versions": versions(),
        }
        if self.online is not None:
            summary["bank"] = str(self.online.export_bank()) if self.info.is_main else None
            summary["synthesis_s"] = sum(row["synthesis_s"] for row in self.online.log)
        if self.info.is_main:
            save_weights(self.distiller.student, self.run_dir / "last.safetensors",
                         self.metadata)
            write_summary(self.run_dir / "summary.json", summary)
        barrier(self.info)
        return summary

    def close(self) -> None:
        cleanup_distributed(self.info)


def train(cfg: Config, resume: bool = False, quiet: bool = False, branch_from: str | Path | None = None
          ) -> dict[str, Any]:
    """Train (or resume, or branch from another run's checkpoint) one run; returns its summary (also written to
    ``summary.json``)."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet, branch_from=branch_from)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["Trainer", "TrainingError", "train"]
