"""What every pruning method shares: the target it must meet, the calibration data it may look at, and how
per-expert scores become a plan.

A method is a small dataclass with a ``name``, constructor parameters, and ``plan(mm, calibration, target)``
returning a :class:`~core.plan.Plan` that meets the target, carrying its provenance (method, parameters,
seed, calibration digest, scores, forward passes, wall time) in ``extra`` — like scikit-learn estimators,
parameters go to the constructor and data to the call. Each method class describes itself
(:class:`Described`): its label, its kind (score-based or search), whether it can stop early or resume, and
its parameters read from its dataclass fields, as scikit-learn's ``get_params`` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from ..errors import MoEScopeError
from ..model import MoEModel
from ..plan import Plan, validate_plan
from ..tasks import TaskSpec, get_task_spec, load_task, training_text

ProgressFn = Callable[[str, float], None]  # (what is happening, fraction done 0..1)

SCORE, SEARCH = "score", "search"  # a method's kind: rank experts by one calibration pass, or search
RUNTIME = {"runtime": True}  # field metadata: a run-time handle (a callback, a state file), not a setting


@dataclass(frozen=True)
class Target:
    """How small the pruned model should be: ``keep`` experts per MoE layer, or a ``ratio`` of experts
    removed (0.5 keeps half), and optionally the top-k to route with."""

    keep: int | None = None
    ratio: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.ratio is None):
            raise MoEScopeError("Give exactly one of keep (experts per layer) or ratio (fraction removed).")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise MoEScopeError(f"ratio {self.ratio} must be at least 0 and below 1 (the fraction of experts removed).")

    def experts_kept(self, mm: MoEModel) -> int:
        """Experts each layer keeps: at least top-k, and for grouped routing the same number in every group,
        enough per group for the group's score and for top-k to be found in the chosen groups."""
        spec = mm.routing_spec()
        n, groups = mm.n_experts, spec.n_groups
        top_k = self.top_k or mm.top_k
        keep = self.keep if self.keep is not None else round(n * (1 - self.ratio))
        keep = max(keep, top_k, groups * spec.group_top_needs)
        if spec.topk_group:
            keep = max(keep, groups * math.ceil(top_k / spec.topk_group))
        keep = int(math.ceil(keep / groups) * groups)
        if not top_k <= keep <= n:
            raise MoEScopeError(f"Cannot keep {keep} of {n} experts with top-{top_k}; keep between {top_k} and {n}.")
        return keep


@dataclass
class Calibration:
    """The data a method may look at: a task's split (default ``calibration``), at most ``limit`` examples."""

    task: TaskSpec
    split: str = "calibration"
    limit: int | None = None
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, task: TaskSpec | str, split: str = "calibration", limit: int | None = None) -> "Calibration":
        return cls(get_task_spec(task), split, limit)

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            data = load_task(self.task, self.split)
            if self.limit:
                data = data.select(range(min(self.limit, len(data))))
            self._rows = list(data)
        return self._rows

    def texts(self) -> list[str]:
        """Each example as the model would read it whole: prompt followed by its reference answer."""
        return ["".join(training_text(self.task, row)) for row in self.rows()]

    def digest(self) -> str:
        blob = json.dumps([self.task.name, self.split, self.rows()], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MethodInfo:
    """What a method says about itself, for the dashboard and the workbench."""

    name: str
    label: str
    kind: str  # SCORE or SEARCH
    can_stop: bool  # a search that stops when asked and returns its best plan so far
    can_resume: bool  # a search that saves its state (``state_path``) and resumes from it
    keeps_all_experts: bool  # changes only the top-k, so the number of experts kept is not a setting
    parameters: dict[str, Any]  # name -> default

    @property
    def is_search(self) -> bool:
        return self.kind == SEARCH


class Described:
    """Self-description shared by every method class (a dataclass): class attributes say what it is, the
    dataclass fields (but ``name`` and run-time handles marked :data:`RUNTIME`) are its parameters."""

    name: str
    label = ""  # plain class attributes, not dataclass fields
    kind = SCORE
    can_stop = False
    can_resume = False
    keeps_all_experts = False

    @classmethod
    def _parameter_fields(cls) -> list:
        return [f for f in fields(cls) if f.name != "name" and not f.metadata.get("runtime")]

    def get_params(self) -> dict[str, Any]:
        """The method's parameters and their values, as scikit-learn's ``get_params``."""
        return {f.name: getattr(self, f.name) for f in self._parameter_fields()}

    def parameters(self) -> dict[str, Any]:
        """The settings a plan records (``extra["parameters"]``): by default every parameter."""
        return self.get_params()

    @classmethod
    def describe(cls) -> MethodInfo:
        defaults = {f.name: f.default for f in cls._parameter_fields()}
        return MethodInfo(cls.name, cls.label or cls.name, cls.kind, cls.can_stop, cls.can_resume,
                          cls.keeps_all_experts, defaults)


class PruningMethod(Protocol):
    name: str

    def plan(self, mm: MoEModel, calibration: Calibration, target: Target,
             progress: ProgressFn | None = None) -> Plan: ...


@dataclass
class ExpertScores:
    """Per-layer expert scores from one calibration pass. Any target's plan follows from them without
    another pass, so the dashboard can move the pruning ratio instantly."""

    scores: dict[int, np.ndarray]
    forward_passes: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class ScoredMethod(Described):
    """A method that ranks experts by a score and keeps each layer's best: ``expert_scores`` does the
    calibration work once, ``plan`` turns scores into a plan for a target."""

    def expert_scores(self, mm: MoEModel, calibration: Calibration,
                      progress: ProgressFn | None = None) -> ExpertScores:
        raise NotImplementedError

    def plan(self, mm: MoEModel, calibration: Calibration, target: Target, progress: ProgressFn | None = None,
             scores: ExpertScores | None = None) -> Plan:
        target.experts_kept(mm)  # refuse an impossible target before the calibration pass
        scored = scores or self.expert_scores(mm, calibration, progress)
        started = time.perf_counter() - scored.seconds  # the plan's wall time includes the scoring pass
        return plan_from_scores(mm, scored.scores, target, self.name, self.parameters(), calibration, started,
                                scored.forward_passes, **scored.extra)


def top_experts(scores: np.ndarray, keep: int, groups: int = 1) -> list[int]:
    """The ``keep`` highest-scoring experts (ties to the lower id), the same number from every group."""
    n = len(scores)
    size, per_group = n // groups, keep // groups
    chosen: list[int] = []
    for g in range(groups):
        ids = np.arange(g * size, (g + 1) * size)
        order = ids[np.lexsort((ids, -scores[ids]))]
        chosen.extend(int(i) for i in order[:per_group])
    return sorted(chosen)


def plan_from_scores(mm: MoEModel, scores: dict[int, np.ndarray], target: Target, method: str,
                     parameters: dict[str, Any], calibration: Calibration | None, started: float,
                     forward_passes: int, seed: int | None = None, **extra: Any) -> Plan:
    """Keep each layer's top-scoring experts and record how the plan was made."""
    keep = target.experts_kept(mm)
    groups = mm.routing_spec().n_groups
    layers = {layer: top_experts(np.asarray(s, float), keep, groups) for layer, s in scores.items()}
    return finish_plan(mm, layers, target, method, parameters, calibration, started, forward_passes, seed,
                       scores={str(k): [float(x) for x in v] for k, v in scores.items()}, **extra)


def finish_plan(mm: MoEModel, layers: dict[int, list[int]], target: Target, method: str,
                parameters: dict[str, Any], calibration: Calibration | None, started: float,
                forward_passes: int, seed: int | None = None, **extra: Any) -> Plan:
    plan = Plan(layers=layers, top_k=target.top_k, model=mm.source, extra={
        "method": method,
        "parameters": parameters,
        "seed": seed,
        "target": {"keep": target.keep, "ratio": target.ratio, "top_k": target.top_k},
        "calibration": None if calibration is None else {
            "task": calibration.task.name, "split": calibration.split, "limit": calibration.limit,
            "digest": calibration.digest()},
        "forward_passes": forward_passes,
        "wall_time_s": round(time.perf_counter() - started, 3),
        **extra,
    })
    validate_plan(plan, mm.routing_spec())
    return plan
