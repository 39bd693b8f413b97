"""``vitdistill bench``: the step time and peak memory of every method against the online lower bound
(docs/methods.md §5.4).

For the student/teacher pair, image size and batch of a config (random images, so no data is read), the median
time of: a student-only training step (forward, backward, optimizer step: the ``none`` method), a teacher forward
in inference mode, the full training step of every registered method (both stages of a two-stage method), the
step of each method that runs a teacher on cached targets (``teacher.cache``: top-k logits rebuilt every step,
teacher maps from a forward up to the tapped layer; reading the shard from disk is left out), and a method's own
aligners with their loss (``(aligners alone)``: the trainable layers that map student maps onto teacher maps,
compute the method adds to the bound). A method's **overhead ratio** is its step over the bound (student step +
teacher forward), the median over rounds of the ratio within a round: 1.0 means it costs nothing beyond running
both models once; a step that runs no teacher is set against the student step alone, the aligners against the
bound (their share of it).

The runners are timed interleaved (one step of each in turn, ``steps`` times, after ``warmup`` rounds) so that a
slow spell of a shared machine hits them all alike. Peak memory is what one step needs above what the runner
already holds (weights, optimizer state): on CUDA the peak allocated above the allocation before the step; on the
CPU the peak resident set above the one before it (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.datasets import TensorImageDataset
from ..io import atomic_write_text
from ..methods import (
    Distiller,
    MethodError,
    TeacherOutputs,
    build_method,
    get_method,
    list_methods,
    parse_method_params,
)
from ..models.factory import build_model
from ..teacher_cache import reconstruct_logits
from .distributed import resolve_device

STUDENT, TEACHER = "student step (none)", "teacher forward"
LAST_STAGE, CACHED, CACHED_MAPS, ALIGNERS = " (last stage)", " (cached)", " (cached, maps too)", " (aligners alone)"
SUFFIXES = (LAST_STAGE, CACHED, CACHED_MAPS, ALIGNERS)
CACHE_TOPK = 10  # vitdistill cache-teacher's default
NUM_CLASSES = {"fashion-mnist": 10, "random": 10, "cifar10": 10, "cifar100": 100}  # imagefolder: say it


@dataclass
class BenchRow:
    name: str
    median_ms: float | None
    iqr_ms: float | None  # interquartile range of the timed steps
    peak_mb: float | None
    ratio: float | None  # step / bound
    note: str = ""
    times_ms: list[float] | None = None  # every timed step, in round order


class _Bench:
    """The random batch, the teacher and a step function per runner, built on demand."""

    def __init__(self, cfg: Config, num_classes: int) -> None:
        d, t = cfg.data, cfg.train
        self.cfg, self.num_classes = cfg, num_classes
        self.device = resolve_device(t.device)
        torch.manual_seed(cfg.run.seed)
        self.images = torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=self.device)
        self.labels = torch.randint(0, num_classes, (d.batch_size,), device=self.device)
        if t.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self._teacher: nn.Module | None = None

    def amp(self) -> contextlib.AbstractContextManager:
        t = self.cfg.train
        return torch.autocast(self.device.type, dtype=getattr(torch, t.amp_dtype)) if t.amp else contextlib.nullcontext()

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            d = self.cfg.data
            self._teacher = build_model(self.cfg.teacher, self.num_classes, d.in_chans, d.img_size)
            self._teacher.to(self.device).eval().requires_grad_(False)
            if self.cfg.train.channels_last:
                self._teacher.to(memory_format=torch.channels_last)
        return self._teacher

    def _distiller(self, method: str) -> Distiller:
        """``method`` with the config's params when it is the config's method, its defaults otherwise."""
        cfg, d = self.cfg, self.cfg.data
        params = parse_method_params(method, cfg.method.params if method == cfg.method.name else None)
        student = build_model(cfg.model, self.num_classes, d.in_chans, d.img_size)
        teacher = self.teacher if get_method(method).needs_teacher else None
        distiller = build_method(method, params, student, teacher, label_smoothing=cfg.train.label_smoothing,
                                 epochs=cfg.train.epochs).to(self.device)
        # SpectralKD's `auto` pairs come from the teacher's intensity on "training" images: here the random batch
        distiller.prepare(TensorImageDataset(self.images.cpu(), self.labels.cpu()), cfg.run.seed)
        if cfg.train.channels_last:
            distiller.to(memory_format=torch.channels_last)
        return distiller

    def runner(self, name: str) -> Callable[[], None]:
        """``teacher forward``, or a method's training step (``METHOD`` or ``METHOD (last stage)``)."""
        if name == TEACHER:
            def forward() -> None:
                with torch.inference_mode(), self.amp():
                    self.teacher(self.images)
            return forward
        last_stage, cached_maps = name.endswith(LAST_STAGE), name.endswith(CACHED_MAPS)
        cached = cached_maps or name.endswith(CACHED)
        method = "none" if name == STUDENT else name
        for suffix in SUFFIXES:
            method = method.removesuffix(suffix)
        cfg = self.cfg
        distiller = self._distiller(method)
        if name.endswith(ALIGNERS):
            return self._aligner_step(distiller)
        if last_stage:
            distiller.on_stage_change(distiller.stage_for_epoch(cfg.train.epochs - 1))
        params = [p for m in distiller.trainable_modules() for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        distiller.train()
        if cached:  # what a cache holds (fp16), made once: top-k rebuilt into logits, maps cast, every step
            logits, stored = distiller.run_teacher(self.images, distiller.teacher_request()[1] if cached_maps else None)
            top = logits.float().topk(min(CACHE_TOPK, self.num_classes), dim=1)
            record = (top.values.half(), top.indices, torch.logsumexp(logits.float(), 1).half())
            stored = {k: v.half() for k, v in stored.items()}

        def teacher_outputs() -> TeacherOutputs | None:
            if not cached:
                return None  # the method runs the teacher itself
            need_logits, tap = distiller.teacher_request()
            if tap is None:
                maps = {}
            elif cached_maps:
                maps = {k: v.to(self.images.dtype) for k, v in stored.items()}
            else:
                maps = distiller.run_teacher(self.images, tap, need_logits=False)[1]
            return TeacherOutputs(reconstruct_logits(*record, self.num_classes) if need_logits else None, maps)

        def step() -> None:
            with self.amp():
                _, losses = distiller(self.images, self.labels, teacher_outputs())
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        step.reads_maps = distiller.teacher_request()[1] is not None  # type: ignore[attr-defined]
        step.has_aligners = hasattr(distiller, "aligners")  # type: ignore[attr-defined]
        return step

    def _aligner_step(self, distiller: Distiller) -> Callable[[], None]:
        """The method's aligners and alignment loss alone (forward, backward into the student maps, AdamW step on
        the aligners), on the maps of one student and one teacher forward made beforehand."""
        distiller.train()
        with torch.no_grad(), self.amp():
            s_maps = distiller.s_tap(self.images, need_logits=False)[1]
            t_maps = distiller.run_teacher(self.images, distiller.t_tap, need_logits=False)[1]
        s_maps = {k: v.detach().requires_grad_() for k, v in s_maps.items()}
        optimizer = torch.optim.AdamW(distiller.aligners.parameters(), lr=1e-4)

        def step() -> None:
            with self.amp():
                loss = distiller.alignment_loss(s_maps, t_maps)
            optimizer.zero_grad(set_to_none=True)
            for v in s_maps.values():
                v.grad = None
            loss.backward()
            optimizer.step()
        return step

    def runs_teacher(self, name: str) -> bool:
        """Whether the step runs the teacher in full (cached steps run at most its tapped part)."""
        if name in (STUDENT, TEACHER) or name.endswith(SUFFIXES):
            return name == TEACHER
        return get_method(name).needs_teacher


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_peaks(runners: dict[str, Callable[[], None]]) -> dict[str, float | None]:
    """Per runner, the peak resident set of one step above the one before it: freed memory goes back to the
    system first (``malloc_trim``), then the kernel's high-water mark is reset to the current size (Linux
    ``/proc/self/clear_refs``); None where that is not possible."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except OSError:
        trim = None
    peaks: dict[str, float | None] = {}
    for name, fn in runners.items():
        gc.collect()
        if trim is not None:
            trim(0)
        try:
            base = _status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            return dict.fromkeys(runners)
        fn()
        peaks[name] = max(0, _status_kb("VmHWM") - base) / 1024
    return peaks


def _cuda_peaks(runners: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    peaks = {}
    for name, fn in runners.items():
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return peaks


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, methods: list[str] | None = None,
              num_classes: int | None = None, out: Path | None = None, memory: bool = True, cached: bool = True,
              quiet: bool = False) -> dict[str, Any]:
    """Time every runner (and measure its peak memory when ``memory``; with ``cached``, also each teacher
    method's step on cached targets); write ``bench.json`` and ``bench.md`` into ``out`` (when given)."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"bench: --steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    known = list_methods()
    unknown = [m for m in methods or [] if m not in known]
    if unknown:
        raise ConfigError(f"bench: unknown method(s) {unknown}; registered methods: {known}")
    if not cfg.teacher.name:
        raise ConfigError("bench needs a teacher: set teacher.name (and teacher.checkpoint) in the config")
    num_classes = num_classes or NUM_CLASSES.get(cfg.data.name)
    if num_classes is None:
        raise ConfigError(f"bench: data.name='{cfg.data.name}' has no known class count; pass --num-classes N")
    bench = _Bench(cfg, num_classes)
    runners: dict[str, Callable[[], None]] = {TEACHER: bench.runner(TEACHER), STUDENT: bench.runner(STUDENT)}
    skipped: dict[str, str] = {}
    for method in [m for m in methods or known if m != "none"]:
        try:
            runners[method] = bench.runner(method)
        except MethodError as e:
            skipped[method] = str(e)
            continue
        if cached and get_method(method).needs_teacher:
            runners[method + CACHED] = bench.runner(method + CACHED)
            if runners[method].reads_maps:  # type: ignore[attr-defined]
                runners[method + CACHED_MAPS] = bench.runner(method + CACHED_MAPS)
        if get_method(method).stage_for_epoch is not Distiller.stage_for_epoch:  # a method with stages
            runners[method + LAST_STAGE] = bench.runner(method + LAST_STAGE)
        if runners[method].has_aligners:  # type: ignore[attr-defined]
            runners[method + ALIGNERS] = bench.runner(method + ALIGNERS)

    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + steps):
        for name, fn in runners.items():
            _sync(bench.device)
            start = time.perf_counter()
            fn()
            _sync(bench.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        if not quiet:
            print(f"bench: round {i + 1}/{warmup + steps}" + (" (warm-up)" if i < warmup else ""), flush=True)
    if not quiet and memory:
        print("bench: peak memory", flush=True)
    peaks = ({} if not memory else _cuda_peaks(runners, bench.device) if bench.device.type == "cuda"
             else _cpu_peaks(runners))

    median = {k: 1000 * statistics.median(v) for k, v in times.items()}
    bound_ms = median[STUDENT] + median[TEACHER]
    bounds = [s + t for s, t in zip(times[STUDENT], times[TEACHER])]  # per round
    rows = []
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        with_teacher = bench.runs_teacher(name)
        against = bounds if with_teacher or name.endswith(ALIGNERS) else times[STUDENT]
        # within a round, so that a slow spell of the machine cancels out
        ratio = None if name == TEACHER else statistics.median(v / a for v, a in zip(values, against))
        note = ("" if with_teacher or name == TEACHER else "the method's own layers: their share of the bound"
                if name.endswith(ALIGNERS) else "cached targets: vs the student step"
                if name.endswith((CACHED, CACHED_MAPS)) else "runs no teacher: vs the student step")
        rows.append(BenchRow(name, median[name], 1000 * (q[2] - q[0]), peaks.get(name), ratio, note,
                             [1000 * v for v in values]))
    rows += [BenchRow(name, None, None, None, None, f"skipped: {why}") for name, why in skipped.items()]
    d, t = cfg.data, cfg.train
    result = {"student": cfg.model.name, "teacher": cfg.teacher.name, "img_size": d.img_size,
              "batch_size": d.batch_size, "device": str(bench.device), "threads": torch.get_num_threads(),
              "amp": t.amp, "channels_last": t.channels_last, "steps": steps, "warmup": warmup,
              "bound_ms": bound_ms, "rows": [asdict(r) for r in rows]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out / "bench.md", markdown(result) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    def cell(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [f"{result['student']} <- {result['teacher']}, {result['img_size']} px, batch {result['batch_size']}, "
             f"{result['device']} ({result['threads']} threads), amp {result['amp']}, channels_last "
             f"{result['channels_last']}; medians of {result['steps']} interleaved steps after {result['warmup']}; "
             f"bound = student step + teacher forward = {result['bound_ms']:.1f} ms", "",
             "| runner | median ms | IQR ms | peak MB | overhead ratio | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {cell(r['median_ms'], '.1f')} | {cell(r['iqr_ms'], '.1f')} | "
                     f"{cell(r['peak_mb'], '.0f')} | {cell(r['ratio'], '.3f')} | {r['note']} |")
    return "\n".join(lines)
