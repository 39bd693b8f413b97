"""``vitdistill synthesize``: a labelled training set made from a teacher alone (DF-DearKD, docs/methods.md §1.5).

Pixels are optimised so that the teacher classifies them as their target labels while every BatchNorm
layer sees the statistics it stored in training (DeepInversion), under total-variation and L2 priors,
with a random roll and flip each step. DF-DearKD's boundary-preserving intra-divergence spreads the
images of a class apart in the teacher's feature space without letting them cross to another class.

The set is made batch by batch; each batch is seeded by (run seed, batch index) and written as its own
shard, so an interrupted job resumes with the next batch and gives the same images as an uninterrupted
one. The result, ``<run>/images.safetensors`` (uint8 images in pixel space, labels), is a train split:
``data.synthetic`` in a training config (e.g. ``configs/fashion_mnist/df_dearkd.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ConfigError, SynthesisConfig, save_config
from .data import load_test_split
from .engine.distributed import resolve_device
from .io import atomic_open, atomic_write_text, read_safetensors, write_safetensors
from .models.factory import build_model
from .rng import seed_everything
from .synthesizers import LOSS_TERMS, InversionObjective, PixelSynthesizer, SynthesisError, teacher_outputs

__all__ = ["SynthesisError", "class_diversity", "run_synthesis", "synthesis_labels", "synthesize_batch"]


def synthesis_labels(num_classes: int, images_per_class: int, per_class: int) -> torch.Tensor:
    """Labels of the whole set: groups of ``per_class`` images of one class, cycling through the classes,
    so every batch of consecutive images holds ``batch_size / per_class`` classes, ``per_class`` each."""
    return torch.arange(num_classes).repeat(images_per_class // per_class).repeat_interleave(per_class)


def synthesize_batch(teacher: nn.Module, labels: torch.Tensor, syn: SynthesisConfig, shape: tuple[int, int, int],
                     mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Optimise one batch of images (normalised space, ``(B, *shape)``) for ``labels`` from noise for
    ``synthesis.iterations`` steps; returns the images and the loss terms of the last step. ``teacher`` is
    frozen and in eval mode."""
    with InversionObjective(teacher, syn) as objective:
        x, _, terms = PixelSynthesizer(shape, mean, std, syn, syn.iterations).synthesize(objective, labels, seed)
    return x, terms


def to_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def from_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


@torch.no_grad()
def class_diversity(teacher: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Mean squared distance between L2-normalised teacher features of same-class images (0 = all alike,
    at most 4): how much of its class a synthetic set covers, as the teacher sees it."""
    feats = torch.cat([teacher_outputs(teacher, x[i:i + batch_size], True)[1] for i in range(0, len(x), batch_size)])
    feats = F.normalize(feats.float(), dim=1)
    dists = [torch.pdist(feats[labels == c]).pow(2).mean() for c in labels.unique() if (labels == c).sum() > 1]
    return float(torch.stack(dists).mean())


@torch.no_grad()
def _predict(teacher: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([teacher(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_row: int = 10) -> None:
    """Up to ``per_row`` images of each class, one class per row, as a PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    rows = [images[labels == c][:per_row] for c in labels.unique()]
    rows = [torch.cat([r, torch.zeros((per_row - len(r), *r.shape[1:]), dtype=r.dtype)]) for r in rows]
    grid = make_grid(torch.cat(rows), nrow=per_row, padding=1, pad_value=255)  # (3, H, W) uint8
    with atomic_open(path) as f:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="png")


def run_synthesis(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """Synthesise ``cfg.synthesis.images_per_class`` images per class from ``cfg.teacher`` into
    ``<run.output_dir>/<run.name>/``: shards/, images.safetensors, synthesis.csv, samples.png, summary.json.
    No training image is read: the test split gives the classes and the normalisation."""
    if not cfg.teacher.name or not (cfg.teacher.checkpoint or cfg.teacher.pretrained):
        raise ConfigError("synthesize needs a trained teacher: teacher.name and teacher.checkpoint (or "
                          f"teacher.pretrained) (got name={cfg.teacher.name!r}, checkpoint={cfg.teacher.checkpoint!r})")
    if cfg.data.synthetic:
        raise ConfigError(f"data.synthetic='{cfg.data.synthetic}': synthesize makes a train split, it does not read one")
    syn, d = cfg.synthesis, cfg.data
    start = time.perf_counter()
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    _, class_names, mean, std = load_test_split(d, cfg.run.seed)
    labels = synthesis_labels(len(class_names), syn.images_per_class, syn.per_class)
    tail_groups = (len(labels) % syn.batch_size) // syn.per_class
    if syn.boundary == "feature" and syn.boundary_weight > 0 and tail_groups == 1:
        raise ConfigError(f"synthesis.batch_size={syn.batch_size}: the last batch of the {len(labels)} images would "
                          "hold one class, which the feature boundary cannot use; pick a batch_size that divides "
                          f"{len(labels)} or leaves at least 2 x per_class={syn.per_class} images for the last batch")
    device = resolve_device(cfg.train.device)
    teacher = build_model(cfg.teacher, len(class_names), d.in_chans, d.img_size).to(device).eval()
    teacher.requires_grad_(False)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    (run_dir / "shards").mkdir(parents=True, exist_ok=True)
    # what the images depend on: a shard made under another fingerprint is never reused
    fingerprint = json.dumps({"synthesis": dataclasses.asdict(syn), "seed": cfg.run.seed, "classes": class_names,
                              "teacher": {"name": cfg.teacher.name, "checkpoint": cfg.teacher.checkpoint,
                                          "kwargs": cfg.teacher.kwargs},
                              "data": {"name": d.name, "in_chans": d.in_chans, "img_size": d.img_size,
                                       "mean": list(mean), "std": list(std)}}, sort_keys=True)
    save_config(cfg, run_dir / "config.yaml")
    n_batches = math.ceil(len(labels) / syn.batch_size)
    shape = (d.in_chans, d.img_size, d.img_size)
    for b in range(n_batches):
        shard = run_dir / "shards" / f"batch_{b:05d}.safetensors"
        if shard.exists():
            if read_safetensors(shard)[1].get("fingerprint") != fingerprint:
                raise ConfigError(f"'{shard}' was made with another synthesis config, teacher, data or seed; use a "
                                  f"new run.name, or delete '{run_dir / 'shards'}' to start this run over")
            continue
        batch_labels = labels[b * syn.batch_size:(b + 1) * syn.batch_size].to(device)
        t0 = time.perf_counter()
        x, terms = synthesize_batch(teacher, batch_labels, syn, shape, mean, std, seed=cfg.run.seed * 1_000_003 + b)
        images = to_uint8(x, mean, std)
        stored = from_uint8(images, mean, std).to(device)
        terms["teacher_top1"] = 100.0 * float((_predict(teacher, stored) == batch_labels).float().mean())
        terms["seconds"] = time.perf_counter() - t0
        write_safetensors(shard, {"images": images, "labels": batch_labels.cpu()},
                          {"terms": json.dumps(terms), "fingerprint": fingerprint})
        if not quiet:
            print(f"synthesize batch {b + 1}/{n_batches}: " + " ".join(f"{k} {v:.4g}" for k, v in terms.items()),
                  flush=True)
    shards = [run_dir / "shards" / f"batch_{b:05d}.safetensors" for b in range(n_batches)]
    return _assemble(cfg, run_dir, shards, teacher, len(class_names), (mean, std), device, time.perf_counter() - start)


def _assemble(cfg: Config, run_dir: Path, shards: list[Path], teacher: nn.Module, num_classes: int,
              normalization: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device,
              seconds: float) -> dict[str, Any]:
    """Join the shards into images.safetensors and write the per-batch log, the sample grid and a summary."""
    tensors, metas = zip(*(read_safetensors(p) for p in shards))
    terms = [json.loads(m["terms"]) for m in metas]
    images = torch.cat([t["images"] for t in tensors])
    labels = torch.cat([t["labels"] for t in tensors])
    d = cfg.data
    meta = {"dataset": d.name, "in_chans": str(d.in_chans), "img_size": str(d.img_size),
            "fingerprint": metas[0]["fingerprint"]}
    write_safetensors(run_dir / "images.safetensors", {"images": images, "labels": labels}, meta)
    columns = ["batch", *terms[0]]
    atomic_write_text(run_dir / "synthesis.csv", "\n".join(
        [",".join(columns)] + [",".join([str(b)] + [f"{t[k]:.6g}" for k in columns[1:]]) for b, t in enumerate(terms)]) + "\n")
    save_grid(images, labels, run_dir / "samples.png")
    stored = from_uint8(images, *normalization).to(device)
    summary = {
        "run": str(run_dir), "images": len(labels), "num_classes": num_classes,
        "teacher": cfg.teacher.name, "teacher_checkpoint": cfg.teacher.checkpoint,
        # each shard's top-1 was measured on its stored images: weight by size rather than run the teacher again
        "teacher_top1_on_synthetic": sum(t["teacher_top1"] * len(x["labels"]) for t, x in zip(terms, tensors)) / len(labels),
        "class_diversity": class_diversity(teacher, stored, labels.to(device)),
        "final_loss_mean": {k: sum(t[k] for t in terms) / len(terms) for k in ("loss", *LOSS_TERMS)},
        "synthesis_seconds": sum(t["seconds"] for t in terms),  # over all invocations, if resumed
        "wall_time_s": seconds,  # this invocation
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
