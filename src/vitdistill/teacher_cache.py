"""Exact cached teacher targets: ``vitdistill cache-teacher CONFIG``, then ``train`` with ``teacher.cache: DIR``.

The cache pass replays the run's training views (``data.replay``: every view a pure function of run seed, epoch and
sample index, mixup/cutmix included: ``data/replay.py``) through the eval-mode teacher and stores, per epoch and
sample, the teacher's top-k logits and the logsumexp of all its logits (fp16, so the KD temperature stays free),
the top-k class indices (the first is the argmax, for hard KD) and a hash of the exact input; with ``maps``, also
the teacher's maps at the method's layers (fp16, full resolution), so that feature methods need no teacher at all. One safetensors file
per epoch (read memory-mapped), written atomically: a killed pass resumes at the first missing epoch and never
leaves half a shard. ``manifest.json`` holds the fingerprint of everything the targets depend on; a run or a
cache pass under another config is refused. Training reads the logits from the cache and never runs the teacher
for them; a method that reads teacher maps (DearKD stage 1, SpectralKD, feature_mse) reads them from the cache
when it holds them, and otherwise runs the teacher only up to its deepest tapped layer (docs/methods.md §5.3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .config import Config, resolve_path
from .data import build_data
from .data.replay import MixSpec, ReplayableViews, view_hash
from .errors import VitdistillError
from .io import SAFETENSORS_ERRORS, atomic_write_text, mmap_safetensors, write_safetensors
from .methods import Distiller, TeacherOutputs
from .models import LayerTap
from .models.factory import build_model

__all__ = ["CacheError", "TeacherCache", "build_cache", "replay_views", "reconstruct_logits", "verify_cache"]

VERSION = 1
MANIFEST = "manifest.json"


class CacheError(VitdistillError, ValueError):
    """A missing, corrupt, incomplete or foreign teacher cache; the message says which and what to do."""


def replay_views(cfg: Config, train_set: Dataset, num_classes: int) -> ReplayableViews:
    a = cfg.data.augment
    return ReplayableViews(train_set, cfg.run.seed, num_classes,
                           MixSpec(a.mixup, a.cutmix, cfg.train.label_smoothing))


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    h = hashlib.sha256()
    with open(resolve_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: Config, train_images: int, train_indices: list[int] | None) -> dict[str, Any]:
    """Everything a cached target depends on (the views and the teacher), nothing it does not (batch size,
    workers, epochs, the student, the method)."""
    d, t = cfg.data, cfg.teacher
    data = {k: v for k, v in dataclasses.asdict(d).items()
            if k not in ("batch_size", "eval_batch_size", "num_workers", "download", "root", "replay")}
    subset = None if train_indices is None else hashlib.sha256(json.dumps(train_indices).encode()).hexdigest()
    return {"version": VERSION, "seed": cfg.run.seed, "label_smoothing": cfg.train.label_smoothing, "data": data,
            "train_images": train_images, "subset": subset,
            "teacher": {"name": t.name, "kwargs": t.kwargs, "pretrained": t.pretrained,
                        "checkpoint_sha256": _file_sha256(t.checkpoint)}}


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k} ({x!r} in the cache, {y!r} now)")
    return out


def reconstruct_logits(values: Tensor, indices: Tensor, lse: Tensor, num_classes: int) -> Tensor:
    """Full logits from the top-k: exact at the top-k classes; the probability left over is spread evenly over
    the other classes (exact when k = num_classes)."""
    values, lse = values.float(), lse.float()
    k = values.shape[1]
    out = torch.empty(values.shape[0], num_classes, dtype=torch.float32, device=values.device)
    if k < num_classes:
        rest = (1.0 - torch.exp(values - lse[:, None]).sum(1)).clamp_min(1e-12)
        out[:] = (lse + torch.log(rest / (num_classes - k)))[:, None]
    out.scatter_(1, indices.long(), values)
    return out


def _epoch_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch_{epoch:04d}.safetensors"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The cache's manifest, None when there is none; a damaged one is a CacheError."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info.get("fingerprint"), dict):
            raise KeyError("fingerprint")
        return info
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise CacheError(f"teacher cache '{folder}': {MANIFEST} is corrupt ({e}); delete the folder and make it "
                         "again") from None


class TeacherCache:
    """An opened cache: :meth:`teacher_outputs` gives a method its cached logits (plus live tapped maps)."""

    def __init__(self, folder: str | Path, expected: dict[str, Any], epochs: int) -> None:
        self.folder = Path(folder)
        info = _read_manifest(self.folder)
        if info is None:
            raise CacheError(f"teacher.cache='{self.folder}' holds no cache ({MANIFEST} missing); make it with "
                             f"`vitdistill cache-teacher CONFIG` under the same config")
        found = info["fingerprint"]
        diff = _differences(found, expected)
        if diff:
            raise CacheError(f"teacher.cache='{self.folder}' was made under another config: {'; '.join(diff[:5])}"
                             f"{' ...' if len(diff) > 5 else ''}; make a new cache for this config")
        missing = [e for e in range(epochs) if not _epoch_path(self.folder, e).is_file()]
        if missing:
            raise CacheError(f"teacher.cache='{self.folder}' lacks epochs {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                             f" of train.epochs={epochs}; run `vitdistill cache-teacher` again to finish it")
        self.num_classes, self.topk = int(info["num_classes"]), int(info["topk"])
        self.map_layers = list(info.get("maps") or [])
        self.images = int(found["train_images"])
        self._epoch, self._shard = -1, {}

    def shard(self, epoch: int) -> dict[str, Tensor]:
        if epoch != self._epoch:
            path = _epoch_path(self.folder, epoch)
            try:
                shard = mmap_safetensors(path)
                ok = ({"values", "indices", "lse", "view_hash"} <= set(shard) and shard["values"].shape ==
                      (self.images, self.topk) and shard["indices"].shape == (self.images, self.topk))
            except SAFETENSORS_ERRORS as e:
                raise CacheError(f"teacher cache shard '{path}' cannot be read ({e}); delete it and run "
                                 f"`vitdistill cache-teacher` again") from None
            if not ok:
                raise CacheError(f"teacher cache shard '{path}' does not hold {self.images} records of top-"
                                 f"{self.topk} logits; delete it and run `vitdistill cache-teacher` again")
            self._epoch, self._shard = epoch, shard
        return self._shard

    def logits(self, epoch: int, ids: Tensor) -> Tensor:
        s = self.shard(epoch)
        ids = ids.cpu().long()
        return reconstruct_logits(s["values"][ids], s["indices"][ids], s["lse"][ids], self.num_classes)

    def teacher_outputs(self, distiller: Distiller, epoch: int, ids: Tensor, images: Tensor) -> TeacherOutputs | None:
        """What ``distiller`` asks of the teacher this step: logits from the cache, maps from a forward that stops
        at the deepest tapped layer."""
        need_logits, tap = distiller.teacher_request()
        if not need_logits and tap is None:
            return None
        logits = self.logits(epoch, ids).to(images.device) if need_logits else None
        if tap is None:
            maps = {}
        elif all(layer in self.map_layers for layer in tap.layers):
            shard, rows = self.shard(epoch), ids.cpu().long()
            maps = {layer: shard[f"map.{layer}"][rows].to(images.device, images.dtype) for layer in tap.layers}
        else:
            maps = distiller.run_teacher(images, tap, need_logits=False)[1]
        return TeacherOutputs(logits, maps)


def _prepare(cfg: Config) -> tuple[ReplayableViews, nn.Module, dict[str, Any], torch.device]:
    from .engine.distributed import resolve_device

    if not cfg.teacher.name:
        raise CacheError("cache-teacher needs a teacher: set teacher.name (and teacher.checkpoint)")
    if cfg.datafree.online:
        raise CacheError("datafree.online=true makes its images during training: there is nothing to cache")
    d = cfg.data
    data = build_data(d, seed=cfg.run.seed, label_smoothing=cfg.train.label_smoothing, evaluation=False)
    views = replay_views(cfg, data.train, data.num_classes)
    device = resolve_device(cfg.train.device)
    teacher = build_model(cfg.teacher, data.num_classes, d.in_chans, d.img_size).to(device).eval()
    teacher.requires_grad_(False)
    return views, teacher, fingerprint(cfg, len(views), data.train_indices), device


def _map_layers(cfg: Config) -> list[int | str]:
    layers = (cfg.method.params or {}).get("teacher_layers")
    if not isinstance(layers, list) or not layers:
        raise CacheError(f"--maps stores the teacher's maps at method.params.teacher_layers, which is {layers!r} for "
                         f"method '{cfg.method.name}'; give a list of layers (e.g. [1, 2])")
    return layers


def build_cache(cfg: Config, folder: str | Path | None = None, topk: int = 10, batch_size: int | None = None,
                maps: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write (or finish) the cache of ``cfg``'s run in ``folder`` (default ``teacher.cache``); with ``maps``, also
    the teacher's maps at ``method.params.teacher_layers``. Returns a summary."""
    folder = Path(folder or cfg.teacher.cache or "")
    if not str(folder) or str(folder) == ".":
        raise CacheError("cache-teacher needs a folder: set teacher.cache=DIR (or pass --out DIR)")
    views, teacher, fp, device = _prepare(cfg)
    k = min(topk, views.num_classes)
    if topk < 1:
        raise CacheError(f"--topk={topk} must be >= 1")
    layers = _map_layers(cfg) if maps else []
    tap = LayerTap(teacher, layers) if layers else None
    found = _read_manifest(folder)
    if found is not None:
        diff = _differences(found["fingerprint"], fp)
        if diff or found.get("topk") != k or found.get("maps", []) != layers:
            raise CacheError(f"'{folder}' holds a cache made under another config ({'; '.join(diff[:3]) or 'topk or maps'}); "
                             "choose another folder")
    else:
        atomic_write_text(folder / MANIFEST, json.dumps({"fingerprint": fp, "num_classes": views.num_classes, "topk": k,
                                                "maps": layers, "epochs": cfg.train.epochs}, indent=2) + "\n")
    start, done, written = time.perf_counter(), 0, 0
    for epoch in range(cfg.train.epochs):
        path = _epoch_path(folder, epoch)
        if path.is_file():
            done += 1
            continue
        views.set_epoch(epoch)
        loader = DataLoader(views, batch_size=batch_size or cfg.data.eval_batch_size, shuffle=False,
                            num_workers=cfg.data.num_workers)
        parts: dict[str, list[Tensor]] = {name: [] for name in ["values", "indices", "lse", "view_hash",
                                                                  *(f"map.{layer}" for layer in layers)]}
        for images, _, _, _ in loader:
            parts["view_hash"].append(torch.tensor([view_hash(x) for x in images], dtype=torch.int64))
            with torch.inference_mode():
                if tap is None:
                    logits = teacher(images.to(device)).float()
                else:
                    logits, tapped = tap(images.to(device), need_logits=True)
                    logits = logits.float()
                    for layer, m in tapped.items():
                        parts[f"map.{layer}"].append(m.half().cpu())
            top = logits.topk(k, dim=1)
            parts["values"].append(top.values.half().cpu())
            parts["indices"].append(top.indices.to(torch.int16 if views.num_classes < 2**15 else torch.int32).cpu())
            parts["lse"].append(torch.logsumexp(logits, 1).half().cpu())
        write_safetensors(path, {name: torch.cat(p) for name, p in parts.items()})
        written += 1
        if not quiet:
            print(f"cache-teacher: epoch {epoch + 1}/{cfg.train.epochs} ({len(views)} views) -> {path.name}", flush=True)
    seconds = time.perf_counter() - start
    size = sum(_epoch_path(folder, e).stat().st_size for e in range(cfg.train.epochs))
    return {"cache": str(folder), "epochs": cfg.train.epochs, "epochs_written": written, "epochs_found": done,
            "records": cfg.train.epochs * len(views), "topk": k, "seconds": seconds, "bytes": size,
            "bytes_per_record": size / max(1, cfg.train.epochs * len(views))}


def verify_cache(cfg: Config, fraction: float, seed: int = 0, folder: str | Path | None = None,
                 quiet: bool = False) -> dict[str, Any]:
    """Rebuild a seeded ``fraction`` of the records and ask the live teacher: input hash equality, top-1
    agreement, the largest error of a cached top-k logit and of the logsumexp."""
    if not 0 < fraction <= 1:
        raise CacheError(f"--verify={fraction} must be a fraction in (0, 1]")
    views, teacher, fp, device = _prepare(cfg)
    cache = TeacherCache(folder or cfg.teacher.cache or "", fp, cfg.train.epochs)
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, math.ceil(fraction * len(views)))
    records = same_input = agree = 0
    max_err = max_lse_err = 0.0
    for epoch in range(cfg.train.epochs):
        views.set_epoch(epoch)
        ids = torch.randperm(len(views), generator=g)[:per_epoch]
        shard = cache.shard(epoch)
        for chunk in ids.split(cfg.data.eval_batch_size):
            images = torch.stack([views[int(i)][0] for i in chunk])
            same_input += sum(view_hash(x) == int(h) for x, h in zip(images, shard["view_hash"][chunk]))
            with torch.inference_mode():
                live = teacher(images.to(device)).float().cpu()
            idx = shard["indices"][chunk].long()
            agree += int((live.argmax(1) == idx[:, 0]).sum())
            max_err = max(max_err, float((live.gather(1, idx) - shard["values"][chunk].float()).abs().max()))
            max_lse_err = max(max_lse_err, float((torch.logsumexp(live, 1) - shard["lse"][chunk].float()).abs().max()))
            records += len(chunk)
    result = {"records": records, "identical_inputs": same_input, "top1_agreement": 100.0 * agree / records,
              "max_logit_error": max_err, "max_logsumexp_error": max_lse_err}
    if not quiet:
        print(json.dumps(result, indent=2))
    return result
