"""The models the benchmarks run on: a tiny Mixtral for CPU, a Mixtral-shaped one for a GPU.

Imported by its sibling scripts (run as files, so this folder is on their path), with MoEScope installed (``pip install -e .``; ``make setup`` does it)."""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from core.model import MoEModel


def build(gpu: bool) -> MoEModel:
    """CPU: 4 layers, hidden 160, 8 experts, top-2 (the sample model's shape, random weights).
    GPU: Mixtral 8x7B's layer shape (hidden 4096, FFN 14336, 8 experts, top-2), 4 layers, bf16."""
    torch.manual_seed(0)
    if gpu:
        config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=4096)
        with torch.device("cuda"):
            model = MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
    else:
        config = MixtralConfig(vocab_size=2048, hidden_size=160, intermediate_size=320, num_hidden_layers=4,
                               num_attention_heads=5, num_key_value_heads=5, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=1024)
        model = MixtralForCausalLM(config)
    return MoEModel(model.eval(), source="benchmark-mixtral")


def sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()
