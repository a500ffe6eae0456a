"""Version-1 profiles written before the file format gained its fingerprint and reader checks still load.

The files in tests/data/profiles_v1/ were written by MoEScope at commit 84973e9 (a tiny Mixtral, two texts;
one plain, one with --probs and two generated tokens).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from core import aggregate
from core.profile_merge import merge_profiles
from core.routing_profile import Profile

DATA = Path(__file__).parent / "data" / "profiles_v1"


def test_a_v1_profile_loads_reads_and_aggregates():
    profile = Profile(DATA / "prose.parquet")
    assert profile.meta.version == 1 and profile.meta.fingerprint == "" and profile.meta.tasks == ["prose"]
    assert profile.num_rows == profile.meta.rows == 2 * profile.meta.tokens  # two MoE layers
    assert sum(batch.num_rows for batch in profile.batches()) == profile.num_rows
    usage = aggregate.expert_usage(profile)
    for layer in (0, 1):  # every token routes to top-2 experts in each layer
        assert usage[usage.layer == layer]["count"].sum() == 2 * profile.meta.tokens


def test_a_v1_profile_with_probs_and_decode_steps_loads_and_merges(tmp_path):
    profile = Profile(DATA / "prose-probs.parquet")
    frame = profile.to_pandas()
    assert profile.meta.with_probs and frame.step.max() >= 1
    probs = np.stack(frame.probs.to_numpy())
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)  # router probabilities over the 8 experts
    copy = tmp_path / "p.parquet"
    shutil.copy(DATA / "prose-probs.parquet", copy)
    shutil.copy(DATA / "prose-probs.json", copy.with_suffix(".json"))
    merged = Profile(merge_profiles([copy], tmp_path / "merged.parquet"))
    assert merged.to_pandas().equals(frame)
