"""A local checkpoint's safetensors files, read lazily: names, shapes and dtypes come from the headers, and a
tensor's bytes are read only when it is asked for, one tensor at a time (``safetensors.safe_open``)."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import torch

from .errors import MoEScopeError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# safetensors' dtype names (the header's "dtype") and torch's.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def has_safetensors(folder: str | Path) -> bool:
    """Whether ``folder`` is a local checkpoint whose weights are safetensors files (one file or an index)."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / SAFE_INDEX).is_file() or (folder / SAFE_WEIGHTS).is_file())


class SafetensorsCheckpoint:
    """The safetensors files of a local checkpoint folder, opened lazily and closed by :meth:`close`."""

    def __init__(self, folder: str | Path) -> None:
        from .model_checks import check_safetensors_files

        self.folder = Path(folder)
        if not has_safetensors(self.folder):
            raise MoEScopeError(f"{self.folder} holds no {SAFE_WEIGHTS} nor {SAFE_INDEX}; only safetensors "
                                f"checkpoints can be read shard by shard.")
        check_safetensors_files(self.folder)  # one sentence naming a missing or damaged shard
        self._handles: dict[Path, object] = {}
        self._left: collections.Counter[Path] | None = None
        index = self.folder / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.file_of = {key: self.folder / name for key, name in weight_map.items()}
        else:
            single = self.folder / SAFE_WEIGHTS
            self.file_of = dict.fromkeys(self._handle(single).keys(), single)
        self._headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    # ----- what is there ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.file_of)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.file_of.values()))

    def header(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a tensor, from its file's header (no tensor bytes are read)."""
        if key not in self._headers:
            view = self._handle(self.file_of[key]).get_slice(key)
            name = view.get_dtype()
            if name not in DTYPES:
                raise MoEScopeError(f"{self.file_of[key]} stores {key} as {name}, a dtype MoEScope cannot copy.")
            self._headers[key] = (tuple(view.get_shape()), DTYPES[name])
        return self._headers[key]

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    # ----- reading ---------------------------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        """The tensor's values, read from its shard now."""
        path = self.file_of[key]
        tensor = self._handle(path).get_tensor(key)
        if self._left is not None and path in self._left:
            self._left[path] -= 1
            if self._left[path] <= 0:  # its last planned read: close it (tensors read from it stay valid)
                self._close(path)
        return tensor

    def plan_reads(self, keys: Iterable[str]) -> None:
        """Say which tensors will be read (each once), so each file is closed after its last: safetensors maps
        a file while it is open, and every page read from it stays in this process's memory until then."""
        self._left = collections.Counter(self.file_of[key] for key in keys)

    def meta_tensor(self, key: str) -> torch.Tensor:
        """A tensor of the right shape and dtype on the meta device: what :meth:`tensor` would give, without data."""
        shape, dtype = self.header(key)
        return torch.empty(shape, dtype=dtype, device="meta")

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def _close(self, path: Path) -> None:
        handle = self._handles.pop(path, None)
        exit_ = getattr(handle, "__exit__", None)
        if exit_ is not None:
            exit_(None, None, None)

    def close(self) -> None:
        for path in list(self._handles):
            self._close(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
