"""Writing a routing profile: rows streamed to Parquet in row groups while recording, so memory stays bounded,
and the file appears under its final name, with its sidecar, only once complete (nothing on failure)."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write_text, temporary_name
from .errors import MoEScopeError
from .routing_profile import ProfileMeta, now_iso, schema, sidecar_path, tool_version

if TYPE_CHECKING:
    import torch


def _list_array(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    rows, width = values.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))


Array = Union[np.ndarray, "torch.Tensor"]


def _to_numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


@dataclass
class TokenBatch:
    """The tokens of one forward pass, flattened [N] (batch-major), padding included and marked invalid.

    Arrays may be device tensors: they are only copied to the host when the writer flushes, so
    recording never forces a device synchronisation inside the forward pass.
    """

    task: str
    example: Array
    position: Array
    token_id: Array
    step: int
    valid: Array | None = None
    _host: dict[str, np.ndarray] | None = field(default=None, repr=False)
    counted: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return len(self.example)

    def host(self) -> dict[str, np.ndarray]:
        """Host copies of the real (non-padding) tokens' columns, computed once per forward."""
        if self._host is None:
            valid = np.ones(len(self), bool) if self.valid is None else _to_numpy(self.valid).astype(bool)
            self._host = {"valid": valid, **{name: _to_numpy(getattr(self, name))[valid]
                                             for name in ("example", "position", "token_id")}}
        return self._host


class ProfileWriter:
    """Streams routing rows to ``path`` (Parquet) and writes the sidecar on close.

    Rows arrive per (forward pass, layer) via :meth:`add` and are flushed as a row group every
    ``flush_rows`` rows. The file is written under a temporary name and renamed on successful close; on
    error it is removed, so a profile on disk is always complete.
    """

    def __init__(self, path: str | Path, meta: ProfileMeta, flush_rows: int = 262_144) -> None:
        self.path = Path(path)
        if self.path.suffix != ".parquet":
            raise MoEScopeError(f"Profile path {self.path} must end in .parquet (the sidecar goes beside it as .json).")
        self.meta = meta
        self.flush_rows = flush_rows
        self._schema = schema(meta.with_probs)
        self._tmp = temporary_name(self.path)
        # atomic_write_text makes the folder, removes temporaries of killed runs, and leaves no file on error.
        atomic_write_text(self._tmp, "")
        try:
            # Dictionary-encode and keep statistics only where they pay: task names repeat, and min/max of the
            # scalar columns let readers skip row groups; list columns get neither (3x faster writes).
            self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd", compression_level=1,
                                            use_dictionary=["task"],
                                            write_statistics=["task", "example", "position", "layer", "step"])
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._chunks: list[tuple[TokenBatch, int, Array, Array, Array | None]] = []
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moescope-profile-writer")
        self._inflight: list[Future] = []
        self._tasks: dict[str, None] = {t: None for t in meta.tasks}

    def add(self, tokens: TokenBatch, layer: int, experts: Array, weights: Array, probs: Array | None = None) -> None:
        """Add one layer's decisions ([N, k] ids and weights, rank order) for the tokens of one forward."""
        self._tasks.setdefault(tokens.task, None)
        self._chunks.append((tokens, layer, experts, weights, probs if self.meta.with_probs else None))
        self._pending += len(tokens)
        if self._pending >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the pending rows to the writer thread; at most two row groups are in flight, so memory
        stays bounded while host copies and Parquet encoding overlap the next forward passes."""
        if not self._chunks:
            return
        chunks, self._chunks, self._pending = self._chunks, [], 0
        while len(self._inflight) >= 2:
            self._inflight.pop(0).result()
        self._inflight.append(self._pool.submit(self._write_chunks, chunks, list(self._tasks)))

    def _drain(self) -> None:
        while self._inflight:
            self._inflight.pop(0).result()

    def _write_chunks(self, chunks: list, tasks: list[str]) -> None:
        task_index = {task: i for i, task in enumerate(tasks)}
        cols: dict[str, list[np.ndarray]] = defaultdict(list)
        task_ids: list[int] = []
        counts: list[int] = []
        for tokens, layer, experts, weights, probs in chunks:
            host = tokens.host()
            valid = host["valid"]
            n = len(host["example"])
            if not tokens.counted:  # a forward's tokens count once, whichever layer is written first
                tokens.counted = True
                self.meta.tokens += n
            task_ids.append(task_index[tokens.task])
            counts.append(n)
            for name in ("example", "position", "token_id"):
                cols[name].append(host[name])
            cols["layer"].append(np.full(n, layer, np.int16))
            cols["step"].append(np.full(n, tokens.step, np.int32))
            cols["experts"].append(_to_numpy(experts)[valid])
            cols["weights"].append(_to_numpy(weights)[valid])
            if self.meta.with_probs:
                cols["probs"].append(_to_numpy(probs)[valid])
        indices = pa.array(np.repeat(np.asarray(task_ids, np.int32), counts))
        arrays = {"task": pa.DictionaryArray.from_arrays(indices, pa.array(tasks)).cast(pa.string())}
        for name, dtype in (("example", np.int64), ("position", np.int32), ("token_id", np.int32),
                            ("layer", np.int16), ("step", np.int32)):
            arrays[name] = pa.array(np.concatenate(cols[name]).astype(dtype, copy=False))
        for name, dtype, pa_type in (("experts", np.int16, pa.int16()), ("weights", np.float32, pa.float32()),
                                     ("probs", np.float32, pa.float32())):
            if cols[name]:
                arrays[name] = _list_array(np.concatenate(cols[name]).astype(dtype, copy=False), pa_type)
        table = pa.Table.from_arrays([arrays[f.name] for f in self._schema], schema=self._schema)
        self._writer.write_table(table)
        self.meta.rows += table.num_rows

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append rows that are already in profile form (used when merging shards)."""
        self.flush()
        self._drain()
        self._writer.write_batch(batch.cast(self._schema) if batch.schema != self._schema else batch)
        self.meta.rows += batch.num_rows

    def close(self) -> Path:
        """Finish the file and put it and its sidecar in place; on any failure (a full disk) nothing is left."""
        try:
            self.flush()
            self._drain()
            self._pool.shutdown()
            self._writer.close()
            self.meta.tasks = list(self._tasks)
            self.meta.created = self.meta.created or now_iso()
            self.meta.tool_version = self.meta.tool_version or tool_version()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        try:
            atomic_write_text(sidecar_path(self.path), self.meta.to_json())
        except BaseException:  # a profile without its sidecar is unreadable: take the file back out
            self.path.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        try:
            for future in self._inflight:
                future.cancel()
            self._pool.shutdown(wait=True)
            with contextlib.suppress(Exception):  # the writer may be the thing that failed
                self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ProfileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
