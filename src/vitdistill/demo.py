"""``vitdistill demo``: the main job on the embedded default data (Fashion-MNIST), end to end.

On one class-balanced subset: the ViT student alone, DeiT (distillation token) and DearKD taught by a
CNN, and SpectralKD taught by the shipped CaiT (trained on all of Fashion-MNIST with the shipped CNN as
its teacher: a transformer teacher cannot be trained within the demo's time). Then the spectral
analysis of the CaiT teacher beside the two ViT students (intensity against depth: the
distillation-dynamics view).

The default (short) demo takes about 10 minutes on 2 CPU cores: 5% of the training set, 4 epochs, and
the shipped CNN (trained on all of Fashion-MNIST) as DeiT's and DearKD's teacher. ``--full`` is the
longer story: 10% of the data, 8 epochs, and a CNN trained in the demo on the same subset, so that no
model sees more data than the others. Each step is an ordinary run from a config in
``configs/fashion_mnist``; an interrupted demo picks up where it stopped (finished runs are skipped,
started ones resume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config, resolve_path
from .engine.trainer import train

SHIPPED_CNN = "weights/resnetd_small_28_fmnist.safetensors"
TEACHER_RUN = ("CNN teacher (resnetd_small_28)", "configs/fashion_mnist/teacher_resnet.yaml")
# (label, config, taught by the CNN)
DEMO_RUNS = [
    ("ViT alone (vitd_tiny_patch4_28)", "configs/fashion_mnist/student_vit.yaml", False),
    ("DeiT: ViT + distillation token", "configs/fashion_mnist/deit.yaml", True),
    ("DearKD: early alignment + MHCA, 2 stages", "configs/fashion_mnist/dearkd.yaml", True),
    ("SpectralKD: soft KD + FFT (CaiT teacher*)", "configs/fashion_mnist/spectralkd.yaml", False),
]


@dataclass(frozen=True)
class DemoProfile:
    fraction: float  # class-balanced share of the training set every model sees
    epochs: int  # of every student
    batch_size: int
    teacher_epochs: int | None  # the CNN trained in the demo; None: the shipped CNN teaches
    analysis_images: int
    minutes: int  # measured on 2 CPU cores (README)


PROFILES = {
    "short": DemoProfile(fraction=0.05, epochs=4, batch_size=64, teacher_epochs=None, analysis_images=300, minutes=10),
    "full": DemoProfile(fraction=0.1, epochs=8, batch_size=128, teacher_epochs=10, analysis_images=500, minutes=38),
}


def run_demo(output_dir: str = "runs/demo", fraction: float | None = None, quick: bool = False,
             full: bool = False, overrides: list[str] | None = None) -> list[dict]:
    """Train the runs in order, then analyse the CaiT teacher and the students; ``overrides`` (dotted,
    e.g. ``data.root=...``) apply to every run. ``quick`` is a few steps per run (a smoke test)."""
    profile = PROFILES["full" if full else "short"]
    fraction = profile.fraction if fraction is None else fraction
    start = time.perf_counter()
    teacher_ckpt = SHIPPED_CNN
    runs = [(*TEACHER_RUN, False, profile.teacher_epochs)] if profile.teacher_epochs else []
    runs += [(label, config, taught, profile.epochs) for label, config, taught in DEMO_RUNS]
    if profile.teacher_epochs:  # "last", not "best": best is picked on the test set
        teacher_ckpt = str(Path(output_dir) / load_config(resolve_path(TEACHER_RUN[1])).run.name / "last.safetensors")
    print(describe(profile, fraction, full), flush=True)
    results, configs = [], {}
    for label, config, taught_by_cnn, epochs in runs:
        run_overrides = [f"run.output_dir={output_dir}", f"data.fraction={fraction}", f"train.epochs={epochs}",
                         f"data.batch_size={profile.batch_size}", f"train.eval_every={max(epochs // 2, 1)}"]
        if taught_by_cnn:
            run_overrides.append(f"teacher.checkpoint={teacher_ckpt}")
        if quick:
            run_overrides += ["train.epochs=2", "train.max_steps_per_epoch=3", "train.warmup_epochs=0",
                              "train.eval_every=1"]
        cfg = load_config(resolve_path(config), run_overrides + list(overrides or []))
        configs[label] = cfg
        resume = (Path(cfg.run.output_dir) / cfg.run.name / "last.pt").exists()
        print(f"\n== {label}: {config} on {fraction:.0%} of Fashion-MNIST ({'resuming' if resume else 'training'})",
              flush=True)
        results.append({"label": label, **train(cfg, resume=resume)})
    images = 50 if quick else profile.analysis_images
    analysis = analyze_demo(configs, Path(output_dir) / "analysis", images=images)
    print_report(results, analysis, fraction, full, time.perf_counter() - start, output_dir)
    return results


def describe(profile: DemoProfile, fraction: float, full: bool) -> str:
    cnn = (f"a CNN trained here for {profile.teacher_epochs} epochs on the same subset" if profile.teacher_epochs
           else f"the shipped CNN ({SHIPPED_CNN}, trained on all of Fashion-MNIST)")
    other = ("" if full else f"; `vitdistill demo --full` (about {PROFILES['full'].minutes} min on 2 CPU cores) "
             f"trains the CNN on the subset too, on {PROFILES['full'].fraction:.0%} for {PROFILES['full'].epochs} epochs")
    return (f"vitdistill demo ({'full' if full else 'short'}, about {profile.minutes} min on 2 CPU cores): "
            f"{fraction:.0%} of Fashion-MNIST, {profile.epochs} epochs per student, batch {profile.batch_size}. "
            f"DeiT and DearKD are taught by {cnn}; SpectralKD by the shipped CaiT{other}.")


def print_report(results: list[dict], analysis: dict, fraction: float, full: bool, seconds: float,
                 output_dir: str) -> None:
    print(f"\nvitdistill demo: {fraction:.0%} class-balanced subset of Fashion-MNIST, "
          f"top-1 on the full 10k test set ({seconds:.0f}s)")
    print(f"{'model':44s} {'params':>8s} {'best top-1':>10s} {'last top-1':>10s} {'train s':>8s}")
    for r in results:
        print(f"{r['label']:44s} {r['student_params'] / 1e6:7.2f}M {r['best_top1']:10.2f} {r['last_top1']:10.2f} "
              f"{r['wall_time_s']:8.0f}")
    cnn = "the CNN was trained on the subset" if full else "the CNN too (shipped, weights/)"
    print(f"* the CaiT teacher was trained on all of Fashion-MNIST (weights/, distilled from the shipped CNN); {cnn}")
    print("\nLayer intensity against depth, closeness to the CaiT teacher's curve (shape: Pearson r, mean abs. "
          "difference of min-max normalised curves; scale: mean |log ratio|):")
    for label, c in analysis["closeness"].items():
        print(f"  {label:24s} r {c['pearson']:+.3f}  MAD {c['mad']:.3f}  log ratio {c['log_ratio']:.3f}")
    print(f"run folders (config, metrics.csv, summary.json, checkpoints): {output_dir}/; "
          f"analysis plots: {Path(output_dir) / 'analysis'}/")


def analyze_demo(configs: dict[str, Config], out_dir: Path, images: int) -> dict:
    """Spectral analysis of the SpectralKD run's teacher, the ViT alone and the SpectralKD student."""
    from .analysis.report import analyze_models, load_models

    spectral = configs[DEMO_RUNS[-1][0]]
    alone = configs[DEMO_RUNS[0][0]]
    specs = [str(resolve_path(spectral.teacher.checkpoint)),
             str(Path(alone.run.output_dir) / alone.run.name / "last.pt"),
             str(Path(spectral.run.output_dir) / spectral.run.name / "last.pt")]
    labels = ["CaiT teacher", "ViT alone", "ViT SpectralKD"]
    models, loaders, _ = load_models(specs, labels=labels, images=images)
    return analyze_models(models, loaders, out_dir, max_images=images, attention=True, progress=False,
                          verbose=False, description=f"vitdistill demo: {images} class-balanced test images.")


DATAFREE_CONFIG = "configs/fashion_mnist/df_dearkd_online.yaml"
DATAFREE_SHORT = ["train.epochs=3", "datafree.rounds_per_epoch=10", "train.warmup_epochs=0.5", "train.eval_every=1",
                  "datafree.samples_every=10"]
DATAFREE_MINUTES = 9  # measured: 527 s on a 2-core AMD EPYC (README)


def run_datafree_demo(output_dir: str = "runs/demo", quick: bool = False, overrides: list[str] | None = None) -> dict:
    """A short online DF-DearKD run: the ViT student learns from images the shipped CNN teacher synthesises
    during training; no real training image is read. Prints the per-epoch test top-1 and the bank."""
    run_overrides = [f"run.output_dir={output_dir}", *DATAFREE_SHORT]
    if quick:
        run_overrides += ["train.epochs=2", "datafree.rounds_per_epoch=2", "datafree.steps_per_round=2",
                          "data.batch_size=32", "synthesis.batch_size=20", "synthesis.per_class=2",
                          "datafree.images_per_round=40", "datafree.samples_every=1", "datafree.first_round_steps=2"]
    cfg = load_config(resolve_path(DATAFREE_CONFIG), run_overrides + list(overrides or []))
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    f = cfg.datafree
    print(f"vitdistill demo --datafree (about {DATAFREE_MINUTES} min on 2 CPU cores): {DATAFREE_CONFIG}, "
          f"{cfg.train.epochs} epochs x {f.rounds_per_epoch} rounds; each round the shipped CNN teacher "
          f"({cfg.teacher.checkpoint}) drives a generator for {f.synthesis_steps} steps against the current ViT, "
          f"{f.images_per_round} images join the bank, and the ViT takes {f.steps_per_round} steps on the bank. "
          "No real training image is read; the test split measures the student.", flush=True)
    summary = train(cfg, resume=(run_dir / "last.pt").exists())
    print(f"\nvitdistill demo --datafree: ViT student {summary['last_top1']:.2f}% top-1 on the real 10k test set, "
          f"after {summary['train_images']} synthesised images ({summary['synthesis_s']:.0f} s of synthesis, "
          f"{summary['wall_time_s']:.0f} s in all). The full recipe (more epochs, the benchmark in BENCHMARKS.md) "
          "is `vitdistill train configs/fashion_mnist/df_dearkd_online.yaml`.")
    print(f"per-round log: {run_dir / 'rounds.csv'}; newest images: {run_dir / 'samples.png'}; "
          f"the bank, reusable as data.synthetic: {summary['bank']}")
    return summary
