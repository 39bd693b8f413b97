"""DF-DearKD on Fashion-MNIST (docs/methods.md §1.5 and §3.6): a ViT trained without any real training image.

For every seed, two synthetic train splits are made from the shipped CNN teacher
(weights/resnetd_small_28_fmnist): plain DeepInversion, and DeepInversion with DF-DearKD's
boundary-preserving intra-divergence. Then, all at equal images, epochs and batch, top-1 on the real
10k test split:
- DF-DearKD (the two-stage DearKD recipe) on each synthetic set: does intra-divergence beat plain DeepInversion?
- soft logit KD on the intra-divergence set, and the ViT alone on its labels: how much of the result is
  the teacher during training, how much the images themselves;
- DearKD and the ViT alone on as many real images (a class-balanced subset of the same size): the
  real-data student DF-DearKD should come within a few points of.
The sets' own numbers (the teacher's top-1 on them, class diversity) are reported beside the table.

    python benchmarks/df_dearkd.py --profile quick   # pipeline check, 1 seed, ~5 min on 2 CPU cores
    python benchmarks/df_dearkd.py --profile cpu     # the table for BENCHMARKS.md, 2 seeds, ~1.5 h on 2 CPU cores

Runs land in runs/bench/df_dearkd/<profile>/ (sets/ for the synthetic splits); re-running resumes or skips
finished work.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    REPO,
    Run,
    aggregate,
    format_table,
    mean_std,
    parse_profile_args,
    run_all,
    section_header,
    threads_per_job,
    vitdistill_cli,
    write_section,
)

CONFIGS = REPO / "configs" / "fashion_mnist"
FMNIST_TRAIN, CLASSES = 60000, 10
SETS = {  # synthetic set: synthesis overrides of configs/fashion_mnist/synthesize.yaml
    "DeepInversion": ["synthesis.diversity_weight=0", "synthesis.boundary_weight=0"],
    "DeepInversion + intra-divergence": [],
}
PLAIN, DIVERSE, REAL = "DeepInversion", "DeepInversion + intra-divergence", None
ROWS = {  # row: (config, train split: a synthetic set or REAL images)
    "DF-DearKD, DeepInversion + intra-divergence": ("df_dearkd.yaml", DIVERSE),
    "DF-DearKD, plain DeepInversion": ("df_dearkd.yaml", PLAIN),
    "soft KD, intra-divergence set": ("kd.yaml", DIVERSE),
    "ViT alone, intra-divergence set (labels only)": ("student_vit.yaml", DIVERSE),
    "DearKD, as many real images": ("dearkd.yaml", REAL),
    "ViT alone, as many real images": ("student_vit.yaml", REAL),
}
PROFILES = {
    "quick": {"seeds": [0], "images_per_class": 16, "iterations": 40, "epochs": 2, "batch_size": 32},
    "cpu": {"seeds": [0, 1], "images_per_class": 200, "iterations": 200, "epochs": 15, "batch_size": 32},
}


def set_dir(out: Path, name: str, seed: int) -> Path:
    return out / "sets" / f"{name.replace(' ', '_').replace('+', 'and')}__s{seed}"


def synthesize(out: Path, name: str, seed: int, profile: dict, threads: int) -> dict:
    """One synthetic set (resumable: the job skips the batches it has written)."""
    folder = set_dir(out, name, seed)
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    cmd = ["synthesize", str(CONFIGS / "synthesize.yaml"), *SETS[name],
           f"run.output_dir={os.path.relpath(folder.parent, REPO)}", f"run.name={folder.name}", f"run.seed={seed}",
           f"synthesis.images_per_class={profile['images_per_class']}", f"synthesis.iterations={profile['iterations']}",
           f"synthesis.warmup_iterations={profile['iterations'] // 10}", "--quiet"]
    vitdistill_cli(cmd, threads, what=f"synthesis {folder.name}")
    print(f"[{time.strftime('%H:%M:%S')}] synthesised {folder.name}", flush=True)
    return json.loads((folder / "summary.json").read_text())


def build_runs(profile: dict, out: Path) -> list[Run]:
    images = profile["images_per_class"] * CLASSES
    common = [f"data.batch_size={profile['batch_size']}", f"train.epochs={profile['epochs']}",
              f"train.warmup_epochs={profile['epochs'] * 0.1:.2f}", f"train.eval_every={profile['epochs']}"]
    runs = []
    for seed in profile["seeds"]:
        for row, (config, split) in ROWS.items():
            data = ([f"data.fraction={images / FMNIST_TRAIN:.6f}"] if split is REAL else
                    [f"data.synthetic={os.path.relpath(set_dir(out, split, seed) / 'images.safetensors', REPO)}"])
            runs.append(Run(row, "top-1", seed, str(CONFIGS / config), common + data))
    return runs


def main() -> None:
    profile_name, jobs = parse_profile_args(__doc__, PROFILES)
    profile = PROFILES[profile_name]
    out = REPO / "runs" / "bench" / "df_dearkd" / profile_name
    start = time.perf_counter()
    threads = threads_per_job(jobs)
    todo = [(name, seed) for seed in profile["seeds"] for name in SETS]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        sets = dict(zip(todo, pool.map(lambda t: synthesize(out, *t, profile, threads), todo)))
    runs = build_runs(profile, out)
    results = run_all(runs, out, jobs)
    table = aggregate(runs, results)
    hours = (sum(s["wall_time_s"] for s in results.values()) + sum(s["synthesis_seconds"] for s in sets.values())) / 3600
    set_lines = ["| synthetic set | teacher top-1 on it | class diversity | synthesis time per set |", "|---|---|---|---|"]
    for name in SETS:
        summaries = [sets[(name, s)] for s in profile["seeds"]]
        top1 = mean_std([s["teacher_top1_on_synthetic"] for s in summaries])
        diversity = mean_std([s["class_diversity"] for s in summaries])
        minutes = sum(s["synthesis_seconds"] for s in summaries) / len(summaries) / 60
        set_lines.append(f"| {name} | {top1[0]:.2f} ± {top1[1]:.2f} | {diversity[0]:.3f} ± {diversity[1]:.3f} | {minutes:.1f} min |")
    df, plain = (mean_std(table[(r, "top-1")]) for r in list(ROWS)[:2])
    real = mean_std(table[("DearKD, as many real images", "top-1")])
    images = profile["images_per_class"] * CLASSES
    text = "\n".join([
        *section_header(
            f"DF-DearKD, data-free ({profile_name} profile)",
            f"python benchmarks/df_dearkd.py --profile {profile_name} --jobs {jobs}",
            f"Setting: teacher `weights/resnetd_small_28_fmnist.safetensors`; per seed, {images} synthetic images "
            f"({profile['images_per_class']} per class, {profile['iterations']} iterations per batch, "
            f"`configs/fashion_mnist/synthesize.yaml`) or as many real training images (class-balanced); "
            f"{profile['epochs']} epochs at batch {profile['batch_size']} for every row; seeds {profile['seeds']} (the "
            f"seed also picks the synthetic set); top-1 after the last epoch on the real 10k test set, mean ± sample std.  ",
            f"Compute: {hours:.2f} h summed over synthesis and training; wall time of this invocation "
            f"{(time.perf_counter() - start) / 60:.0f} min (finished work is reused, not redone)."), "",
        format_table(table, list(ROWS), ["top-1"], "test"), "",
        *set_lines, "",
        f"DF-DearKD with intra-divergence minus plain DeepInversion: {df[0] - plain[0]:+.2f} points (seed spread "
        f"± {df[1]:.2f} and ± {plain[1]:.2f}). DF-DearKD minus DearKD on as many real images: "
        f"{df[0] - real[0]:+.2f} points (± {real[1]:.2f}).",
        *(["", "The quick profile is a pipeline check (one seed, a few iterations per batch): not evidence."]
          if profile_name == "quick" else []),
    ])
    write_section(f"df-dearkd-{profile_name}", text)
    print(text)


if __name__ == "__main__":
    main()
