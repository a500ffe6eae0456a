"""EEP's router mapping: the paper's probs form p' = R · softmax(W x) (then top-k and the family's normalisation)
against hand computations, one-hot R as plain pruning under both mappings, and the plan field."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.errors import MoEScopeError
from core.masking import masked
from core.model import MoEModel
from core.plan import Plan
from core.router_mapping import mapped_probs, probs_normalisation, route_mapped

from .tiny_models import build, build_layout, ids


def test_probs_mapping_equals_a_hand_computation():
    # softmax([0, ln 2, ln 3]) = [1/6, 2/6, 3/6]
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]])
    mapping = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    mapped = mapped_probs(logits, mapping)
    assert mapped.tolist()[0] == pytest.approx([1 / 6, 0.5 / 6 + 0.5 * 2 / 6], abs=1e-7)  # [1/6, 1/4]
    weights, slots = route_mapped(mapped, 1, "topk")
    assert slots.tolist() == [[1]] and weights.tolist()[0] == pytest.approx([1.0])
    weights, slots = route_mapped(mapped, 1, "kept")  # p'_1 / (p'_0 + p'_1) = (1/4) / (5/12)
    assert slots.tolist() == [[1]] and weights.tolist()[0] == pytest.approx([0.6])
    # the logits form would mix the logit rows: [0, ln 2 / 2] -> top slot 1 too, but weight 1/(1+2^-1/2) differs
    logits_form = torch.softmax(mapping @ logits[0], -1)
    assert float(logits_form[1]) != pytest.approx(0.6, abs=1e-3)


def _merge_json(router, experts):
    return {"router": [list(map(float, r)) for r in router], "experts": [list(map(float, r)) for r in experts]}


def test_masked_mixtral_router_routes_on_r_times_softmax():
    mm = MoEModel(build("mixtral"))
    layer = mm.layers[0]
    keep = [1, 3, 4, 6]
    torch.manual_seed(0)
    router_map = torch.eye(8)[keep] + 0.3 * torch.randn(4, 8)
    experts_map = torch.eye(8)[keep]
    merge = {str(i): _merge_json(router_map.tolist(), experts_map.tolist()) for i in mm.layer_indices}
    plan = Plan(layers={i: keep for i in mm.layer_indices}, extra={"merge": merge, "router_mapping": "probs"})
    x = torch.randn(10, 32)
    with torch.no_grad():
        by_hand = torch.softmax(x @ layer.router.weight.T, -1) @ router_map.T  # R · softmax(W x)
        values, slots = by_hand.topk(2, -1)
        with masked(mm, plan):
            _, weights, chosen = layer.router(x)
    assert chosen.tolist() == torch.tensor(keep)[slots].tolist()
    torch.testing.assert_close(weights.float(), values / values.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "jamba"])  # top-k renormalised, by config, kept-softmax
@pytest.mark.parametrize("mapping", ["probs", "logits"])
def test_one_hot_merging_is_plain_pruning_under_both_mappings(family, mapping):
    mm = MoEModel(build(family))
    keep = [0, 2, 5, 7]
    one_hot = torch.eye(8)[keep].tolist()
    merge = {str(i): _merge_json(one_hot, one_hot) for i in mm.layer_indices}
    pruned = Plan(layers={i: keep for i in mm.layer_indices})
    merged = Plan(layers={i: keep for i in mm.layer_indices}, extra={"merge": merge, "router_mapping": mapping})
    x = ids()
    seen: dict[str, list] = {"pruned": [], "merged": []}
    with torch.no_grad():
        for name, plan in (("pruned", pruned), ("merged", merged)):
            hooks = [layer.router.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out[2]))
                     for layer in mm.layers]
            with masked(mm, plan):
                seen[name].append(mm.model(input_ids=x).logits)
            for h in hooks:
                h.remove()
    # the same experts chosen for every token (exact), and the same output up to float rounding (the probs form
    # takes the softmax over all experts, then divides; plain pruning takes it over the kept ones)
    for a, b in zip(seen["pruned"][:-1], seen["merged"][:-1]):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    torch.testing.assert_close(seen["merged"][-1], seen["pruned"][-1], atol=1e-5, rtol=1e-5)


def test_probs_mapping_refuses_families_it_does_not_define():
    mm = MoEModel(build_layout("deepseek_v3-grouped-dense-first"))
    assert probs_normalisation(mm.adapter, mm.config) is None
    n, keep = mm.n_experts, [0, 1, 4, 5]
    one_hot = torch.eye(n)[keep].tolist()
    plan = Plan(layers={i: keep for i in mm.layer_indices},
                extra={"merge": {str(i): _merge_json(one_hot, one_hot) for i in mm.layer_indices},
                       "router_mapping": "probs"})
    with pytest.raises(MoEScopeError, match="router_mapping=logits"), masked(mm, plan):
        pass


def test_router_mapping_field_round_trips_and_defaults_to_logits():
    legacy = Plan.from_dict({"format": "moescope-plan", "version": 1, "layers": {"0": {"keep": [0, 1]}}})
    assert legacy.mapping == "logits" and "router_mapping" not in legacy.to_dict()
    plan = Plan(layers={0: [0, 1]}, extra={"router_mapping": "probs"})
    again = Plan.loads(plan.to_json())
    assert again.mapping == "probs" and again.to_json() == plan.to_json()
    assert again.digest() != legacy.digest()
    bad = json.loads(plan.to_json()) | {"router_mapping": "softmax"}
    with pytest.raises(MoEScopeError, match="router_mapping"):
        Plan.from_dict(bad)


# ----- a linear router fitted to a probs-mapped plan, for export --------------------------------------------
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model",
         "1 + 2 = 3 and 4 + 5 = 9", "abcdefghijklmnopqrstuvwxyz", "merging experts by evolution"] * 4


def _probs_plan(mm, keep, noise: float, seed: int = 0) -> Plan:
    torch.manual_seed(seed)
    router_map = torch.eye(8)[keep] + noise * torch.randn(len(keep), 8)
    experts_map = torch.eye(8)[keep]
    merge = {str(i): _merge_json(router_map.tolist(), experts_map.tolist()) for i in mm.layer_indices}
    return Plan(layers={i: keep for i in mm.layer_indices}, extra={"merge": merge, "router_mapping": "probs"})


def test_fitted_router_is_exact_for_one_hot_mapping_and_reports_agreement():
    from core.router_fit import fit_plan_routers

    from .tiny_models import char_tokenizer

    mm = MoEModel(build("mixtral"), tokenizer=char_tokenizer())
    fits = fit_plan_routers(mm, _probs_plan(mm, [0, 2, 5, 7], 0.0), TEXTS, min_agreement=1.0)
    # one-hot R: log p' minus its mean is the kept rows of W x centred, a linear function: fitted exactly
    assert sorted(fits) == mm.layer_indices
    assert all(f.agreement == 1.0 and f.state["weight"].shape == (4, 32) for f in fits.values())
    noisy = fit_plan_routers(mm, _probs_plan(mm, [0, 2, 5, 7], 0.3), TEXTS, min_agreement=0.0)
    report = noisy[0].report()
    tokens = sum(len(mm.tokenizer(t)["input_ids"]) for t in TEXTS)  # every real token reached the router
    assert report["fit_tokens"] + report["held_out_tokens"] == tokens
    assert report["held_out_tokens"] == round(0.25 * tokens)  # a quarter held out
    assert 0.0 < report["top_k_agreement"] < 1.0  # sigma 0.3 noise: not linear any more, but mostly fitted


def test_fitted_router_below_the_threshold_is_refused_in_one_sentence():
    from core.router_fit import fit_plan_routers

    from .tiny_models import char_tokenizer

    mm = MoEModel(build("mixtral"), tokenizer=char_tokenizer())
    plan = _probs_plan(mm, [0, 2, 5, 7], 0.3)
    agreement = fit_plan_routers(mm, plan, TEXTS, min_agreement=0.0)[0].agreement
    with pytest.raises(MoEScopeError, match=r"only .*% of \d+ held-out tokens \(threshold 100\.1%\)") as err:
        fit_plan_routers(mm, plan, TEXTS, min_agreement=1.001)
    assert "\n" not in str(err.value)
    assert fit_plan_routers(mm, plan, TEXTS, min_agreement=agreement)[0].agreement == agreement  # at it: accepted
    with pytest.raises(MoEScopeError, match="router_mapping probs"):
        fit_plan_routers(mm, Plan(layers={0: [0, 1, 2, 3]}), TEXTS)
