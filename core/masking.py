"""Apply a plan to a loaded model without reloading it, exactly as physical pruning would behave.

Each MoE router is temporarily replaced by a *pruned copy* (its expert-indexed tensors sliced to the kept
experts, top-k set), the very router a physically pruned checkpoint would build. Its decisions are mapped
back to the original expert ids, so the untouched expert weights are used and the original parameters
are never written. Undoing restores the original ``forward``: outputs afterwards are bit-identical.

Masking changes the model in place, so it holds the model's lock: two threads with different plans are
serialised and each gets its own plan's result.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, MoELayer
from .model import MoEModel
from .plan import Plan, validate_plan


def slice_router_state(adapter: Adapter, router: nn.Module, keep: list[int]) -> dict[str, torch.Tensor]:
    """The router's parameters and buffers restricted to ``keep`` (in that order), keyed like ``state_dict``."""
    out = {}
    for name, tensor in router.state_dict().items():
        dim = adapter.router_expert_dim(name, tensor)
        index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
        out[name] = tensor.index_select(dim, index).clone()
    return out


def pruned_router(adapter: Adapter, router: nn.Module, keep: list[int], top_k: int | None,
                  n_experts: int) -> nn.Module:
    """A standalone copy of ``router`` over the kept experts, with its own top-k."""
    sub = copy.deepcopy(router)
    for module in sub.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module.__dict__.pop("forward", None)
        for attr in ("num_experts", "n_routed_experts", "out_features"):
            if getattr(module, attr, None) == n_experts:
                setattr(module, attr, len(keep))
        if top_k is not None and hasattr(module, "top_k"):
            module.top_k = top_k
    for name, tensor in slice_router_state(adapter, router, keep).items():
        owner_name, _, leaf = name.rpartition(".")
        owner = sub.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    return sub


def _expand(values: torch.Tensor, keep_t: torch.Tensor, n_experts: int, fill: float) -> torch.Tensor:
    full = values.new_full((values.shape[0], n_experts), fill)
    return full.index_copy_(1, keep_t, values)


def skip_weak_experts(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """NAEE dynamic skipping: zero the weight of every chosen expert below ``beta`` times the strongest one
    (not renormalised: the skipped expert's share is simply dropped)."""
    top = weights.max(dim=-1, keepdim=True).values
    return torch.where(weights < beta * top, torch.zeros_like(weights), weights)


def _remapping_forward(adapter: Adapter, sub: nn.Module, keep: list[int], n_experts: int, beta: float | None):
    """Forward of the masked router: the pruned router's decisions in original expert ids."""
    keep_t: torch.Tensor | None = None

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal keep_t
        out = sub(hidden_states, *args, **kwargs)
        logits = adapter.logits(out)
        if keep_t is None or keep_t.device != logits.device:
            keep_t = torch.tensor(keep, dtype=torch.long, device=logits.device)
        full_logits = _expand(logits, keep_t, n_experts, float("-inf"))
        if adapter.router_output == "decisions":
            weights = out[1] if beta is None else skip_weak_experts(out[1], beta)
            return full_logits, weights, keep_t[out[2]]
        if adapter.router_output == "scores":
            return _expand(out[0], keep_t, n_experts, 0.0), full_logits
        return full_logits

    return forward


@contextlib.contextmanager
def masked(mm: MoEModel, plan: Plan | None) -> Iterator[MoEModel]:
    """Run the block with ``plan`` applied to ``mm``; ``None`` means the unpruned model (still locked)."""
    with mm.lock:
        if plan is None:
            yield mm
            return
        validate_plan(plan, mm.routing_spec())
        restore: list[tuple[Any, str, Any, bool]] = []
        try:
            for layer in mm.layers:
                _mask_layer(mm, layer, plan, restore)
            _set_instance_attr(mm, "active_plan", plan, restore)
            yield mm
        finally:
            for obj, attr, old, had in reversed(restore):
                if had:
                    obj.__dict__[attr] = old
                else:
                    obj.__dict__.pop(attr, None)


def _mask_layer(mm: MoEModel, layer: MoELayer, plan: Plan, restore: list) -> None:
    adapter, n = mm.adapter, mm.n_experts
    keep = plan.keep(layer.index, n)
    beta = plan.dynamic_skip.get(layer.index)
    if keep == list(range(n)) and plan.top_k is None and beta is None:
        return
    sub = pruned_router(adapter, layer.router, keep, plan.top_k, n)
    _set_instance_attr(layer.router, "forward", _remapping_forward(adapter, sub, keep, n, beta), restore)
    if adapter.block_top_k_attr and plan.top_k is not None:
        _set_instance_attr(layer.block, adapter.block_top_k_attr, plan.top_k, restore)


def _set_instance_attr(obj: Any, attr: str, value: Any, restore: list) -> None:
    had = attr in obj.__dict__
    restore.append((obj, attr, obj.__dict__.get(attr), had))
    obj.__dict__[attr] = value
