"""The core engine on a tiny random model of every supported family (and non-default layouts):
recording equals the routers' own decisions, masking equals physical pruning, and undoing is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from core.adapters import supported_families
from core.export import export_pruned
from core.masking import masked
from core.model import MoEModel
from core.plan import Plan
from core.profile_writer import ProfileWriter
from core.recorder import RouterRecorder
from core.routing_profile import Profile, ProfileMeta, list_matrix

from .tiny_models import FAMILIES, LAYOUTS, ids

# Compares floating-point results of different computations (kernels, batchings, masking and export):
# .ci/run runs these again with OMP_NUM_THREADS=1.
pytestmark = pytest.mark.numeric

CASES = [(mt, None) for mt in FAMILIES] + [(LAYOUTS[name][0], name) for name in LAYOUTS]
CASE_IDS = [name or mt for mt, name in CASES]
KEEP = [0, 2, 5, 7]  # two per group of four, so grouped routing stays balanced


def make(models, model_type: str, layout: str | None, dtype=torch.float32) -> MoEModel:
    """A fresh copy of the session's tiny model (see conftest.TinyModels)."""
    model = models.layout(layout) if layout else models.model(model_type)
    model = model.to(dtype)
    return MoEModel(model, source=f"tiny-{layout or model_type}")


def half_plan(mm: MoEModel, top_k: int | None = None) -> Plan:
    return Plan(layers={i: KEEP for i in mm.layer_indices}, top_k=top_k)


def record(mm: MoEModel, tmp_path, input_ids, attention_mask=None, name="p") -> Profile:
    meta = ProfileMeta(model=mm.source, weights_digest=mm.weights_digest(), family=mm.adapter.family,
                       layers=mm.layer_indices, n_experts=mm.n_experts, top_k=mm.effective_top_k)
    path = tmp_path / f"{name}.parquet"
    with ProfileWriter(path, meta) as writer, RouterRecorder(mm, writer) as rec, torch.no_grad():
        with rec.batch("t", list(range(input_ids.shape[0]))):
            mm.model(input_ids=input_ids, attention_mask=attention_mask)
    return Profile(path)


def independent_decisions(mm: MoEModel, layer, output, top_k: int):
    """The router's own top-k ids and applied weights, read without the adapter."""
    kind = mm.adapter.router_output
    if kind == "decisions":
        return output[2], output[1]
    if kind == "scores":  # Llama4: scores are sigmoid of the chosen logits, zero elsewhere
        scores = output[0]
        top = torch.topk(scores, top_k, dim=-1)
        return top.indices, top.values
    probs = torch.softmax(output, dim=-1)  # DBRX routes in the block: softmax, top-k, p-normalise
    top = torch.topk(probs, top_k, dim=-1)
    return top.indices, top.values / top.values.norm(p=1, dim=-1, keepdim=True)


@pytest.mark.parametrize("model_type,layout", CASES, ids=CASE_IDS)
def test_recording_equals_router_outputs(model_type, layout, tmp_path, tiny_models):
    mm = make(tiny_models, model_type, layout)
    if layout:
        assert len(mm.layer_indices) < len(mm.adapter.decoder_layers(mm.model)) or "group" in layout
    input_ids = ids(2, 10)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding on the second example must not be recorded
    raw: dict[int, object] = {}
    handles = [layer.router.register_forward_hook(lambda m, a, o, i=layer.index: raw.__setitem__(i, o))
               for layer in mm.layers]
    prof = record(mm, tmp_path, input_ids, mask)
    for h in handles:
        h.remove()
    table = prof.table()
    assert table.num_rows == len(mm.layers) * int(mask.sum())
    valid = mask.reshape(-1).bool()
    for layer in mm.layers:
        rows = table.filter(np.asarray(table.column("layer")) == layer.index)
        got_ids = list_matrix(rows.column("experts"), mm.top_k)
        got_w = list_matrix(rows.column("weights"), mm.top_k)
        exp_ids, exp_w = independent_decisions(mm, layer, raw[layer.index], mm.top_k)
        exp_ids, exp_w = exp_ids[valid].numpy(), exp_w[valid].float().numpy()
        order = np.argsort(-exp_w, axis=1, kind="stable")
        np.testing.assert_array_equal(got_ids, np.take_along_axis(exp_ids, order, 1))
        np.testing.assert_allclose(got_w, np.take_along_axis(exp_w, order, 1), rtol=1e-6, atol=1e-7)
    positions = table.filter(np.asarray(table.column("layer")) == mm.layer_indices[0]).column("position")
    assert positions.to_pylist() == list(range(10)) + list(range(7))


def choose_from_logits(mm: MoEModel, logits: torch.Tensor) -> torch.Tensor:
    """Top-k choice recomputed from raw router logits: plain top-k, or group-limited for grouped routing
    (DeepSeek-V2 scores a group by its best softmax score, V3 by the sum of its two best sigmoid scores)."""
    groups, k = mm.adapter.n_groups(mm.config), mm.top_k
    if groups == 1:
        return torch.topk(logits, k, dim=-1).indices
    sigmoid = mm.adapter.scoring == "sigmoid"
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    per_group = scores.view(len(scores), groups, -1)
    group_score = per_group.topk(2, dim=-1).values.sum(-1) if sigmoid else per_group.max(-1).values
    chosen = group_score.topk(mm.config.topk_group, dim=-1).indices
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, chosen, True)
    allowed = allowed.repeat_interleave(per_group.shape[-1], dim=1)
    return torch.topk(scores.masked_fill(~allowed, -1.0), k, dim=-1).indices


@pytest.mark.parametrize("model_type,layout", CASES, ids=CASE_IDS)
def test_counts_match_output_router_logits(model_type, layout, tmp_path, tiny_models):
    mm = make(tiny_models, model_type, layout)
    input_ids = ids(3, 9, seed=1)
    prof = record(mm, tmp_path, input_ids)
    with torch.no_grad():
        logits = mm.model(input_ids=input_ids, output_router_logits=True).router_logits
    assert len(logits) == len(mm.layers)
    usage = {}
    for batch in prof.batches():
        for layer, experts in zip(batch.column("layer").to_pylist(), batch.column("experts").to_pylist()):
            usage.setdefault(layer, np.zeros(mm.n_experts, int))
            np.add.at(usage[layer], experts, 1)
    for layer, layer_logits in zip(mm.layers, logits):
        top = choose_from_logits(mm, layer_logits.float())
        expected = np.bincount(top.reshape(-1).numpy(), minlength=mm.n_experts)
        np.testing.assert_array_equal(usage[layer.index], expected)


@pytest.mark.parametrize("model_type,layout", CASES, ids=CASE_IDS)
def test_masking_matches_export_and_undoes_exactly(model_type, layout, tmp_path, tiny_models):
    mm = make(tiny_models, model_type, layout)
    input_ids = ids(2, 12, seed=2)
    with torch.no_grad():
        before = mm.model(input_ids=input_ids).logits.clone()
    plan = half_plan(mm)
    with masked(mm, plan):
        prof = record(mm, tmp_path, input_ids, name="masked")
        with torch.no_grad():
            masked_logits = mm.model(input_ids=input_ids).logits.clone()
    used = np.unique(list_matrix(prof.table().column("experts"), mm.top_k))
    assert set(used.tolist()) <= set(KEEP)
    assert not torch.equal(masked_logits, before)
    with torch.no_grad():
        after = mm.model(input_ids=input_ids).logits
    assert torch.equal(after, before), "outputs after masking must be bit-identical to before"

    out = export_pruned(mm, plan, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert MoEModel(reloaded).n_experts == len(KEEP)
    with torch.no_grad():
        exported_logits = reloaded(input_ids=input_ids).logits
    assert (exported_logits - masked_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", [m for m in FAMILIES if m != "phimoe"])
def test_top_k_change_takes_effect_and_survives_export(model_type, tmp_path, tiny_models):
    mm = make(tiny_models, model_type, None)
    input_ids = ids(2, 8, seed=3)
    plan = half_plan(mm, top_k=1)
    with masked(mm, plan):
        prof = record(mm, tmp_path, input_ids)
        with torch.no_grad():
            masked_logits = mm.model(input_ids=input_ids).logits.clone()
    assert prof.table().column("experts").to_pylist()[0].__len__() == 1
    out = export_pruned(mm, plan, tmp_path / "top1")
    reloaded = MoEModel(AutoModelForCausalLM.from_pretrained(out).eval())
    assert reloaded.top_k == 1
    with torch.no_grad():
        assert (reloaded.model(input_ids=input_ids).logits - masked_logits).abs().max().item() <= 1e-5


def test_every_family_is_covered():
    from transformers import AutoConfig

    from core.adapters import adapter_for_config

    covered = {adapter_for_config(AutoConfig.for_model(mt)).family for mt in FAMILIES}
    assert covered == set(supported_families())
    assert len(covered) == 16


def test_bf16_model_masks_and_records(tmp_path, tiny_models):
    mm = make(tiny_models, "mixtral", None, dtype=torch.bfloat16)
    input_ids = ids(2, 8)
    with torch.no_grad():
        before = mm.model(input_ids=input_ids).logits.clone()
    with masked(mm, half_plan(mm)):
        prof = record(mm, tmp_path, input_ids)
    assert set(np.unique(list_matrix(prof.table().column("experts"), 2)).tolist()) <= set(KEEP)
    with torch.no_grad():
        assert torch.equal(mm.model(input_ids=input_ids).logits, before)
    assert mm.info().dtype == "bfloat16"


@pytest.mark.parametrize("model_type", ["mixtral", "llama4_text", "dbrx", "deepseek_v3"])
def test_generate_records_prefill_and_decode(model_type, tmp_path, tiny_models):
    mm = make(tiny_models, model_type, None)
    input_ids = ids(2, 6, seed=4)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    meta = ProfileMeta(model="t", weights_digest="", family="", layers=mm.layer_indices, n_experts=8, top_k=2)
    path = tmp_path / "gen.parquet"
    with ProfileWriter(path, meta) as writer, RouterRecorder(mm, writer) as rec, torch.no_grad():
        with rec.batch("gen", [10, 11]):
            out = mm.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)
    df = Profile(path).to_pandas()
    first = df[df.layer == mm.layer_indices[0]]
    prompt = first[first.step == 0]
    assert sorted(prompt.groupby("example").size().tolist()) == [4, 6]
    # decode steps 1 and 2 feed back the generated tokens (the third is produced, never fed)
    decode = first[first.step > 0].sort_values(["example", "step"])
    assert decode.step.tolist() == [1, 2, 1, 2]
    ex10 = decode[decode.example == 10]
    assert ex10.position.tolist() == [4, 5]
    assert ex10.token_id.tolist() == out[0, 6:8].tolist()
