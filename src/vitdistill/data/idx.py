"""Reader for IDX files (the MNIST / Fashion-MNIST container format), gzipped or raw.

``DataError`` lives here because this is the lowest module of the data package; everything
else in ``vitdistill.data`` imports it from here and the package re-exports it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import VitdistillError

__all__ = ["DataError", "read_idx"]


class DataError(VitdistillError, ValueError):
    """A user-facing data problem; the message names the bad value or path and what is valid."""


# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT")
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's payload, decompressed when it is gzip (detected by content, not by name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"IDX file '{path}' looks gzipped but cannot be decompressed: {e}") from None
    return raw


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file into a tensor whose dtype and shape come from the file's header.

    uint8 files (all of MNIST / Fashion-MNIST) stay uint8 so a whole split sits in memory compactly.
    Malformed files raise ``DataError`` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file '{path}' does not exist")
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"'{path}' is not an IDX file (its header must start with two zero bytes)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"IDX file '{path}' has unknown data type 0x{type_code:02X}; valid: {valid}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file '{path}' is truncated inside its header ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"IDX file '{path}' holds {len(data) - header} data bytes but its header {shape} "
            f"of {dtype} needs {expected}; the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # native byte order, writable copy: torch cannot wrap big-endian or read-only buffers
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
