"""Pruning methods: every method returns a valid plan meeting its target, and known-answer cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import MoEScopeError
from core.methods import Calibration, Target, make_method
from core.methods.base import top_experts
from core.model import MoEModel
from core.plan import Plan, validate_plan
from core.tasks import TaskSpec

from .tiny_models import build, build_layout, char_tokenizer, write_lm_task

DEAD = [5, 6, 7]
TEXTS = ["the cat sat on the mat", "hello world again", "def f(x): return x + 1", "12+34=46", "abc abc abc"]


def lm_task(tmp_path) -> Calibration:
    return Calibration(TaskSpec.from_json(write_lm_task(tmp_path / "lm", TEXTS)))


def with_dead_experts(model_type: str = "gpt_oss") -> MoEModel:
    """A tiny model whose router never picks experts 5, 6, 7 (router bias -100)."""
    model = build(model_type)
    for layer in MoEModel(model).layers:
        layer.router.bias.data[DEAD] = -100.0
    return MoEModel(model, tokenizer=char_tokenizer(), source="tiny-dead")


def test_target_resolution():
    mm = MoEModel(build("mixtral"))
    assert Target(ratio=0.5).experts_kept(mm) == 4
    assert Target(keep=1).experts_kept(mm) == 2  # never fewer than top-k
    assert Target(keep=1, top_k=1).experts_kept(mm) == 1
    grouped = MoEModel(build_layout("deepseek_v3-grouped-dense-first"))
    assert Target(ratio=0.7).experts_kept(grouped) == 4  # rounded up to a multiple of the 2 groups
    with pytest.raises(MoEScopeError, match="exactly one of keep"):
        Target(keep=2, ratio=0.5)
    with pytest.raises(MoEScopeError, match="below 1"):
        Target(ratio=1.0)


def test_top_experts_balances_groups_and_breaks_ties_by_id():
    scores = np.array([5, 1, 1, 0, 9, 8, 7, 6], float)
    assert top_experts(scores, 4) == [4, 5, 6, 7]
    assert top_experts(scores, 5) == [0, 4, 5, 6, 7]
    assert top_experts(np.array([1, 1, 1, 0], float), 2) == [0, 1]
    assert top_experts(scores, 4, groups=2) == [0, 1, 4, 5]


@pytest.mark.parametrize("method", ["frequency", "soft_activation"])
def test_usage_methods_prune_exactly_the_dead_experts(method, tmp_path):
    mm = with_dead_experts()
    plan = make_method(method).plan(mm, lm_task(tmp_path), Target(keep=5))
    assert all(keep == [0, 1, 2, 3, 4] for keep in plan.layers.values())
    scores = plan.extra["scores"]
    assert all(scores[str(layer)][e] == 0 for layer in mm.layer_indices for e in DEAD)
    assert plan.extra["method"] == method and plan.extra["calibration"]["digest"]
    assert plan.extra["forward_passes"] == len(TEXTS)
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.layers == plan.layers and again.extra == plan.extra


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "dbrx", "llama4_text"])
@pytest.mark.parametrize("method", ["random", "frequency", "soft_activation", "top_k", "reap", "naee"])
def test_every_method_meets_its_target_on_several_families(method, model_type, tmp_path, tiny_models):
    mm = MoEModel(tiny_models.model(model_type), tokenizer=char_tokenizer())
    if method == "reap" and model_type == "llama4_text":
        with pytest.raises(MoEScopeError, match="REAP does not support"):
            make_method(method).plan(mm, lm_task(tmp_path), Target(ratio=0.5, top_k=1))
        return
    plan = make_method(method).plan(mm, lm_task(tmp_path), Target(ratio=0.5, top_k=1))
    validate_plan(plan, mm.routing_spec(), for_export=True)
    assert plan.top_k == 1
    if method == "top_k":
        assert plan.layers == {}
    else:
        assert sorted(plan.layers) == mm.layer_indices and all(len(k) == 4 for k in plan.layers.values())


def test_random_is_seeded_and_group_balanced():
    mm = MoEModel(build_layout("deepseek_v3-grouped-dense-first"))
    a = make_method("random", seed=1).plan(mm, None, Target(keep=4))
    assert a.layers == make_method("random", seed=1).plan(mm, None, Target(keep=4)).layers
    assert any(make_method("random", seed=s).plan(mm, None, Target(keep=4)).layers != a.layers for s in range(2, 6))
    validate_plan(a, mm.routing_spec(), for_export=True)
    assert a.extra["seed"] == 1


def test_unknown_method():
    with pytest.raises(MoEScopeError, match="Unknown pruning method 'magic'"):
        make_method("magic")
