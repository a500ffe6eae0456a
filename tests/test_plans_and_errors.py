"""Plans round-trip and validate; bad input fails with one clear sentence and leaves nothing half-written;
concurrent evaluations of different plans on one model each get their own result."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from core.adapters import adapter_for_config
from core.errors import MoEScopeError
from core.export import export_pruned
from core.masking import masked
from core.model import MoEModel, load_model
from core.plan import Plan, validate_plan

from .tiny_models import build, build_layout, ids


@pytest.fixture(scope="module")
def mixtral() -> MoEModel:
    return MoEModel(build("mixtral"), source="tiny-mixtral")


def test_plan_json_round_trip_keeps_extra_fields(tmp_path):
    plan = Plan(layers={1: [3, 1], 0: [0, 2]}, top_k=1, model="m", extra={"method": "frequency", "scores": [1.5]})
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == "moescope-plan" and data["version"] == 1
    assert data["layers"] == {"0": {"keep": [0, 2]}, "1": {"keep": [3, 1]}}
    again = Plan.load(path)
    assert again.layers == plan.layers and again.top_k == 1 and again.extra["method"] == "frequency"
    assert again.digest() == plan.digest()
    assert Plan(layers={0: [2, 0], 1: [1, 3]}, top_k=1).digest() == plan.digest()  # order of ids is irrelevant
    assert Plan(layers={0: [0, 2], 1: [1, 3]}, top_k=2).digest() != plan.digest()


@pytest.mark.parametrize("layers,top_k,message", [
    ({5: [0, 1]}, None, "Layer 5 is not a MoE layer"),
    ({0: [0, 8]}, None, "out of range"),
    ({0: [1, 1, 2]}, None, "more than once"),
    ({0: [3]}, None, "keep at least 2"),
    ({0: [0, 1, 2]}, 4, "keep at least 4"),
    ({0: [0, 1]}, 9, "top_k 9 is out of range"),
])
def test_invalid_plans_are_rejected_with_what_to_change(mixtral, layers, top_k, message):
    with pytest.raises(MoEScopeError, match=message):
        with masked(mixtral, Plan(layers=layers, top_k=top_k)):
            pass


def test_uneven_counts_mask_but_do_not_export(mixtral, tmp_path):
    plan = Plan(layers={0: [0, 1, 2], 1: [0, 1, 2, 3]})
    with masked(mixtral, plan):  # masking can simulate uneven layers
        pass
    with pytest.raises(MoEScopeError, match="same number of experts in every MoE layer"):
        export_pruned(mixtral, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grouped_routing_needs_balanced_groups():
    mm = MoEModel(build_layout("deepseek_v3-grouped-dense-first"))
    spec = mm.routing_spec()
    assert spec.n_groups == 2 and mm.layer_indices == [1, 2]
    with pytest.raises(MoEScopeError, match="same number kept in every group"):
        validate_plan(Plan(layers={1: [0, 1, 2, 4]}), spec)
    with pytest.raises(MoEScopeError, match="at least 2 per group"):
        validate_plan(Plan(layers={1: [0, 4]}), spec)
    validate_plan(Plan(layers={1: [0, 1, 4, 5]}), spec)


def test_phimoe_refuses_top_k_change():
    mm = MoEModel(build("phimoe"))
    with pytest.raises(MoEScopeError, match="always routes to 2 experts"):
        validate_plan(Plan(layers={}, top_k=1), mm.routing_spec())


def test_plan_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MoEScopeError, match="not valid JSON"):
        Plan.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MoEScopeError, match="Not a MoEScope plan"):
        Plan.load(bad)
    bad.write_text(json.dumps({"format": "moescope-plan", "version": 1, "layers": {"0": [1, 2]}}))
    with pytest.raises(MoEScopeError, match="keep"):
        Plan.load(bad)
    with pytest.raises(MoEScopeError, match="No plan file"):
        Plan.load(tmp_path / "missing.json")


def test_non_moe_and_unknown_family_get_one_sentence(tmp_path):
    llama = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(MoEScopeError, match="not a supported MoE family; supported: Mixtral, Qwen2-MoE") as err:
        adapter_for_config(llama)
    assert "\n" not in str(err.value)
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "llama")
    with pytest.raises(MoEScopeError, match="not a supported MoE family"):
        load_model(tmp_path / "llama")
    dense_qwen = build("qwen2_moe", mlp_only_layers=[0, 1])
    with pytest.raises(MoEScopeError, match="has no MoE layer"):
        MoEModel(dense_qwen)
    with pytest.raises(MoEScopeError, match="No model directory"):
        load_model(tmp_path / "nowhere")


def test_existing_output_directory_is_refused_unless_overwrite(mixtral, tmp_path):
    plan = Plan(layers={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]})
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep-me.txt").write_text("user data")
    with pytest.raises(MoEScopeError, match="already exists; choose another directory or pass --overwrite"):
        export_pruned(mixtral, plan, target)
    assert (target / "keep-me.txt").read_text() == "user data"
    with pytest.raises(MoEScopeError, match="replaces only an earlier MoEScope export"):
        export_pruned(mixtral, plan, target, overwrite=True)  # a folder MoEScope did not write is never replaced
    assert (target / "keep-me.txt").read_text() == "user data"
    (target / "keep-me.txt").unlink()
    target.rmdir()
    export_pruned(mixtral, plan, target)
    export_pruned(mixtral, Plan(layers={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}), target, overwrite=True)  # its own export
    assert Plan.load(target / "moescope-plan.json").layers[1] == [0, 1, 2, 3]  # replaced by the second export
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories or lock files left behind


def test_export_refuses_to_write_into_the_source(tmp_path):
    src = tmp_path / "src"
    build("mixtral").save_pretrained(src)
    mm = load_model(src)
    with pytest.raises(MoEScopeError, match="inside the source model"):
        export_pruned(mm, Plan(layers={}), src / "pruned")


def test_interrupted_export_leaves_nothing(mixtral, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def boom(self, *args, **kwargs):
        Path(args[0], "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        export_pruned(mixtral, Plan(layers={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.numeric
def test_two_threads_with_different_plans_each_get_their_own_logits(mixtral):
    x = ids(2, 16, seed=7)
    plans = [Plan(layers={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}), Plan(layers={0: [4, 5, 6, 7], 1: [4, 5, 6, 7]}, top_k=1)]
    expected = []
    for plan in plans:
        with masked(mixtral, plan), torch.no_grad():
            expected.append(mixtral.model(input_ids=x).logits.clone())
    # Each thread runs the same forward as above, but while the other thread holds cores, so its kernels may
    # split work otherwise: equal to fp32 rounding (rtol 1e-5), where another plan's logits are far apart.
    same = dict(rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1], **same)
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(15):
            with masked(mixtral, plans[i]), torch.no_grad():
                got = mixtral.model(input_ids=x).logits
            if not torch.allclose(got, expected[i], **same):
                errors.append(f"thread {i} got another plan's logits")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_load_model_options(tmp_path):
    from .tiny_models import save_tiny

    path = save_tiny(tmp_path / "m")
    mm = load_model(path, dtype="bf16")
    assert mm.info().dtype == "bfloat16" and mm.tokenizer is not None and mm.source == str(path)
    assert load_model(path, dtype="fp32", device="auto").info().device == "cpu"  # accelerate device_map
    assert load_model(path, experts_implementation="eager").model.config._experts_implementation == "eager"
    with pytest.raises(MoEScopeError, match="80x slower"):
        load_model(path, experts_implementation="batched_mm")
    with pytest.raises(MoEScopeError, match="Unknown dtype 'int3'"):
        load_model(path, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(MoEScopeError, match="no CUDA GPU is available"):
            load_model(path, device="cuda")
    # the digest identifies the routing weights as loaded: same checkpoint and dtype, same digest
    assert load_model(path).weights_digest() == load_model(path).weights_digest() != mm.weights_digest()
    assert load_model(save_tiny(tmp_path / "other", seed=1)).weights_digest() != load_model(path).weights_digest()


def test_dynamic_skipping_drops_weak_second_experts(mixtral, tmp_path):
    from core.masking import skip_weak_experts

    w = torch.tensor([[0.7, 0.3], [0.55, 0.45], [0.9, 0.1]])
    assert torch.equal(skip_weak_experts(w, 0.5), torch.tensor([[1.0, 0.0], [0.55, 0.45], [1.0, 0.0]]))  # survivor renormalised (NAEE)
    x = ids(2, 10, seed=9)
    with torch.no_grad():
        full = mixtral.model(input_ids=x).logits.clone()
        with masked(mixtral, Plan(layers={}, extra={"dynamic_skip": {"0": 0.0, "1": 0.0}})):
            assert torch.equal(mixtral.model(input_ids=x).logits, full)  # beta 0 skips nothing
        with masked(mixtral, Plan(layers={}, extra={"dynamic_skip": {"0": 1.0, "1": 1.0}})):
            skipped = mixtral.model(input_ids=x).logits.clone()
        assert not torch.allclose(skipped, full)  # beta 1 keeps only each token's strongest expert
    with pytest.raises(MoEScopeError, match="between 0 and 1"):
        validate_plan(Plan(layers={}, extra={"dynamic_skip": {"0": 1.5}}), mixtral.routing_spec())
    with pytest.raises(MoEScopeError, match="cannot store"):
        export_pruned(mixtral, Plan(layers={}, extra={"dynamic_skip": {"0": 0.5}}), tmp_path / "x")
    with pytest.raises(MoEScopeError, match="cannot skip experts dynamically"):
        validate_plan(Plan(layers={}, extra={"dynamic_skip": {"0": 0.5}}), MoEModel(build("dbrx")).routing_spec())
