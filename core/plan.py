"""Pruning plans: which experts each MoE layer keeps, and the top-k to route with.

A plan is plain JSON so that any method can produce it, the dashboard can download it, and export can
apply it later on another machine. Later work adds fields (method, scores, merge matrices, provenance);
they travel in ``extra`` untouched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .errors import MoEScopeError
from .io import atomic_write_text

PLAN_FORMAT = "moescope-plan"
PLAN_VERSION = 1


@dataclass
class Plan:
    """Experts kept per MoE layer (real layer index); MoE layers not listed keep every expert."""

    layers: dict[int, list[int]]
    top_k: int | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {int(k): [int(e) for e in v] for k, v in self.layers.items()}

    def keep(self, layer: int, n_experts: int) -> list[int]:
        """Kept experts of a layer in ascending order (the order physical pruning renumbers them in)."""
        return sorted(self.layers.get(layer, range(n_experts)))

    def experts_kept(self, n_experts: int) -> int:
        """Experts kept per MoE layer (the fewest over layers); all of them for a plan that only changes top-k."""
        return min((len(kept) for kept in self.layers.values()), default=n_experts)

    @property
    def dynamic_skip(self) -> dict[int, float]:
        """NAEE dynamic skipping thresholds per layer (``extra["dynamic_skip"]``): at inference a chosen
        expert whose gate weight is below beta times the strongest one's is skipped."""
        return {int(k): float(v) for k, v in self.extra.get("dynamic_skip", {}).items()}

    @property
    def merge(self) -> dict[int, tuple["torch.Tensor", "torch.Tensor"]]:
        """EEP merging per layer (``extra["merge"]``): the router-mapping and expert-merging matrices, each
        [kept, n_experts]; merged expert j takes kept expert j's place."""
        import torch

        return {int(k): (torch.tensor(v["router"], dtype=torch.float32), torch.tensor(v["experts"], dtype=torch.float32))
                for k, v in self.extra.get("merge", {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "top_k": self.top_k,
            "layers": {str(k): {"keep": list(v)} for k, v in sorted(self.layers.items())},
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise MoEScopeError(f"Not a MoEScope plan: expected a JSON object with \"format\": \"{PLAN_FORMAT}\".")
        if data.get("version") != PLAN_VERSION:
            raise MoEScopeError(f"Plan version {data.get('version')!r} is not supported; this MoEScope reads "
                                f"version {PLAN_VERSION}.")
        layers_raw = data.get("layers")
        if not isinstance(layers_raw, dict):
            raise MoEScopeError("Plan has no \"layers\" object; give {\"<layer index>\": {\"keep\": [ids]}}.")
        layers: dict[int, list[int]] = {}
        for key, entry in layers_raw.items():
            keep = entry.get("keep") if isinstance(entry, dict) else None
            if not str(key).lstrip("-").isdigit() or not isinstance(keep, list) \
                    or not all(isinstance(e, int) and not isinstance(e, bool) for e in keep):
                raise MoEScopeError(f"Plan layer {key!r} must be a layer index mapping to {{\"keep\": [expert ids]}}.")
            layers[int(key)] = keep
        top_k = data.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
            raise MoEScopeError(f"Plan top_k must be an integer or null, not {top_k!r}.")
        known = {"format", "version", "model", "top_k", "layers"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(layers=layers, top_k=top_k, model=data.get("model"), extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoEScopeError(f"No plan file at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoEScopeError(f"{path} is not a MoEScope plan: it is not valid JSON ({exc}).") from None
        return cls.from_dict(data)

    def digest(self) -> str:
        """Identity of what the plan does to the model (kept sets, top-k, merging, skipping), for caches."""
        core = {"top_k": self.top_k, "layers": {str(k): sorted(v) for k, v in sorted(self.layers.items())},
                "merge": self.extra.get("merge"), "dynamic_skip": self.extra.get("dynamic_skip")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


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
    """Reject plans masking or export cannot honour, saying what to change."""
    n = spec.n_experts
    top_k = plan.top_k if plan.top_k is not None else spec.top_k
    if plan.top_k is not None:
        if spec.fixed_top_k and plan.top_k != spec.top_k:
            raise MoEScopeError(f"{spec.family} always routes to {spec.top_k} experts; set top_k to null or "
                                f"{spec.top_k}.")
        if not 1 <= plan.top_k <= n:
            raise MoEScopeError(f"top_k {plan.top_k} is out of range; choose 1 to {n}.")
    for layer, beta in plan.dynamic_skip.items():
        if layer not in spec.moe_layers:
            raise MoEScopeError(f"dynamic_skip names layer {layer}, which is not a MoE layer; MoE layers are "
                                f"{list(spec.moe_layers)}.")
        if not 0 <= beta <= 1:
            raise MoEScopeError(f"dynamic_skip beta {beta} for layer {layer} must lie between 0 and 1.")
        if not spec.skippable:
            raise MoEScopeError(f"{spec.family} routers cannot skip experts dynamically; remove dynamic_skip.")
    if for_export and plan.dynamic_skip:
        raise MoEScopeError("dynamic_skip is a rule applied at inference that plain transformers cannot store; "
                            "remove it from the plan to export (keep it for masked evaluation).")
    for layer, (router_map, expert_map) in plan.merge.items():
        keep = plan.keep(layer, n)
        for what, matrix in (("router", router_map), ("experts", expert_map)):
            if tuple(matrix.shape) != (len(keep), n):
                raise MoEScopeError(f"merge matrix {what!r} of layer {layer} is {tuple(matrix.shape)}; it must be "
                                    f"[{len(keep)} kept, {n} experts].")
            if not bool(matrix.isfinite().all()):
                raise MoEScopeError(f"merge matrix {what!r} of layer {layer} holds non-finite values.")
    for layer, keep in plan.layers.items():
        if layer not in spec.moe_layers:
            raise MoEScopeError(f"Layer {layer} is not a MoE layer of this model; MoE layers are "
                                f"{list(spec.moe_layers)}.")
        bad = [e for e in keep if not 0 <= e < n]
        if bad:
            raise MoEScopeError(f"Layer {layer} keeps expert(s) {bad} out of range; expert ids run 0 to {n - 1}.")
        if len(set(keep)) != len(keep):
            dup = sorted({e for e in keep if keep.count(e) > 1})
            raise MoEScopeError(f"Layer {layer} lists expert(s) {dup} more than once; list each kept expert once.")
        if len(keep) < top_k:
            raise MoEScopeError(f"Layer {layer} keeps {len(keep)} expert(s) but routing picks top-{top_k}; keep at "
                                f"least {top_k} or lower top_k.")
        if spec.n_groups > 1:
            _check_groups(layer, keep, spec, top_k)
    if for_export:
        counts = {layer: len(plan.keep(layer, n)) for layer in spec.moe_layers}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise MoEScopeError(f"{spec.family} checkpoints need the same number of experts in every MoE layer "
                                f"(kept per layer: {shown}); make the counts equal to export.")


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
