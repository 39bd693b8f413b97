"""Online data-free distillation on Fashion-MNIST (docs/methods.md §1.7): students that never see a real training
image, taught by the shipped CNN (weights/resnetd_small_28_fmnist, 92.81% on the test set).

Rows, all at the same number of student steps and synthesis steps per round (the compute of each row, synthesis
plus training, is in the table):
- DF-DearKD online: the ViT student, generator synthesiser, adversarial term, intra-divergence + boundary,
  teacher-relabelled views in stage 1, synthesis labels in stage 2 (configs/fashion_mnist/df_dearkd_online.yaml);
- its ablations: no adversarial term; no intra-divergence/boundary (the paper's ablation); the pixel
  synthesiser instead of the generator; stage 2 on teacher-relabelled views instead of the labels;
- the fixed sets of the first DF-DearKD benchmark (plain DeepInversion, DeepInversion + intra-divergence),
  `vitdistill synthesize` then df_dearkd.yaml, trained for as many steps;
- the CNN student (resnetd_tiny_28) online, for the CNN-student literature (ZSKD: 0.88 of its teacher);
- accuracy against synthesis compute: the headline row at three `datafree.synthesis_steps` budgets (a plot).

    python benchmarks/datafree.py --profile quick   # pipeline check, 1 seed, about 15 min on 2 CPU cores
    python benchmarks/datafree.py --profile full    # 2 seeds (size in PROFILES), resumable, may run in parts

Runs land in runs/bench/datafree/<profile>/ (sets/ for the fixed sets); re-running resumes or skips finished work.
"""

from __future__ import annotations

import json
import os
import time
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
TEACHER_TOP1 = 92.81  # BENCHMARKS.md, teachers section
ONLINE = "DF-DearKD online (ViT)"
ROWS = {  # row: (config, overrides)
    ONLINE: ("df_dearkd_online.yaml", []),
    "- without the adversarial term": ("df_dearkd_online.yaml", ["datafree.adversarial_weight=0"]),
    "- without intra-divergence and boundary": ("df_dearkd_online.yaml",
                                                ["synthesis.diversity_weight=0", "synthesis.boundary_weight=0"]),
    "- pixel synthesiser (DeepInversion, warm start)": ("df_dearkd_online.yaml",
                                                        ["datafree.synthesizer=pixel", "datafree.images_per_round=null"]),
    "- stage 2 on teacher-relabelled views": ("df_dearkd_online.yaml", ["datafree.stage2_targets=teacher"]),
    "CNN student (resnetd_tiny_28) online": ("df_cnn_online.yaml", []),
}
SETS = {  # fixed set: synthesis overrides of synthesize.yaml
    "fixed set, plain DeepInversion": ["synthesis.diversity_weight=0", "synthesis.boundary_weight=0"],
    "fixed set, DeepInversion + intra-divergence": [],
}
PROFILES = {
    "quick": {"seeds": [0], "epochs": 1, "rounds": 6, "steps": 4, "synthesis_steps": 3, "first_round_steps": 30,
              "budgets": [1, 3, 6], "set_images_per_class": 16, "set_iterations": 40},
    "full": {"seeds": [0, 1], "epochs": 6, "rounds": 20, "steps": 10, "synthesis_steps": 5, "first_round_steps": 300,
             "budgets": [2, 5, 10], "set_images_per_class": 200, "set_iterations": 200},
}


def online_overrides(p: dict, synthesis_steps: int | None = None) -> list[str]:
    return [f"train.epochs={p['epochs']}", f"datafree.rounds_per_epoch={p['rounds']}",
            f"datafree.steps_per_round={p['steps']}", f"datafree.first_round_steps={p['first_round_steps']}",
            f"datafree.synthesis_steps={synthesis_steps or p['synthesis_steps']}", f"train.eval_every={p['epochs']}",
            f"train.warmup_epochs={p['epochs'] * 0.1:.2f}", "data.eval_batch_size=1000"]


def set_dir(out: Path, name: str, seed: int) -> Path:
    return out / "sets" / f"{name.replace(' ', '_').replace(',', '').replace('+', 'and')}__s{seed}"


def synthesize(out: Path, name: str, seed: int, p: dict, threads: int) -> dict:
    folder = set_dir(out, name, seed)
    if not (folder / "summary.json").exists():
        vitdistill_cli(["synthesize", str(CONFIGS / "synthesize.yaml"), *SETS[name],
                        f"run.output_dir={os.path.relpath(folder.parent, REPO)}", f"run.name={folder.name}",
                        f"run.seed={seed}", f"synthesis.images_per_class={p['set_images_per_class']}",
                        f"synthesis.iterations={p['set_iterations']}",
                        f"synthesis.warmup_iterations={p['set_iterations'] // 10}", "--quiet"],
                       threads, what=f"synthesis {folder.name}")
    return json.loads((folder / "summary.json").read_text())


def build_runs(p: dict, out: Path) -> list[Run]:
    steps = p["epochs"] * p["rounds"] * p["steps"]  # student steps of every row
    runs = []
    for seed in p["seeds"]:
        for row, (config, extra) in ROWS.items():
            runs.append(Run(row, "top-1", seed, str(CONFIGS / config), online_overrides(p) + extra))
        for budget in p["budgets"]:
            if budget != p["synthesis_steps"]:
                runs.append(Run(ONLINE, f"synthesis_steps={budget}", seed, str(CONFIGS / "df_dearkd_online.yaml"),
                                online_overrides(p, budget)))
        for name in SETS:
            images = p["set_images_per_class"] * 10
            batch = 128
            epochs = max(1, round(steps * batch / images))
            runs.append(Run(name, "top-1", seed, str(CONFIGS / "df_dearkd.yaml"), [
                f"data.synthetic={os.path.relpath(set_dir(out, name, seed) / 'images.safetensors', REPO)}",
                f"data.batch_size={batch}", f"train.epochs={epochs}", f"train.max_steps_per_epoch={-(-steps // epochs)}",
                f"train.eval_every={epochs}", f"train.warmup_epochs={epochs * 0.1:.2f}", "data.eval_batch_size=1000"]))
    return runs


def plot(points: dict[int, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(points)
    means = [mean_std(points[b])[0] for b in budgets]
    spreads = [mean_std(points[b])[1] for b in budgets]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(budgets, means, yerr=spreads, marker="o", capsize=3)
    ax.axhline(TEACHER_TOP1, ls="--", c="gray", label=f"teacher {TEACHER_TOP1}")
    ax.set_xlabel("generator steps per round (datafree.synthesis_steps)")
    ax.set_ylabel("ViT top-1 on the real test set (%)")
    ax.set_title("DF-DearKD online: accuracy against synthesis compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    profile_name, jobs = parse_profile_args(__doc__, PROFILES)
    p = PROFILES[profile_name]
    out = REPO / "runs" / "bench" / "datafree" / profile_name
    start = time.perf_counter()
    threads = threads_per_job(jobs)
    sets = {(name, seed): synthesize(out, name, seed, p, threads) for seed in p["seeds"] for name in SETS}
    runs = build_runs(p, out)
    results = run_all(runs, out, jobs)
    table = aggregate(runs, results)
    hours = {}
    for r in runs:
        seconds = results[r.name]["wall_time_s"]
        if r.group in SETS:
            seconds += sets[(r.group, r.seed)]["synthesis_seconds"]
        hours.setdefault((r.group, r.column), []).append(seconds / 60)
    rows = [ONLINE, *list(ROWS)[1:], *SETS]
    lines = ["| row | top-1 (real test set) | ratio to the teacher | minutes per run (synthesis + training) |",
             "|---|---|---|---|"]
    for row in rows:
        m, s = mean_std(table[(row, "top-1")])
        lines.append(f"| {row} | {m:.2f} ± {s:.2f} (n={len(table[(row, 'top-1')])}) | {m / TEACHER_TOP1:.3f} | "
                     f"{mean_std(hours[(row, 'top-1')])[0]:.1f} |")
    points = {b: table[(ONLINE, "top-1" if b == p["synthesis_steps"] else f"synthesis_steps={b}")] for b in p["budgets"]}
    plot_path = REPO / "benchmarks" / f"datafree_compute_{profile_name}.png"
    plot(points, plot_path)
    steps = p["epochs"] * p["rounds"] * p["steps"]
    text = "\n".join([
        *section_header(
            f"Online data-free distillation ({profile_name} profile)",
            f"python benchmarks/datafree.py --profile {profile_name} --jobs {jobs}",
            f"Setting: teacher `weights/resnetd_small_28_fmnist.safetensors` ({TEACHER_TOP1}%); no real training "
            f"image; every row takes {steps} student steps at batch 128 ({p['epochs']} epochs x {p['rounds']} rounds x "
            f"{p['steps']} steps; the fixed-set rows as many steps over their set of {p['set_images_per_class'] * 10} "
            f"images made with {p['set_iterations']} iterations per batch); {p['synthesis_steps']} synthesis steps per "
            f"round after a first round of {p['first_round_steps']}; seeds {p['seeds']}; top-1 after the last epoch on "
            "the real 10k test set, mean ± sample std.  ",
            f"Compute: {sum(sum(v) for v in hours.values()) / 60:.2f} h summed over runs; wall time of this invocation "
            f"{(time.perf_counter() - start) / 60:.0f} min (finished work is reused, not redone)."), "",
        *lines, "",
        format_table(table, [ONLINE], [f"synthesis_steps={b}" for b in p["budgets"] if b != p["synthesis_steps"]],
                     "top-1 at"), "",
        f"![accuracy against synthesis compute](benchmarks/{plot_path.name})",
        *(["", "The quick profile is a pipeline check (one seed, a few steps): not evidence."]
          if profile_name == "quick" else []),
    ])
    write_section(f"datafree-{profile_name}", text)
    print(text)


if __name__ == "__main__":
    main()
