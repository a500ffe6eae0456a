"""Tiny random models of every MoE causal-LM family the installed transformers has, built from each family's own
config class with small sizes (issue 13): 2 layers, hidden 32, 8 experts, top-2, every MLP layer sparse."""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from core.adapter_discovery import N_EXPERTS_FIELDS, TOP_K_FIELDS

from .tiny_models import _spread_router

N_LAYERS, N_EXPERTS, TOP_K = 2, 8, 2
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
             num_key_value_heads=4, head_dim=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2, n_group=1, topk_group=1,
             num_expert_group=1, first_k_dense_replace=0, num_dense_layers=0, moe_layer_start_index=0,
             decoder_sparse_step=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
             qk_nope_head_dim=8, qk_head_dim=16, num_shared_experts=1, n_shared_experts=1, use_mamba_kernels=False,
             num_layers=N_LAYERS, mlp_only_layers=[],
             moe_shared_expert_intermediate_size=32, expert_ffn_hidden_size=32)
_SPARSE = {"sparse", "moe"}
# Where the common sizes or layer kinds do not fit a family: MiMo-V2-Flash needs fewer key/value heads (MLA families
# need as many as query heads: the default above); hybrid families need one attention layer beside a MoE one.
PER_FAMILY = {
    "mimo_v2_flash": dict(num_key_value_heads=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "nemotron_h": dict(layer_types=["full_attention", "moe"]),
    "granitemoehybrid": dict(mamba_n_heads=4, layer_types=["full_attention", "linear_attention"]),
    "zaya": dict(num_experts_per_tok=1),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16,
                           indexer_compress_ratio=4, linear_key_head_dim=8, linear_value_head_dim=8,
                           linear_num_key_heads=2, linear_num_value_heads=4),
    "kolibri1_1": dict(head_dim=16, index_num_heads=1),
    "inkling2_text": dict(unpadded_vocab_size=128),
    "inkling2_loop_text": dict(unpadded_vocab_size=128),
    "dots3_note_text": dict(head_dim=16, index_head_dim=8, index_n_heads=2, index_topk=16,
                            shared_experts_intermediate_size=32),
    "dots3_note": dict(vision_config=dict(adapter_out_dim=32), audio_config=dict(adapter_out_dim=32)),
}
# Arguments for a family's default config, where its defaults cannot be read globally: Dots3-Note's sliding-window
# layers take their attention sizes from per-layer configs, so its tiny model keeps the indexed-attention layers.
DEFAULT_ARGS = {
    "dots3_note_text": dict(use_sliding_window=False),
    "dots3_note": dict(text_config=dict(use_sliding_window=False)),
}


def _one_of_each(kinds) -> list:
    """N_LAYERS layer kinds from a family's default list: a MoE kind where the list has one, else the first distinct
    kinds (a hybrid family keeps one linear-attention or state-space layer beside one attention layer)."""
    distinct = list(dict.fromkeys(kinds))
    sparse = [k for k in distinct if k in _SPARSE]
    chosen = [k for k in distinct if k not in _SPARSE][: N_LAYERS - len(sparse[:1])] + sparse[:1]
    return (chosen + [chosen[-1]] * N_LAYERS)[:N_LAYERS]


def _text_overrides(default) -> dict:
    """Small sizes for the fields ``default`` (a config instance) has."""
    kwargs = {k: v for k, v in SMALL.items() if hasattr(default, k)}
    for name in N_EXPERTS_FIELDS:
        if isinstance(getattr(default, name, None), int) and not isinstance(getattr(default, name), bool):
            kwargs[name] = N_EXPERTS
    for name in TOP_K_FIELDS:
        if isinstance(getattr(default, name, None), int) and not isinstance(getattr(default, name), bool):
            kwargs[name] = TOP_K
    for name in ("layer_types", "mlp_layer_types"):
        values = getattr(default, name, None)
        if isinstance(values, (list, tuple)) and values:
            if name == "mlp_layer_types":
                sparse = next((v for v in values if v in _SPARSE), values[-1])
                kwargs[name] = [sparse] * N_LAYERS
            else:
                kwargs[name] = _one_of_each(values)
    return kwargs


def tiny_config(model_type: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = CONFIG_MAPPING[model_type]
        default = cls(**DEFAULT_ARGS.get(model_type, {}))
        kwargs = {**DEFAULT_ARGS.get(model_type, {}), **_text_overrides(default)}
        text = getattr(default, "text_config", None)
        if text is not None and not isinstance(text, dict):
            kwargs["text_config"] = {**text.to_dict(), **_text_overrides(text), **PER_FAMILY.get(text.model_type, {})}
        return cls(**{**kwargs, **PER_FAMILY.get(model_type, {})})


def build_family(model_type: str, seed: int = 0):
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    _spread_router(model, seed)
    return model.float().eval()
