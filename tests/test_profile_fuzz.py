"""Property-based tests: a damaged or hand-edited profile is read correctly or refused in one sentence.

Whatever the bytes, column values or sidecar fields, opening a profile, reading its rows, aggregating it and
merging it either works or raises ``MoEScopeError``; never another exception, never a merged file of bad rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import aggregate
from core.errors import MoEScopeError
from core.profile_merge import merge_profiles
from core.profile_writer import ProfileWriter, TokenBatch
from core.routing_profile import Profile, ProfileMeta

N_EXPERTS, TOP_K, LAYERS = 8, 2, [0, 1]
FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 100)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3),
                           max_leaves=8)


def write_profile(path: Path, tokens: int = 12) -> Path:
    rng = np.random.default_rng(0)
    meta = ProfileMeta(model="m", weights_digest="w", family="Mixtral", layers=LAYERS, n_experts=N_EXPERTS,
                       top_k=TOP_K, tasks=["a"])
    with ProfileWriter(path, meta) as writer:
        batch = TokenBatch("a", np.arange(tokens) // 4, np.arange(tokens) % 4, rng.integers(0, 50, tokens), step=0)
        for layer in LAYERS:
            experts = np.stack([rng.permutation(N_EXPERTS)[:TOP_K] for _ in range(tokens)])
            writer.add(batch, layer, experts, rng.random((tokens, TOP_K)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_profile(tmp_path_factory.mktemp("fuzz") / "good.parquet")


def use(path: Path) -> None:
    """Everything a user does with a profile: open it, read its rows, aggregate, merge it."""
    profile = Profile(path)
    for _batch in profile.batches():
        pass
    aggregate.expert_usage(profile)
    out = path.with_name(path.stem + "-merged.parquet")
    merge_profiles([path], out)
    assert Profile(out).num_rows == profile.num_rows  # a merged profile is whole and passes the same checks
    out.unlink()
    out.with_suffix(".json").unlink()


def accepted_or_refused(path: Path) -> None:
    try:
        use(path)
    except MoEScopeError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()


def copy_of(good: Path, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    shutil.copy(good, path)
    shutil.copy(good.with_suffix(".json"), path.with_suffix(".json"))
    return path


@FUZZ
@given(data=st.data())
def test_corrupted_bytes_are_read_or_refused(good, tmp_path, data):
    path = copy_of(good, tmp_path / "bytes", "p")
    raw = bytearray(good.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "zero"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[at] = (raw[at] ^ data.draw(st.integers(1, 255))) if how == "flip" else 0
    path.write_bytes(bytes(raw))
    accepted_or_refused(path)


SIDECAR_FIELDS = ["model", "weights_digest", "family", "layers", "n_experts", "top_k", "tasks", "rows", "tokens",
                  "with_probs", "shards", "fingerprint", "format", "version", "plan_digest", "created"]


@FUZZ
@given(field=st.sampled_from(SIDECAR_FIELDS), value=json_values)
def test_any_json_in_any_sidecar_field_is_read_or_refused(good, tmp_path, field, value):
    path = copy_of(good, tmp_path / "sidecar", "p")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta[field] = value
    path.with_suffix(".json").write_text(json.dumps(meta))
    accepted_or_refused(path)


@FUZZ
@given(whole=json_values)
def test_any_json_as_the_whole_sidecar_is_refused(good, tmp_path, whole):
    path = copy_of(good, tmp_path / "whole", "p")
    path.with_suffix(".json").write_text(json.dumps(whole))
    with pytest.raises(MoEScopeError):
        use(path)


int_lists = st.lists(st.integers(-(2**15), 2**15 - 1), max_size=4)
COLUMN_VALUES = {
    "experts": st.sampled_from([pa.list_(pa.int16()), pa.list_(pa.int64()), pa.string(), pa.list_(pa.float32())]),
    "weights": st.sampled_from([pa.list_(pa.float32()), pa.list_(pa.string()), pa.float64()]),
    "layer": st.sampled_from([pa.int16(), pa.int64(), pa.string(), pa.float32()]),
    "example": st.sampled_from([pa.int64(), pa.string()]),
}


@FUZZ
@given(data=st.data())
def test_wrong_column_types_and_ranges_are_read_or_refused(good, tmp_path, data):
    table = pq.read_table(good)
    name = data.draw(st.sampled_from(sorted(COLUMN_VALUES)))
    kind = data.draw(COLUMN_VALUES[name])
    n = table.num_rows
    if pa.types.is_list(kind) and pa.types.is_integer(kind.value_type):
        values = pa.array(data.draw(st.lists(int_lists, min_size=n, max_size=n)), kind)
    elif pa.types.is_list(kind) and pa.types.is_floating(kind.value_type):
        values = pa.array(data.draw(st.lists(st.lists(st.floats(-1, 1), max_size=3), min_size=n, max_size=n)), kind)
    elif pa.types.is_list(kind):
        values = pa.array([["x"]] * n, kind)
    elif pa.types.is_string(kind):
        values = pa.array([str(v) for v in table.column(name).to_pylist()], kind)
    elif pa.types.is_floating(kind):
        values = pa.array(data.draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=n, max_size=n)), kind)
    else:
        values = pa.array(data.draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n)), kind)
    table = table.set_column(table.schema.get_field_index(name), name, values)
    path = copy_of(good, tmp_path / "columns", "p")
    pq.write_table(table, path)
    accepted_or_refused(path)


def test_a_valid_profile_passes_every_step(good, tmp_path):
    use(copy_of(good, tmp_path, "valid"))  # the fuzz tests' "accepted" branch is reachable
