"""Apply a plan to a loaded model without reloading it, exactly as physical pruning would behave.

Each MoE router is temporarily replaced by a *pruned copy* (its expert-indexed tensors sliced to the kept
experts, top-k set), the very router a physically pruned checkpoint would build. Its decisions are mapped
back to the original expert ids, so the untouched expert weights are used and the original parameters
are never written. Undoing restores the original ``forward``: outputs afterwards are bit-identical.

Masking changes the model in place, so it holds the model's lock: two threads with different plans are
serialised and each gets its own plan's result.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, MoELayer
from .model import MoEModel
from .plan import Plan, validate_plan
from .router_mapping import PROBS, mapped_probs, require_probs, route_mapped


def _offload_hook(module: nn.Module) -> Any:
    """accelerate's hook that keeps ``module``'s own tensors off the module (offloaded to CPU or disk), if any."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def held_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()``, with the tensors accelerate offloaded (meta tensors in the module) read from the
    offload hook's ``weights_map`` onto the device the hook runs the module on."""
    state = module.state_dict()
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            owner_name, _, leaf = name.rpartition(".")
            hook = _offload_hook(module.get_submodule(owner_name))
            if hook is not None:
                state[name] = hook.weights_map[leaf].to(hook.execution_device)
    return state


def slice_router_state(adapter: Adapter, router: nn.Module, keep: list[int]) -> dict[str, torch.Tensor]:
    """The router's parameters and buffers restricted to ``keep`` (in that order), keyed like ``state_dict``."""
    out = {}
    for name, tensor in held_state(router).items():
        dim = adapter.router_expert_dim(name, tensor)
        index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
        out[name] = tensor.index_select(dim, index).clone()
    return out


def mapped_router_state(adapter: Adapter, router: nn.Module, mapping: torch.Tensor) -> dict[str, torch.Tensor]:
    """EEP router mapping: every expert-indexed router tensor T becomes ``mapping @ T`` along the expert axis
    (new router row j = sum_i mapping[j, i] * row i). Applied to the router's rows, so the mapped router
    is an ordinary router and the merged model an ordinary checkpoint; one-hot rows give plain slicing."""
    out = {}
    for name, tensor in held_state(router).items():
        dim = adapter.router_expert_dim(name, tensor)
        moved = tensor.float().movedim(dim, 0)
        mixed = torch.tensordot(mapping.to(moved.device, torch.float32), moved, dims=([1], [0]))
        out[name] = mixed.movedim(0, dim).to(tensor.dtype).contiguous()
    return out


def merged_expert_tensor(tensor: torch.Tensor, merging: torch.Tensor, n_experts: int) -> torch.Tensor:
    """EEP expert merging of one stacked expert tensor: new expert j = sum_i merging[j, i] * expert i.
    Experts are stacked on axis 0 ([E, ...]), or flat as DBRX stores them ([E * F, H])."""
    stacked = tensor.view(n_experts, -1, *tensor.shape[1:]) if tensor.shape[0] != n_experts else tensor
    mixed = torch.tensordot(merging.to(tensor.device, torch.float32), stacked.float(), dims=([1], [0]))
    mixed = mixed.to(tensor.dtype)
    return mixed.reshape(-1, *tensor.shape[1:]) if tensor.shape[0] != n_experts else mixed


def build_router(router: nn.Module, state: dict[str, torch.Tensor], n_new: int, top_k: int | None,
                 n_experts: int) -> nn.Module:
    """A standalone copy of ``router`` holding ``state`` (a pruned or mapped router over ``n_new`` experts),
    with its own top-k."""
    sub = copy.deepcopy(router)
    for name, tensor in state.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = sub.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    for module in sub.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module.__dict__.pop("forward", None)
        for attr in ("num_experts", "n_routed_experts", "out_features"):
            if getattr(module, attr, None) == n_experts:
                setattr(module, attr, n_new)
        if top_k is not None and hasattr(module, "top_k"):
            module.top_k = top_k
    return sub


def pruned_router(adapter: Adapter, router: nn.Module, keep: list[int], top_k: int | None,
                  n_experts: int) -> nn.Module:
    """A standalone copy of ``router`` over the kept experts, with its own top-k."""
    return build_router(router, slice_router_state(adapter, router, keep), len(keep), top_k, n_experts)


def _expand(values: torch.Tensor, keep_t: torch.Tensor, n_experts: int, fill: float) -> torch.Tensor:
    full = values.new_full((values.shape[0], n_experts), fill)
    return full.index_copy_(1, keep_t, values)


def skip_weak_experts(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """NAEE dynamic skipping: zero the weight of every chosen expert below ``beta`` times the strongest one and
    rescale the survivors so the token's weights sum to what they summed to before. For Mixtral (weights summing
    to 1) that is the official renormalisation: Expert_Sparsity ``model/modeling_mixtral.py`` lines 52-56 zero
    the weaker of the top-2 softmax weights, then divide by the sum, so a lone survivor gets weight 1."""
    top = weights.max(dim=-1, keepdim=True).values
    kept = torch.where(weights < beta * top, torch.zeros_like(weights), weights)
    before, after = weights.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
    skipped = (kept != weights).any(dim=-1, keepdim=True)  # tokens that skipped nothing keep their weights as they are
    # divided by the survivors' sum first, as the official code: a lone survivor gets exactly the old sum (1 on Mixtral)
    return torch.where(skipped, kept / torch.where(after != 0, after, torch.ones_like(after)) * before, weights)


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


def _probs_mapping_forward(adapter: Adapter, whole: nn.Module, mapping: torch.Tensor, keep: list[int], n_experts: int,
                           top_k: int, normalisation: str, beta: float | None):
    """Forward of a router under the paper's probs mapping (``core.router_mapping``): the original router's
    logits, ``p' = R · softmax(logits)`` over the kept slots, top-k and the family's normalisation; decisions in
    original expert ids (slot j is kept expert ``keep[j]``). The logits returned hold log p' on the kept experts
    (-inf elsewhere, and where p' is not positive), for anything that reads them."""
    keep_t: torch.Tensor | None = None

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal keep_t
        out = whole(hidden_states, *args, **kwargs)
        logits = adapter.logits(out)
        if keep_t is None or keep_t.device != logits.device:
            keep_t = torch.tensor(keep, dtype=torch.long, device=logits.device)
        mapped = mapped_probs(logits, mapping)
        weights, slots = route_mapped(mapped, top_k, normalisation)
        if beta is not None:
            weights = skip_weak_experts(weights, beta)
        mapped_logits = torch.where(mapped > 0, mapped.clamp(min=torch.finfo(mapped.dtype).tiny).log(),
                                    torch.full_like(mapped, float("-inf")))
        full_logits = _expand(mapped_logits, keep_t, n_experts, float("-inf")).to(logits.dtype)
        return full_logits, weights.to(out[1].dtype), keep_t[slots]

    return forward


@contextlib.contextmanager
def masked(mm: MoEModel, plan: Plan | None) -> Iterator[MoEModel]:
    """Run the block with ``plan`` applied to ``mm``; ``None`` means the unpruned model (still locked)."""
    with mm.lock:
        if plan is None:
            yield mm
            return
        validate_plan(plan, mm.routing_spec())
        undo: list[Callable[[], None]] = []
        try:
            for layer in mm.layers:
                _mask_layer(mm, layer, plan, undo)
            _set_instance_attr(mm, "active_plan", plan, undo)
            yield mm
        finally:
            for step in reversed(undo):
                step()


def _mask_layer(mm: MoEModel, layer: MoELayer, plan: Plan, undo: list) -> None:
    adapter, n = mm.adapter, mm.n_experts
    keep = plan.keep(layer.index, n)
    beta = plan.dynamic_skip.get(layer.index)
    merge = plan.merge.get(layer.index)
    if keep == list(range(n)) and plan.top_k is None and beta is None and merge is None:
        return
    if merge is None:
        sub = pruned_router(adapter, layer.router, keep, plan.top_k, n)
        forward = _remapping_forward(adapter, sub, keep, n, beta)
    elif plan.mapping == PROBS:
        router_map, expert_map = merge
        normalisation = require_probs(adapter, mm.config)
        whole = build_router(layer.router, held_state(layer.router), n, None, n)  # the original router, to read its logits over all experts
        forward = _probs_mapping_forward(adapter, whole, router_map, keep, n, plan.top_k or mm.top_k, normalisation,
                                         beta)
        _write_merged_experts(layer, keep, expert_map, n, undo)
    else:
        router_map, expert_map = merge
        sub = build_router(layer.router, mapped_router_state(adapter, layer.router, router_map), len(keep),
                           plan.top_k, n)
        forward = _remapping_forward(adapter, sub, keep, n, beta)
        _write_merged_experts(layer, keep, expert_map, n, undo)
    _set_instance_attr(layer.router, "forward", forward, undo)
    if adapter.block_top_k_attr and plan.top_k is not None:
        _set_instance_attr(layer.block, adapter.block_top_k_attr, plan.top_k, undo)


def _write_merged_experts(layer: MoELayer, keep: list[int], merging: torch.Tensor, n: int, undo: list) -> None:
    """Put merged expert j into the slot of kept expert ``keep[j]``; the originals of those slots are
    copied aside and written back on undo, bit for bit."""
    hook = _offload_hook(layer.experts)
    if hook is not None:  # offloaded: the hook loads the experts from its weights_map before each forward
        merged = {}
        for name, held in held_state(layer.experts).items():
            if "." in name or not held.is_floating_point():
                continue
            stacked = held.clone().view(n, -1, *held.shape[1:]) if held.shape[0] != n else held.clone()
            index = torch.tensor(keep, dtype=torch.long, device=held.device)
            mixed = merged_expert_tensor(held, merging, n)
            stacked.index_copy_(0, index, mixed.view(len(keep), -1, *held.shape[1:]) if held.shape[0] != n else mixed)
            merged[name] = stacked.view(held.shape)
        original = hook.weights_map
        hook.weights_map = collections.ChainMap(merged, original)  # the merged slots over the offloaded originals
        undo.append(lambda hook=hook, original=original: setattr(hook, "weights_map", original))
        return
    for param in layer.experts.parameters():
        stacked = param.data.view(n, -1, *param.shape[1:]) if param.shape[0] != n else param.data
        index = torch.tensor(keep, dtype=torch.long, device=param.device)
        saved = stacked.index_select(0, index).clone()
        merged = merged_expert_tensor(param.data, merging, n)
        merged = merged.view(len(keep), -1, *param.shape[1:]) if param.shape[0] != n else merged
        stacked.index_copy_(0, index, merged)
        undo.append(lambda stacked=stacked, index=index, saved=saved: stacked.index_copy_(0, index, saved))


def _set_instance_attr(obj: Any, attr: str, value: Any, undo: list) -> None:
    had, old = attr in obj.__dict__, obj.__dict__.get(attr)
    obj.__dict__[attr] = value

    def restore() -> None:
        if had:
            obj.__dict__[attr] = old
        else:
            obj.__dict__.pop(attr, None)

    undo.append(restore)
