"""``vitdistill demo``: the main job on the embedded default data (Fashion-MNIST), end to end.

Each step is an ordinary run from a config in ``configs/fashion_mnist``; a demo that was
interrupted picks up where it stopped (finished runs are not retrained).
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config, resolve_path
from .engine import train

# (label, config, epochs): sized so that the whole demo stays well within 15 minutes on 2 CPU cores
DEMO_RUNS = [
    ("CNN teacher (resnetd_small_28)", "configs/fashion_mnist/teacher_resnet.yaml", 10),
    ("ViT student, no KD (vitd_tiny_patch4_28)", "configs/fashion_mnist/student_vit.yaml", 15),
]


def run_demo(output_dir: str = "runs/demo", fraction: float = 0.1, quick: bool = False) -> list[dict]:
    results = []
    start = time.perf_counter()
    for label, config, epochs in DEMO_RUNS:
        overrides = [f"run.output_dir={output_dir}", f"data.fraction={fraction}", f"train.epochs={epochs}",
                     "train.eval_every=5"]
        if quick:
            overrides += ["train.epochs=1", "train.max_steps_per_epoch=3", "train.warmup_epochs=0"]
        cfg = load_config(resolve_path(config), overrides)
        resume = (Path(cfg.run.output_dir) / cfg.run.name / "last.pt").exists()
        print(f"\n== {label}: {config} on {fraction:.0%} of Fashion-MNIST ({'resuming' if resume else 'training'})",
              flush=True)
        summary = train(cfg, resume=resume)
        results.append({"label": label, **summary})
    print(f"\nvitdistill demo: {fraction:.0%} class-balanced subset of Fashion-MNIST, "
          f"top-1 on the full 10k test set ({time.perf_counter() - start:.0f}s)")
    print(f"{'model':48s} {'best top-1':>10s} {'last top-1':>10s} {'train s':>8s}")
    for r in results:
        print(f"{r['label']:48s} {r['best_top1']:10.2f} {r['last_top1']:10.2f} {r['wall_time_s']:8.0f}")
    print(f"run folders (config, metrics.csv, summary.json, checkpoints): {output_dir}/")
    return results
