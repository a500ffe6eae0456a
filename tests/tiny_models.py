"""Tiny random-weight models of every supported family, built locally from transformers configs."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
            qk_nope_head_dim=8, moe_intermediate_size=32, n_shared_experts=1)

# model_type -> config overrides (8 experts, top-2 everywhere).
FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, head_dim=8,
                       layer_types=["linear_attention", "full_attention"]),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0, **_MLA),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0, n_group=1,
                        topk_group=1, **_MLA),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0,
                     n_group=1, topk_group=1, head_dim=8),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0, head_dim=8),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=8),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=1, attn_layer_offset=0, use_mamba_kernels=False),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=64, head_dim=8),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=VOCAB, pad_token_id=0,
                 eos_token_id=1, bos_token_id=2,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2)),
}

# Non-default layouts: dense layers mixed in, grouped routing, shared experts.
LAYOUTS: dict[str, tuple[str, dict]] = {
    "qwen2_moe-dense-mixed": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    "deepseek_v3-grouped-dense-first": ("deepseek_v3", dict(num_hidden_layers=3, first_k_dense_replace=1,
                                                            n_group=2, topk_group=1)),
    "deepseek_v2-group-limited": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    "jamba-every-other": ("jamba", dict(num_hidden_layers=4, expert_layer_period=2, expert_layer_offset=1)),
}


def build(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    if model_type == "dbrx":
        kwargs = {**FAMILIES["dbrx"], **overrides}
    else:
        kwargs = {**COMMON, **FAMILIES[model_type], **overrides}
    if "layer_types" in kwargs and len(kwargs["layer_types"]) != kwargs["num_hidden_layers"]:
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = (kwargs["layer_types"] * n)[:n]
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _spread_router(model, seed)
    return model.to(dtype).eval()


def build_layout(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    model_type, overrides = LAYOUTS[name]
    return build(model_type, seed=seed, dtype=dtype, **overrides)


def _spread_router(model, seed: int) -> None:
    """Random init leaves some routers near-uniform (zeros, tiny std); give every router clearly distinct
    logits so routing decisions are not decided by float ties."""
    gen = torch.Generator().manual_seed(1234 + seed)
    for name, param in model.named_parameters():
        low = name.lower()
        if ("gate" in low or "router" in low) and "proj" not in low and param.dim() == 2 and param.shape[0] == 8:
            param.data = torch.randn(param.shape, generator=gen) * 0.5
        if "router" in low and low.endswith("bias") and param.dim() == 1:
            param.data = torch.randn(param.shape, generator=gen) * 0.1


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def char_tokenizer():
    """A character-level tokenizer that fits the tiny models' vocabulary (ids < VOCAB)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def save_tiny(path, model_type: str = "mixtral", **overrides):
    """A tiny model with a tokenizer, saved like a real checkpoint directory."""
    build(model_type, **overrides).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_task(folder, rows, splits=("test",), **spec):
    """The one task-folder writer of the suite: ``rows`` (dicts) as ``<split>.jsonl`` for each split, and a
    task.json of ``spec`` (name defaults to the folder's name, data_files to the files written). Returns the
    folder; ``TaskSpec.from_json(folder)`` reads it back."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    for split in splits:
        (folder / f"{split}.jsonl").write_text(lines)
    spec = {"name": folder.name, "data_files": {s: f"{s}.jsonl" for s in splits}, **spec}
    (folder / "task.json").write_text(json.dumps(spec))
    return folder


def write_lm_task(folder, texts, splits=("calibration",)):
    """A language-model-loss task named "lm" with the same texts in each split, as a task folder."""
    return write_task(folder, [{"text": t} for t in texts], splits=splits, name="lm", metric="lm_loss",
                      text_field="text")
