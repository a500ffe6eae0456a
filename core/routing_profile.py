"""The routing profile file format: one Parquet row per (token, MoE layer) plus a JSON sidecar describing the
run; the schema, the sidecar (``ProfileMeta``) and the reader (``Profile``), which refuses rows the sidecar
contradicts.

The format is versioned and documented in docs/formats.md; users read it with pandas or DuckDB. Writing is
``core.profile_writer``; merging shards is ``core.profile_merge``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (imported now: its first use costs ~0.2 s mid-recording)
import pyarrow.parquet as pq

from .errors import MoEScopeError

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
