"""What the teacher costs, and what cached targets save (docs/methods.md §5).

Parts (``--part``; all of them by default):
- ``steps``: `vitdistill bench` for each pair: student step, teacher forward, every method online and on cached
  targets, with the overhead ratios (the Fashion-MNIST presets; DeiT-Ti <- RegNetY-16GF, DeiT-Ti <- CaiT-S24 and
  Swin-T <- Swin-S at 224 px, batch 8, random weights: the full profile only).
- ``fidelity``: a cache of a run with every augmentation on (crop, flip, RandAugment, erasing, mixup/cutmix) over
  enough records, then `cache-teacher --verify 1`: identical inputs (hash), top-1 agreement, largest logit error.
- ``official`` (with ``--official DIR``, a checkout of github.com/thy960112/SpectralKD that you fetched; it is
  imported at run time, never copied): its training step (``customized_forward`` student and teacher,
  ``losses.DistillationLoss`` soft + fft) against vitdistill's spectralkd step for DeiT-Ti <- CaiT-S24 at 224 px,
  batch 8, the same layer pairs and weights, timed interleaved in one process.
- ``parity``: kd and dearkd on 10% of Fashion-MNIST with the teacher online (replayable views) and on cached
  targets, the same seeds and epochs; one longer schedule (kd); the ViT alone beside them for the cost table
  (images/s, epoch time, cache time and size, break-even number of runs).

    python benchmarks/teacher_cost.py --profile quick   # pipeline check, about 10 min on 2 CPU cores
    python benchmarks/teacher_cost.py --profile full --official /path/to/SpectralKD   # the tables for BENCHMARKS.md

Runs land in runs/bench/teacher_cost/<profile>/; re-running skips finished work.
"""

from __future__ import annotations

import csv
import json
import os
import time
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
    vitdistill_cli,
    write_section,
)

FMNIST, IMAGENET = REPO / "configs" / "fashion_mnist", REPO / "configs" / "imagenet"
PAIRS = {  # name: (config, overrides, class count for bench)
    "ViT (distilled) <- ResNet, Fashion-MNIST": (FMNIST / "dearkd.yaml", [], None),
    "ViT <- CaiT, Fashion-MNIST": (FMNIST / "spectralkd.yaml", [], None),
    "DeiT-Ti <- RegNetY-16GF, 224 px": (IMAGENET / "dearkd_deit_tiny.yaml", ["data.batch_size=8"], 1000),
    "DeiT-Ti <- CaiT-S24, 224 px": (IMAGENET / "spectralkd_deit_tiny.yaml", ["data.batch_size=8"], 1000),
    "Swin-T <- Swin-S, 224 px": (IMAGENET / "spectralkd_swin_tiny.yaml", ["data.batch_size=8"], 1000),
}
ALL_AUGMENTATIONS = ["data.augment.crop_padding=2", "data.augment.hflip=0.5",
                     "data.augment.randaugment=rand-m9-mstd0.5", "data.augment.random_erasing=0.25",
                     "data.augment.mixup=0.8", "data.augment.cutmix=1.0"]
PROFILES = {
    "quick": {"pairs": 2, "steps": 3, "warmup": 1, "fidelity": (0.02, 2), "seeds": [0], "fraction": 0.02,
              "epochs": 2, "long_epochs": 3},
    "full": {"pairs": 5, "steps": 30, "warmup": 3, "fidelity": (0.1, 2), "seeds": [0, 1], "fraction": 0.1,
             "epochs": 5, "long_epochs": 30},
}
METHODS = {"kd": "kd.yaml", "dearkd": "dearkd.yaml"}


def steps_part(p: dict, out: Path, threads: int) -> dict[str, dict]:
    results = {}
    for name, (config, overrides, classes) in list(PAIRS.items())[:p["pairs"]]:
        folder = out / "steps" / name.split(",")[0].replace(" ", "_").replace("<-", "from").replace("(", "").replace(")", "")
        if not (folder / "bench.json").exists():
            args = ["bench", str(config), *overrides, "--steps", str(p["steps"]), "--warmup", str(p["warmup"]),
                    "--out", str(folder), "--quiet", *(["--num-classes", str(classes)] if classes else [])]
            vitdistill_cli(args, threads, what=f"bench {name}")
            print(f"[{time.strftime('%H:%M:%S')}] bench {name}", flush=True)
        results[name] = json.loads((folder / "bench.json").read_text())
    return results


def official_part(p: dict, out: Path, official: Path) -> dict[str, dict[str, float]]:
    """Median step of the official SpectralKD code and of ours, interleaved, once in float32 and once under
    bfloat16 autocast (each side in the same precision); cached in official.json."""
    record = out / "official.json"
    if record.exists():
        return json.loads(record.read_text())
    import statistics
    import sys
    from types import SimpleNamespace

    import timm
    import torch

    from vitdistill.config import load_config
    from vitdistill.engine.bench import _Bench

    config, overrides, classes = PAIRS["DeiT-Ti <- CaiT-S24, 224 px"]
    sys.path.insert(0, str(official))
    from customized_forward import register_forward  # the official repository's files
    from losses import DistillationLoss

    def measure(amp: str) -> dict[str, float]:
        cfg = load_config(config, [*overrides, f"train.amp={amp}", "train.amp_dtype=bfloat16"])
        ours = _Bench(cfg, classes)
        params = cfg.method.params
        student = timm.create_model(cfg.model.name, num_classes=classes)
        teacher = timm.create_model(cfg.teacher.name, num_classes=classes).eval()
        register_forward(student, cfg.model.name)
        register_forward(teacher, cfg.teacher.name)
        args = SimpleNamespace(distillation_type="soft", distillation_tau=params["temperature"],
                               s_id=params["student_layers"], t_id=params["teacher_layers"],
                               distillation_alpha=params["alpha"], distillation_beta=1.0, w_fft=params["fft_weight"])
        criterion = DistillationLoss(torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing), teacher,
                                     args)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        student.train()

        def official_step() -> None:
            with ours.amp():
                outputs = student(ours.images, args.s_id)
                loss = sum(criterion(ours.images, outputs, ours.labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        runners = {"official SpectralKD": official_step, "vitdistill spectralkd": ours.runner("spectralkd"),
                   "student step (none)": ours.runner("student step (none)"),
                   "teacher forward": ours.runner("teacher forward")}
        times: dict[str, list[float]] = {k: [] for k in runners}
        for i in range(p["warmup"] + p["steps"]):
            for name, fn in runners.items():
                start = time.perf_counter()
                fn()
                if i >= p["warmup"]:
                    times[name].append(time.perf_counter() - start)
        return {k: 1000 * statistics.median(v) for k, v in times.items()}

    result = {"float32": measure("false"), "bfloat16 autocast": measure("true")}
    record.write_text(json.dumps(result, indent=2))
    return result


def cache(out: Path, name: str, config: Path, overrides: list[str], threads: int, verify: bool = False) -> dict:
    folder = out / "caches" / name
    summary = folder / ("verify.json" if verify else "build.json")
    if not summary.exists():
        args = ["cache-teacher", str(config), *overrides, f"teacher.cache={os.path.relpath(folder, REPO)}", "--quiet"]
        proc = vitdistill_cli([*args, *(["--verify", "1"] if verify else [])], threads, what=f"cache {name}")
        summary.write_text(proc.stdout)
    return json.loads(summary.read_text())


def fidelity_part(p: dict, out: Path, threads: int) -> dict:
    fraction, epochs = p["fidelity"]
    overrides = [f"data.fraction={fraction}", f"train.epochs={epochs}", *ALL_AUGMENTATIONS]
    return {"build": cache(out, "fidelity", FMNIST / "kd.yaml", overrides, threads),
            "verify": cache(out, "fidelity", FMNIST / "kd.yaml", overrides, threads, verify=True),
            "overrides": overrides}


def common_overrides(p: dict, epochs: int) -> list[str]:
    return [f"data.fraction={p['fraction']}", f"train.epochs={epochs}", f"train.warmup_epochs={epochs * 0.1:.2f}",
            f"train.eval_every={epochs}", "data.eval_batch_size=1000"]


def parity_part(p: dict, out: Path, jobs: int) -> tuple[list[Run], dict[str, dict], dict[str, dict]]:
    threads = threads_per_job(jobs)
    runs, caches = [], {}
    schedules = [("equal epochs", p["epochs"], list(METHODS), p["seeds"]),
                 ("longer schedule", p["long_epochs"], ["kd"], p["seeds"][:1])]
    for column, epochs, methods, seeds in schedules:
        for seed in seeds:
            base = common_overrides(p, epochs)
            name = f"{column.replace(' ', '_')}__s{seed}"
            # kd.yaml and dearkd.yaml share data, augmentation and teacher: one cache serves both
            caches[name] = cache(out, name, FMNIST / "kd.yaml", [*base, f"run.seed={seed}"], threads)
            cache_dir = os.path.relpath(out / "caches" / name, REPO)
            for method in methods:
                config = str(FMNIST / METHODS[method])
                runs.append(Run(f"{method}, teacher online", column, seed, config, [*base, "data.replay=true"]))
                runs.append(Run(f"{method}, cached targets", column, seed, config, [*base, f"teacher.cache={cache_dir}"]))
            if column == "equal epochs":
                runs.append(Run("ViT alone (no teacher)", column, seed, str(FMNIST / "student_vit.yaml"),
                                [*base, "data.replay=true"]))
    return runs, run_all(runs, out / "runs", jobs), caches


def images_per_s(out: Path, run: Run) -> float:
    with open(out / "runs" / run.name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return sum(float(r["images_per_s"]) for r in rows) / len(rows)


def steps_table(results: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in results.items():
        lines += [f"**{name}**: {r['student']} <- {r['teacher']}, {r['img_size']} px, batch {r['batch_size']}; "
                  f"bound (student step + teacher forward) {r['bound_ms']:.0f} ms; medians of {r['steps']} interleaved "
                  f"rounds after {r['warmup']}", "",
                  "| runner | median ms | IQR ms | peak MB | overhead ratio |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            cells = [f"{row[k]:.1f}" if isinstance(row[k], float) else "—" for k in ("median_ms", "iqr_ms")]
            peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "—"
            ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "—"
            lines.append(f"| {row['name']} | {' | '.join(cells)} | {peak} | {ratio}{' (' + row['note'] + ')' if row['note'] else ''} |")
        lines.append("")
    return lines


def official_table(official: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| precision | official SpectralKD ms | vitdistill spectralkd ms | ours / official | student step ms | "
             "teacher forward ms | bound ms |", "|---|---|---|---|---|---|---|"]
    for precision, r in official.items():
        ours, theirs = r["vitdistill spectralkd"], r["official SpectralKD"]
        bound = r["student step (none)"] + r["teacher forward"]
        lines.append(f"| {precision} | {theirs:.0f} ({theirs / bound:.2f}x bound) | {ours:.0f} ({ours / bound:.2f}x "
                     f"bound) | {ours / theirs:.2f}x | {r['student step (none)']:.0f} | {r['teacher forward']:.0f} | "
                     f"{bound:.0f} |")
    return lines


def main() -> None:
    parser = profile_parser(__doc__, PROFILES)
    parser.add_argument("--part", choices=("steps", "official", "fidelity", "parity"), help="run only this part")
    parser.add_argument("--official", type=Path, help="a checkout of the official SpectralKD code (for `official`)")
    args = parser.parse_args()
    p = PROFILES[args.profile]
    out = REPO / "runs" / "bench" / "teacher_cost" / args.profile
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threads = threads_per_job(1)  # timing and cache passes alone on the machine
    parts = [args.part] if args.part else ["steps", *(["official"] if args.official else []), "fidelity", "parity"]
    if "official" in parts and args.official is None:
        parser.error("the official part needs --official DIR (a checkout of github.com/thy960112/SpectralKD)")
    steps = steps_part(p, out, threads) if "steps" in parts else None
    official = official_part(p, out, args.official) if "official" in parts else None
    fidelity = fidelity_part(p, out, threads) if "fidelity" in parts else None
    parity = parity_part(p, out, args.jobs) if "parity" in parts else None
    if args.part:
        print(json.dumps({"steps": steps and {k: v["bound_ms"] for k, v in steps.items()}, "fidelity": fidelity,
                          "official": official}, indent=2))
        return
    assert steps is not None and fidelity is not None and parity is not None
    runs, results, caches = parity
    table = aggregate(runs, results)
    v, b = fidelity["verify"], fidelity["build"]
    lines = [*section_header(
        f"What the teacher costs: online vs cached targets ({args.profile} profile)",
        f"python benchmarks/teacher_cost.py --profile {args.profile} --jobs {args.jobs}",
        f"Code: commit {commit()}.  ",
        f"Wall time of this invocation {(time.perf_counter() - start) / 60:.0f} min (finished work is reused)."), "",
        "### Step times (`vitdistill bench`, random images)", "", *steps_table(steps),
        "### The official SpectralKD step beside ours (DeiT-Ti <- CaiT-S24, 224 px, batch 8, interleaved)", "",
        *(official_table(official) if official else ["Not measured in this invocation (no `--official DIR`)."]),
        "",
        "### Replay fidelity (`vitdistill cache-teacher --verify 1`)", "",
        f"Cache of `configs/fashion_mnist/kd.yaml {' '.join(fidelity['overrides'])}`: {v['records']} (image, epoch) "
        f"records rebuilt in a fresh process; identical inputs (hash) {v['identical_inputs']}/{v['records']}; top-1 "
        f"agreement with the live teacher {v['top1_agreement']:.2f}%; largest top-k logit error "
        f"{v['max_logit_error']:.2e}, largest logsumexp error {v['max_logsumexp_error']:.2e} (fp16 storage); "
        f"{b['bytes_per_record']:.0f} bytes per record, built in {b['seconds']:.0f} s.", "",
        "### Accuracy, online vs cached (Fashion-MNIST, equal data, epochs and seeds)", "",
        "| run | schedule | top-1 | images/s | minutes per run |", "|---|---|---|---|---|"]
    for (group, column), values in table.items():
        members = [r for r in runs if (r.group, r.column) == (group, column)]
        m, s = mean_std(values)
        ips = mean_std([images_per_s(out, r) for r in members])[0]
        minutes = mean_std([results[r.name]["wall_time_s"] / 60 for r in members])[0]
        lines.append(f"| {group} | {column} | {m:.2f} ± {s:.2f} (n={len(values)}) | {ips:.0f} | {minutes:.1f} |")
    build_s = mean_std([c["seconds"] for name, c in caches.items() if name.startswith("equal")])[0]
    lines += ["", f"Cache pass per seed (equal-epochs schedule): {build_s:.0f} s, "
              f"{mean_std([c['bytes_per_record'] for c in caches.values()])[0]:.0f} bytes per record."]
    for method in METHODS:
        online = mean_std([results[r.name]["wall_time_s"] for r in runs
                           if r.group == f"{method}, teacher online" and r.column == "equal epochs"])[0]
        cached = mean_std([results[r.name]["wall_time_s"] for r in runs
                           if r.group == f"{method}, cached targets" and r.column == "equal epochs"])[0]
        saved = online - cached
        lines.append(f"{method}: {online:.0f} s online, {cached:.0f} s cached per run; break-even after "
                     + (f"{build_s / saved:.1f} runs." if saved > 0 else "never (no time saved at this size)."))
    if args.profile == "quick":
        lines += ["", "The quick profile is a pipeline check (tiny sizes, one seed, a busy machine): not evidence."]
    text = "\n".join(lines)
    write_section(f"teacher-cost-{args.profile}", text)
    print(text)


if __name__ == "__main__":
    main()
