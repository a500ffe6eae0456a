"""Baselines that need no search: random, frequency, soft activation (router-weight mass), top-k reduction.

Frequency and soft activation read the routing on the calibration texts, recorded with the same router
hooks as profiles.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..aggregate import expert_usage
from ..model import MoEModel
from ..plan import Plan
from ..profile import Profile
from ..profiling import profile_texts
from .base import (
    Calibration,
    ExpertScores,
    ProgressFn,
    ScoredMethod,
    Target,
    finish_plan,
    plan_from_scores,
)


def routing_usage(mm: MoEModel, calibration: Calibration, batch_size: int = 16,
                  progress: ProgressFn | None = None) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """Per MoE layer: how often each expert is in a token's top-k, and the gate weight it receives."""
    texts = calibration.texts()
    say = progress or (lambda *_: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration.parquet"
        profile_texts(mm, {calibration.task.name: texts}, path, batch_size=batch_size, progress=False)
        usage = expert_usage(Profile(path))
    say("routing recorded", 1.0)
    counts, mass = {}, {}
    for layer in mm.layer_indices:
        rows = usage[usage.layer == layer].sort_values("expert")
        counts[layer] = rows["count"].to_numpy(float)
        mass[layer] = rows["weight_mass"].to_numpy(float)
    return counts, mass, len(texts)


@dataclass
class Frequency(ScoredMethod):
    """Keep the experts most often in the top-k on calibration tokens."""

    name: str = "frequency"
    batch_size: int = 16

    def score(self, counts: np.ndarray, mass: np.ndarray) -> np.ndarray:
        return counts

    def expert_scores(self, mm: MoEModel, calibration: Calibration,
                      progress: ProgressFn | None = None) -> ExpertScores:
        started = time.perf_counter()
        counts, mass, passes = routing_usage(mm, calibration, self.batch_size, progress)
        return ExpertScores({layer: self.score(counts[layer], mass[layer]) for layer in counts}, passes,
                            time.perf_counter() - started)


@dataclass
class SoftActivation(Frequency):
    """Keep the experts with the largest accumulated routing weight (sum of applied gate weights)."""

    name: str = "soft_activation"

    def score(self, counts: np.ndarray, mass: np.ndarray) -> np.ndarray:
        return mass


@dataclass
class Random:
    """Keep a uniformly random set of experts per layer (the same number from every routing group)."""

    seed: int = 0
    name: str = "random"

    def plan(self, mm: MoEModel, calibration: Calibration | None, target: Target,
             progress: ProgressFn | None = None) -> Plan:
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        scores = {layer: rng.random(mm.n_experts) for layer in mm.layer_indices}
        plan = plan_from_scores(mm, scores, target, self.name, {"seed": self.seed}, None, started, 0, seed=self.seed)
        plan.extra.pop("scores")  # random draws are not expert scores
        return plan


@dataclass
class TopKReduction:
    """Keep every expert and route each token to fewer of them (top-k from the target, else k - 1)."""

    name: str = "top_k"

    def plan(self, mm: MoEModel, calibration: Calibration | None, target: Target,
             progress: ProgressFn | None = None) -> Plan:
        top_k = target.top_k or max(1, mm.top_k - 1)
        reduced = Target(keep=mm.n_experts, top_k=top_k)
        return finish_plan(mm, {}, reduced, self.name, {"top_k": top_k}, None, time.perf_counter(), 0)
