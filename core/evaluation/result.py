"""What an evaluation gives back: a task's scores, and the size of the model a plan would leave."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..model import MoEModel
from ..plan import Plan
from .interval import score_interval

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class EvalResult:
    """A task's scores for one model (and plan) on one split."""

    task: str
    split: str
    metric_kind: str
    n_examples: int
    metrics: dict[str, float]
    agreement: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    plan_digest: str | None = None
    weights_digest: str | None = None  # the routers' weights digest of the scored model (lm-eval results carry it)
    seconds: float = 0.0
    predictions: list[str] = field(default_factory=list)
    # per-example values of the metrics that are means of them, and their weights where not all 1 (the loss:
    # scored tokens); kept in memory for intervals and paired changes, left out of to_dict (JSON outputs)
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)
    weights: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for bulky in ("samples", "weights"):
            data.pop(bulky)
        return data

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The 95% interval of ``metric`` (see :mod:`.interval`), or None when it is not a mean of
        per-example values (perplexity, lm-eval's results)."""
        if metric not in self.samples:
            return None
        return score_interval(self.samples[metric], self.weights.get(metric))


def plan_cost(mm: MoEModel, plan: Plan | None) -> dict[str, float]:
    """Total and active parameters and weight bytes of the model a plan would leave."""
    info = mm.info()
    n, top_k = mm.n_experts, mm.top_k if plan is None or plan.top_k is None else plan.top_k
    per_expert = {layer.index: sum(p.numel() for p in layer.experts.parameters()) / n for layer in mm.layers}
    bytes_per_param = info.weight_bytes / info.total_params
    kept = {i: len(plan.keep(i, n)) if plan else n for i in per_expert}
    removed = sum((n - kept[i]) * per_expert[i] for i in per_expert)
    total = info.total_params - removed
    active = info.total_params - info.expert_params + sum(min(top_k, kept[i]) * per_expert[i] for i in per_expert)
    return {"total_params": total, "active_params": active, "weight_bytes": total * bytes_per_param,
            "total_params_full": info.total_params, "active_params_full": info.active_params}
