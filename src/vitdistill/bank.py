"""The image bank of online data-free training: every synthesised batch, kept as data.

One shard per round (``<run>/bank/round_NNNNNN.safetensors``: uint8 images in pixel space, int64 labels,
the run's fingerprint), written atomically. The checkpoint records how many rounds the bank held at the
end of its epoch; a resumed run loads exactly those shards and makes the later rounds again (the same
images, since a round depends only on the checkpointed state and its seed). ``export`` writes the whole
bank in ``vitdistill synthesize``'s format, so another run can train on it as ``data.synthetic``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError
from .io import read_safetensors, write_safetensors

__all__ = ["ImageBank"]


class ImageBank:
    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._joined: tuple[torch.Tensor, torch.Tensor] | None = None

    def shard(self, round_index: int) -> Path:
        return self.folder / f"round_{round_index:06d}.safetensors"

    @property
    def rounds(self) -> int:
        return len(self._images)

    def __len__(self) -> int:
        return sum(len(x) for x in self._labels)

    def append(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the next round's batch (uint8 ``(B, C, H, W)`` on the CPU) and write its shard."""
        if images.dtype != torch.uint8:
            raise ValueError(f"the bank stores uint8 images, got {images.dtype}")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(self.shard(self.rounds), {"images": images.contiguous(), "labels": labels.cpu().long()},
                          {"fingerprint": self.fingerprint})
        self._images.append(images)
        self._labels.append(labels.cpu().long())
        self._joined = None

    def load(self, rounds: int) -> None:
        """Load the first ``rounds`` shards (a resumed run's bank); later shards are made again."""
        self._images, self._labels, self._joined = [], [], None
        for r in range(rounds):
            path = self.shard(r)
            if not path.is_file():
                raise ConfigError(f"the image bank lacks '{path}', which the checkpoint counts on; the run folder "
                                  "was changed after the checkpoint was written: start the run over")
            tensors, meta = read_safetensors(path)
            if meta.get("fingerprint") != self.fingerprint:
                raise ConfigError(f"'{path}' was made by another config or seed; start the run over in a new folder")
            self._images.append(tensors["images"])
            self._labels.append(tensors["labels"])

    def tensors(self, newest: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels (or the ``newest`` of them), oldest first."""
        if self._joined is None:
            self._joined = torch.cat(self._images), torch.cat(self._labels)
        images, labels = self._joined
        if newest is not None:
            images, labels = images[-newest:], labels[-newest:]
        return images, labels

    def export(self, path: str | Path, meta: dict[str, str]) -> None:
        images, labels = self.tensors()
        write_safetensors(path, {"images": images, "labels": labels}, {**meta, "fingerprint": self.fingerprint})
