"""Train the Fashion-MNIST teachers from their configs, export the shipped weights, record BENCHMARKS.md.

    python benchmarks/teachers.py --seeds 0 1          # ~12 min per run on 2 CPU cores
    python benchmarks/teachers.py --seeds 0 --no-export

The seed-0 run's final weights become ``weights/<preset>_fmnist.safetensors``; its top-1 and mean loss on
1,000 class-balanced test images are recorded too, and a test checks that the shipped file reproduces them
(the whole 10k test set would cost the suite minutes per CaiT on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (
    REPO,
    Run,
    aggregate,
    mean_std,
    run_all,
    run_dir,
    section_header,
    threads_per_job,
    vitdistill_cli,
    write_section,
)

TEACHERS = {
    # name: (config, shipped weights file)
    "resnetd_small_28": ("configs/fashion_mnist/teacher_resnet.yaml", "weights/resnetd_small_28_fmnist.safetensors"),
    "caitd_small_patch4_28": ("configs/fashion_mnist/teacher_cait.yaml",
                              "weights/caitd_small_patch4_28_fmnist.safetensors"),
    # the same CaiT distilled from the shipped CNN while it trains (as CaiT/DeiT train theirs)
    "caitd_small_patch4_28_kd": ("configs/fashion_mnist/teacher_cait_kd.yaml",
                                 "weights/caitd_small_patch4_28_kd_fmnist.safetensors"),
}


CHECK_IMAGES = 1000


def check_line(teacher: str) -> str:
    """What tests/test_shipped_weights.py checks: the shipped file on 1,000 class-balanced test images."""
    weights = TEACHERS[teacher][1]
    out = json.loads(vitdistill_cli(["eval", weights, "--images", str(CHECK_IMAGES)]).stdout)
    return (f"Check for the test suite (`vitdistill eval {weights} --images {CHECK_IMAGES}`, class-balanced, seed 0): "
            f"top-1 {out['top1']:.2f}, mean loss {out['loss']:.6f} (shipped-teacher-check {teacher} "
            f"{out['top1']:.2f} {out['loss']:.6f}).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "teachers")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--no-export", action="store_true", help="do not overwrite the shipped weights")
    args = p.parse_args()

    start = time.perf_counter()
    runs = [Run(t, "fashion-mnist", s, TEACHERS[t][0]) for t in args.teachers for s in args.seeds]
    results = run_all(runs, args.out, args.jobs)
    table = aggregate(runs, results)
    for t in args.teachers:  # one BENCHMARKS.md section per teacher, so teachers can be (re)trained apart
        rs = [r for r in runs if r.group == t]
        m, s = mean_std(table[(t, "fashion-mnist")])
        per_seed = ", ".join(f"s{r.seed}: {results[r.name]['last_top1']:.2f}" for r in rs)
        minutes = sum(results[r.name]["wall_time_s"] for r in rs) / len(rs) / 60
        lines = [*section_header(
                     f"Teacher {t} (Fashion-MNIST, full training set, top-1 on the 10k test set)",
                     f"python benchmarks/teachers.py --teachers {t} --seeds {' '.join(map(str, args.seeds))} "
                     f"--jobs {args.jobs}",
                     note=f" ({args.jobs} run(s) at a time, {threads_per_job(args.jobs)} thread(s) each)"), "",
                 "| teacher | config | params | seeds | last top-1 (mean ± std) | per-seed last top-1 | train time per run |",
                 "|---|---|---|---|---|---|---|",
                 f"| {t} | `{TEACHERS[t][0]}` | {results[rs[0].name]['student_params'] / 1e6:.2f}M | "
                 f"{len(rs)} | {m:.2f} ± {s:.2f} | {per_seed} | {minutes:.1f} min |"]
        shipped = next((r for r in rs if r.seed == 0), None)
        if shipped is not None and not args.no_export:
            weights = REPO / TEACHERS[t][1]
            export = vitdistill_cli(["export", str(run_dir(args.out, shipped) / "last.pt"), str(weights)])
            print(export.stdout, end="")
            lines += ["", f"Shipped: `{TEACHERS[t][1]}` = seed 0, last epoch: **top-1 "
                      f"{results[shipped.name]['last_top1']:.2f}** (shipped-teacher-top1 {t} "
                      f"{results[shipped.name]['last_top1']:.2f}).", "", check_line(t)]
        lines += ["", f"Wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min "
                  "(finished runs are reused, not retrained)."]
        write_section(f"teacher-{t}", "\n".join(lines))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
