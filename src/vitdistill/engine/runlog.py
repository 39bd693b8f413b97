"""Run-folder bookkeeping: metrics.csv, summary.json, optional TensorBoard, progress output."""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from ..schema import ConfigError


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per epoch; columns are the union of keys in order of first appearance (losses can
    differ between stages, a missing value is left empty)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    from .. import __version__

    return {"vitdistill": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "machine": platform.machine()}


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


class TensorBoardLog:
    """Thin optional wrapper: no-op unless enabled and tensorboard is installed."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard extra: "
                                  "pip install 'vitdistill[tensorboard]' (or set train.tensorboard=false)") from None
            self.writer = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, int | float) and k != "epoch":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """tqdm bar on a terminal; otherwise a plain line every ``interval`` steps (logs stay readable)."""

    def __init__(self, iterable: Iterable, total: int, desc: str, interval: int, enabled: bool) -> None:
        self.iterable, self.total, self.desc, self.interval = iterable, total, desc, interval
        self.enabled = enabled
        self.bar = None
        self.postfix = ""
        self.start = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def update(self, step: int, info: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.4g}" for k, v in info.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.interval == 0 or step == self.total:
            print(f"{self.desc} step {step}/{self.total} {text} ({time.perf_counter() - self.start:.0f}s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
