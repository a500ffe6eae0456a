"""core.coverage: experts ranked per layer and the coverage curve, against hand-computed cases."""

import pandas as pd
import pytest

from core.coverage import band, coverage_curves, experts_for_coverage, kept_share, most_chosen_experts, ranked_usage
from core.errors import MoEScopeError


def _usage() -> pd.DataFrame:
    # Layer 0 counts [1, 5, 0, 4] (10 slots); layer 3 counts [2, 2, 2, 2]; a second task on layer 0.
    rows = []
    for task, layer, counts in [("qa", 0, [1, 5, 0, 4]), ("qa", 3, [2, 2, 2, 2]), ("code", 0, [0, 0, 0, 0])]:
        total = sum(counts)
        for expert, c in enumerate(counts):
            rows.append((task, layer, expert, c, c * 0.5, c / total if total else 0.0, c / total if total else 0.0))
    return pd.DataFrame(rows, columns=["task", "layer", "expert", "count", "weight_mass", "share", "weight_share"])


def test_rank_orders_experts_by_share_within_each_layer():
    ranked = ranked_usage(_usage(), task="qa")
    layer0 = ranked[ranked["layer"] == 0]
    assert layer0["expert"].tolist() == [1, 3, 0, 2]
    assert layer0["rank"].tolist() == [0, 1, 2, 3]
    assert layer0["v"].tolist() == pytest.approx([0.5, 0.4, 0.1, 0.0])
    assert ranked[ranked["layer"] == 3]["expert"].tolist() == [0, 1, 2, 3]  # ties: lower id first


def test_coverage_curve_by_hand():
    curves = coverage_curves(_usage(), task="qa")
    layer0 = curves[curves["layer"] == 0]
    assert layer0["n"].tolist() == [1, 2, 3, 4]
    assert layer0["coverage"].tolist() == pytest.approx([0.5, 0.9, 1.0, 1.0])
    assert layer0["fraction_of_experts"].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert curves[curves["layer"] == 3]["coverage"].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert experts_for_coverage(curves, 0.9).set_index("layer")["experts"].to_dict() == {0: 2, 3: 4}


def test_every_task_and_a_layer_without_tokens():
    curves = coverage_curves(_usage())
    assert set(curves["task"]) == {"qa", "code"}
    assert curves[curves["task"] == "code"]["coverage"].tolist() == [0.0] * 4


def test_bad_task_or_value_is_one_sentence():
    with pytest.raises(MoEScopeError, match="not in this profile"):
        coverage_curves(_usage(), task="nope")
    with pytest.raises(MoEScopeError, match="share"):
        coverage_curves(_usage(), value="count")


def test_kept_share_per_layer():
    usage = _usage()
    qa = usage[usage["task"] == "qa"]
    kept = kept_share(qa, [(0, 1), (0, 2), (3, 0)]).set_index("layer")["kept_share"]
    assert kept.to_dict() == pytest.approx({0: 0.5, 3: 0.75})  # layer 0 keeps experts 0 and 3: 0.1 + 0.4


def test_most_chosen_experts_and_band():
    assert most_chosen_experts([5, 2, 5, 9, 2, 7, 5], 2) == [5, 2]
    assert most_chosen_experts([3, 1], 5) == [1, 3]  # a tie: lower id first
    zoomed = band(_usage(), (1, 3), (2, 3))
    assert sorted(set(zip(zoomed["layer"], zoomed["expert"]))) == [(3, 2), (3, 3)]
