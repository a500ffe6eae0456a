"""Comparing two routing profiles (core.profile_compare): usage differences, per-layer Jensen–Shannon divergence
and re-routing flows, against hand-worked numbers on hand-built profiles, and end to end on a tiny random model
profiled with and without a pruning plan."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.model import MoEModel
from core.plan import Plan
from core.profile_compare import (
    NO_REPLACEMENT,
    ProfileMismatch,
    compare_usage,
    divergence_of,
    dropped_experts,
    flow_totals,
    js_bits,
    js_divergence_per_layer,
    reroute_flows,
    top_flows,
)
from core.profile_writer import ProfileWriter, TokenBatch
from core.profiling import profile_texts
from core.routing_profile import Profile, ProfileMeta, list_matrix
from tests.tiny_models import char_tokenizer

# Shares are ratios of small integer counts: exact in binary up to the last bit or two of a float64.
TOL = 1e-12


def write(path, rows, layers=(0, 1), n_experts=4, top_k=2, plan_digest=None) -> Profile:
    """rows: (task, example, position, token_id, layer, experts in rank order[, decode step])."""
    meta = ProfileMeta(model="m", weights_digest="d", family="Mixtral", layers=list(layers), n_experts=n_experts,
                       top_k=top_k, plan_digest=plan_digest)
    with ProfileWriter(path, meta) as writer:
        for task, example, position, token_id, layer, experts, *step in rows:
            tokens = TokenBatch(task, np.array([example]), np.array([position]), np.array([token_id]),
                                step=step[0] if step else 0)
            weights = np.linspace(0.9, 0.1, len(experts))[None, :]
            writer.add(tokens, layer, np.array([experts]), weights)
    return Profile(path)


def test_identical_profiles_differ_by_nothing(tmp_path):
    rows = [("a", 0, p, 10 + p, layer, [p % 4, (p + 1) % 4]) for p in range(4) for layer in (0, 1)]
    a, b = write(tmp_path / "a.parquet", rows), write(tmp_path / "b.parquet", rows)
    cells = compare_usage(a, b)
    assert len(cells) == 2 * 4 and (cells["diff_pp"] == 0).all()
    assert cells.groupby("layer")["share_a"].sum().to_numpy() == pytest.approx([1, 1], abs=TOL)
    js = js_divergence_per_layer(a, b)
    assert js["jsd_bits"].to_numpy() == pytest.approx([0, 0], abs=TOL)
    assert js["moved_share"].to_numpy() == pytest.approx([0, 0], abs=TOL)


def test_disjoint_experts_diverge_by_one_bit_and_a_hand_worked_case(tmp_path):
    # Layer 0: A uses only experts 0 and 1, B only 2 and 3 -> disjoint, JS = 1 bit, everything moved.
    # Layer 1: A fills its slots with experts 0 and 1 (share 1/2 each), B with 0, 1 and 0, 2 (shares 1/2, 1/4, 1/4).
    a = write(tmp_path / "a.parquet", [("a", 0, 0, 5, 0, [0, 1]), ("a", 0, 1, 6, 0, [1, 0]),
                                       ("a", 0, 0, 5, 1, [0, 1]), ("a", 0, 1, 6, 1, [1, 0])])
    b = write(tmp_path / "b.parquet", [("a", 0, 0, 5, 0, [2, 3]), ("a", 0, 1, 6, 0, [3, 2]),
                                       ("a", 0, 0, 5, 1, [0, 1]), ("a", 0, 1, 6, 1, [0, 2])])
    cells = compare_usage(a, b).set_index(["layer", "expert"])
    assert cells.loc[(0, 0), "diff_pp"] == pytest.approx(-50.0, abs=1e-9)
    assert cells.loc[(0, 2), "diff_pp"] == pytest.approx(50.0, abs=1e-9)
    assert cells.loc[(1, 1), "diff_pp"] == pytest.approx(-25.0, abs=1e-9)
    assert cells.loc[(1, 2), "diff_pp"] == pytest.approx(25.0, abs=1e-9)
    assert cells.loc[(1, 3), ["share_a", "share_b", "diff_pp"]].tolist() == [0.0, 0.0, 0.0]
    js = js_divergence_per_layer(a, b).set_index("layer")
    pd.testing.assert_frame_equal(divergence_of(compare_usage(a, b)).set_index("layer"), js)
    assert js.loc[0, "jsd_bits"] == pytest.approx(1.0, abs=TOL)
    assert js.loc[0, "moved_share"] == pytest.approx(1.0, abs=TOL)
    # p = (1/2, 1/2, 0), q = (1/2, 1/4, 1/4), m = (1/2, 3/8, 1/8):
    # KL(p||m) = 1/2 log2(4/3); KL(q||m) = 1/4 log2(2/3) + 1/4 log2(2); JS = (KL(p||m) + KL(q||m)) / 2.
    expected = 0.5 * (0.5 * np.log2(4 / 3) + 0.25 * np.log2(2 / 3) + 0.25)
    assert js.loc[1, "jsd_bits"] == pytest.approx(expected, abs=1e-12)
    assert js.loc[1, "moved_share"] == pytest.approx(0.25, abs=TOL)


def test_js_bits_handles_zeros_and_empty_distributions():
    assert js_bits(np.array([1.0, 0, 0]), np.array([0, 0, 3.0])) == pytest.approx(1.0, abs=TOL)
    assert js_bits(np.array([2.0, 2.0]), np.array([1.0, 1.0])) == pytest.approx(0.0, abs=TOL)
    assert np.isnan(js_bits(np.zeros(3), np.array([1.0, 0, 0])))


def test_a_task_compares_alone_and_must_be_in_both(tmp_path):
    a = write(tmp_path / "a.parquet", [("x", 0, 0, 5, 0, [0, 1]), ("y", 0, 0, 5, 0, [2, 3])], layers=(0,))
    b = write(tmp_path / "b.parquet", [("x", 0, 0, 5, 0, [0, 1]), ("z", 0, 0, 5, 0, [0, 1])], layers=(0,))
    assert (compare_usage(a, b, task="x")["diff_pp"] == 0).all()  # pooled, they differ
    assert compare_usage(a, b)["diff_pp"].tolist() == pytest.approx([25.0, 25.0, -25.0, -25.0], abs=1e-9)
    with pytest.raises(ProfileMismatch, match="Task 'y' is not in b.parquet"):
        compare_usage(a, b, task="y")


def test_profiles_of_different_shapes_are_refused(tmp_path):
    a = write(tmp_path / "a.parquet", [("a", 0, 0, 5, 0, [0, 1])], layers=(0,), n_experts=4)
    b = write(tmp_path / "b.parquet", [("a", 0, 0, 5, 0, [0, 1])], layers=(0,), n_experts=8)
    with pytest.raises(ProfileMismatch, match="different shapes"):
        compare_usage(a, b)
    c = write(tmp_path / "c.parquet", [("a", 0, 0, 5, 1, [0, 1])], layers=(1,), n_experts=4)
    with pytest.raises(ProfileMismatch, match="different shapes"):
        js_divergence_per_layer(a, c)


# ----- flows by hand -------------------------------------------------------------------------------------
FULL = [  # task, example, position, token_id, layer, experts (rank order); a plan drops experts 0 and 1 at layer 0
    ("a", 0, 0, 5, 0, [0, 2]),  # 0 dropped -> B chose [2, 3]: 0 -> 3
    ("a", 0, 1, 6, 0, [1, 0]),  # both dropped -> B chose [3, 2]: 1 -> 3, 0 -> 2 (rank order)
    ("a", 1, 0, 7, 0, [2, 3]),  # none dropped, B the same: no flow
    ("a", 1, 1, 8, 0, [0, 3]),  # 0 dropped, B chose [2, 3] but 3 kept: 0 -> 2
    ("a", 0, 0, 5, 1, [0, 1]),  # layer 1 keeps every expert: the changed choice 1 -> 2 is no flow from a drop
    ("a", 0, 1, 6, 1, [0, 1]),
    ("a", 1, 0, 7, 1, [0, 1]),
    ("a", 1, 1, 8, 1, [0, 1]),
]
PRUNED = [
    ("a", 0, 0, 5, 0, [2, 3]),
    ("a", 0, 1, 6, 0, [3, 2]),
    ("a", 1, 0, 7, 0, [2, 3]),
    ("a", 1, 1, 8, 0, [2, 3]),
    ("a", 0, 0, 5, 1, [0, 2]),
    ("a", 0, 1, 6, 1, [0, 1]),
    ("a", 1, 0, 7, 1, [0, 1]),
    ("a", 1, 1, 8, 1, [0, 1]),
]
PLAN = Plan(layers={0: [2, 3]})


def test_flows_pair_dropped_experts_with_newcomers_in_rank_order(tmp_path):
    full = write(tmp_path / "full.parquet", FULL)
    pruned = write(tmp_path / "pruned.parquet", PRUNED[::-1], plan_digest=PLAN.digest())  # row order does not matter
    flows = reroute_flows(full, pruned, PLAN)
    got = {(r.layer, r.from_expert, r.to_expert): r.tokens for r in flows.itertuples()}
    assert got == {(0, 0, 3): 1, (0, 1, 3): 1, (0, 0, 2): 2}
    share = flows.set_index(["layer", "from_expert", "to_expert"])["share_of_from"]
    assert share.loc[(0, 0, 2)] == pytest.approx(2 / 3, abs=TOL) and share.loc[(0, 1, 3)] == pytest.approx(1.0)
    assert flows.iloc[0].to_dict()["tokens"] == 2  # most tokens first within a layer
    assert flow_totals(flows, [0, 1]).to_dict("list") == {"layer": [0, 1], "tokens": [4, 0], "unreplaced": [0, 0]}
    assert top_flows(flows, 0, limit=1)[["from_expert", "to_expert"]].values.tolist() == [[0, 2]]
    # Without a plan, every expert the pruned model stopped choosing counts: layer 1's 1 -> 2 appears too.
    every = reroute_flows(full, pruned, None)
    assert {(r.layer, r.from_expert, r.to_expert): r.tokens for r in every.itertuples()} == {**got, (1, 1, 2): 1}
    assert dropped_experts(PLAN, [0, 1], 4) == {(0, 0), (0, 1)}


def test_decode_steps_are_left_out_of_the_flows(tmp_path):
    # Each model generates its own continuation: a decode step's token differs and is not paired.
    full = write(tmp_path / "full.parquet", [*FULL, ("a", 0, 2, 40, 0, [0, 1], 1)])
    pruned = write(tmp_path / "pruned.parquet", [*PRUNED, ("a", 0, 2, 41, 0, [2, 3], 1), ("a", 0, 3, 42, 0, [2, 3], 2)])
    flows = reroute_flows(full, pruned, PLAN)
    assert {(r.layer, r.from_expert, r.to_expert): r.tokens for r in flows.itertuples()} == {
        (0, 0, 3): 1, (0, 1, 3): 1, (0, 0, 2): 2}


def test_a_lower_top_k_leaves_dropped_experts_unreplaced(tmp_path):
    full = write(tmp_path / "full.parquet", [("a", 0, 0, 5, 0, [0, 1]), ("a", 0, 1, 6, 0, [1, 2])], layers=(0,))
    plan = Plan(layers={0: [2, 3]}, top_k=1)
    pruned = write(tmp_path / "pruned.parquet", [("a", 0, 0, 5, 0, [3]), ("a", 0, 1, 6, 0, [2])], layers=(0,),
                   top_k=1, plan_digest=plan.digest())
    flows = reroute_flows(full, pruned, plan)
    got = {(r.from_expert, r.to_expert): r.tokens for r in flows.itertuples()}
    assert got == {(0, 3): 1, (1, NO_REPLACEMENT): 2}
    assert flow_totals(flows, [0]).to_dict("list") == {"layer": [0], "tokens": [3], "unreplaced": [2]}


def test_flows_refuse_profiles_of_other_texts_or_another_plan(tmp_path):
    full = write(tmp_path / "full.parquet", FULL)
    other_token = [row if i else (*row[:3], 99, *row[4:]) for i, row in enumerate(PRUNED)]
    with pytest.raises(ProfileMismatch, match=r"not of the same texts: they differ at task 'a', text 0, position 0, "
                                              r"layer 0 \(token_id\)"):
        reroute_flows(full, write(tmp_path / "b1.parquet", other_token), PLAN)
    with pytest.raises(ProfileMismatch, match="A holds 8 prompt token rows and B 7"):
        reroute_flows(full, write(tmp_path / "b2.parquet", PRUNED[1:]), PLAN)
    with pytest.raises(ProfileMismatch, match="not of the same tasks"):
        reroute_flows(full, write(tmp_path / "b3.parquet", [("q", *row[1:]) for row in PRUNED]), PLAN)
    elsewhere = write(tmp_path / "b4.parquet", PRUNED, plan_digest=Plan(layers={0: [0, 1]}).digest())
    with pytest.raises(ProfileMismatch, match="not under the plan given"):
        reroute_flows(full, elsewhere, PLAN)


# ----- end to end on a tiny random model ---------------------------------------------------------------------
TEXTS = {"prose": ["the cat sat on the mat", "a quick brown fox jumps", "moe models route tokens"],
         "code": ["def f(x): return x + 1", "for i in range(3): print(i)"]}


def test_a_plan_profile_reroutes_only_dropped_experts_onto_kept_ones(tiny_models, tmp_path):
    mm = MoEModel(tiny_models.model("mixtral"), tokenizer=char_tokenizer(), source="tiny-mixtral")
    plan = Plan(layers={layer: [0, 2, 4, 6] for layer in mm.layer_indices})
    full = Profile(profile_texts(mm, TEXTS, tmp_path / "full.parquet", progress=False))
    pruned = Profile(profile_texts(mm, TEXTS, tmp_path / "pruned.parquet", progress=False, plan=plan))
    assert pruned.meta.plan_digest == plan.digest()

    flows = reroute_flows(full, pruned, plan)
    kept = {layer: set(plan.keep(layer, mm.n_experts)) for layer in mm.layer_indices}
    assert not flows.empty
    assert not any(r.from_expert in kept[r.layer] for r in flows.itertuples())  # never from a kept expert
    assert all(r.to_expert in kept[r.layer] for r in flows.itertuples())  # always onto a kept one (same top-k)
    # Every slot the full model gave a dropped expert flows somewhere: totals match the full profile's own count.
    table = full.table(columns=["layer", "experts"])
    experts, layers = list_matrix(table.column("experts"), full.meta.top_k), table.column("layer").to_numpy()
    for layer in mm.layer_indices:
        slots = int(np.isin(experts[layers == layer], sorted(set(range(mm.n_experts)) - kept[layer])).sum())
        assert flows[flows["layer"] == layer]["tokens"].sum() == slots > 0
    assert (flow_totals(flows, mm.layer_indices)["unreplaced"] == 0).all()

    cells = compare_usage(full, pruned)
    dropped = cells[~cells.apply(lambda r: r.expert in kept[r.layer], axis=1)]
    assert (dropped["share_b"] == 0).all() and (dropped["diff_pp"] <= 0).all()
    assert cells.groupby("layer")["diff_pp"].sum().abs().max() == pytest.approx(0.0, abs=1e-9)
    js = js_divergence_per_layer(full, pruned, task="prose")
    assert ((js["jsd_bits"] > 0) & (js["jsd_bits"] <= 1)).all()
    assert list(js["layer"]) == mm.layer_indices
    pd.testing.assert_frame_equal(js_divergence_per_layer(full, full)[["jsd_bits"]],
                                  pd.DataFrame({"jsd_bits": [0.0] * len(mm.layer_indices)}), atol=TOL)
