"""Safetensors shards of bounded size, written one tensor at a time.

The shards are planned before any tensor exists, from the tensors' names, shapes and dtypes, so each shard's
header is written first and each tensor's bytes go straight to disk after it: memory holds one tensor, never
a shard. Shards are named and indexed as ``save_pretrained`` names them (``model.safetensors``, or
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .checkpoint_files import DTYPE_NAMES, SAFE_INDEX, SAFE_WEIGHTS
from .errors import MoEScopeError

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``, ``200MB``, ``512MiB`` or an int (units as transformers reads them: GB = 10**9)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match[2].upper() if match else ""
        if not match or unit not in _UNITS | {"": 1}:
            raise MoEScopeError(f"Cannot read the shard size {size!r}; give bytes or a size like 5GB or 500MB.")
        value = int(float(match[1]) * _UNITS.get(unit, 1))
    if value < 1:
        raise MoEScopeError(f"The shard size must be positive, not {size!r}.")
    return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of ``specs``, each at most ``max_shard_bytes`` unless one tensor alone is larger."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in DTYPE_NAMES:
            raise MoEScopeError(f"Cannot write {spec.name}: safetensors has no dtype {spec.dtype}.")
        entries[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Writes ``specs`` (in that order, by :meth:`add`) into shards in ``folder``; :meth:`finish` writes the index.

    ``progress(shards_done, shards, tensors_done, tensors, bytes_done, total_bytes)`` is called after each shard.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 progress: Callable[[int, int, int, int, int, int], None] | None = None) -> None:
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.files = [SAFE_WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_tensors, self.total_bytes = len(specs), sum(spec.nbytes for spec in specs)
        self.progress = progress
        self._shard, self._position, self._tensors, self._bytes = 0, 0, 0, 0
        self._file: BinaryIO | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard >= len(self.shards):
            raise MoEScopeError(f"Export produced {name} after every planned tensor was written.")
        spec = self.shards[self._shard][self._position]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise MoEScopeError(f"Export produced {name} {tuple(tensor.shape)} {tensor.dtype} where "
                                f"{spec.name} {spec.shape} {spec.dtype} was planned.")
        if self._file is None:
            self._file = open(self.folder / self.files[self._shard], "wb")  # noqa: SIM115 - closed per shard
            self._file.write(_header(self.shards[self._shard]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._position += 1
        self._tensors += 1
        self._bytes += spec.nbytes
        if self._position == len(self.shards[self._shard]):
            self._file.close()
            self._file = None
            self._shard += 1
            self._position = 0
            if self.progress is not None:
                self.progress(self._shard, len(self.shards), self._tensors, self.total_tensors, self._bytes,
                              self.total_bytes)

    def finish(self, total_parameters: int) -> list[str]:
        """Check every planned tensor was written, write the index when sharded; the files written."""
        if self._tensors != self.total_tensors:
            raise MoEScopeError(f"Export wrote {self._tensors} of {self.total_tensors} planned tensors.")
        if len(self.files) > 1:
            weight_map = {spec.name: file for file, shard in zip(self.files, self.shards) for spec in shard}
            index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_bytes},
                     "weight_map": weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            return [*self.files, SAFE_INDEX]
        return list(self.files)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
