"""Models larger than memory (issue 14, item 2): a tiny model with its last decoder layer offloaded to disk by
accelerate. Profiling it (no plan) records what the resident model records; its routers' digest is read from the
shards. Masking and merging an offloaded layer read the router and expert tensors that accelerate keeps off the
module (its hook's weights map) and equal the resident model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.masking import masked
from core.model import MoEModel
from core.plan import Plan
from core.profiling import profile_texts
from core.routing_profile import Profile

from .test_streaming_export import KEEP, merge_plan, offloaded, save_checkpoint
from .tiny_models import char_tokenizer, ids

pytestmark = pytest.mark.numeric
TEXTS = {"prose": ["the cat sat on the mat", "a quick brown fox jumps", "seven sleepy seals"]}


def resident_and_offloaded(tmp_path, models, model_type: str) -> tuple[MoEModel, MoEModel]:
    model = models.model(model_type)
    src = save_checkpoint(model, tmp_path / "src")
    resident = MoEModel(AutoModelForCausalLM.from_pretrained(src).eval(), char_tokenizer(), source=str(src))
    off = MoEModel(offloaded(src, model, tmp_path / "offload"), char_tokenizer(), source=str(src))
    assert any(t.device.type == "meta" for t in off.layers[-1].router.state_dict().values())
    return resident, off


def logits(mm: MoEModel, plan: Plan | None) -> torch.Tensor:
    with masked(mm, plan), torch.no_grad():
        return mm.model(input_ids=ids(2, 10, seed=8)).logits.float()


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_profiling_an_offloaded_model_records_what_the_resident_one_does(model_type, tmp_path, tiny_models):
    resident, off = resident_and_offloaded(tmp_path, tiny_models, model_type)
    assert torch.equal(logits(off, None), logits(resident, None))
    a = Profile(profile_texts(resident, TEXTS, tmp_path / "resident.parquet", progress=False)).to_pandas()
    b = Profile(profile_texts(off, TEXTS, tmp_path / "offloaded.parquet", progress=False)).to_pandas()
    assert a["experts"].map(list).tolist() == b["experts"].map(list).tolist()
    assert Profile(tmp_path / "offloaded.parquet").meta.weights_digest == resident.weights_digest()


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_masking_an_offloaded_layer_equals_resident(model_type, tmp_path, tiny_models):
    resident, off = resident_and_offloaded(tmp_path, tiny_models, model_type)
    plan = Plan(layers={i: KEEP for i in resident.layer_indices}, top_k=1)
    assert (logits(off, plan) - logits(resident, plan)).abs().max().item() <= 1e-5
    assert torch.equal(logits(off, None), logits(resident, None))  # undone exactly


def test_merging_an_offloaded_layer_equals_resident(tmp_path, tiny_models):
    resident, off = resident_and_offloaded(tmp_path, tiny_models, "mixtral")
    plan = merge_plan(resident.layer_indices, seed=9)
    assert (logits(off, plan) - logits(resident, plan)).abs().max().item() <= 1e-4
    assert torch.equal(logits(off, None), logits(resident, None))


def test_evaluating_an_offloaded_model_under_a_plan_equals_resident(tmp_path, tiny_models):
    """The evaluation harness (greedy generation, exact match, teacher-forced loss) gives the resident model's
    predictions and scores when a layer is offloaded to disk, with and without a plan. Without a plan the logits
    are equal bit for bit (same weights, same operations: test above), so predictions and scores are too. Under a
    plan they agree to 1e-5, so a greedy step may flip only where two logits tie that closely: at most one of the
    four answers is allowed to differ; the loss is compared with the 1e-5 tolerance."""
    from core.evaluation import Evaluator
    from core.task_spec import TaskSpec

    from .tiny_models import write_task

    resident, off = resident_and_offloaded(tmp_path, tiny_models, "mixtral")
    prompts = ["ab", "hello wor", "the cat sat on t", "12+3="]
    gen = TaskSpec.from_json(write_task(tmp_path / "gen", [{"q": p, "answer": "x"} for p in prompts],
                                        metric="exact_match", prompt_template="{q}", answer_field="answer",
                                        target_prefix="", stop="", max_new_tokens=5))
    loss = TaskSpec.from_json(write_task(tmp_path / "lm", [{"text": t} for t in TEXTS["prose"]], metric="lm_loss",
                                         text_field="text"))
    plan = Plan(layers={i: KEEP for i in resident.layer_indices}, top_k=1)
    for p in (None, plan):
        a = Evaluator(resident, batch_size=2).evaluate(gen, plan=p, agreement=False)
        b = Evaluator(off, batch_size=2).evaluate(gen, plan=p, agreement=False)
        if p is None:
            assert a.predictions == b.predictions and a.metrics == b.metrics
        else:
            assert sum(x != y for x, y in zip(a.predictions, b.predictions)) <= 1
        a = Evaluator(resident, batch_size=2).evaluate(loss, plan=p, agreement=False).metrics
        b = Evaluator(off, batch_size=2).evaluate(loss, plan=p, agreement=False).metrics
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a)
