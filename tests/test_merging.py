"""EEP merging in masking and export: one-hot matrices reproduce pruning exactly, real-valued ones export to a
plain checkpoint that reproduces the in-memory model, and undoing restores the weights bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.errors import MoEScopeError
from core.export import export_pruned
from core.masking import masked
from core.model import MoEModel
from core.plan import Plan, validate_plan

from .tiny_models import ids

# Compares floating-point results of different computations (kernels, batchings, masking and export):
# .ci/run runs these again with OMP_NUM_THREADS=1.
pytestmark = pytest.mark.numeric

KEEP = [0, 2, 5, 7]
FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss", "dbrx", "ernie4_5_moe", "llama4_text", "deepseek_v3"]


def one_hot(keep, n=8) -> list[list[float]]:
    return [[1.0 if i == e else 0.0 for i in range(n)] for e in keep]


def merge_plan(mm: MoEModel, router, experts, top_k=None) -> Plan:
    layers = {i: KEEP for i in mm.layer_indices}
    merge = {str(i): {"router": router, "experts": experts} for i in mm.layer_indices}
    return Plan(layers=layers, top_k=top_k, extra={"merge": merge})


def random_matrices(seed: int) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor(one_hot(KEEP))
    noise = lambda: (torch.randn(4, 8, generator=gen) * 0.2 * (torch.rand(4, 8, generator=gen) < 0.5))
    return (base + noise()).tolist(), (base + noise()).tolist()


def logits(mm, x, plan=None):
    with masked(mm, plan), torch.no_grad():
        return mm.model(input_ids=x).logits.clone()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_hot_merging_reproduces_pruning_exactly(model_type, tiny_models):
    mm = MoEModel(tiny_models.model(model_type))
    x = ids(2, 10, seed=5)
    pruned = logits(mm, x, Plan(layers={i: KEEP for i in mm.layer_indices}))
    merged = logits(mm, x, merge_plan(mm, one_hot(KEEP), one_hot(KEEP)))
    assert torch.equal(merged, pruned)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merged_export_matches_in_memory_and_undo_is_exact(model_type, tmp_path, tiny_models):
    mm = MoEModel(tiny_models.model(model_type))
    x = ids(2, 10, seed=6)
    before = logits(mm, x)
    weights = {k: v.clone() for k, v in mm.model.state_dict().items()}
    router, experts = random_matrices(1)
    plan = merge_plan(mm, router, experts, top_k=1 if model_type != "phimoe" else None)
    in_memory = logits(mm, x, plan)
    assert not torch.allclose(in_memory, logits(mm, x, Plan(layers=plan.layers, top_k=plan.top_k)))
    assert torch.equal(logits(mm, x), before)
    assert all(torch.equal(v, weights[k]) for k, v in mm.model.state_dict().items())
    out = export_pruned(mm, plan, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        exported = reloaded(input_ids=x).logits
    assert (exported - in_memory).abs().max().item() <= 1e-4


def test_grouped_routing_merge_round_trips(tmp_path, tiny_models):
    mm = MoEModel(tiny_models.layout("deepseek_v3-grouped-dense-first"))
    x = ids(2, 8, seed=7)
    router, experts = random_matrices(2)
    plan = merge_plan(mm, router, experts)
    validate_plan(plan, mm.routing_spec(), for_export=True)
    in_memory = logits(mm, x, plan)
    reloaded = AutoModelForCausalLM.from_pretrained(export_pruned(mm, plan, tmp_path / "g")).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - in_memory).abs().max().item() <= 1e-4


def test_bad_merge_matrices_are_refused(tiny_models):
    mm = MoEModel(tiny_models.model("mixtral"))
    wrong = Plan(layers={0: KEEP}, extra={"merge": {"0": {"router": one_hot([0, 2, 5]), "experts": one_hot(KEEP)}}})
    with pytest.raises(MoEScopeError, match=r"must be \[4 kept, 8 experts\]"):
        validate_plan(wrong, mm.routing_spec())
    nan = one_hot(KEEP)
    nan[0][0] = float("nan")
    with pytest.raises(MoEScopeError, match="non-finite"):
        validate_plan(Plan(layers={0: KEEP}, extra={"merge": {"0": {"router": nan, "experts": one_hot(KEEP)}}}),
                      mm.routing_spec())
    a = merge_plan(mm, *random_matrices(1))
    b = merge_plan(mm, *random_matrices(2))
    assert a.digest() != b.digest()  # result caches tell merges apart
