"""The evaluation harness on a tiny model with hand-checkable tasks: each metric kind against a direct,
unbatched computation, agreement and cost of plans, caching and determinism."""

from __future__ import annotations

import pytest
import torch

from core.evaluation import Evaluator, evaluate, plan_cost
from core.model import MoEModel, load_model
from core.plan import Plan
from core.tasks import TaskSpec

from .tiny_models import FAMILIES, write_task

# Compares floating-point results of different computations (kernels, batchings, masking and export):
# .ci/run runs these again with OMP_NUM_THREADS=1.
pytestmark = pytest.mark.numeric

PROMPTS = ["ab", "hello wor", "x", "the cat sat on t", "12+3=", "zz top"]
PLAN = Plan(layers={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]})
# Logits closer than this count as tied: 100x the largest difference between a prompt's last logits computed
# alone and in a left-padded batch of PROMPTS, measured over all 16 families (1.2e-7, logits of magnitude ~0.4).
NEAR_TIE = 1e-5


@pytest.fixture(scope="module")
def mm(tiny_models) -> MoEModel:
    return load_model(tiny_models.checkpoint())


def task_spec(tmp_path, name, rows, **spec) -> TaskSpec:
    """A task with a test split of ``rows`` (the suite's one task writer), read back."""
    return TaskSpec.from_json(write_task(tmp_path / name, rows, **spec))


def greedy(mm: MoEModel, text: str, n: int) -> str:
    """The model's greedy continuation of one unpadded prompt (bos + text), computed step by step, ended by
    the end-of-sequence token and decoded without special tokens, as the harness decodes."""
    ids = [mm.tokenizer.bos_token_id] + mm.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = mm.model(torch.tensor([ids])).logits[0, -1]
            nxt = int(logits.argmax())
            # The harness decodes in padded batches, whose fp32 logits differ from these in the last bits; the tests
            # compare tokens exactly, which is sound only where the top two logits are further apart than that.
            # The models and prompts are fixed, so the gaps (smallest now 2.4e-5) are the same on every machine.
            first, second = logits.float().topk(2).values.tolist()
            assert first - second > NEAR_TIE, f"near-tie in the greedy reference of {text!r}: pick other prompts"
            if nxt == mm.tokenizer.eos_token_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return mm.tokenizer.decode(out, skip_special_tokens=True)


def sequence_logprob(mm: MoEModel, prompt: str, continuation: str) -> float:
    tok = mm.tokenizer
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(mm.model(torch.tensor([p + c])).logits[0].float(), -1)
    return float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c)))


def test_generation_exact_match_and_squad_against_unbatched_greedy(mm, tmp_path):
    answers = [greedy(mm, p, 4) for p in PROMPTS]
    rows = [{"q": p, "answer": a if i % 2 == 0 else a + "#"} for i, (p, a) in enumerate(zip(PROMPTS, answers))]
    spec = task_spec(tmp_path, "gen", rows, metric="exact_match", prompt_template="{q}", answer_field="answer",
                      target_prefix="", stop="", max_new_tokens=4)
    result = Evaluator(mm, batch_size=4).evaluate(spec)
    assert result.predictions == [a.strip() for a in answers]
    assert result.metrics == {"exact_match": pytest.approx(50.0)}  # every other reference was spoiled
    squad_rows = [{"q": p, "answers": {"text": [a.strip()], "answer_start": [0]}} for p, a in zip(PROMPTS, answers)]
    squad = task_spec(tmp_path, "sq", squad_rows, metric="squad", prompt_template="{q}", answer_field="answers",
                       stop="", max_new_tokens=4)
    scores = evaluate(mm, squad).metrics
    assert set(scores) == {"exact_match", "f1"} and scores["f1"] >= scores["exact_match"] > 0


def test_generation_stops_at_the_stop_string(mm, tmp_path):
    raw = greedy(mm, "ab", 6)
    stop = raw[2]  # a character the model produces third: the prediction must end before it
    spec = task_spec(tmp_path, "stop", [{"q": "ab", "answer": raw[:2]}], metric="exact_match",
                      prompt_template="{q}", answer_field="answer", target_prefix="", stop=stop, max_new_tokens=6)
    result = evaluate(mm, spec)
    assert result.predictions == [raw.split(stop)[0].strip()]


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen3_moe"])
def test_rows_that_stop_at_different_steps(model_type, tmp_path, tiny_models):
    """In one batch some rows produce the stop string at once and others never: every prediction must equal
    its own unbatched greedy continuation cut at the stop string."""
    mm = load_model(tiny_models.checkpoint(model_type))
    raw = [greedy(mm, p, 8) for p in PROMPTS]
    stop = min(raw, key=len)[0]  # a character some rows produce at once and others not at all
    assert any(stop in r[:4] for r in raw) and sum(stop not in r for r in raw) >= 2, "rows must stop apart"
    spec = task_spec(tmp_path, "early", [{"q": p, "answer": "x"} for p in PROMPTS], metric="exact_match",
                      prompt_template="{q}", answer_field="answer", target_prefix="", stop=stop, max_new_tokens=8)
    result = Evaluator(mm, batch_size=6).evaluate(spec)
    assert result.predictions == [r.split(stop)[0].strip() for r in raw]


@pytest.mark.parametrize("path", ["own", "generate"])
def test_generation_stops_at_the_generation_configs_end_of_sequence(path, tmp_path, monkeypatch, tiny_models):
    """An end-of-sequence id named only by the model's generation config (as instruct models do) ends an
    answer on both decoding paths."""
    mm = load_model(tiny_models.checkpoint())
    raw = greedy(mm, "hello wor", 6)
    ending = mm.tokenizer.convert_tokens_to_ids(raw[2])  # the model's third token: answers must end with it
    mm.model.generation_config.eos_token_id = [mm.tokenizer.eos_token_id, ending]
    if path == "generate":
        monkeypatch.setattr(Evaluator, "_cache_reusable", lambda self: False)
    spec = task_spec(tmp_path, "eos", [{"q": "hello wor", "answer": "x"}], metric="exact_match",
                      prompt_template="{q}", answer_field="answer", target_prefix="", stop="", max_new_tokens=6)
    # (kept in the text because this stand-in is an ordinary character; a real one is a special token)
    assert raw[3:].strip() and Evaluator(mm).evaluate(spec).predictions == [raw[:3].strip()]


def test_agreement_with_masked_vocabulary_entries_is_finite():
    """-inf log-probs (a vocabulary entry a model masks) give a finite KL, not NaN: 0 * -inf is avoided."""
    from core.evaluation.agreement import Agreement as _Agreement, Reference as _Reference

    logits = torch.tensor([[2.0, 1.0, float("-inf")], [0.5, float("-inf"), 0.1]])
    full = _Reference.of(torch.log_softmax(logits, -1))
    tally = _Agreement()
    tally.add(full, torch.log_softmax(logits.flip(-1), -1))
    kl = tally.result()["mean_kl"]
    assert kl == kl and kl > 0  # not NaN; finite where both sides mask the same entry
    same = _Agreement()
    same.add(full, torch.log_softmax(logits, -1))
    assert same.result() == {"top1_agreement": 1.0, "mean_kl": pytest.approx(0.0, abs=1e-3)}


def test_agreement_tally_matches_per_position_definition():
    """Top-1 agreement and mean KL(full || pruned), summed over several texts, equal their per-position
    definitions computed directly (the tally keeps only sums, so a wrong sum or sign shows here)."""
    from core.evaluation.agreement import Agreement as _Agreement, Reference as _Reference

    gen = torch.Generator().manual_seed(0)
    tally, agree, kl, n = _Agreement(), 0.0, 0.0, 0
    for length in (7, 1, 30):
        full = torch.log_softmax(torch.randn(length, 50, generator=gen) * 3, -1)
        # a pruned model near the full one, so that some positions agree and some do not
        pruned = torch.log_softmax(full + torch.randn(length, 50, generator=gen), -1)
        tally.add(_Reference.of(full), pruned)
        agree += float((pruned.argmax(-1) == full.argmax(-1)).sum())
        kl += float((full.exp() * (full - pruned)).sum())
        n += length
    result = tally.result()
    assert 0 < agree < n
    assert result["top1_agreement"] == pytest.approx(agree / n)
    assert result["mean_kl"] == pytest.approx(kl / n, rel=2e-3)  # P is kept in fp16


def test_lm_loss_matches_direct_computation(mm, tmp_path):
    texts = ["hello world", "a", "the quick brown fox jumps"]
    spec = task_spec(tmp_path, "lm", [{"text": t} for t in texts], metric="lm_loss", text_field="text")
    result = Evaluator(mm, batch_size=2).evaluate(spec)
    total = sum(-sequence_logprob(mm, "", t) for t in texts)
    n = sum(len(t) for t in texts)  # character tokenizer: one token per character
    assert result.metrics["nll"] == pytest.approx(total / n, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(torch.tensor(total / n).exp().item(), rel=1e-5)


def test_multiple_choice_matches_direct_loglikelihood(mm, tmp_path):
    rows = []
    for i, p in enumerate(PROMPTS):
        options = ["cat", "dog!", "x", "zebra"]
        scores = [sequence_logprob(mm, p, " " + o) for o in options]
        best = max(range(4), key=lambda k: scores[k])
        rows.append({"q": p, "options": options, "label": best if i < 4 else (best + 1) % 4})
    spec = task_spec(tmp_path, "mc", rows, metric="multiple_choice", prompt_template="{q}", options_field="options",
                      answer_field="label")
    assert evaluate(mm, spec).metrics["accuracy"] == pytest.approx(100 * 4 / 6)


def test_agreement_and_cost_of_plans(mm, tmp_path):
    spec = task_spec(tmp_path, "lm", [{"text": t} for t in PROMPTS], metric="lm_loss", text_field="text")
    ev = Evaluator(mm)
    full = ev.evaluate(spec)
    assert full.agreement == {} and full.plan_digest is None
    same = ev.evaluate(spec, plan=Plan(layers={0: list(range(8))}))
    assert same.agreement["top1_agreement"] == 1.0 and same.agreement["mean_kl"] == pytest.approx(0, abs=1e-3)
    assert same.metrics["nll"] == pytest.approx(full.metrics["nll"], rel=1e-6)
    pruned = ev.evaluate(spec, plan=PLAN)
    assert pruned.agreement["top1_agreement"] < 1.0 and pruned.agreement["mean_kl"] > 0  # near-uniform tiny model
    assert pruned.metrics["nll"] != full.metrics["nll"]
    # the unpruned reference is cached: a fresh evaluator gives the same numbers
    assert Evaluator(mm).evaluate(spec, plan=PLAN).agreement == pruned.agreement
    assert ev.evaluate(spec, plan=PLAN) is pruned  # results cached by plan digest
    assert pruned.cost["total_params"] < full.cost["total_params"]
    assert pruned.cost["tokens_per_s"] > 0


def test_plan_cost_by_hand(mm):
    info = mm.info()
    per_expert = info.expert_params / (2 * 8)  # two MoE layers of 8 experts
    cost = plan_cost(mm, Plan(layers={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, top_k=1))
    assert cost["total_params"] == pytest.approx(info.total_params - 8 * per_expert)
    assert cost["active_params"] == pytest.approx(info.total_params - info.expert_params + 2 * per_expert)
    assert cost["weight_bytes"] == pytest.approx(cost["total_params"] * 4)
    assert plan_cost(mm, None)["active_params"] == info.active_params


@pytest.mark.parametrize("kind", ["lm", "mc", "gen"])
def test_agreement_is_the_same_with_or_without_the_cached_reference(mm, tmp_path, monkeypatch, kind):
    import core.evaluation.reference as evaluation

    if kind == "lm":
        spec = task_spec(tmp_path, "lm", [{"text": t} for t in PROMPTS], metric="lm_loss", text_field="text")
    elif kind == "gen":  # agreement from the generation's prompt pass, or from a pass of its own
        spec = gen_task(tmp_path)
    else:
        rows = [{"q": p, "options": ["cat", "dog!", "x"], "label": i % 3} for i, p in enumerate(PROMPTS)]
        spec = task_spec(tmp_path, "mc", rows, metric="multiple_choice", prompt_template="{q}",
                          options_field="options", answer_field="label")
    cached = Evaluator(mm, batch_size=4).evaluate(spec, plan=PLAN)  # agreement from the scoring forward
    monkeypatch.setattr(evaluation, "_FULL_CACHE_BYTES", 0)  # too big to cache: separate passes, batch by batch
    separate = Evaluator(mm, batch_size=3).evaluate(spec, plan=PLAN)
    # the two paths batch differently (4 and 3 sequences), and multiple choice and generation continue on the
    # prompt's KV cache in the cached path but run whole sequences in the separate one: the same log-probs to
    # fp32 rounding, which can shift a mean KL by ~1e-7 (so abs 1e-6 for every kind, not exact)
    assert separate.agreement == pytest.approx(cached.agreement, rel=1e-6, abs=1e-6)
    assert separate.metrics == pytest.approx(cached.metrics, rel=1e-6)


def gen_task(tmp_path) -> TaskSpec:
    """Exact-match generation on PROMPTS (references need not match: the tests compare two paths)."""
    rows = [{"q": p, "answer": p[::-1][:3]} for p in PROMPTS]
    return task_spec(tmp_path, "gen", rows, metric="exact_match", prompt_template="{q}", answer_field="answer",
                      target_prefix=" ", stop="", max_new_tokens=5)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_generation_on_the_prompt_cache_equals_generate(model_type, tmp_path, monkeypatch, tiny_models):
    """Greedy decoding runs on the cache of one prompt pass that also gives the agreement (the reference
    answer teacher-forced on that cache, then cropped off); predictions must equal ``model.generate``'s and
    agreement a separate teacher-forced pass's, in every family where the cache allows it."""
    mm = load_model(tiny_models.checkpoint(model_type))
    spec = gen_task(tmp_path)  # no stop string: five tokens each, so every decoding step counts
    # processors a generation config names are not applied: both paths decode pure greedy
    mm.model.generation_config.repetition_penalty = 5.0
    mm.model.generation_config.no_repeat_ngram_size = 1
    plan = Plan(layers={layer: list(range(mm.top_k, mm.n_experts)) for layer in mm.layer_indices})
    calls = []
    monkeypatch.setattr(Evaluator, "_greedy", _spy(Evaluator._greedy, calls))
    own = Evaluator(mm, batch_size=4).evaluate(spec, plan=plan)
    monkeypatch.setattr(Evaluator, "_cache_reusable", lambda self: False)
    generate = Evaluator(mm, batch_size=4).evaluate(spec, plan=plan)
    assert calls or model_type != "mixtral"  # windowed and hybrid models decode with generate
    assert own.predictions == generate.predictions
    assert own.agreement == pytest.approx(generate.agreement, rel=1e-4, abs=1e-6)
    assert mm.model.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_scoring_batches_keep_to_the_token_budget(mm, tmp_path):
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4]
    ev = Evaluator(mm, batch_size=3, token_budget=12)
    batches = ev._batches([[0] * n for n in lengths])
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 12)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)  # little padding: sorted by length
    spec = task_spec(tmp_path, "lm", [{"text": t} for t in PROMPTS], metric="lm_loss", text_field="text")
    small = Evaluator(mm, token_budget=1).evaluate(spec, plan=PLAN)  # one sequence per forward
    large = Evaluator(mm, token_budget=10**6).evaluate(spec, plan=PLAN)
    assert small.metrics == pytest.approx(large.metrics, rel=1e-6)
    assert small.agreement == pytest.approx(large.agreement, rel=1e-5, abs=1e-7)  # fp32 rounding of a tiny KL


@pytest.mark.parametrize("model_type", [pytest.param(m, marks=pytest.mark.slow) if m == "qwen3_next" else m
                                        for m in sorted(FAMILIES)])  # qwen3_next: reference linear attention
def test_options_scored_on_a_shared_prompt_cache_equal_whole_sequences(model_type, tmp_path, monkeypatch,
                                                                       tiny_models):
    """Multiple choice runs each prompt once and repeats its KV cache per option; scores and agreement must
    equal scoring every prompt + option sequence whole, in every family (where the cache allows it)."""
    mm = load_model(tiny_models.checkpoint(model_type))
    rows = [{"q": p, "options": ["cat", "dog!", "x y", "zebra"], "label": i % 4} for i, p in enumerate(PROMPTS)]
    spec = task_spec(tmp_path, "mc", rows, metric="multiple_choice", prompt_template="{q}",
                      options_field="options", answer_field="label")
    plan = Plan(layers={layer: list(range(mm.top_k, mm.n_experts)) for layer in mm.layer_indices})
    shared = Evaluator(mm, batch_size=4)
    calls = []
    monkeypatch.setattr(Evaluator, "_score_options", _spy(Evaluator._score_options, calls))
    fast = shared.evaluate(spec, plan=plan)
    monkeypatch.setattr(Evaluator, "_shares_prompts", lambda self, examples: False)
    whole = Evaluator(mm, batch_size=4).evaluate(spec, plan=plan)
    assert calls or model_type != "mixtral"  # windowed and hybrid models take the whole-sequence path
    assert fast.metrics == pytest.approx(whole.metrics)
    assert fast.agreement == pytest.approx(whole.agreement, rel=1e-4, abs=1e-6)



def test_option_log_likelihoods_on_the_shared_prompt_cache(mm, tmp_path):
    """Each option's log-likelihood, with the prompt pass computing logits at every position (agreement
    wanted) or at each prompt's last position only, against a direct whole-sequence computation."""
    options = ["cat", "dog!", "x", "zebra"]
    rows = [{"q": p, "options": options, "label": 0} for p in PROMPTS]
    spec = task_spec(tmp_path, "mc", rows, metric="multiple_choice", prompt_template="{q}", options_field="options",
                      answer_field="label")
    ev = Evaluator(mm, batch_size=8)
    examples = ev._prepare(spec, "test", None)
    direct = [sequence_logprob(mm, p, " " + o) for p in PROMPTS for o in options]
    with torch.inference_mode():
        last_only = ev._score_options(examples, lambda *_: None, None, None)
        ev._keeps_last_logits = lambda: False
        every = ev._score_options(examples, lambda *_: None, None, None)
    assert last_only == pytest.approx(direct, rel=1e-4) and every == pytest.approx(direct, rel=1e-4)


def _spy(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper
