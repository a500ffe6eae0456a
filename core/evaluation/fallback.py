"""Greedy decoding with ``model.generate``, for models whose cache the harness's own decoding cannot crop or
continue (sliding-window, chunked, hybrid and state-space caches)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def generate_greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new: int, stop_table: torch.Tensor,
                    pad: int, eos_ids: list[int]) -> torch.Tensor:
    """``model.generate``'s greedy continuations [B, <= max_new] of left-padded prompts, each row ended at a
    token of ``stop_table``. Pure greedy, as the harness's own decoding: none of the processors the model's
    generation config names (that config is restored afterwards)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StopAtStopToken(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return stop_table[input_ids[:, -1]]

    device = next(model.parameters()).device
    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos_ids or None, pad_token_id=pad)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([StopAtStopToken()]))
    finally:
        model.generation_config = saved
    return out[:, ids.size(1):].cpu()
