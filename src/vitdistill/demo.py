"""``vitdistill demo``: the main job on the embedded default data (Fashion-MNIST), end to end.

On one class-balanced subset: a CNN teacher, the ViT student alone, DeiT (distillation token) and
DearKD taught by that CNN (trained here, on the subset, so none of them sees more data than the
others), and SpectralKD taught by the shipped CaiT teacher (trained on all of Fashion-MNIST with the
shipped CNN as its teacher: a transformer teacher cannot be trained within the demo's time). Then the spectral analysis of the
CaiT teacher beside the two ViT students (intensity against depth: the distillation-dynamics view).
Each step is an ordinary run from a config in ``configs/fashion_mnist``; an interrupted demo picks up
where it stopped (finished runs are skipped, started ones resume).
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config, resolve_path
from .engine import train

TEACHER_RUN = "teacher_resnet"
# (label, config, epochs, taught by the CNN trained in the demo): ~17 min in all on 2 CPU cores
DEMO_RUNS = [
    ("CNN teacher (resnetd_small_28)", "configs/fashion_mnist/teacher_resnet.yaml", 10, False),
    ("ViT alone (vitd_tiny_patch4_28)", "configs/fashion_mnist/student_vit.yaml", 8, False),
    ("DeiT: ViT + distillation token", "configs/fashion_mnist/deit.yaml", 8, True),
    ("DearKD: early alignment + MHCA, 2 stages", "configs/fashion_mnist/dearkd.yaml", 8, True),
    ("SpectralKD: soft KD + FFT (CaiT teacher*)", "configs/fashion_mnist/spectralkd.yaml", 8, False),
]


def run_demo(output_dir: str = "runs/demo", fraction: float = 0.1, quick: bool = False,
             overrides: list[str] | None = None) -> list[dict]:
    """Train the runs in order, then analyse the CaiT teacher and the students; ``overrides`` (dotted,
    e.g. ``data.root=...``) apply to every run."""
    results = []
    start = time.perf_counter()
    teacher_weights = Path(output_dir) / TEACHER_RUN / "last.safetensors"  # not "best": picked on the test set
    configs = {}
    for label, config, epochs, taught_by_demo_cnn in DEMO_RUNS:
        run_overrides = [f"run.output_dir={output_dir}", f"data.fraction={fraction}", f"train.epochs={epochs}",
                         "train.eval_every=4"]
        if taught_by_demo_cnn:
            run_overrides.append(f"teacher.checkpoint={teacher_weights}")
        if quick:
            run_overrides += ["train.epochs=2", "train.max_steps_per_epoch=3", "train.warmup_epochs=0",
                              "train.eval_every=1"]
        cfg = load_config(resolve_path(config), run_overrides + list(overrides or []))
        configs[label] = cfg
        resume = (Path(cfg.run.output_dir) / cfg.run.name / "last.pt").exists()
        print(f"\n== {label}: {config} on {fraction:.0%} of Fashion-MNIST ({'resuming' if resume else 'training'})",
              flush=True)
        summary = train(cfg, resume=resume)
        results.append({"label": label, **summary})
    analysis = analyze_demo(configs, Path(output_dir) / "analysis", images=50 if quick else 500)
    print(f"\nvitdistill demo: {fraction:.0%} class-balanced subset of Fashion-MNIST, "
          f"top-1 on the full 10k test set ({time.perf_counter() - start:.0f}s)")
    print(f"{'model':44s} {'params':>8s} {'best top-1':>10s} {'last top-1':>10s} {'train s':>8s}")
    for r in results:
        print(f"{r['label']:44s} {r['student_params'] / 1e6:7.2f}M {r['best_top1']:10.2f} {r['last_top1']:10.2f} "
              f"{r['wall_time_s']:8.0f}")
    print("* the CaiT teacher was trained on all of Fashion-MNIST (weights/, distilled from the shipped CNN); "
          "the other teachers on the subset")
    print("\nLayer intensity against depth, closeness to the CaiT teacher's curve (shape: Pearson r, mean abs. "
          "difference of min-max normalised curves; scale: mean |log ratio|):")
    for label, c in analysis["closeness"].items():
        print(f"  {label:24s} r {c['pearson']:+.3f}  MAD {c['mad']:.3f}  log ratio {c['log_ratio']:.3f}")
    print(f"run folders (config, metrics.csv, summary.json, checkpoints): {output_dir}/; "
          f"analysis plots: {Path(output_dir) / 'analysis'}/")
    return results


def analyze_demo(configs: dict, out_dir: Path, images: int) -> dict:
    """Spectral analysis of the SpectralKD run's teacher, the ViT alone and the SpectralKD student."""
    from .analysis.report import analyze_models, load_models
    from .cli import load_trained_model

    spectral = configs[DEMO_RUNS[-1][0]]
    alone = configs[DEMO_RUNS[1][0]]
    specs = [str(resolve_path(spectral.teacher.checkpoint)),
             str(Path(alone.run.output_dir) / alone.run.name / "last.pt"),
             str(Path(spectral.run.output_dir) / spectral.run.name / "last.pt")]
    labels = ["CaiT teacher", "ViT alone", "ViT SpectralKD"]
    models, loaders, _ = load_models(specs, load_trained_model, labels=labels, images=images)
    return analyze_models(models, loaders, out_dir, max_images=images, attention=True, progress=False,
                          verbose=False, description=f"vitdistill demo: {images} class-balanced test images.")
