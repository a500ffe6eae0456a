"""EEP's search as the official code runs it (issue 16): unbiased ties, the official operator rates, phase-2
crossover and re-normalisation, validation re-ranking, and the answer-likelihood tie-break."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from core.errors import MoEScopeError
from core.evaluation import Evaluator
from core.methods import Calibration, Target, make_method
from core.methods.eep_operators import assign_slots, evolve, evolve_merge, one_hot
from core.methods.eep_search import SearchState, first_beyond, parent_pool
from core.model import load_model
from core.tasks import TaskSpec

from .test_evaluation import sequence_logprob
from .tiny_models import write_task

# chi-square 0.999 quantile with 7 degrees of freedom (8 experts): a fair search exceeds it once in 1000 runs
CHI2_7DF_999 = 24.322


def constant(genome) -> float:
    return 0.0


def test_with_a_constant_fitness_the_survivors_keep_every_expert_equally_often():
    """Under a constant fitness every kept set is as good as another, so the search's choice (its best) must
    keep each expert equally often. The units counted are one kept set per (seed, layer group): independent across
    seeds, and across groups (each group starts from its own random set and mutates on its own). A kept set
    holds 4 distinct experts of 8, which makes counts less variable than the multinomial the chi-square assumes,
    so the 99.9% bound is conservative. The old search ordered ties by the genome's JSON text: its best kept
    experts 0 and 1 in every group, a chi-square in the hundreds."""
    counts: Counter = Counter()
    for seed in range(40):
        best, _ = evolve(constant, 4, 8, 4, population=6, offspring=6, generations=5, seed=seed).best
        counts.update(e for kept in best for e in kept)
    n = sum(counts.values())
    expected = n / 8
    chi2 = sum((counts[e] - expected) ** 2 / expected for e in range(8))
    assert n == 40 * 4 * 4 and chi2 < CHI2_7DF_999, counts
    mean_id = sum(e * c for e, c in counts.items()) / n
    assert abs(mean_id - 3.5) < 0.4  # sd of one set's mean id is ~0.85, of 160 sets' ~0.07: a 5-sd bound


def test_phase1_mutates_a_quarter_of_the_groups_and_never_crosses_over():
    """Official rates: each of the 8 matrices (4 groups' experts and routers) changes with p 0.25, redrawn until
    one does; a changed group redraws each slot with p 0.15 among the 5 experts no other slot holds (its own
    included). So a child equals its parent with probability ((0.75 + 0.25 * 0.88**4)**4 - 0.75**8) /
    (1 - 0.75**8) = 0.617; the old operators (every slot, p 0.15, plus crossover) gave about 0.07."""
    state = evolve(constant, 4, 8, 4, population=10, offspring=50, generations=8, seed=1)
    children = [g for g, _ in state.archive[10:]]
    earlier = [{g for g, _ in state.archive[:10 + i]} for i in range(len(children))]
    repeats = np.mean([child in seen for child, seen in zip(children, earlier)])
    expected = ((0.75 + 0.25 * 0.88 ** 4) ** 4 - 0.75 ** 8) / (1 - 0.75 ** 8)
    assert abs(repeats - expected) < 4 * np.sqrt(expected * (1 - expected) / len(children)), repeats
    # no crossover: every child is one parent with at most a few slots redrawn, never a mix of two distant ones
    for child, seen in zip(children, earlier):
        assert min(sum(len(set(a) - set(b)) for a, b in zip(child, g)) for g in seen) <= 4


def test_parent_pool_is_the_official_absolute_selection():
    ranked = [((i,), f) for i, f in enumerate([50.0, 49.0, 47.5, 46.9, 40.0, 30.0])]
    assert parent_pool(ranked, 3.0) == 4  # indices 0..3: the first more than 3 below (46.9) is drawable too
    assert parent_pool(ranked, 100.0) == 6  # none beyond: the whole archive
    assert parent_pool(ranked, 1.0, floor=6) == 6  # crossover's parents_rank 6 floor
    assert parent_pool([((0,), (1.0, -2.0)), ((1,), (1.0, -9.0))], 0.5) == 2  # tuples: the metric decides
    # crossover draws from population[:max(i, 6)]: i = 2 here (47.5 is more than 1 below 50), so the top 6
    assert first_beyond(ranked, 1.0) == 2 and first_beyond(ranked, 100.0) == 5


def _matrices(kept, n=6):
    m = one_hot(kept, n)
    return ((m, m),)


def test_phase2_crossover_takes_router_and_expert_rows_from_either_parent():
    a, b = _matrices((0, 1)), _matrices((2, 3))
    state = evolve_merge(constant, [(a, 0.0), (b, 0.0)], offspring=40, generations=1, p_mutation=0.0,
                         p_crossover=1.0, p_normalise=0.0, crossover_rank=2, seed=0)
    children = [g for g, _ in state.archive[2:]]
    mixed = 0
    for ((router, experts),) in children:
        for m in (router, experts):
            assert all(m[i] in (a[0][0][i], b[0][0][i]) for i in range(2))  # row i from one parent's row i
        mixed += router != experts
    assert mixed > 0  # a group's router mapping and expert merging came from different parents


def test_phase2_without_crossover_copies_one_parent_then_perturbs_and_renormalises():
    a = _matrices((0, 1))
    state = evolve_merge(constant, [(a, 0.0)], offspring=30, generations=1, p_crossover=0.0, p_normalise=1.0,
                         p_mutation=0.5, seed=2)
    children = [g for g, _ in state.archive[1:]]
    assert any(c != a for c in children)
    for ((router, experts),) in children:
        assert all(abs(sum(row) - 1.0) < 1e-5 for row in experts)  # expert rows re-normalised
    assert any(abs(sum(row) - 1.0) > 1e-3 for c in children for row in c[0][0])  # router rows are not


def test_slots_are_distinct_balanced_and_one_hot_rows_keep_their_expert():
    assert assign_slots(one_hot((1, 4), 6), one_hot((1, 4), 6), 6)[0] == [1, 4]
    same = [[0.0, 0.9, 0.1, 0.0], [0.0, 0.8, 0.0, 0.2]]  # both rows weigh expert 1 most
    keep, router, experts = assign_slots(same, same, 4)
    assert keep == [1, 3] and experts == [same[0], same[1]] and router == experts
    keep, _, _ = assign_slots(same, same, 4, routing_groups=2)
    assert keep == [1, 3]  # one slot per routing group of 2 experts


def test_old_state_files_are_refused_in_one_sentence(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"generation": 2, "population": [], "curve": [], "evaluations": 3, "cache": {},
                                "rng": {}, "cancelled": False}))
    with pytest.raises(MoEScopeError, match="older EEP"):
        SearchState.load(path)


# ----- on a model: the tie-break signal and validation re-ranking -----------------------------------------
PROMPTS = ["ab", "hello wor", "x", "the cat sat on t", "12+3=", "zz top"]


@pytest.fixture(scope="module")
def mm(tiny_models):
    return load_model(tiny_models.checkpoint())


def _exact_task(tmp_path, splits=("calibration", "validation")) -> TaskSpec:
    rows = [{"q": p, "answer": "ab"} for p in PROMPTS]
    return TaskSpec.from_json(write_task(tmp_path / "em", rows, splits=splits, metric="exact_match",
                                         prompt_template="{q}", answer_field="answer", target_prefix="", stop="",
                                         max_new_tokens=2))


def test_answer_logprob_is_the_teacher_forced_reference_likelihood(mm, tmp_path):
    spec = _exact_task(tmp_path)
    result = Evaluator(mm, batch_size=4).evaluate(spec, split="calibration", agreement=False, answer_likelihood=True)
    n_answer = len(mm.tokenizer("ab", add_special_tokens=False)["input_ids"])
    by_hand = sum(sequence_logprob(mm, p, "ab") for p in PROMPTS) / (n_answer * len(PROMPTS))
    assert result.metrics["answer_logprob"] == pytest.approx(by_hand, abs=1e-4)
    plain = Evaluator(mm, batch_size=4).evaluate(spec, split="calibration", agreement=False)
    assert "answer_logprob" not in plain.metrics and plain.metrics["exact_match"] == result.metrics["exact_match"]


def test_eep_breaks_metric_ties_by_likelihood_and_reranks_on_validation(mm, tmp_path):
    spec = _exact_task(tmp_path)
    plan = make_method("eep", population=6, offspring=3, generations=2, merge_generations=0, validate_top=4,
                       seed=0).plan(mm, Calibration(spec), Target(keep=4))
    fitness, validation = plan.extra["fitness"], plan.extra["validation"]
    assert fitness["tie_break"] == "answer_logprob" and isinstance(fitness["best_answer_logprob"], float)
    assert validation["split"] == "validation" and validation["candidates"] == 4
    assert validation["chosen_rank"] == int(np.argmax(validation["scores"]))
    rows = len(PROMPTS)
    assert plan.extra["forward_passes"] == (plan.extra["evaluations"] + 4) * rows
    no_dev = make_method("eep", population=3, offspring=2, generations=1, merge_generations=0, seed=0).plan(
        mm, Calibration(_exact_task(tmp_path / "x", splits=("calibration",))), Target(keep=4))
    assert no_dev.extra["validation"] == {"split": None, "reason": "task has no 'validation' split"}


def test_a_merging_genome_is_plain_pruning_only_on_distinct_balanced_one_hot_rows():
    from core.methods.eep import _kept_sets

    a, b = one_hot((0, 5), 8), one_hot((5, 5), 8)
    assert _kept_sets(((a, a),), 8, 1) == ((0, 5),)
    assert _kept_sets(((b, b),), 8, 1) is None  # two merged experts both copies of expert 5
    assert _kept_sets(((a, one_hot((1, 5), 8)),), 8, 1) is None  # router and experts differ
    assert _kept_sets(((one_hot((0, 1), 8),) * 2,), 8, 2) is None  # both in routing group 0 of 2
