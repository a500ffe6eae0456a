"""The routing profile: one Parquet row per (token, MoE layer) plus a JSON sidecar describing the run.

The format is versioned and documented in the README; users read it with pandas or DuckDB. Rows are
streamed to disk in row groups while recording so memory stays bounded, and the file only appears
under its final name once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (imported now: its first use costs ~0.2 s mid-recording)
import pyarrow.parquet as pq

from .errors import MoEScopeError
from .io import atomic_write_text, temporary_name
from .outputs import check_output, output_lock

if TYPE_CHECKING:
    import torch

PROFILE_FORMAT = "moescope-profile"
PROFILE_VERSION = 1
REQUIRED_COLUMNS = ("task", "example", "position", "token_id", "layer", "step", "experts", "weights")


def schema(with_probs: bool) -> pa.Schema:
    fields = [
        pa.field("task", pa.string()),
        pa.field("example", pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("layer", pa.int16()),
        pa.field("step", pa.int32()),
        pa.field("experts", pa.list_(pa.int16())),
        pa.field("weights", pa.list_(pa.float32())),
    ]
    if with_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
    return pa.schema(fields)


@dataclass
class ProfileMeta:
    """The JSON sidecar: what model and data produced the rows."""

    model: str
    weights_digest: str
    family: str
    layers: list[int]
    n_experts: int
    top_k: int
    tasks: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    tool_version: str = ""
    created: str = ""
    rows: int = 0
    tokens: int = 0
    weights_semantics: str = ""
    plan_digest: str | None = None
    with_probs: bool = False
    shards: list[str] = field(default_factory=list)
    fingerprint: str = ""  # digest of everything that determines the rows (see core.profiling.run_fingerprint)
    format: str = PROFILE_FORMAT
    version: int = PROFILE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def require_model(self, weights_digest: str, source: str) -> None:
        """Refuse to read this profile against a model whose routers differ from the one that recorded it."""
        if self.weights_digest != weights_digest:
            raise MoEScopeError(f"This profile was recorded from {self.model} (router weights {self.weights_digest[:12]}), "
                                f"not from the loaded model {source} ({weights_digest[:12]}); record a profile of "
                                f"this model, or load the model it came from.")

    @classmethod
    def from_dict(cls, data: Any) -> "ProfileMeta":
        """The sidecar's fields, type-checked where they enter (TypeError names the first bad field)."""
        if not isinstance(data, dict):
            raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
        known = {f for f in cls.__dataclass_fields__}
        meta = cls(**{k: v for k, v in data.items() if k in known})
        meta._check_types()
        return meta

    def _check_types(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = {
            "model": isinstance(self.model, str), "weights_digest": isinstance(self.weights_digest, str),
            "family": isinstance(self.family, str),
            "layers": isinstance(self.layers, list) and all(is_int(v) and v >= 0 for v in self.layers),
            "n_experts": is_int(self.n_experts) and self.n_experts >= 1,
            "top_k": is_int(self.top_k) and 1 <= self.top_k <= (self.n_experts if is_int(self.n_experts) else 0),
            "tasks": isinstance(self.tasks, list) and all(isinstance(t, str) for t in self.tasks),
            "rows": is_int(self.rows) and self.rows >= 0, "tokens": is_int(self.tokens) and self.tokens >= 0,
            "with_probs": isinstance(self.with_probs, bool), "version": is_int(self.version),
            "format": isinstance(self.format, str), "fingerprint": isinstance(self.fingerprint, str),
            "shards": isinstance(self.shards, list),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise TypeError(f"field {bad[0]!r} has the wrong type or range ({getattr(self, bad[0])!r:.60})")


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moescope")
    except PackageNotFoundError:
        return "unknown"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


class Profile:
    """A profile on disk: its sidecar, and its rows read in batches (never all at once unless asked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        side = sidecar_path(self.path)
        if not self.path.exists():
            raise MoEScopeError(f"No profile at {self.path}.")
        try:
            self.meta = ProfileMeta.from_dict(json.loads(side.read_text()))
        except FileNotFoundError:
            raise MoEScopeError(f"{self.path} has no sidecar {side.name}; a MoEScope profile is a .parquet file "
                                f"with its .json beside it.") from None
        except (ValueError, TypeError, RecursionError, OSError) as exc:  # JSON, UTF-8, field types, a folder
            raise MoEScopeError(f"{side} is not a MoEScope profile sidecar ({_brief(exc)}).") from None
        if self.meta.format != PROFILE_FORMAT:
            raise MoEScopeError(f"{side} is not a MoEScope profile sidecar (format {self.meta.format!r}).")
        if self.meta.version != PROFILE_VERSION:
            raise MoEScopeError(f"Profile version {self.meta.version} is not supported; this MoEScope reads "
                                f"version {PROFILE_VERSION}.")
        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: undecodable names in the schema
            raise MoEScopeError(f"{self.path} is not a readable Parquet profile (corrupt or truncated: "
                                f"{_brief(exc)}).") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in self._file.schema_arrow.names]
        if missing:
            raise MoEScopeError(f"{self.path} lacks the profile column(s) {missing}; it was not written by MoEScope.")
        wrong = [name for name, ok in _COLUMN_TYPES.items()
                 if name in self._file.schema_arrow.names and not ok(self._file.schema_arrow.field(name).type)]
        if wrong:
            found = self._file.schema_arrow.field(wrong[0]).type
            raise MoEScopeError(f"{self.path} column {wrong[0]!r} has type {found}, not a profile's; it was not "
                                f"written by MoEScope.")
        if self.meta.with_probs != ("probs" in self._file.schema_arrow.names):
            raise MoEScopeError(f"{side} says with_probs {self.meta.with_probs} but {self.path.name} "
                                f"{'lacks' if self.meta.with_probs else 'has'} a probs column; the sidecar does not "
                                f"belong to this file.")
        if self._file.metadata.num_rows != self.meta.rows:
            raise MoEScopeError(f"{self.path} holds {self._file.metadata.num_rows} rows but its sidecar says "
                                f"{self.meta.rows}; the profile is incomplete, record it again.")

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    def batches(self, columns: list[str] | None = None, batch_size: int = 262_144) -> Iterator[pa.RecordBatch]:
        seen = 0
        try:
            for batch in self._file.iter_batches(batch_size=batch_size, columns=columns):
                self.check_values(batch)
                seen += batch.num_rows
                yield batch
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise MoEScopeError(f"{self.path} could not be read (corrupt: {_brief(exc)}).") from None
        if seen != self.num_rows:  # damaged page headers can make Arrow yield fewer rows without an error
            raise MoEScopeError(f"{self.path} yielded {seen} of its {self.num_rows} rows; it is corrupt, record it "
                                f"again.")

    def table(self, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        try:
            table = pq.read_table(self.path, columns=columns, filters=filters)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise MoEScopeError(f"{self.path} could not be read (corrupt: {_brief(exc)}).") from None
        if filters is None and table.num_rows != self.num_rows:
            raise MoEScopeError(f"{self.path} yielded {table.num_rows} of its {self.num_rows} rows; it is corrupt, "
                                f"record it again.")
        self.check_values(table)
        return table

    def check_values(self, rows: pa.RecordBatch | pa.Table) -> None:
        """Refuse rows the sidecar contradicts: an unknown layer, expert ids outside 0..n-1, lists not top-k
        long. Vectorised (a few Arrow kernels per batch), so reading stays fast."""
        import pyarrow.compute as pc

        names = rows.schema.names
        nulls = [name for name in names if name in _COLUMN_TYPES and rows.column(name).null_count]
        if nulls:
            raise MoEScopeError(f"{self.path} column {nulls[0]!r} has missing values; it is corrupt, record it again.")
        if "layer" in names and len(rows):
            bad = pc.invert(pc.is_in(rows.column("layer"), value_set=pa.array(self.meta.layers, pa.int64())))
            if pc.any(bad).as_py():
                raise MoEScopeError(f"{self.path} holds rows of layers its sidecar does not list ({self.meta.layers}); "
                                    f"it is corrupt, record it again.")
        for name in ("experts", "weights", "probs"):
            if name not in names or not len(rows):
                continue
            width = self.meta.n_experts if name == "probs" else self.meta.top_k
            lengths = pc.list_value_length(rows.column(name))
            if pc.any(pc.not_equal(lengths, width)).as_py() or lengths.null_count:
                raise MoEScopeError(f"{self.path} column {name!r} holds lists that are not {width} long; it is "
                                    f"corrupt, record it again.")
            if name == "experts":
                low_high = pc.min_max(pc.list_flatten(rows.column(name)))
                low, high = low_high["min"].as_py(), low_high["max"].as_py()
                if low is not None and (low < 0 or high >= self.meta.n_experts):
                    raise MoEScopeError(f"{self.path} holds expert id {low if low < 0 else high}, outside 0 to "
                                        f"{self.meta.n_experts - 1}; it is corrupt, record it again.")

    def to_pandas(self, **kwargs: Any):
        return self.table(**kwargs).to_pandas()


def _brief(exc: BaseException) -> str:
    """A library's error text on one line and short (Arrow's span several lines)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:199] + "…"


def _is_list_of(kind) -> Any:
    return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and kind(t.value_type)


_COLUMN_TYPES = {"task": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                 or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)),
                 "example": pa.types.is_integer, "position": pa.types.is_integer, "token_id": pa.types.is_integer,
                 "layer": pa.types.is_integer, "step": pa.types.is_integer,
                 "experts": _is_list_of(pa.types.is_integer), "weights": _is_list_of(pa.types.is_floating),
                 "probs": _is_list_of(pa.types.is_floating)}


def list_matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-width list column as a [rows, width] numpy array (no per-row Python objects)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def merge_profiles(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Concatenate profiles of disjoint shards of one run into one profile, row for row.

    ``out`` is checked (``core.outputs.check_output``) and locked for the merge; the inputs are never written.
    """
    if not paths:
        raise MoEScopeError("Give at least one profile to merge.")
    out = check_output(out, "profile", overwrite, sources=paths, source_label="input profile")
    with output_lock(out):
        return write_merged(paths, out)


def write_merged(paths: list[str | Path], out: str | Path) -> Path:
    """The merge itself, for a caller that already holds ``out``'s lock (a sharded job's rank 0)."""
    seen: dict[Path, Path] = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise MoEScopeError(f"{p} is given twice; give each shard once.")
        seen[key] = Path(p)
    profiles = [Profile(p) for p in paths]
    first = profiles[0].meta
    for prof in profiles[1:]:
        for key in ("weights_digest", "layers", "n_experts", "top_k", "with_probs", "plan_digest"):
            if getattr(prof.meta, key) != getattr(first, key):
                raise MoEScopeError(f"{prof.path} was recorded with a different {key} than {profiles[0].path}; "
                                    f"only shards of one run can be merged.")
    _refuse_overlapping_examples(profiles)
    meta = ProfileMeta(**{**asdict(first), "rows": 0, "tokens": sum(p.meta.tokens for p in profiles),
                          "tasks": [], "created": now_iso(), "shards": [str(p.path) for p in profiles]})
    meta.tasks = list(dict.fromkeys(t for p in profiles for t in p.meta.tasks))
    if len({p.meta.fingerprint for p in profiles}) > 1:
        meta.fingerprint = ""  # shards of different runs: the merged rows have no single fingerprint
    with ProfileWriter(out, meta) as writer:
        for prof in profiles:
            for batch in prof.batches():
                writer.write_batch(batch)
    return Path(out)


def _refuse_overlapping_examples(profiles: list[Profile]) -> None:
    """Inputs must not hold the same row (task, example, step, position, layer) twice, as a shard given twice
    would. Cheap first pass over (task, example) pairs; rows are compared only for examples in several inputs."""
    owners: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, prof in enumerate(profiles):
        pairs = prof.table(columns=["task", "example"]).group_by(["task", "example"]).aggregate([])
        for pair in zip(pairs.column("task").to_pylist(), pairs.column("example").to_pylist()):
            owners[pair].append(i)
    shared = {pair for pair, where in owners.items() if len(where) > 1}
    if not shared:
        return
    seen: dict[tuple, Path] = {}
    key_columns = ["task", "example", "step", "position", "layer"]
    for prof in profiles:
        frame = prof.table(columns=key_columns).to_pandas()
        frame = frame[[pair in shared for pair in zip(frame.task, frame.example)]]
        for key in frame.itertuples(index=False, name=None):
            if key in seen:
                raise MoEScopeError(f"{prof.path} and {seen[key]} both hold the routing of example {key[1]} of task "
                                    f"{key[0]!r} (layer {key[4]}, position {key[3]}); merge only disjoint shards of "
                                    f"one run, each given once.")
            seen[key] = prof.path
