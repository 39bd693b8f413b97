"""Files: every file vitdistill writes (checkpoints, weights, CSV, plots, reports) goes through
:func:`atomic_open`, so a kill or crash never leaves a half-written file under the real name; and the one
reader of safetensors files (weights, synthesised images, synthesis shards), whole or memory-mapped."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

#: what reading a damaged or foreign safetensors file can raise
SAFETENSORS_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Yield a temporary file beside ``path``; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", newline="") as f:
        f.write(text)
    return Path(path)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> Path:
    with atomic_open(path) as f:
        f.write(safetensors_bytes(tensors, metadata=metadata))
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, on the CPU; raises one of ``SAFETENSORS_ERRORS``."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                 "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def mmap_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as CPU tensors over a memory map of it: indexing rows reads only their pages
    (copy-on-write, so the file is never changed). Raises one of ``SAFETENSORS_ERRORS`` for a damaged file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size)) if size else None
    if not isinstance(header, dict):
        raise ValueError(f"'{path}' has no safetensors header")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (begin, end), shape = _NUMPY_DTYPES[entry["dtype"]], entry["data_offsets"], tuple(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor '{name}' of '{path}': a header entry {entry!r} that memory-mapped reading cannot "
                             f"use (dtypes: {sorted(_NUMPY_DTYPES)})") from None
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor '{name}' of '{path}': {end - begin} bytes do not hold a {shape} {entry['dtype']}")
        array = (np.memmap(path, dtype=dtype, mode="c", offset=8 + size + begin, shape=shape) if end > begin
                 else np.empty(shape, dtype=dtype))
        tensors[name] = torch.from_numpy(array)
    return tensors
