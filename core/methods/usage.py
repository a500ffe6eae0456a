"""Baselines that need no search: random, frequency, soft activation (router-weight mass), top-k reduction.

Frequency and soft activation count the routing on the calibration texts in memory, seen by the same
router hooks as profiles (:class:`~core.recorder.RouterRecorder`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..masking import masked
from ..model import MoEModel
from ..plan import Plan
from ..profile_writer import TokenBatch
from ..recorder import RouterRecorder
from .base import (
    Calibration,
    Described,
    ExpertScores,
    ProgressFn,
    ScoredMethod,
    Target,
    finish_plan,
    plan_from_scores,
)
from .reap import encode_calibration, padded_batches

MAX_LENGTH = 512  # calibration texts are cut where profiles cut them


class RoutingCounts:
    """A :class:`RouterRecorder` sink that keeps, per MoE layer, how often each expert is in a real token's
    top-k and the gate weight it receives, instead of writing rows."""

    def __init__(self, layers: list[int], n_experts: int) -> None:
        self.counts = {layer: np.zeros(n_experts, np.int64) for layer in layers}
        self.mass = {layer: np.zeros(n_experts, np.float64) for layer in layers}

    def add(self, tokens: TokenBatch, layer: int, experts: torch.Tensor, weights: torch.Tensor,
            probs: torch.Tensor | None = None) -> None:
        if tokens.valid is not None:  # padding rows never count
            experts, weights = experts[tokens.valid.to(experts.device)], weights[tokens.valid.to(weights.device)]
        ids = experts.reshape(-1).cpu().numpy().astype(np.int64)
        gate = weights.reshape(-1).cpu().numpy()
        n = len(self.counts[layer])
        self.counts[layer] += np.bincount(ids, minlength=n)
        self.mass[layer] += np.bincount(ids, weights=gate, minlength=n)


def routing_usage(mm: MoEModel, calibration: Calibration, batch_size: int = 16,
                  progress: ProgressFn | None = None) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """Per MoE layer: how often each expert is in a token's top-k, and the gate weight it receives."""
    seqs = encode_calibration(mm, calibration, MAX_LENGTH)
    say = progress or (lambda *_: None)
    sink = RoutingCounts(mm.layer_indices, mm.n_experts)
    with masked(mm, None), torch.inference_mode(), RouterRecorder(mm, sink, with_probs=False) as recorder:
        for lo, (batch, _) in zip(range(0, len(seqs), batch_size), padded_batches(mm, seqs, batch_size)):
            with recorder.batch(calibration.task.name, list(range(lo, lo + len(batch["input_ids"])))):
                mm.model(**batch)
            say("recording routing", min(1.0, (lo + batch_size) / len(seqs)))
    say("routing recorded", 1.0)
    counts = {layer: c.astype(float) for layer, c in sink.counts.items()}
    return counts, sink.mass, len(seqs)


@dataclass
class Frequency(ScoredMethod):
    """Keep the experts most often in the top-k on calibration tokens."""

    label = "Frequency"
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

    label = "Soft activation (gate-weight mass)"
    name: str = "soft_activation"

    def score(self, counts: np.ndarray, mass: np.ndarray) -> np.ndarray:
        return mass


@dataclass
class Random(Described):
    """Keep a uniformly random set of experts per layer (the same number from every routing group)."""

    label = "Random"
    seed: int = 0
    name: str = "random"

    def plan(self, mm: MoEModel, calibration: Calibration | None, target: Target,
             progress: ProgressFn | None = None) -> Plan:
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        scores = {layer: rng.random(mm.n_experts) for layer in mm.layer_indices}
        plan = plan_from_scores(mm, scores, target, self.name, self.parameters(), None, started, 0, seed=self.seed)
        plan.extra.pop("scores")  # random draws are not expert scores
        return plan


@dataclass
class TopKReduction(Described):
    """Keep every expert and route each token to fewer of them (top-k from the target, else k - 1)."""

    label = "Top-k reduction (keep all experts)"
    keeps_all_experts = True
    name: str = "top_k"

    def plan(self, mm: MoEModel, calibration: Calibration | None, target: Target,
             progress: ProgressFn | None = None) -> Plan:
        top_k = target.top_k or max(1, mm.top_k - 1)
        reduced = Target(keep=mm.n_experts, top_k=top_k)
        return finish_plan(mm, {}, reduced, self.name, {"top_k": top_k}, None, time.perf_counter(), 0)
