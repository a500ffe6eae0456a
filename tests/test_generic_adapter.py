"""The generic adapter (issue 13): fields found from the config, refusals in one sentence, and the CLI and the
streaming export on tiny models of discovered families (the engine checks run on every family in test_families)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.adapter_discovery import DiscoveredAdapter, discover_adapter
from core.adapters import adapter_for_config
from core.cli import main
from core.errors import UnsupportedFamilyFeature
from core.export import export_pruned
from core.model import MoEModel, load_model
from core.plan import Plan
from core.streaming_export import export_checkpoint

from .family_models import build_family, tiny_config
from .test_streaming_export import assert_same_tensors, config_of, save_checkpoint
from .tiny_models import _spread_router, write_lm_task

KEEP = [0, 2, 5, 7]
# One of each kind: plain fused experts; shared experts in block_sparse_moe; sigmoid router with correction bias,
# groups and MLA; a multimodal family whose causal LM is its MoE text tower, with linear-attention layers.
REPRESENTATIVE = ["cohere2_moe", "granitemoeshared", "glm4_moe_lite", "qwen3_5_moe"]


def test_discovered_adapter_reads_the_fields_from_the_config():
    lite = adapter_for_config(tiny_config("glm4_moe_lite"))
    assert isinstance(lite, DiscoveredAdapter)
    assert (lite.n_experts_field, lite.top_k_field) == ("n_routed_experts", "num_experts_per_tok")
    assert lite.group_fields == ("n_group", "topk_group") and lite.scoring == "sigmoid" and lite.bias_corrected
    cohere = adapter_for_config(tiny_config("cohere2_moe"))
    assert (cohere.scoring, cohere.bias_corrected, cohere.group_fields) == ("softmax", False, None)
    multimodal = discover_adapter(tiny_config("qwen3_5_moe"))
    assert multimodal.n_experts_field == "text_config.num_experts"


def test_explicit_adapters_win_over_discovery():
    assert not isinstance(adapter_for_config(SimpleNamespace(model_type="mixtral")), DiscoveredAdapter)


def test_expert_counts_given_per_layer_are_refused_in_one_sentence():
    config = SimpleNamespace(model_type="made_up_moe", num_experts=[8, 16], num_experts_per_tok=2)
    with pytest.raises(UnsupportedFamilyFeature, match="num_experts gives the expert count or top-k per layer") as err:
        adapter_for_config(config)
    assert "\n" not in str(err.value)


def test_a_router_that_needs_its_blocks_tensors_is_refused():
    model = build_family("afmoe")
    with pytest.raises(UnsupportedFamilyFeature, match="takes the expert-selection bias"):
        MoEModel(model)  # from the config (core.families.REFUSED)
    with pytest.raises(UnsupportedFamilyFeature, match="takes expert_bias from its block"):
        MoEModel(model, adapter=discover_adapter(tiny_config("afmoe")))  # and found from the structure


def test_zero_computation_experts_are_refused_from_the_config():
    with pytest.raises(UnsupportedFamilyFeature, match="zero-computation experts"):
        adapter_for_config(SimpleNamespace(model_type="longcat_flash"))


@pytest.mark.numeric
@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_streaming_export_equals_in_memory_export(model_type, tmp_path):
    src = save_checkpoint(build_family(model_type), tmp_path / "src", max_shard_size="40KB")
    mm = load_model(src)
    assert isinstance(mm.adapter, DiscoveredAdapter)
    plan = Plan(layers={i: KEEP for i in mm.layer_indices}, top_k=1)
    in_memory = export_pruned(mm, plan, tmp_path / "memory", streaming=False)
    streamed = export_checkpoint(src, plan, tmp_path / "streamed", max_shard_size="40KB")
    assert assert_same_tensors(in_memory, streamed) > 10
    assert config_of(streamed) == config_of(in_memory)


@pytest.mark.parametrize("model_type", ["cohere2_moe", "qwen3_5_moe"])
def test_cli_info_profile_prune_evaluate_export(model_type, tmp_path, capsys):
    model_dir = save_checkpoint(build_family(model_type), tmp_path / "model")
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "(discovered)" in info["family"] and info["n_experts"] == 8 and info["moe_layers"] == [0, 1]
    folder = write_lm_task(tmp_path / "lm", ["hello world", "abc def"], splits=("calibration", "test"))
    plan = tmp_path / "plan.json"
    assert main(["prune", str(model_dir), "--method", "frequency", "--ratio", "0.5", "--task", str(folder),
                 "--out", str(plan)]) == 0
    assert all(len(v["keep"]) == 4 for v in json.loads(plan.read_text())["layers"].values())
    (tmp_path / "t.txt").write_text("the cat sat on the mat\nhello world\n")
    profile = ["profile", str(model_dir), "--task", str(tmp_path / "t.txt"), "--out", str(tmp_path / "p.parquet")]
    assert main(profile) == 0
    assert main(["evaluate", str(model_dir), "--task", str(folder), "--plan", str(plan), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "pruned")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert MoEModel(reloaded).n_experts == 4
    assert reloaded(torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)


class _Shared:
    def __init__(self, model):
        self._model = model

    def model(self, _model_type):
        return self._model


@pytest.mark.numeric
@pytest.mark.parametrize("model_type,overrides,moe_layers", [
    ("glm4_moe_lite", dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"]), [1, 2]),
    ("glm4_moe_lite", dict(n_group=2, topk_group=1), [0, 1]),
    ("flint", dict(num_hidden_layers=3, mlp_only_layers=[1], layer_types=["full_attention"] * 3), [0, 2]),
])
def test_dense_layers_and_grouped_routing_of_discovered_families(model_type, overrides, moe_layers, tmp_path):
    """Dense layers are skipped but counted in layer indices; grouped routing is read from the config; the engine's
    checks hold on both (recording, counts from an independent group-limited top-k, masking == export, undo)."""
    from . import test_engine

    config = tiny_config(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    _spread_router(model, 0)
    mm = MoEModel(model)
    assert mm.layer_indices == moe_layers
    assert mm.adapter.n_groups(mm.config) == overrides.get("n_group", 1)
    for check in (test_engine.test_recording_equals_router_outputs, test_engine.test_counts_match_output_router_logits,
                  test_engine.test_masking_matches_export_and_undoes_exactly):
        check(model_type, None, tmp_path, _Shared(model))


def _multimodal_checkpoint(model_type, folder):
    """A tiny multimodal checkpoint (vision tower and MoE text decoder) saved as its image-text-to-text class."""
    from transformers import AutoModelForImageTextToText

    config = tiny_config(model_type)
    small = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32}
    for name, value in small.items():
        if hasattr(config.vision_config, name):
            setattr(config.vision_config, name, value)
    torch.manual_seed(0)
    return save_checkpoint(AutoModelForImageTextToText.from_config(config), folder)


def test_info_says_a_multimodal_checkpoint_is_profiled_by_its_text_tower(tmp_path, capsys):
    model_dir = _multimodal_checkpoint("qwen3_5_moe", tmp_path / "vl")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3_5_moe"
    capsys.readouterr()
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["text_tower"] == ("text tower of a multimodal model (qwen3_5_moe): only the text decoder is "
                                  "profiled and pruned, and an export holds the text decoder alone")
    assert info["n_experts"] == 8 and info["moe_layers"] == [0, 1]
    assert main(["info", str(model_dir)]) == 0
    assert "text tower of a multimodal model (qwen3_5_moe)" in capsys.readouterr().out
    # As the note says: the export is the pruned text decoder, a causal LM without the vision tower.
    plan = tmp_path / "plan.json"
    Plan(layers={0: KEEP, 1: KEEP}, top_k=2).save(plan)
    assert main(["export", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "pruned")]) == 0
    assert config_of(tmp_path / "pruned")["model_type"] == "qwen3_5_moe_text"
    assert MoEModel(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")).n_experts == len(KEEP)


def test_info_of_a_text_only_family_has_no_text_tower_note(tmp_path, capsys):
    model_dir = save_checkpoint(build_family("cohere2_moe"), tmp_path / "model")
    capsys.readouterr()
    assert main(["info", str(model_dir), "--json"]) == 0
    assert "text_tower" not in json.loads(capsys.readouterr().out)
