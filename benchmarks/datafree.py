"""Online data-free distillation on Fashion-MNIST (docs/methods.md §1.7): students that never see a real training
image, taught by the shipped CNN (weights/resnetd_small_28_fmnist, 92.81% on the test set).

Rows, all at the same number of student steps and synthesis steps per round (the compute of each row, synthesis
plus training, is in the table):
- DF-DearKD online: the ViT student, generator synthesiser, adversarial term, intra-divergence + boundary,
  mixup/cutmix and teacher-relabelled views in both stages (configs/fashion_mnist/df_dearkd_online.yaml);
- its ablations: no adversarial term; no intra-divergence/boundary (the paper's ablation); the pixel
  synthesiser instead of the generator; stage 2 (the last epoch) on the synthesis labels (the paper's) against
  stage 2 on relabelled views;
- the fixed sets of the first DF-DearKD benchmark (plain DeepInversion, DeepInversion + intra-divergence),
  `vitdistill synthesize` then df_dearkd.yaml, trained for as many steps;
- the CNN student (resnetd_tiny_28) online, for the CNN-student literature (ZSKD: 0.88 of its teacher);
- accuracy against synthesis compute: the headline row at three `datafree.synthesis_steps` budgets (a plot).

    python benchmarks/datafree.py --profile quick   # pipeline check, 1 seed, 9 min on 2 CPU cores (measured)
    python benchmarks/datafree.py --profile full    # 2 seeds (size in PROFILES), resumable
    python benchmarks/datafree.py --profile full --part headline   # one part now, the rest later

The full profile (measured) is about 12 h of CPU summed over runs, 6 h of wall time on 2 cores at --jobs 2: the
headline rows (ViT 2 x 81 min, CNN 2 x 26 min; the ViT needs its 1,600 student steps to pass 80%), the fixed sets
(synthesis 4 x 24 min, training 4 x 41-48 min) and the ablations and compute budgets (16 runs of 12-18 min).
`--part` runs the online headline rows (`headline`), the fixed sets (`sets`) or the ablations and budgets
(`ablations`); the table is written once every part is done.

Runs land in runs/bench/datafree/<profile>/ (sets/ for the fixed sets); re-running resumes or skips finished work.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    REPO,
    Run,
    aggregate,
    commit,
    mean_std,
    profile_parser,
    run_all,
    section_header,
    threads_per_job,
    write_section,
)
from df_dearkd import set_dir, synthesize

from vitdistill.methods.dearkd import switch_epoch_for

CONFIGS = REPO / "configs" / "fashion_mnist"
TEACHER_TOP1 = 92.81  # BENCHMARKS.md, teachers section
ONLINE = "DF-DearKD online (ViT)"
STAGE2_TEACHER = "- stage 2 (last epoch) on teacher-relabelled views"
ROWS = {  # row: (config, overrides)
    ONLINE: ("df_dearkd_online.yaml", []),
    "- without the adversarial term": ("df_dearkd_online.yaml", ["datafree.adversarial_weight=0"]),
    "- without intra-divergence and boundary": ("df_dearkd_online.yaml",
                                                ["synthesis.diversity_weight=0", "synthesis.boundary_weight=0"]),
    "- pixel synthesiser (DeepInversion, warm start)": ("df_dearkd_online.yaml",
                                                        ["datafree.synthesizer=pixel", "datafree.images_per_round=null"]),
    STAGE2_TEACHER: ("df_dearkd_online.yaml", []),
    "- stage 2 (last epoch) on the synthesis labels (the paper's)": ("df_dearkd_online.yaml",
                                                                    ["datafree.stage2_targets=labels"]),
    "CNN student (resnetd_tiny_28) online": ("df_cnn_online.yaml", []),
}
SETS = {  # fixed-set row: the set of the first DF-DearKD benchmark (benchmarks/df_dearkd.py) it trains on
    "fixed set, plain DeepInversion": "DeepInversion",
    "fixed set, DeepInversion + intra-divergence": "DeepInversion + intra-divergence",
}
FULL, SMALL = "full budget", "ablation budget"
PROFILES = {  # a budget: (epochs, rounds per epoch); every round takes `steps` student steps
    "quick": {"seeds": [0], "full": (1, 6), "small": (1, 6), "steps": 4, "synthesis_steps": 3, "first_round_steps": 30,
              "budgets": [1, 3, 6], "set_images_per_class": 16, "set_iterations": 40},
    "full": {"seeds": [0, 1], "full": (8, 20), "small": (2, 20), "steps": 10, "synthesis_steps": 5,
             "first_round_steps": 300, "budgets": [2, 5, 10], "set_images_per_class": 200, "set_iterations": 200},
}
HEADLINE = [ONLINE, "CNN student (resnetd_tiny_28) online"]  # the rest of ROWS are ablations
STAGE2_ROWS = [row for row in ROWS if row.startswith("- stage 2")]  # the pair that compares stage-2 targets
PARTS = ("headline", "sets", "ablations")


def epochs_rounds(p: dict, budget: str) -> tuple[int, int]:
    return p["full" if budget == FULL else "small"]


def online_overrides(p: dict, budget: str, synthesis_steps: int | None = None) -> list[str]:
    epochs, rounds = epochs_rounds(p, budget)
    return [f"train.epochs={epochs}", f"datafree.rounds_per_epoch={rounds}", f"datafree.steps_per_round={p['steps']}",
            f"datafree.first_round_steps={p['first_round_steps']}",
            f"datafree.synthesis_steps={synthesis_steps or p['synthesis_steps']}", f"train.eval_every={epochs}",
            f"train.warmup_epochs={epochs * 0.1:.2f}", "data.eval_batch_size=1000"]


def student_steps(p: dict, budget: str) -> int:
    epochs, rounds = epochs_rounds(p, budget)
    return epochs * rounds * p["steps"]


def column(p: dict, budget: str) -> str:
    """Where the small budget equals the full one, the ablations share the full runs."""
    return FULL if p["small"] == p["full"] else budget


def fixed_set(out: Path, row: str, seed: int, p: dict, threads: int) -> dict:
    """The row's synthetic set, made (or found) by the first DF-DearKD benchmark's code at this profile's size."""
    size = {"images_per_class": p["set_images_per_class"], "iterations": p["set_iterations"]}
    return synthesize(out, SETS[row], seed, size, threads)


def part(run: Run) -> str:
    return "sets" if run.group in SETS else "headline" if run.column == FULL and run.group in HEADLINE else "ablations"


def stage2_switch(p: dict, row: str) -> list[str]:
    """The stage-2 pair trains its last epoch in stage 2 (as the full budget's default 5/6 switch does): at the
    ablation budget's 2 epochs the default switch, round(5/6 * 2) = 2, would leave no stage 2 to compare."""
    epochs = epochs_rounds(p, SMALL)[0]
    return [f"method.params.switch_epoch={epochs - 1}"] if row in STAGE2_ROWS and epochs > 1 else []


def stage2_text(p: dict, budget: str) -> str:
    epochs = epochs_rounds(p, budget)[0]
    switch = switch_epoch_for(epochs)
    return f"stage 2 from epoch {switch + 1} of {epochs}" if switch < epochs else "no stage 2"


def build_runs(p: dict, out: Path) -> list[Run]:
    """Every run, the headline rows first (the ViT's seeds before the CNN's)."""
    runs = []
    for row in HEADLINE:
        for seed in p["seeds"]:
            config, extra = ROWS[row]
            runs.append(Run(row, FULL, seed, str(CONFIGS / config), online_overrides(p, FULL) + extra))
    for seed in p["seeds"]:
        for row, (config, extra) in ROWS.items():
            if row not in HEADLINE:
                runs.append(Run(row, column(p, SMALL), seed, str(CONFIGS / config),
                                online_overrides(p, SMALL) + extra + stage2_switch(p, row)))
        if column(p, SMALL) == SMALL:  # the reference of the ablations, at their budget
            runs.append(Run(ONLINE, SMALL, seed, str(CONFIGS / "df_dearkd_online.yaml"), online_overrides(p, SMALL)))
        for b in p["budgets"]:
            if b != p["synthesis_steps"]:
                runs.append(Run(ONLINE, f"{column(p, SMALL)}, synthesis_steps={b}", seed,
                                str(CONFIGS / "df_dearkd_online.yaml"), online_overrides(p, SMALL, b)))
        batch = 128
        epochs = -(-student_steps(p, FULL) // (p["set_images_per_class"] * 10 // batch))  # full batches per epoch
        for name in SETS:  # at least as many student steps as the full-budget online row
            runs.append(Run(name, FULL, seed, str(CONFIGS / "df_dearkd.yaml"), [
                f"data.synthetic={os.path.relpath(set_dir(out, SETS[name], seed) / 'images.safetensors', REPO)}",
                f"data.batch_size={batch}", f"train.epochs={epochs}", f"train.eval_every={epochs}",
                f"train.warmup_epochs={epochs * 0.1:.2f}", "data.eval_batch_size=1000"]))
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
    ax.set_title("DF-DearKD online at the ablation budget", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = profile_parser(__doc__, PROFILES)
    parser.add_argument("--part", choices=PARTS, help="run only this part; the table needs all of them")
    args = parser.parse_args()
    profile_name, jobs = args.profile, args.jobs
    p = PROFILES[profile_name]
    out = REPO / "runs" / "bench" / "datafree" / profile_name
    start = time.perf_counter()
    threads = threads_per_job(jobs)
    runs = build_runs(p, out)

    def make_sets() -> dict[tuple[str, int], dict]:  # `jobs` synthesis processes at once
        keys = [(name, seed) for seed in p["seeds"] for name in SETS]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return dict(zip(keys, pool.map(lambda k: fixed_set(out, k[0], k[1], p, threads), keys)))

    if args.part:
        if args.part == "sets":
            make_sets()
        chosen = [r for r in runs if part(r) == args.part]
        for r, s in run_all(chosen, out, jobs).items():
            print(f"{r}: top-1 {s['last_top1']:.2f}, {s['wall_time_s'] / 60:.1f} min")
        return
    sets = make_sets()
    results = run_all(runs, out, jobs)
    table = aggregate(runs, results)
    minutes: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        seconds = results[r.name]["wall_time_s"] + (sets[(r.group, r.seed)]["synthesis_seconds"] if r.group in SETS else 0)
        minutes.setdefault((r.group, r.column), []).append(seconds / 60)
    small = column(p, SMALL)
    lines = ["| row | budget | top-1 (real test set) | ratio to the teacher | minutes per run (synthesis + training) |",
             "|---|---|---|---|---|"]
    reference = [(ONLINE, small)] if small != FULL else []  # the ablations' own reference, where it is a run
    for row, budget in [(ONLINE, FULL), *((name, FULL) for name in SETS), (HEADLINE[1], FULL), *reference,
                        *((row, small) for row in ROWS if row not in HEADLINE)]:
        values = table[(row, budget)]
        m, s = mean_std(values)
        lines.append(f"| {row} | {budget} | {m:.2f} ± {s:.2f} (n={len(values)}) | {m / TEACHER_TOP1:.3f} | "
                     f"{mean_std(minutes[(row, budget)])[0]:.1f} |")
    points = {b: table[(ONLINE, small if b == p["synthesis_steps"] else f"{small}, synthesis_steps={b}")]
              for b in p["budgets"]}
    plot_path = REPO / "benchmarks" / f"datafree_compute_{profile_name}.png"
    plot(points, plot_path)
    budgets = "; ".join(f"{name}: {student_steps(p, name)} student steps ({epochs_rounds(p, name)[0]} epochs x "
                        f"{epochs_rounds(p, name)[1]} rounds x {p['steps']} steps)" for name in (FULL, SMALL))
    text = "\n".join([
        *section_header(
            f"Online data-free distillation ({profile_name} profile)",
            f"python benchmarks/datafree.py --profile {profile_name} --jobs {jobs}",
            f"Setting: teacher `weights/resnetd_small_28_fmnist.safetensors` ({TEACHER_TOP1}%); no real training "
            f"image; batch 128; {budgets}. The fixed-set rows take as many steps as the full-budget online row over "
            f"a set of {p['set_images_per_class'] * 10} images made with {p['set_iterations']} iterations per batch. "
            f"{p['synthesis_steps']} synthesis steps per round after a first round of {p['first_round_steps']}. "
            f"DearKD's default switch (5/6 of the epochs): {stage2_text(p, FULL)} at the full budget, "
            f"{stage2_text(p, SMALL)} at the ablation budget except in the stage-2 pair "
            f"({'its last epoch' if stage2_switch(p, STAGE2_TEACHER) else 'none'}). Seeds {p['seeds']}; top-1 after the last epoch on the real 10k test set, mean ± sample std.  ",
            f"Code: commit {commit()}.  ",
            f"Compute: {sum(sum(v) for v in minutes.values()) / 60:.2f} h summed over runs; wall time of this "
            f"invocation {(time.perf_counter() - start) / 60:.0f} min (finished work is reused, not redone)."), "",
        *lines, "",
        "Accuracy against synthesis compute (generator steps per round, the ablation budget):", "",
        "| synthesis_steps | " + " | ".join(str(b) for b in p["budgets"]) + " |",
        "|---|" + "---|" * len(p["budgets"]),
        "| top-1 | " + " | ".join("{:.2f} ± {:.2f}".format(*mean_std(points[b])) for b in p["budgets"]) + " |", "",
        f"![accuracy against synthesis compute](benchmarks/{plot_path.name})",
        *(["", "The quick profile is a pipeline check (one seed, a few steps): not evidence."]
          if profile_name == "quick" else []),
    ])
    write_section(f"datafree-{profile_name}", text)
    print(text)


if __name__ == "__main__":
    main()
