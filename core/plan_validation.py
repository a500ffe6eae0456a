"""Checking a plan against the model it is applied to: what masking or export can honour, given the model's
routing (experts, top-k, MoE layers, routing groups), each refusal one sentence saying what to change."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import MoEScopeError
from .plan_fields import show

if TYPE_CHECKING:
    from .plan import Plan


@dataclass(frozen=True)
class RoutingSpec:
    """What validation needs to know about a model's routing (see ``MoEModel.routing_spec``)."""

    family: str
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    n_groups: int = 1
    topk_group: int | None = None
    fixed_top_k: bool = False
    group_top_needs: int = 1  # experts a group must keep for its group score (DeepSeek-V3 sums the top 2)
    skippable: bool = True  # whether masking can apply dynamic skipping (routers that return decisions)


def validate_plan(plan: Plan, spec: RoutingSpec, for_export: bool = False) -> None:
    """Reject plans masking or export cannot honour, saying what to change. Linear in the plan's size."""
    n = spec.n_experts
    top_k = plan.top_k if plan.top_k is not None else spec.top_k
    if plan.top_k is not None:
        if spec.fixed_top_k and plan.top_k != spec.top_k:
            raise MoEScopeError(f"{spec.family} always routes to {spec.top_k} experts; set top_k to null or "
                                f"{spec.top_k}.")
        if not 1 <= plan.top_k <= n:
            raise MoEScopeError(f"top_k {show(plan.top_k)} is out of range; choose 1 to {n}.")
    for layer, beta in plan.dynamic_skip.items():
        _check_moe_layer(f"dynamic_skip names layer {layer}, which is", layer, spec)
        if not 0 <= beta <= 1:
            raise MoEScopeError(f"dynamic_skip beta {beta} for layer {layer} must lie between 0 and 1.")
        if not spec.skippable:
            raise MoEScopeError(f"{spec.family} routers cannot skip experts dynamically; remove dynamic_skip.")
    if for_export and plan.dynamic_skip:
        raise MoEScopeError("dynamic_skip is a rule applied at inference that plain transformers cannot store; "
                            "remove it from the plan to export (keep it for masked evaluation).")
    for layer, keep in plan.layers.items():
        _check_moe_layer(f"Layer {layer} is", layer, spec)
        _check_keep(layer, keep, spec, top_k)
    for layer, (router_map, expert_map) in plan.merge.items():
        _check_moe_layer(f"merge names layer {layer}, which is", layer, spec)
        keep = plan.keep(layer, n)
        for what, matrix in (("router", router_map), ("experts", expert_map)):
            if tuple(matrix.shape) != (len(keep), n):
                raise MoEScopeError(f"merge matrix {what!r} of layer {layer} is {tuple(matrix.shape)}; it must be "
                                    f"[{len(keep)} kept, {n} experts].")
            if not bool(matrix.isfinite().all()):
                raise MoEScopeError(f"merge matrix {what!r} of layer {layer} holds non-finite values.")
    if for_export:
        counts = {layer: len(plan.keep(layer, n)) for layer in spec.moe_layers}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise MoEScopeError(f"{spec.family} checkpoints need the same number of experts in every MoE layer "
                                f"(kept per layer: {shown}); make the counts equal to export.")


def _ids(ids: list[int], limit: int = 8) -> str:
    """A list of ids for a message, cut after ``limit`` so that a huge plan still gets a one-line message."""
    shown = ", ".join(show(e, 24) for e in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _check_moe_layer(subject: str, layer: int, spec: RoutingSpec) -> None:
    if layer not in spec.moe_layers:
        raise MoEScopeError(f"{subject} not a MoE layer of this model; MoE layers are "
                            f"{_ids(list(spec.moe_layers), 16)}.")


def _check_keep(layer: int, keep: list[int], spec: RoutingSpec, top_k: int) -> None:
    n = spec.n_experts
    if len(keep) > n:
        raise MoEScopeError(f"Layer {layer} lists {len(keep)} experts but the model has only {n}; list each kept "
                            f"expert once, with ids 0 to {n - 1}.")
    bad = [e for e in keep if not 0 <= e < n]
    if bad:
        raise MoEScopeError(f"Layer {layer} keeps expert(s) {_ids(bad)} out of range; expert ids run 0 to {n - 1}.")
    counts = Counter(keep)
    if len(counts) != len(keep):
        dup = sorted(e for e, c in counts.items() if c > 1)
        raise MoEScopeError(f"Layer {layer} lists expert(s) {_ids(dup)} more than once; list each kept expert once.")
    if len(keep) < top_k:
        raise MoEScopeError(f"Layer {layer} keeps {len(keep)} expert(s) but routing picks top-{top_k}; keep at "
                            f"least {top_k} or lower top_k.")
    if spec.n_groups > 1:
        _check_groups(layer, keep, spec, top_k)


def _check_groups(layer: int, keep: list[int], spec: RoutingSpec, top_k: int) -> None:
    size = spec.n_experts // spec.n_groups
    per_group = [sum(1 for e in keep if e // size == g) for g in range(spec.n_groups)]
    if len(set(per_group)) > 1:
        raise MoEScopeError(f"Layer {layer} keeps {per_group} experts in its {spec.n_groups} routing groups; grouped "
                            f"routing needs the same number kept in every group of {size}.")
    if per_group[0] < spec.group_top_needs:
        raise MoEScopeError(f"Layer {layer} keeps {per_group[0]} expert(s) per group; {spec.family} scores a group by "
                            f"its top {spec.group_top_needs}, so keep at least {spec.group_top_needs} per group.")
    if spec.topk_group is not None and top_k > spec.topk_group * per_group[0]:
        raise MoEScopeError(f"Layer {layer}: top-{top_k} cannot be chosen from {spec.topk_group} group(s) of "
                            f"{per_group[0]} kept experts; keep more per group or lower top_k.")
