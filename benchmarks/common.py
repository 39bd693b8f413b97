"""Benchmark plumbing shared by the scripts in this folder.

A benchmark is a list of runs (a config plus overrides). Each run is an ordinary ``vitdistill train``
in its own folder, so an interrupted benchmark loses no finished run: finished runs (summary.json)
are skipped, started ones are resumed. Results are aggregated over seeds (mean, sample std) and
written into a marked section of BENCHMARKS.md together with the command, machine and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vitdistill.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


@dataclass
class Run:
    group: str  # what the table row is (method or ablation)
    column: str  # what the table column is (e.g. the data fraction)
    seed: int
    config: str
    overrides: list[str] = field(default_factory=list)
    branch: tuple[str, int] | None = None  # (run name, epoch): start from that run's kept checkpoint (--branch-from)

    @property
    def name(self) -> str:
        return f"{self.group}__{self.column}__s{self.seed}".replace("/", "-").replace(" ", "_")


def profile_parser(doc: str | None, profiles: dict) -> argparse.ArgumentParser:
    """``--profile`` and ``--jobs``, the options every benchmark script takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(profiles), default="quick")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cores/jobs threads)")
    return p


def parse_profile_args(doc: str | None, profiles: dict) -> tuple[str, int]:
    args = profile_parser(doc, profiles).parse_args()
    return args.profile, args.jobs


def threads_per_job(jobs: int) -> int:
    """The threads each of ``jobs`` processes at once gets, so that together they use every core."""
    return max(1, (os.cpu_count() or 1) // jobs)


def vitdistill_cli(args: Sequence[str], threads: int | None = None,
                   what: str | None = None) -> subprocess.CompletedProcess:
    """``python -m vitdistill *args`` in the repository, output captured as text.

    ``threads`` caps OMP/MKL threads (None: the environment as it is). A non-zero exit raises RuntimeError
    naming ``what`` (default: the subcommand) with the tail of stderr.
    """
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads),
                                        "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "vitdistill", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        what = what or f"vitdistill {args[0]}"
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_dir(out: Path, run: Run) -> Path:
    return out / run.name


def _launch(run: Run, out: Path, threads: int) -> dict:
    folder = run_dir(out, run)
    summary = folder / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    # the run folder relative to the repository (the cwd), so that run records carry no machine paths
    cmd = ["train", run.config, *run.overrides, f"run.output_dir={os.path.relpath(out, REPO)}",
           f"run.name={run.name}", f"run.seed={run.seed}", "--quiet"]
    if (folder / "last.pt").exists():
        cmd.append("--resume")
    elif run.branch is not None:
        parent, epoch = run.branch
        cmd += ["--branch-from", os.path.relpath(out / parent / f"epoch_{epoch:03d}.pt", REPO)]
    start = time.perf_counter()
    vitdistill_cli(cmd, threads, what=f"run {run.name}")
    print(f"[{time.strftime('%H:%M:%S')}] done {run.name} in {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(summary.read_text())


def run_all(runs: Sequence[Run], out: Path, jobs: int) -> dict[str, dict]:
    """Run (or resume, or skip) every run; ``jobs`` processes at once share the cores evenly."""
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda r: _launch(r, out, threads), runs))
    return {r.name: s for r, s in zip(runs, results)}


def aggregate(runs: Sequence[Run], results: dict[str, dict], key: str = "last_top1") -> dict[tuple[str, str], list[float]]:
    table: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        table.setdefault((r.group, r.column), []).append(results[r.name][key])
    return table


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_table(table: dict[tuple[str, str], list[float]], groups: Sequence[str], columns: Sequence[str],
                 column_title: str) -> str:
    lines = ["| method | " + " | ".join(f"{column_title} {c}" for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for g in groups:
        cells = []
        for c in columns:
            v = table.get((g, c))
            if v:
                m, s = mean_std(v)
                cells.append(f"{m:.2f} ± {s:.2f} (n={len(v)})")
            else:
                cells.append("—")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def commit() -> str:
    """The commit the runs were made with (as of this invocation), marked when the tree has changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "src", "configs", "benchmarks")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def section_header(title: str, command: str, *lines: str, note: str = "") -> list[str]:
    """The head of a BENCHMARKS.md section: title, the command that wrote it (``note`` after it), the machine,
    then ``lines`` (setting, compute; each ends in a markdown line break of its own)."""
    return [f"## {title}", "", f"Command: `{command}`{note}  ", f"Machine: {machine()}  ", *lines]


def training_time(results: dict[str, dict], start: float) -> str:
    """The header line with the training time summed over ``results`` and this invocation's wall time."""
    hours = sum(s["wall_time_s"] for s in results.values()) / 3600
    return (f"Training time: {hours:.2f} h summed over runs; wall time of this invocation "
            f"{(time.perf_counter() - start) / 60:.0f} min (finished runs are reused, not retrained).")


def write_section(marker: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the block between ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in body and end in body:
        before, rest = body.split(start, 1)
        body = before + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, body)
