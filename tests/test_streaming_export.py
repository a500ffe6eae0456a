"""Streaming export (core.streaming_export): shard by shard from the source's safetensors, never loading the model,
and the same tensors, bit for bit, as the in-memory export; the routers' digest reads only router tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from core import checkpoint_writer
from core.errors import MoEScopeError
from core.export import export_pruned
from core.masking import masked
from core.model import MoEModel, load_model
from core.plan import Plan
from core.streaming_export import export_checkpoint

from .tiny_models import FAMILIES, LAYOUTS, char_tokenizer, ids

CASES = [(mt, None) for mt in FAMILIES] + [(LAYOUTS[name][0], name) for name in LAYOUTS]
CASE_IDS = [name or mt for mt, name in CASES]
KEEP = [0, 2, 5, 7]  # two per group of four, so grouped routing stays balanced
MERGED = ["mixtral", "dbrx", "deepseek_v3", "ernie4_5_moe", "gpt_oss", "hunyuan_v1_moe", "llama4_text"]


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            out.update({key: handle.get_tensor(key) for key in names})
    return out


def assert_same_tensors(a: Path, b: Path) -> int:
    """Same names, dtypes, shapes and bytes; returns how many tensors."""
    left, right = stored(a), stored(b)
    assert sorted(left) == sorted(right)
    for name, tensor in left.items():
        other = right[name]
        assert (tensor.dtype, tensor.shape) == (other.dtype, other.shape), name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), name
    return len(left)


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def save_checkpoint(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    char_tokenizer().save_pretrained(folder)
    return folder


def one_hot(keep, n=8) -> list[list[float]]:
    return [[1.0 if i == e else 0.0 for i in range(n)] for e in keep]


def merge_plan(layers: list[int], seed: int) -> Plan:
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor(one_hot(KEEP))
    noisy = lambda: (base + torch.randn(4, 8, generator=gen) * 0.2 * (torch.rand(4, 8, generator=gen) < 0.5)).tolist()
    merge = {str(i): {"router": noisy(), "experts": noisy()} for i in layers}
    return Plan(layers={i: KEEP for i in layers}, top_k=1, extra={"merge": merge})


@pytest.mark.parametrize("model_type,layout", CASES, ids=CASE_IDS)
def test_streaming_export_equals_in_memory_export(model_type, layout, tmp_path, tiny_models):
    """Sharded source, sharded output, top-k changed: every tensor and the config as the in-memory export writes."""
    model = tiny_models.layout(layout) if layout else tiny_models.model(model_type)
    src = save_checkpoint(model, tmp_path / "src", max_shard_size="20KB")
    mm = load_model(src)
    plan = Plan(layers={i: KEEP for i in mm.layer_indices}, top_k=None if model_type == "phimoe" else 1)
    in_memory = export_pruned(mm, plan, tmp_path / "memory", streaming=False)
    streamed = export_checkpoint(src, plan, tmp_path / "streamed", max_shard_size="30KB")
    assert assert_same_tensors(in_memory, streamed) > 10
    assert config_of(streamed) == config_of(in_memory)
    assert len(list(streamed.glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("model_type", MERGED)
def test_merged_bf16_export_equals_in_memory_export(model_type, tmp_path, tiny_models):
    """Merged experts and mapped routers, in bf16 (DeepSeek, ERNIE, Hunyuan hold their routers in fp32)."""
    src = save_checkpoint(tiny_models.model(model_type).to(torch.bfloat16), tmp_path / "src")
    mm = load_model(src)
    plan = merge_plan(mm.layer_indices, seed=1)
    plan.top_k = None if model_type == "phimoe" else 1
    in_memory = export_pruned(mm, plan, tmp_path / "memory", streaming=False)
    assert assert_same_tensors(in_memory, export_checkpoint(src, plan, tmp_path / "streamed")) > 10


def test_grouped_routing_merge_streams_like_in_memory(tmp_path, tiny_models):
    src = save_checkpoint(tiny_models.layout("deepseek_v3-grouped-dense-first"), tmp_path / "src")
    mm = load_model(src)
    plan = merge_plan(mm.layer_indices, seed=2)
    in_memory = export_pruned(mm, plan, tmp_path / "memory", streaming=False)
    assert_same_tensors(in_memory, export_checkpoint(src, plan, tmp_path / "streamed"))


def test_export_pruned_streams_from_the_loaded_models_shards(tmp_path, tiny_models):
    """A model loaded from safetensors (here in another dtype than stored) is exported from its shards; the result
    loads with plain transformers and computes what masking computes."""
    src = save_checkpoint(tiny_models.model("qwen2_moe"), tmp_path / "src")
    mm = load_model(src, dtype="bf16")
    plan = Plan(layers={i: KEEP for i in mm.layer_indices}, top_k=1)
    said: list[str] = []
    streamed = export_pruned(mm, plan, tmp_path / "streamed", progress=said.append, max_shard_size="100KB",
                             streaming=None)
    assert any("streaming from the safetensors shards" in m for m in said)
    assert any(m.startswith("shard 1 of") and "tensors" in m and "MB" in m for m in said)
    assert_same_tensors(export_pruned(mm, plan, tmp_path / "memory", streaming=False), streamed)
    x = ids(2, 10, seed=4)
    with masked(mm, plan), torch.no_grad():
        expected = mm.model(input_ids=x).logits.float()
    reloaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits.float() - expected).abs().max().item() <= 1e-2  # bf16 rounding
    assert (streamed / "tokenizer.json").is_file() and Plan.load(streamed / "moescope-plan.json").model == str(src)


def test_in_memory_models_keep_the_in_memory_export(tmp_path, tiny_models):
    mm = MoEModel(tiny_models.model("mixtral"), source="tiny-in-memory")
    said: list[str] = []
    export_pruned(mm, Plan(layers={i: KEEP for i in mm.layer_indices}), tmp_path / "out", progress=said.append,
                  streaming=None)
    assert "slicing experts and building the pruned model" in said
    with pytest.raises(MoEScopeError, match="not a local folder of safetensors weights"):
        export_pruned(mm, Plan(layers={}), tmp_path / "again", streaming=True)


def test_no_model_is_instantiated_on_a_real_device(tmp_path, tiny_models, monkeypatch):
    src = save_checkpoint(tiny_models.model("deepseek_v3"), tmp_path / "src")
    real_from_config = AutoModelForCausalLM.from_config.__func__
    built = []

    def meta_only(cls, config, *args, **kwargs):
        if torch.get_default_device().type != "meta":
            raise AssertionError("a model was instantiated on a real device")
        model = real_from_config(cls, config, *args, **kwargs)
        built.append({t.device.type for t in model.state_dict().values()})
        return model

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", classmethod(meta_only))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    plan = merge_plan([0, 1], seed=3)
    out = export_checkpoint(src, plan, tmp_path / "out")
    assert built and all(devices == {"meta"} for devices in built)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="real device"):  # the check does catch the in-memory export
        monkeypatch.setattr(AutoModelForCausalLM, "from_config", classmethod(meta_only))
        export_pruned(load_model(src), plan, tmp_path / "memory", streaming=False)
    monkeypatch.undo()
    assert_same_tensors(export_pruned(load_model(src), plan, tmp_path / "memory", streaming=False), out)


def test_fused_and_per_expert_sources_export_alike(tmp_path, tiny_models):
    """A checkpoint saved with transformers' fused expert tensors streams to the same export as the per-expert one."""
    model = tiny_models.model("mixtral")
    per_expert = save_checkpoint(model, tmp_path / "per-expert")
    fused = save_checkpoint(model, tmp_path / "fused", save_original_format=False)
    assert any("experts.gate_up_proj" in k for k in stored(fused)) and not any(".w1." in k for k in stored(fused))
    plan = Plan(layers={0: KEEP, 1: [1, 3, 4, 6]})
    assert_same_tensors(export_checkpoint(per_expert, plan, tmp_path / "a"), export_checkpoint(fused, plan, tmp_path / "b"))


def test_shards_are_bounded_and_indexed(tmp_path, tiny_models):
    src = save_checkpoint(tiny_models.model("olmoe"), tmp_path / "src")
    out = export_checkpoint(src, Plan(layers={0: KEEP, 1: KEEP}), tmp_path / "out", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files] and len(files) > 2
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys = handle.keys()
            sizes = [handle.get_tensor(k).nbytes for k in keys]
        assert all(index["weight_map"][k] == file.name for k in keys)
        assert sum(sizes) <= 40_000 or len(keys) == 1
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored(out).values())
    AutoModelForCausalLM.from_pretrained(out)  # transformers reads the index and every shard


def test_streaming_export_refuses_like_the_in_memory_one(tmp_path, tiny_models):
    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    plan = Plan(layers={0: KEEP, 1: KEEP})
    with pytest.raises(MoEScopeError, match="inside the source model"):
        export_checkpoint(src, plan, src / "pruned")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MoEScopeError, match="already exists"):
        export_checkpoint(src, plan, tmp_path / "taken")
    with pytest.raises(MoEScopeError, match="need the same number of experts in every MoE layer"):
        export_checkpoint(src, Plan(layers={0: KEEP, 1: [0, 1]}), tmp_path / "uneven")
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((src / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MoEScopeError, match="not a local folder of safetensors weights"):
        export_checkpoint(bin_only, plan, tmp_path / "from-bin")


def test_a_checkpoint_lacking_a_tensor_is_refused(tmp_path, tiny_models):
    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    tensors = stored(src)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoEScopeError, match=r"lacks tensors the pruned model needs \(1, e.g. "
                                            r"model.layers.1.self_attn.q_proj.weight\)"):
        export_checkpoint(src, Plan(layers={0: KEEP, 1: KEEP}), tmp_path / "out")


def test_interrupted_streaming_export_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    real_add = checkpoint_writer.ShardedWriter.add
    written = []

    def add_then_fail(self, name, tensor):
        real_add(self, name, tensor)
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_writer.ShardedWriter, "add", add_then_fail)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(src, Plan(layers={0: KEEP, 1: KEEP}), tmp_path / "out", max_shard_size="10KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


class SpyOpen:
    """``safetensors.safe_open`` that records every tensor read."""

    reads: ClassVar[list[str]] = []

    def __init__(self, path, framework="pt", device="cpu"):
        self._handle = REAL_SAFE_OPEN(path, framework=framework, device=device)

    def get_tensor(self, key):
        SpyOpen.reads.append(key)
        return self._handle.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


REAL_SAFE_OPEN = safe_open


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "ernie4_5_moe", "phimoe"])
def test_weights_digest_reads_only_router_tensors(model_type, tmp_path, tiny_models, monkeypatch):
    import safetensors

    model = tiny_models.model(model_type).to(torch.bfloat16)
    src = save_checkpoint(model, tmp_path / "src", max_shard_size="20KB")
    mm = load_model(src, dtype="fp32")
    in_memory = MoEModel(mm.model, source="tiny-in-memory").weights_digest()  # today's digest: read from the model
    SpyOpen.reads = []
    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    assert mm.weights_digest() == in_memory
    router_tensors = sum(len(layer.router.state_dict()) for layer in mm.layers)
    assert len(SpyOpen.reads) == len(set(SpyOpen.reads)) == router_tensors  # each router tensor once, nothing else
    assert not any("experts" in read or "proj" in read or "embed" in read for read in SpyOpen.reads)
    for layer in mm.layers:  # routers changed in memory only: the digest, read from the shards, stays
        torch.nn.init.zeros_(next(layer.router.parameters()))
    assert mm.weights_digest() == in_memory != MoEModel(mm.model, source="tiny-in-memory").weights_digest()


def test_weights_digest_is_read_once_while_the_shards_are_unchanged(tmp_path, tiny_models, monkeypatch):
    """The dashboard asks for the digest on every rerun: the shards are read again only once they change."""
    import safetensors

    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    mm = load_model(src)
    first = mm.weights_digest()
    SpyOpen.reads = []
    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    assert mm.weights_digest() == first and SpyOpen.reads == []
    changed = tiny_models.model("mixtral")
    with torch.no_grad():
        for layer in MoEModel(changed).layers:
            next(layer.router.parameters()).add_(1.0)
    changed.save_pretrained(src)  # the same folder now holds other routers: the digest follows the files
    assert mm.weights_digest() != first and SpyOpen.reads


def test_probs_mapped_plans_export_fitted_routers_from_a_loaded_model_only(tmp_path, tiny_models):
    """A 'probs'-mapped merge gets linear routers fitted on the loaded model (core.router_fit): both exports write
    the same tensors, and the checkpoint routes as the masked model (one-hot R: the fit is exact). Without a
    loaded model there is nothing to fit on: export_checkpoint refuses in one sentence, writing nothing."""
    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    plan = Plan(layers={0: KEEP, 1: KEEP}, top_k=1,
                extra={"merge": {str(i): {"router": one_hot(KEEP), "experts": one_hot(KEEP)} for i in (0, 1)},
                       "router_mapping": "probs"})
    with pytest.raises(MoEScopeError, match="'probs' router mapping are exported with linear routers fitted"):
        export_checkpoint(src, plan, tmp_path / "refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    mm = load_model(src)
    texts = ["the quick brown fox jumps over the lazy dog", "1 + 2 = 3 and 4 + 5 = 9", "merging experts"] * 4
    said: list[str] = []
    streamed = export_pruned(mm, plan, tmp_path / "streamed", streaming=None, fit_texts=texts, progress=said.append)
    assert any("fitted routers agree with the probs mapping's top-k on 100.0%" in m for m in said)
    assert_same_tensors(export_pruned(mm, plan, tmp_path / "memory", fit_texts=texts), streamed)
    x = ids(2, 10, seed=5)
    with masked(mm, plan), torch.no_grad():
        expected = mm.model(input_ids=x).logits
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(streamed)(input_ids=x).logits - expected).abs().max() <= 1e-4
    with pytest.raises(MoEScopeError, match="records no calibration task"):
        export_pruned(mm, plan, tmp_path / "no-texts")


def test_pruned_experts_are_never_read(tmp_path, tiny_models, monkeypatch):
    """Slicing a per-expert checkpoint reads the kept experts' tensors only; every other tensor once."""
    import safetensors

    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src", max_shard_size="20KB")
    everything = stored(src)
    SpyOpen.reads = []
    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    export_checkpoint(src, Plan(layers={0: KEEP, 1: KEEP}), tmp_path / "out")
    dropped = [k for k in everything if any(f".experts.{e}." in k for e in (1, 3, 4, 6))]
    assert len(dropped) == 2 * 4 * 3 and not set(dropped) & set(SpyOpen.reads)
    assert sorted(SpyOpen.reads) == sorted(set(everything) - set(dropped))


def offloaded(src: Path, model, folder: Path):
    """The checkpoint in ``src`` loaded with its last decoder layer offloaded to disk by accelerate."""
    mm = MoEModel(model)
    top, _, attr = mm.adapter.layers_path.partition(".")  # "model", "layers" (every family: two parts)
    n = len(mm.adapter.decoder_layers(mm.model))
    device_map = {name: "cpu" for name, _ in mm.model.named_children() if name != top}
    device_map |= {f"{top}.{name}": "cpu" for name, _ in mm.model.get_submodule(top).named_children() if name != attr}
    device_map |= {f"{top}.{attr}.{i}": "disk" if i == n - 1 else "cpu" for i in range(n)}
    return AutoModelForCausalLM.from_pretrained(src, device_map=device_map, offload_folder=str(folder)).eval()


@pytest.mark.parametrize("model_type", ["mixtral", "dbrx", "ernie4_5_moe"])
def test_weights_digest_of_an_offloaded_model_equals_resident(model_type, tmp_path, tiny_models):
    """Routers offloaded to disk hold meta tensors; the digest is read from the shards, so it still exists and
    equals the resident model's (reading the model would fail: meta tensors have no data)."""
    model = tiny_models.model(model_type)
    src = save_checkpoint(model, tmp_path / "src")
    resident = MoEModel(model, source="tiny-in-memory").weights_digest()
    off = MoEModel(offloaded(src, model, tmp_path / "offload"), source=str(src))
    assert any(t.device.type == "meta" for layer in off.layers for t in layer.router.state_dict().values())
    assert off.weights_digest() == resident


def test_a_damaged_tokenizer_is_refused_before_anything_is_written(tmp_path, tiny_models):
    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    (src / "tokenizer.json").write_text('{"a": 1}')  # as tests/test_model_validation.py damages it
    with pytest.raises(MoEScopeError, match="Could not read the tokenizer files in"):
        export_checkpoint(src, Plan(layers={0: KEEP, 1: KEEP}), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streaming_none_builds_in_memory_when_the_shards_no_longer_match(tmp_path, tiny_models):
    """The folder changed after loading (other shapes on disk): export_pruned(streaming=None) exports the model
    in memory instead; streaming=True refuses in one sentence."""
    src = save_checkpoint(tiny_models.model("mixtral"), tmp_path / "src")
    mm = load_model(src)
    tiny_models.model("mixtral", hidden_size=48).save_pretrained(src)
    plan = Plan(layers={0: KEEP, 1: KEEP})
    said: list[str] = []
    out = export_pruned(mm, plan, tmp_path / "auto", streaming=None, progress=said.append)
    assert "slicing experts and building the pruned model" in said
    assert_same_tensors(out, export_pruned(mm, plan, tmp_path / "memory"))
    with pytest.raises(MoEScopeError, match="do not hold the loaded model's tensors"):
        export_pruned(mm, plan, tmp_path / "streamed", streaming=True)
