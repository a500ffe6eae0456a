"""EEP's router mapping in the paper's form: the merged model routes on ``p' = R · softmax(W x)``.

EEP (Liu et al. 2024, arXiv 2407.00945) maps the router's *probabilities* over all experts to the kept slots with
a real matrix R [kept, experts], then takes the top-k of the mapped values and normalises them as the family does.
The official code does exactly this for Mixtral (imagination-research/EEP,
``transformers/src/transformers/models/mixtral/modeling_mixtral.py``, ``MixtralSparseMoeBlock.forward``:
``routing_weights = softmax(router_logits) @ router_transfer.T``, then ``topk`` and division by the top-k sum).

Two mappings exist in MoEScope (the plan's ``router_mapping`` field):

- ``"probs"``: the paper's. Plans written by EEP since issue 16 say so.
- ``"logits"``: R mixes the router's rows (logits), so the merged router is an ordinary linear router
  (:func:`core.masking.mapped_router_state`). Plans without the field mean this one (older plans).

For one-hot R (pruning) both give plain pruning: the kept experts' probabilities, top-k, the family's
normalisation. For real R they are different functions (issue 16 measured 32-52% of tokens choosing different
top-2 experts after a few mutations), so the paper's sigma does not transfer to the logits form.

The probs form is defined for softmax routers that return their decisions (logits, top-k weights, ids), without
grouping or a selection bias; families differ in how top-k weights are normalised:

- ``"topk"``: the chosen weights are divided by their sum (Mixtral, gpt-oss, GraniteMoe, Hunyuan, Qwen/OLMoE with
  ``norm_topk_prob``);
- ``"kept"``: the chosen probabilities are left as they are, which for a pruned router means the softmax over the
  kept experts, so the mapped values are divided by their sum over the kept slots (Jamba, Qwen/OLMoE without
  ``norm_topk_prob``). Both reduce to plain pruning for one-hot R.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import MoEScopeError

PROBS, LOGITS = "probs", "logits"
MAPPINGS = (PROBS, LOGITS)
LEGACY_MAPPING = LOGITS  # a plan without the field was made with the row (logits) mapping

_ALWAYS_RENORMALISED = {"Mixtral", "gpt-oss", "GraniteMoe", "Hunyuan-MoE"}
_NEVER_RENORMALISED = {"Jamba"}
_BY_CONFIG = {"Qwen2-MoE", "Qwen3-MoE", "Qwen3-Next", "OLMoE"}  # ``norm_topk_prob`` decides


def probs_normalisation(adapter: Any, config: Any) -> str | None:
    """How the family normalises top-k weights under the probs mapping ("topk" or "kept"), or None where the
    probs mapping is not defined for it (sigmoid or grouped routing, selection biases, sparsemixer, routers that
    do not return their decisions)."""
    if adapter.router_output != "decisions" or adapter.scoring != "softmax" or adapter.bias_corrected:
        return None
    if adapter.family in _ALWAYS_RENORMALISED:
        return "topk"
    if adapter.family in _NEVER_RENORMALISED:
        return "kept"
    if adapter.family in _BY_CONFIG:
        return "topk" if getattr(config, "norm_topk_prob", False) else "kept"
    return None


def check_mapping(mapping: str) -> str:
    if mapping not in MAPPINGS:
        raise MoEScopeError(f"Unknown router mapping {mapping!r}; choose probs (the paper's) or logits.")
    return mapping


def require_probs(adapter: Any, config: Any) -> str:
    """The family's normalisation under the probs mapping, or a one-sentence refusal."""
    norm = probs_normalisation(adapter, config)
    if norm is None:
        raise MoEScopeError(f"The probs router mapping is not defined for {adapter.family} routers (it needs a "
                            f"softmax router without grouping or selection bias); use router_mapping=logits.")
    return norm


def mapped_probs(logits: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """``p' = R · softmax(logits)`` per token: [N, kept] from logits [N, E] and R [kept, E], in float32."""
    probs = logits.float().softmax(dim=-1)
    return probs @ mapping.to(probs.device, torch.float32).T


def route_mapped(mapped: torch.Tensor, top_k: int, normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the mapped probabilities [N, kept] (largest first): their weights after the family's
    normalisation, and their slots (indices into the kept experts)."""
    values, slots = torch.topk(mapped, top_k, dim=-1)
    total = values.sum(-1, keepdim=True) if normalisation == "topk" else mapped.sum(-1, keepdim=True)
    return values / total, slots
