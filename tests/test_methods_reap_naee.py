"""REAP, NAEE and NAEE dynamic skipping: known answers, agreement with independent computations, valid plans."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import MoEScopeError
from core.masking import masked
from core.methods import Calibration, Target
from core.methods.naee import NAEE, DynamicSkipping, collect_block_inputs, sample_tokens
from core.methods.reap import REAP, encode_calibration
from core.model import MoEModel
from core.plan import Plan, validate_plan
from core.profiling import profile_texts
from core.routing_profile import Profile, list_matrix

from .test_methods import DEAD, TEXTS, lm_task, with_dead_experts
from .tiny_models import char_tokenizer

# Compares floating-point results of different computations (kernels, batchings, masking and export):
# .ci/run runs these again with OMP_NUM_THREADS=1.
pytestmark = pytest.mark.numeric

ZERO = [1, 4]  # experts whose output weights are zeroed


def tiny(models, model_type: str = "mixtral", **overrides) -> MoEModel:
    """A fresh copy of the session's tiny model (``models`` is the ``tiny_models`` fixture)."""
    return MoEModel(models.model(model_type, **overrides), tokenizer=char_tokenizer(), source=f"tiny-{model_type}")


def layout(models, name: str) -> MoEModel:
    return MoEModel(models.layout(name), tokenizer=char_tokenizer(), source=f"tiny-{name}")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Calibration:
    return lm_task(tmp_path_factory.mktemp("calibration"))


@pytest.fixture(scope="module")
def mixtral(tiny_models) -> MoEModel:
    return tiny(tiny_models)


@pytest.fixture(scope="module")
def mixtral_naee(mixtral, calibration) -> Plan:
    """The exhaustive NAEE plan keeping 4 of 8 experts, shared by the tests that compare against it."""
    return NAEE().plan(mixtral, calibration, Target(keep=4))


@torch.no_grad()
def block_inputs(mm: MoEModel) -> dict[int, torch.Tensor]:
    """Every MoE block's inputs [tokens, H] over the calibration texts, run one text at a time (no padding)."""
    seen: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in mm.layers}
    handles = [layer.block.register_forward_pre_hook(
        lambda m, args, index=layer.index: seen[index].append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in mm.layers]
    for text in TEXTS:
        mm.model(input_ids=mm.tokenizer(text, return_tensors="pt")["input_ids"])
    for handle in handles:
        handle.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@torch.no_grad()
def mixtral_expert(mm: MoEModel, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Mixtral expert j written out from its weights: down(silu(gate(x)) * up(x))."""
    experts = mm.layer(layer).experts
    gate, up = (x @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[expert].T


@torch.no_grad()
def mixtral_block(mm: MoEModel, layer: int, x: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """Mixtral's MoE output with only ``subset`` routable: top-2 of the subset's logits, softmax renormalised."""
    logits = (x @ mm.layer(layer).router.weight.T)[:, subset]
    top, pos = logits.topk(2, dim=-1)
    weights = top.softmax(dim=-1)
    out = torch.zeros_like(x)
    for slot in range(2):
        for p, expert in enumerate(subset):
            rows = pos[:, slot] == p
            out[rows] += weights[rows, slot, None] * mixtral_expert(mm, layer, expert, x[rows])
    return out


def assert_top(kept: list[int], scores, k: int, rtol: float) -> None:
    """``kept`` is a set of the ``k`` highest ``scores``, where two experts whose scores differ by less than
    ``rtol`` of the largest score count as tied: a ranking recomputed another way (other batches, other
    kernels) may order such near-ties either way, so only a gap beyond rounding decides which is kept."""
    scores = np.asarray(scores, dtype=np.float64)
    dropped = [e for e in range(len(scores)) if e not in kept]
    assert len(kept) == k == len(set(kept))
    assert scores[kept].min() >= scores[dropped].max() - rtol * np.abs(scores).max(), (kept, scores)


def with_zero_experts(models) -> MoEModel:
    mm = tiny(models)
    for layer in mm.layers:
        layer.experts.down_proj.data[ZERO] = 0.0
    return mm


# ----- known answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [REAP(), NAEE(), NAEE(max_subsets=1)], ids=["reap", "naee", "naee-greedy"])
def test_never_routed_experts_are_exactly_the_ones_pruned(method, calibration):
    mm = with_dead_experts()
    plan = method.plan(mm, calibration, Target(keep=5))
    assert plan.layers == {layer: [0, 1, 2, 3, 4] for layer in mm.layer_indices}
    scores = plan.extra["scores"]
    for layer in mm.layer_indices:
        live = min(scores[str(layer)][e] for e in range(5))
        assert max(scores[str(layer)][e] for e in DEAD) < live
    if isinstance(method, REAP):
        assert all(plan.extra["scores"][str(layer)][e] == 0 for layer in mm.layer_indices for e in DEAD)
        assert all(plan.extra["routed_tokens"][str(layer)][e] == 0 for layer in mm.layer_indices for e in DEAD)
    else:
        # Dropping experts no token reaches changes no routing decision, so the block output is the same up to
        # rounding only: the pruned router computes its logits with a [5, H] matrix instead of [8, H], a
        # different GEMM whose last bits differ on some CPUs (an AMD EPYC gives absolute errors of 7e-09 and
        # 5e-08, not 0). Relative to the block output's norm, that rounding is at most about H * eps_fp32 =
        # 32 * 1.2e-7 = 4e-6 (each logit is an H-term dot product); a subset without a live expert is off by
        # orders of magnitude more (its relative error here is above 0.1).
        assert all(plan.extra["relative_error"][str(layer)] <= 1e-5 for layer in mm.layer_indices)


@torch.no_grad()
def test_reap_saliency_equals_an_independent_computation(calibration, tiny_models):
    mm = tiny(tiny_models)
    plan = REAP(batch_size=3).plan(mm, calibration, Target(keep=4))
    for layer, x in block_inputs(mm).items():
        probs = (x @ mm.layer(layer).router.weight.T).softmax(dim=-1)
        # official REAP on Mixtral (no norm_topk_prob in its config): the softmax probability, not renormalised
        gates, ids = probs.topk(2, dim=-1)
        expected = np.zeros(mm.n_experts)
        for expert in range(mm.n_experts):
            rows, slot = (ids == expert).nonzero(as_tuple=True)
            if len(rows):
                norms = mixtral_expert(mm, layer, expert, x[rows]).norm(dim=-1)
                expected[expert] = float((gates[rows, slot] * norms).mean())
        np.testing.assert_allclose(plan.extra["scores"][str(layer)], expected, rtol=1e-4, atol=1e-7)
        assert sum(plan.extra["routed_tokens"][str(layer)]) == 2 * len(x)  # real tokens only, top-2 each
        assert_top(plan.layers[layer], expected, 4, rtol=1e-4)  # the tolerance of the scores' comparison


def test_reap_ignores_padding_and_batching(calibration, tiny_models):
    mm = tiny(tiny_models, "qwen2_moe")
    one = REAP(batch_size=1).plan(mm, calibration, Target(keep=4)).extra
    five = REAP(batch_size=5).plan(mm, calibration, Target(keep=4)).extra
    assert one["routed_tokens"] == five["routed_tokens"]
    for layer in mm.layer_indices:
        np.testing.assert_allclose(one["scores"][str(layer)], five["scores"][str(layer)], rtol=1e-5)


def test_zero_output_experts_are_pruned_by_reap_but_not_free_for_naee(calibration, tiny_models):
    mm = with_zero_experts(tiny_models)
    plan = REAP().plan(mm, calibration, Target(keep=6))
    assert all(keep == [0, 2, 3, 5, 6, 7] for keep in plan.layers.values())
    assert all(plan.extra["routed_tokens"][str(layer)][e] > 0 for layer in mm.layer_indices for e in ZERO)
    assert all(plan.extra["scores"][str(layer)][e] == 0 for layer in mm.layer_indices for e in ZERO)
    # Tokens routed to a zero-output expert are re-routed to a live one once it is gone, and the renormalised
    # weights shift, so for NAEE its removal is not free: the subset without it has a positive error.
    naee = NAEE().plan(mm, calibration, Target(keep=6))
    for layer, x in block_inputs(mm).items():
        full = mixtral_block(mm, layer, x, list(range(8)))
        without = float(torch.linalg.norm(full - mixtral_block(mm, layer, x, [0, 2, 3, 5, 6, 7])))
        assert without > 1e-4
        assert naee.extra["reconstruction_error"][str(layer)] <= without * (1 + 1e-5)


def test_exhaustive_naee_equals_brute_force_over_all_subsets(mixtral, mixtral_naee):
    mm, plan = mixtral, mixtral_naee
    assert plan.extra["search"] == {"0": "exhaustive", "1": "exhaustive"}
    assert plan.extra["evaluations"] == {"0": 70, "1": 70}
    for layer, x in block_inputs(mm).items():
        full = mixtral_block(mm, layer, x, list(range(8)))
        errors = {subset: float(torch.linalg.norm(full - mixtral_block(mm, layer, x, list(subset))))
                  for subset in itertools.combinations(range(8), 4)}
        best = min(errors, key=errors.get)
        # the plan's subset is the best one, or one whose error ties it to rounding (the 1e-4 used below): the
        # brute force recomputes every error in another way, so a near-tie may fall either way
        assert errors[tuple(plan.layers[layer])] <= errors[best] * (1 + 1e-4)
        assert plan.extra["reconstruction_error"][str(layer)] == pytest.approx(errors[best], rel=1e-4)
        assert plan.extra["relative_error"][str(layer)] == pytest.approx(
            errors[best] / float(torch.linalg.norm(full)), rel=1e-4)
        lowest = [min(e for s, e in errors.items() if j in s) for j in range(8)]
        np.testing.assert_allclose(plan.extra["scores"][str(layer)], [-v for v in lowest], rtol=1e-4)


# ----- the scalable search ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_greedy_search_meets_the_target_close_to_exhaustive(model_type, calibration, request, tiny_models):
    mm = request.getfixturevalue("mixtral") if model_type == "mixtral" else tiny(tiny_models, model_type)
    exact = request.getfixturevalue("mixtral_naee") if model_type == "mixtral" else \
        NAEE().plan(mm, calibration, Target(keep=4))
    greedy = NAEE(max_subsets=69).plan(mm, calibration, Target(keep=4))
    validate_plan(greedy, mm.routing_spec(), for_export=True)
    assert all(len(keep) == 4 for keep in greedy.layers.values())
    assert set(greedy.extra["search"].values()) == {"greedy"}
    assert all(n <= 1 + 8 + 7 + 6 + 5 for n in greedy.extra["evaluations"].values())
    for layer in mm.layer_indices:
        best, found = exact.extra["reconstruction_error"][str(layer)], greedy.extra["reconstruction_error"][str(layer)]
        assert best * (1 - 1e-6) <= found <= 1.2 * best
        scores = greedy.extra["scores"][str(layer)]  # rounds survived: 4 for kept experts, 0..3 for the rest
        assert sorted(scores) == [0, 1, 2, 3, 4, 4, 4, 4]
        assert [e for e in range(8) if scores[e] == 4] == greedy.layers[layer]


@pytest.mark.slow
def test_greedy_search_scales_to_many_experts(calibration, tiny_models):
    mm = tiny(tiny_models, num_local_experts=64, num_hidden_layers=1)
    assert math.comb(64, 60) > 5000
    plan = NAEE().plan(mm, calibration, Target(keep=60))
    validate_plan(plan, mm.routing_spec(), for_export=True)
    assert len(plan.layers[0]) == 60 and plan.extra["search"] == {"0": "greedy"}
    assert plan.extra["evaluations"]["0"] <= 1 + 64 + 63 + 62 + 61


def test_greedy_search_keeps_grouped_routing_balanced(calibration, tiny_models):
    mm = layout(tiny_models, "deepseek_v3-grouped-dense-first")
    plan = NAEE(max_subsets=1).plan(mm, calibration, Target(keep=4))
    validate_plan(plan, mm.routing_spec(), for_export=True)
    for keep in plan.layers.values():
        assert sum(e < 4 for e in keep) == 2 and sum(e >= 4 for e in keep) == 2


# ----- progressive mode and bounded caches -------------------------------------------------------------
def test_progressive_naee_recollects_later_layers_inputs(mixtral, mixtral_naee, calibration):
    mm, plain = mixtral, mixtral_naee
    progressive = NAEE(progressive=True).plan(mm, calibration, Target(keep=4))
    validate_plan(progressive, mm.routing_spec(), for_export=True)
    assert progressive.extra["parameters"]["progressive"] is True
    errors = plain.extra["reconstruction_error"], progressive.extra["reconstruction_error"]
    # layer 0 sees the same inputs, computed by the same code on the same batches in this process: exactly equal
    assert errors[0]["0"] == errors[1]["0"] and progressive.layers[0] == plain.layers[0]
    assert errors[0]["1"] != errors[1]["1"]  # layer 1 sees layer 0 pruned


def test_cached_inputs_are_a_bounded_deterministic_sample_of_real_tokens(mixtral, calibration):
    mm = mixtral
    seqs = encode_calibration(mm, calibration, 512)
    total = sum(map(len, seqs))
    chosen = sample_tokens(total, 16, seed=0)
    assert len(chosen) == 16 and np.array_equal(chosen, sample_tokens(total, 16, seed=0))
    layer = mm.layers[1]
    small, _ = collect_block_inputs(mm, layer, seqs, chosen, batch_size=2, plan=None)
    large, _ = collect_block_inputs(mm, layer, seqs, chosen, batch_size=5, plan=None)
    assert small.shape == (16, 32)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)  # padding never enters the sample
    unpadded = torch.cat([block_inputs_of(mm, layer.index, seq) for seq in seqs])  # one sequence at a time
    torch.testing.assert_close(small, unpadded[torch.as_tensor(chosen)], rtol=1e-4, atol=1e-5)
    plan = NAEE(max_tokens=16).plan(mm, calibration, Target(keep=4))
    validate_plan(plan, mm.routing_spec(), for_export=True)
    assert plan.extra["parameters"]["max_tokens"] == 16


def block_inputs_of(mm: MoEModel, index: int, seq: list[int]) -> torch.Tensor:
    """One MoE block's inputs [L, H] for one unpadded sequence."""
    seen = []
    handle = mm.layer(index).block.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    with torch.no_grad():
        mm.model(input_ids=torch.tensor([seq]))
    handle.remove()
    return seen[0]


# ----- dynamic skipping ------------------------------------------------------------------------------
# The planner's betas and the profiler's recorded gate weights come from two passes over the texts, batched
# and padded their own way. A gate ratio g_k / g_1 = exp(l_k - l_1) of fp32 router logits l (H = 32 term dot
# products, |l| ~ 1) then differs relatively by up to ~H * eps_fp32 = 4e-6 between them.
GATE_RATIO_RTOL = 1e-5
def recorded_medians(mm: MoEModel, texts: list[str], tmp_path, plan: Plan | None = None) -> dict[str, float]:
    """Median of g_k / g_1 per layer, from a routing profile recorded by the profiler."""
    path = profile_texts(mm, {"lm": texts}, tmp_path / "routing.parquet", progress=False, plan=plan)
    table = Profile(path).table(columns=["layer", "weights"])
    layers = table["layer"].to_numpy()
    k = plan.top_k if plan is not None and plan.top_k else mm.top_k
    weights = list_matrix(table["weights"], k).astype(np.float64)
    ratios = weights[:, -1] / weights[:, 0]
    return {str(layer): float(np.median(ratios[layers == layer])) for layer in mm.layer_indices}


@pytest.mark.parametrize("top_k", [2, 3])
def test_dynamic_skip_beta_is_the_median_gate_ratio(top_k, calibration, tmp_path, tiny_models):
    mm = tiny(tiny_models, num_experts_per_tok=top_k)
    plan = DynamicSkipping().plan(mm, calibration, Target(keep=8))
    assert plan.layers == {} and plan.extra["method"] == "dynamic_skip"
    expected = recorded_medians(mm, calibration.texts(), tmp_path)
    assert plan.extra["dynamic_skip"] == pytest.approx(expected, rel=GATE_RATIO_RTOL)
    assert all(0 < beta < 1 for beta in plan.extra["dynamic_skip"].values())
    validate_plan(plan, mm.routing_spec())
    with pytest.raises(MoEScopeError, match="dynamic_skip"):
        validate_plan(plan, mm.routing_spec(), for_export=True)


def test_dynamic_skip_with_pruning_measures_betas_on_the_naee_pruned_model(mixtral, mixtral_naee, calibration,
                                                                          tmp_path):
    mm, naee = mixtral, mixtral_naee
    plan = DynamicSkipping().plan(mm, calibration, Target(keep=4))
    assert plan.layers == naee.layers
    assert plan.extra["reconstruction_error"] == naee.extra["reconstruction_error"]
    expected = recorded_medians(mm, calibration.texts(), tmp_path, plan=Plan(layers=naee.layers))
    assert plan.extra["dynamic_skip"] == pytest.approx(expected, rel=GATE_RATIO_RTOL)
    with masked(mm, plan):  # the plan applies
        mm.model(input_ids=torch.tensor([[5, 6, 7]]))


def test_dynamic_skip_refuses_what_cannot_skip(calibration, tiny_models):
    with pytest.raises(MoEScopeError, match="cannot skip experts dynamically"):
        DynamicSkipping().plan(tiny(tiny_models, "dbrx"), calibration, Target(keep=8))
    with pytest.raises(MoEScopeError, match="top-k of at least 2"):
        DynamicSkipping().plan(tiny(tiny_models), calibration, Target(keep=8, top_k=1))


def test_reap_refuses_llama4(calibration, tiny_models):
    with pytest.raises(MoEScopeError, match="REAP does not support Llama4"):
        REAP().plan(tiny(tiny_models, "llama4_text"), calibration, Target(keep=4))


# ----- valid plans across families -------------------------------------------------------------------
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3-grouped-dense-first", "dbrx", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [REAP, NAEE])
def test_plans_are_valid_and_round_trip_on_several_families(method, family, calibration, tiny_models):
    mm = layout(tiny_models, family) if "-" in family else tiny(tiny_models, family)
    target = Target(ratio=0.5, top_k=1)
    plan = method().plan(mm, calibration, target)
    validate_plan(plan, mm.routing_spec(), for_export=True)
    assert plan.top_k == 1 and sorted(plan.layers) == mm.layer_indices
    assert all(len(keep) == target.experts_kept(mm) for keep in plan.layers.values())
    assert plan.extra["method"] == method.name and plan.extra["calibration"]["digest"]
    assert sorted(plan.extra["scores"]) == [str(layer) for layer in mm.layer_indices]
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.layers == plan.layers and again.extra == plan.extra and again.top_k == 1


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3-grouped-dense-first", "gpt_oss"])
def test_dynamic_skip_plans_are_valid_and_round_trip(family, calibration, tiny_models):
    mm = layout(tiny_models, family) if "-" in family else tiny(tiny_models, family)
    plan = DynamicSkipping().plan(mm, calibration, Target(ratio=0.0))
    validate_plan(plan, mm.routing_spec())
    assert sorted(plan.dynamic_skip) == mm.layer_indices
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.dynamic_skip == plan.dynamic_skip and again.extra == plan.extra


# ----- issue 16: the official NAEE skipping and REAP gate ----------------------------------------------
def test_dynamic_skip_renormalises_the_survivor_as_the_official_code():
    from core.masking import skip_weak_experts

    # Expert_Sparsity modeling_mixtral.py 52-56: zero the weaker weight if below beta * the stronger, then
    # divide by the sum. [0.8, 0.2] with beta 0.3: 0.2 < 0.24 is skipped and 0.8 / 0.8 = 1; [0.6, 0.4] is kept.
    out = skip_weak_experts(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]]), 0.3)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.5, 0.5]]))


def test_skipping_every_second_expert_is_top1_routing_on_mixtral(mixtral):
    """beta = 1 skips the second expert of every token (but exact ties); the survivor then has weight 1, which
    is exactly top-1 routing with Mixtral's renormalisation (before the fix its weight stayed g1 / (g1 + g2))."""
    layer = mixtral.layers[0]
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(3))
    layers = {i: list(range(8)) for i in mixtral.layer_indices}
    with torch.no_grad():
        with masked(mixtral, Plan(layers=layers, extra={"dynamic_skip": {str(layer.index): 1.0}})):
            skipped = layer.block(x)
        with masked(mixtral, Plan(layers=layers, top_k=1)):
            top1 = layer.block(x)
    skipped, top1 = (o[0] if isinstance(o, tuple) else o for o in (skipped, top1))
    torch.testing.assert_close(skipped, top1, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_progressive_naee_targets_the_original_models_block_output(mixtral, calibration):
    """Official progressive_pruning caches Z (each block's output) from the unpruned model, then scores a later
    layer's subsets on its inputs X collected with the earlier layers pruned: error = ||Z - block_S(X_pruned)||."""
    mm = mixtral
    plan = NAEE(progressive=True).plan(mm, calibration, Target(keep=4))
    original = block_inputs(mm)[1]
    with masked(mm, Plan(layers={0: plan.layers[0]})):
        pruned_inputs = block_inputs(mm)[1]
    candidate = mixtral_block(mm, 1, pruned_inputs, plan.layers[1])
    target = mixtral_block(mm, 1, original, list(range(8)))
    expected = float(torch.linalg.norm(target - candidate))
    assert plan.extra["reconstruction_error"]["1"] == pytest.approx(expected, rel=1e-4)
    old_target = float(torch.linalg.norm(mixtral_block(mm, 1, pruned_inputs, list(range(8))) - candidate))
    assert abs(old_target - expected) > 1e-3 * expected  # the two targets differ by far more than rounding


def test_reap_renormalises_only_where_the_config_asks_and_the_flag_is_set(calibration, tiny_models):
    """Official: renormalize_router_weights = config.norm_topk_prob (absent on Mixtral: False) and the flag."""
    mixtral = tiny(tiny_models)
    assert not hasattr(mixtral.config, "norm_topk_prob")
    plain, flagged = (REAP(renormalize=r).expert_scores(mixtral, calibration).scores for r in (False, True))
    assert all(np.array_equal(plain[k], flagged[k]) for k in plain)
    qwen = tiny(tiny_models, "qwen2_moe", norm_topk_prob=True)
    plain, flagged = (REAP(renormalize=r).expert_scores(qwen, calibration).scores for r in (False, True))
    # renormalised top-2 gates are larger than the raw probabilities (they sum to 1, the raw ones to less)
    assert all((flagged[k] >= plain[k] - 1e-9).all() and (flagged[k] > plain[k]).any() for k in plain)
