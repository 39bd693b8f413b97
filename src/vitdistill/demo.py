"""``vitdistill demo``: the main job on the embedded default data (Fashion-MNIST), end to end.

A CNN teacher, the ViT student alone, DeiT (distillation token) and DearKD, all on the same
class-balanced subset; the distillers use the teacher trained here, on that subset, so no method
sees more data than the others. Each step is an ordinary run from a config in
``configs/fashion_mnist``; an interrupted demo picks up where it stopped (finished runs are skipped,
started ones resume).
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config, resolve_path
from .engine import train

TEACHER_RUN = "teacher_resnet"
# (label, config, epochs, uses the teacher): sized so the whole demo stays within ~15 min on 2 CPU cores
DEMO_RUNS = [
    ("CNN teacher (resnetd_small_28)", "configs/fashion_mnist/teacher_resnet.yaml", 10, False),
    ("ViT alone (vitd_tiny_patch4_28)", "configs/fashion_mnist/student_vit.yaml", 10, False),
    ("DeiT: ViT + distillation token", "configs/fashion_mnist/deit.yaml", 10, True),
    ("DearKD: early alignment + MHCA, 2 stages", "configs/fashion_mnist/dearkd.yaml", 10, True),
]


def run_demo(output_dir: str = "runs/demo", fraction: float = 0.1, quick: bool = False,
             overrides: list[str] | None = None) -> list[dict]:
    """Train the four runs in order; ``overrides`` (dotted, e.g. ``data.root=...``) apply to each."""
    results = []
    start = time.perf_counter()
    teacher_weights = Path(output_dir) / TEACHER_RUN / "last.safetensors"  # not "best": picked on the test set
    for label, config, epochs, uses_teacher in DEMO_RUNS:
        run_overrides = [f"run.output_dir={output_dir}", f"data.fraction={fraction}", f"train.epochs={epochs}",
                         "train.eval_every=5"]
        if uses_teacher:
            run_overrides.append(f"teacher.checkpoint={teacher_weights}")
        if quick:
            run_overrides += ["train.epochs=2", "train.max_steps_per_epoch=3", "train.warmup_epochs=0",
                              "train.eval_every=1"]
        cfg = load_config(resolve_path(config), run_overrides + list(overrides or []))
        resume = (Path(cfg.run.output_dir) / cfg.run.name / "last.pt").exists()
        print(f"\n== {label}: {config} on {fraction:.0%} of Fashion-MNIST ({'resuming' if resume else 'training'})",
              flush=True)
        summary = train(cfg, resume=resume)
        results.append({"label": label, **summary})
    print(f"\nvitdistill demo: {fraction:.0%} class-balanced subset of Fashion-MNIST, "
          f"top-1 on the full 10k test set ({time.perf_counter() - start:.0f}s)")
    print(f"{'model':44s} {'params':>8s} {'best top-1':>10s} {'last top-1':>10s} {'train s':>8s}")
    for r in results:
        print(f"{r['label']:44s} {r['student_params'] / 1e6:7.2f}M {r['best_top1']:10.2f} {r['last_top1']:10.2f} "
              f"{r['wall_time_s']:8.0f}")
    print(f"run folders (config, metrics.csv, summary.json, checkpoints): {output_dir}/")
    return results
