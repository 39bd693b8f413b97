"""DearKD's two stages at a longer schedule, and transfer of the distilled students (docs/methods.md §1.4, §3.7).

Parts (``--part``; both by default):
- ``schedule``: at each data fraction, equal epochs and seeds: the ViT alone, soft KD, DeiT, DearKD (switch at 5/6),
  DearKD in one stage (distil to the end) and DearKD switching at 1/2; plus the ViT alone on all the data at the same
  epochs. Test accuracy after every epoch, so the stage ablations' curves can be drawn with the switch marked.
- ``transfer``: fine-tune on the digits set (configs/digits/finetune.yaml) from random weights and from the ViT alone,
  DeiT and DearKD students of the smallest fraction (seed 0 of the schedule part), several fine-tuning seeds.

    python benchmarks/dearkd_schedule.py --profile quick   # pipeline check, about 15 min on 2 CPU cores
    python benchmarks/dearkd_schedule.py --profile full    # the tables (size in PROFILES; many hours on 2 CPU cores)

Order: the smallest fraction's first seed, then the transfer part (it fine-tunes those students), then the other
seeds and fractions, the runs on all the data last. DearKD switching at 5/6 and at 1/2 are the one-stage run until
their switch, so they branch from its checkpoints (`train.keep_epochs`, `vitdistill train --branch-from`): the same
result as training them from scratch (tested), without training the shared epochs again (their wall time includes
the shared epochs).

The full profile: 30 epochs at batch 128 (the DearKD table ran 5, where stage 2 was one epoch); 2 seeds x 6 rows x
2 fractions + 2 runs on all the data + 12 fine-tuning runs. On 2 CPU cores that is about 9 h with the branches (an
estimate from the quick profile's images/s; about 12 h without them; the 100% rows alone
about 5 h), so it is meant to run in parts (every run resumes) or on a GPU. Runs land in
runs/bench/dearkd_schedule/<profile>/.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import yaml
from common import (
    REPO,
    Run,
    aggregate,
    commit,
    format_table,
    mean_std,
    profile_parser,
    run_all,
    section_header,
    write_section,
)

from vitdistill.methods.dearkd import switch_epoch_for

CONFIGS = REPO / "configs" / "fashion_mnist"
VIT, KD, DEIT, DEARKD = "ViT alone", "soft KD", "DeiT", "DearKD (switch at 5/6)"
ONE_STAGE, HALF = "DearKD one stage", "DearKD switch at 1/2"
ROWS = {VIT: ("student_vit.yaml", []), KD: ("kd.yaml", []), DEIT: ("deit.yaml", []), DEARKD: ("dearkd.yaml", []),
        ONE_STAGE: ("dearkd.yaml", ["method.params.switch_epoch=EPOCHS"]),
        HALF: ("dearkd.yaml", ["method.params.switch_epoch=HALF"])}
PROFILES = {
    "quick": {"fractions": [0.02], "all_data": 0.05, "epochs": 2, "seeds": [0], "batch_size": 64,
              "transfer_seeds": [0], "transfer_epochs": 2},
    "full": {"fractions": [0.1, 0.25], "all_data": 1.0, "epochs": 30, "seeds": [0, 1], "batch_size": 128,
             "transfer_seeds": [0, 1, 2], "transfer_epochs": 30},
}
SOURCES = [VIT, DEIT, DEARKD]  # students fine-tuned on digits, beside random weights


def schedule_runs(p: dict) -> list[Run]:
    e = p["epochs"]
    common = [f"train.epochs={e}", f"train.warmup_epochs={max(1, e // 10)}", "train.eval_every=1",
              f"data.batch_size={p['batch_size']}", "data.eval_batch_size=1000"]
    switches = {DEARKD: switch_epoch_for(e), HALF: e // 2}  # the rows that are the one-stage run until their switch
    runs = []
    for seed in p["seeds"]:
        for fraction in p["fractions"]:
            column = f"{fraction:.0%}"
            one_stage = Run(ONE_STAGE, column, seed, "").name
            for row, (config, extra) in ROWS.items():
                extra = [x.replace("EPOCHS", str(e)).replace("HALF", str(e // 2)) for x in extra]
                if row == ONE_STAGE:
                    extra.append(f"train.keep_epochs={sorted({s for s in switches.values() if 1 <= s <= e})}")
                switch = switches.get(row)
                runs.append(Run(row, column, seed, str(CONFIGS / config), [*common, f"data.fraction={fraction}", *extra],
                                branch=(one_stage, switch) if switch else None))
        runs.append(Run(VIT, f"{p['all_data']:.0%}", seed, str(CONFIGS / "student_vit.yaml"),
                        [*common, f"data.fraction={p['all_data']}"]))
    return runs


def schedule_cells(runs: list[Run], p: dict) -> list[list[Run]]:
    """The order to train them: each fraction and seed in turn, the smallest fraction's first seed first (the
    students the transfer part fine-tunes); the runs on all the data last, all seeds at once (the longest)."""
    every = f"{p['all_data']:.0%}"
    cells = [[r for r in runs if r.column == f"{f:.0%}" and r.seed == seed] for f in p["fractions"] for seed in p["seeds"]]
    return [*cells, [r for r in runs if r.column == every]]


def transfer_runs(p: dict, out: Path, sources: dict[str, Run]) -> list[Run]:
    e = p["transfer_epochs"]
    common = [f"train.epochs={e}", f"train.warmup_epochs={max(1, e // 10)}", f"train.eval_every={e}"]
    runs = []
    for seed in p["transfer_seeds"]:
        runs.append(Run("random weights", "digits", seed, str(REPO / "configs" / "digits" / "finetune.yaml"), common))
        for row, source in sources.items():
            folder = out / "schedule" / source.name
            model = yaml.safe_load((folder / "config.yaml").read_text())["model"]
            runs.append(Run(f"from {row}", "digits", seed, str(REPO / "configs" / "digits" / "finetune.yaml"), [
                *common, f"model.name={model['name']}", f"model.mhca.blocks={model['mhca']['blocks']}",
                f"model.kwargs={model['kwargs']}", f"model.init={folder}"]))
    return runs


def curve(out: Path, run: Run) -> list[float]:
    with open(out / "schedule" / run.name / "metrics.csv") as f:
        return [float(r["val_top1"]) for r in csv.DictReader(f)]


def plot(out: Path, runs: list[Run], p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fraction = f"{p['fractions'][0]:.0%}"
    fig, ax = plt.subplots(figsize=(6, 4))
    switches = {DEARKD: switch_epoch_for(p["epochs"]), ONE_STAGE: None, HALF: p["epochs"] // 2, VIT: None}
    for row, switch in switches.items():
        members = [r for r in runs if r.group == row and r.column == fraction]
        curves = [curve(out, r) for r in members]
        mean = [sum(c) / len(c) for c in zip(*curves)]
        line, = ax.plot(range(1, len(mean) + 1), mean, label=f"{row} (n={len(curves)})")
        if switch:
            ax.axvline(switch + 0.5, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test top-1 (%), {fraction} of Fashion-MNIST")
    ax.set_title("DearKD stages: the dotted lines mark the switch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = profile_parser(__doc__, PROFILES)
    parser.add_argument("--part", choices=("schedule", "transfer"), help="run only this part")
    args = parser.parse_args()
    p = PROFILES[args.profile]
    out = REPO / "runs" / "bench" / "dearkd_schedule" / args.profile
    start = time.perf_counter()
    runs = schedule_runs(p)
    smallest = f"{p['fractions'][0]:.0%}"
    sources = {row: next(r for r in runs if r.group == row and r.column == smallest and r.seed == p["seeds"][0])
               for row in SOURCES}
    cells = schedule_cells(runs, p)
    results: dict[str, dict] = {}

    def run_cell(cell: list[Run]) -> None:  # the branches start from the one-stage run's kept checkpoints
        results.update(run_all([r for r in cell if r.branch is None], out / "schedule", args.jobs))
        results.update(run_all([r for r in cell if r.branch is not None], out / "schedule", args.jobs))

    if args.part != "transfer":
        run_cell(cells[0])  # the transfer part's students: first
    if args.part != "schedule":
        missing = [r.name for r in sources.values() if not (out / "schedule" / r.name / "summary.json").exists()]
        if missing:
            raise SystemExit(f"the transfer part fine-tunes the schedule part's students; not trained yet: {missing} "
                             f"(run --part schedule first, or no --part)")
        transfers = transfer_runs(p, out, sources)
        transfer_results = run_all(transfers, out / "transfer", args.jobs)
    if args.part != "transfer":
        for cell in cells[1:]:
            run_cell(cell)
    if args.part is not None:
        return
    table = aggregate(runs, results)
    columns = [f"{f:.0%}" for f in p["fractions"]] + [f"{p['all_data']:.0%}"]
    m = {k: mean_std(v) for k, v in table.items()}

    def diff(a: tuple[str, str], b: tuple[str, str]) -> str:
        return (f"{m[a][0] - m[b][0]:+.2f} points ({m[a][0]:.2f} ± {m[a][1]:.2f} vs {m[b][0]:.2f} ± {m[b][1]:.2f}, "
                f"n={len(table[a])})")

    answers = [f"- stage 2 vs one stage at {c}: DearKD (switch at 5/6) minus DearKD one stage = {diff((DEARKD, c), (ONE_STAGE, c))}"
               for c in columns[:-1]]
    largest = f"{p['fractions'][-1]:.0%}"
    answers.append(f"- DearKD@{largest} vs the ViT alone@{columns[-1]}: {diff((DEARKD, largest), (VIT, columns[-1]))}")
    ttable = aggregate(transfers, transfer_results)
    tm = {k[0]: mean_std(v) for k, v in ttable.items()}
    plot_path = REPO / "benchmarks" / f"dearkd_schedule_{args.profile}.png"
    plot(out, runs, p, plot_path)
    text = "\n".join([
        *section_header(f"DearKD at a longer schedule, and transfer to digits ({args.profile} profile)",
                        f"python benchmarks/dearkd_schedule.py --profile {args.profile} --jobs {args.jobs}",
                        f"Setting: {p['epochs']} epochs at batch {p['batch_size']}, seeds {p['seeds']}, top-1 after the "
                        f"last epoch on the 10k test set; transfer: configs/digits/finetune.yaml for "
                        f"{p['transfer_epochs']} epochs, seeds {p['transfer_seeds']}, from the {smallest} students of "
                        f"seed {p['seeds'][0]}, top-1 on the digits test split (359 images).  ",
                        f"Code: commit {commit()}. Wall time of this invocation "
                        f"{(time.perf_counter() - start) / 60:.0f} min (finished runs are reused)."), "",
        format_table(table, list(ROWS), columns, "data"), "", *answers, "",
        "| fine-tuned from | digits top-1 |", "|---|---|",
        *(f"| {row} | {v[0]:.2f} ± {v[1]:.2f} (n={len(ttable[(row, 'digits')])}) |" for row, v in tm.items()), "",
        f"![stage curves](benchmarks/{plot_path.name})",
        *(["", "The quick profile is a pipeline check (tiny sizes, one seed): not evidence."]
          if args.profile == "quick" else [])])
    write_section(f"dearkd-schedule-{args.profile}", text)
    print(text)


if __name__ == "__main__":
    main()
