"""The profile format on disk, its aggregations against hand-worked numbers, and exact shard merging."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core import aggregate
from core.errors import MoEScopeError
from core.profile_merge import merge_profiles
from core.profile_writer import ProfileWriter, TokenBatch
from core.routing_profile import Profile, ProfileMeta


def meta(**kw) -> ProfileMeta:
    base = dict(model="m", weights_digest="d", family="Mixtral", layers=[0, 3], n_experts=4, top_k=2)
    base.update(kw)
    return ProfileMeta(**base)


def write(path, rows, flush_rows=1000, **kw) -> Profile:
    """rows: (task, example, position, layer, experts, weights)."""
    with ProfileWriter(path, meta(**kw), flush_rows=flush_rows) as w:
        for task, example, position, layer, experts, weights in rows:
            tokens = TokenBatch(task, np.array([example, -1]), np.array([position, -1]), np.array([position + 10, -1]),
                                step=0, valid=np.array([True, False]))  # the second token is padding
            w.add(tokens, layer, np.array([experts, [9, 9]]), np.array([weights, [0.0, 0.0]]))
    return Profile(path)


HAND = [
    ("a", 0, 0, 0, [0, 1], [0.75, 0.25]),
    ("a", 0, 1, 0, [0, 2], [0.5, 0.5]),
    ("a", 0, 2, 0, [1, 0], [0.6, 0.4]),
    ("a", 0, 0, 3, [3, 2], [0.9, 0.1]),
    ("b", 0, 0, 0, [3, 2], [0.8, 0.2]),
    ("b", 1, 0, 0, [3, 1], [0.7, 0.3]),
]


def test_format_is_documented_columns_and_sidecar(tmp_path):
    prof = write(tmp_path / "p.parquet", HAND)
    df = pd.read_parquet(tmp_path / "p.parquet")
    assert list(df.columns) == ["task", "example", "position", "token_id", "layer", "step", "experts", "weights"]
    assert df.experts.map(list).tolist()[0] == [0, 1]
    side = json.loads((tmp_path / "p.json").read_text())
    for key in ("model", "weights_digest", "family", "layers", "n_experts", "top_k", "tasks", "tokenizer",
                "tool_version", "created", "format", "version"):
        assert key in side
    assert side["tasks"] == ["a", "b"] and side["rows"] == 6 and side["tokens"] == 6  # one forward per row here
    assert prof.num_rows == 6


def test_usage_counts_mass_and_shares_by_hand(tmp_path):
    usage = aggregate.expert_usage(write(tmp_path / "p.parquet", HAND))
    a0 = usage[(usage.task == "a") & (usage.layer == 0)].set_index("expert")
    assert a0["count"].tolist() == [3, 2, 1, 0]
    np.testing.assert_allclose(a0["weight_mass"].tolist(), [1.65, 0.85, 0.5, 0.0])
    np.testing.assert_allclose(a0["share"].tolist(), [0.5, 1 / 3, 1 / 6, 0.0])
    assert a0["tokens"].iloc[0] == 3


def test_layer_stats_entropy_and_imbalance(tmp_path):
    stats = aggregate.layer_stats(write(tmp_path / "p.parquet", HAND)).set_index(["task", "layer"])
    row = stats.loc[("a", 0)]
    p = np.array([3, 2, 1]) / 6
    assert row.entropy_bits == pytest.approx(-(p * np.log2(p)).sum())
    assert row.imbalance == pytest.approx(3 / 1.5)
    assert row.unused_experts == 1
    assert stats.loc[("b", 0)].unused_experts == 1  # experts 3, 2, 1 used; 0 never


def test_coactivation_and_token_routes(tmp_path):
    prof = write(tmp_path / "p.parquet", HAND)
    co = aggregate.coactivation(prof, 0, task="a")
    assert co[0, 1] == co[1, 0] == 2 and co[0, 2] == 1 and co[0, 0] == 3 and co[3].sum() == 0
    routes = aggregate.token_routes(prof, "a", 0, 0)
    assert routes.position.tolist() == [0, 1, 2]
    assert routes.experts.tolist() == [[0, 1], [0, 2], [1, 0]]
    assert routes.token_id.tolist() == [10, 11, 12]
    assert aggregate.consecutive_same_expert(prof, "a", 0) == pytest.approx(0.5)
    with pytest.raises(MoEScopeError, match="Layer 2 is not in this profile"):
        aggregate.coactivation(prof, 2)


def test_task_divergence_is_jsd_in_bits(tmp_path):
    div = aggregate.task_divergence(write(tmp_path / "p.parquet", HAND))
    row = div[div.layer == 0].iloc[0]
    p = np.array([3, 2, 1, 0]) / 6
    q = np.array([0, 1, 1, 2]) / 4
    m = (p + q) / 2

    def kl(x, y):
        s = x > 0
        return (x[s] * np.log2(x[s] / y[s])).sum()

    assert row.jsd_bits == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    assert aggregate.js_divergence_bits(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)


def test_disjoint_shards_merge_exactly(tmp_path):
    whole = write(tmp_path / "whole.parquet", HAND)
    a = write(tmp_path / "s0.parquet", HAND[:3], flush_rows=2)
    b = write(tmp_path / "s1.parquet", HAND[3:])
    merged = Profile(merge_profiles([a.path, b.path], tmp_path / "merged.parquet"))
    pd.testing.assert_frame_equal(merged.to_pandas(), whole.to_pandas())
    assert merged.meta.rows == 6 and merged.meta.tokens == whole.meta.tokens
    pd.testing.assert_frame_equal(aggregate.expert_usage(merged), aggregate.expert_usage(whole))
    other = write(tmp_path / "other.parquet", HAND, weights_digest="different")
    with pytest.raises(MoEScopeError, match="different weights_digest"):
        merge_profiles([a.path, other.path], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def test_writer_streams_row_groups_and_leaves_nothing_on_failure(tmp_path):
    prof = write(tmp_path / "p.parquet", HAND * 5, flush_rows=4)
    assert prof._file.metadata.num_row_groups >= 7
    with pytest.raises(RuntimeError):
        with ProfileWriter(tmp_path / "q.parquet", meta()) as w:
            w.add(TokenBatch("a", np.array([0]), np.array([0]), np.array([0]), step=0), 0, np.array([[0, 1]]),
                  np.array([[0.5, 0.5]]))
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.parquet"]


def test_corrupt_truncated_and_foreign_profiles_are_refused(tmp_path):
    prof = write(tmp_path / "p.parquet", HAND)
    data = prof.path.read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "t.json").write_text((tmp_path / "p.json").read_text())
    with pytest.raises(MoEScopeError, match="corrupt or truncated"):
        Profile(tmp_path / "t.parquet")
    (tmp_path / "n.parquet").write_bytes(data)
    with pytest.raises(MoEScopeError, match="has no sidecar"):
        Profile(tmp_path / "n.parquet")
    (tmp_path / "n.json").write_text('{"format": "other"}')
    with pytest.raises(MoEScopeError, match="not a MoEScope profile sidecar"):
        Profile(tmp_path / "n.parquet")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "f.parquet")
    (tmp_path / "f.json").write_text((tmp_path / "p.json").read_text())
    with pytest.raises(MoEScopeError, match="lacks the profile column"):
        Profile(tmp_path / "f.parquet")
    side = json.loads((tmp_path / "p.json").read_text())
    side["rows"] = 99
    (tmp_path / "p.json").write_text(json.dumps(side))
    with pytest.raises(MoEScopeError, match="incomplete"):
        Profile(tmp_path / "p.parquet")
