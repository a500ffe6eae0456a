"""EEP (Liu et al. 2024, arXiv 2407.00945): gradient-free evolutionary search, forward passes only, fitness = the
task metric on the calibration split. The search follows the official code (imagination-research/EEP) by default;
every default below names the setting it comes from (``configs/search/search.yml`` unless said otherwise):

- phase 1, pruning: up to ``population`` = 30 random kept sets per layer group (``max_init_num: 30``), then
  mutation-only steps until about 100 candidates (``discrete_iter: 100``: 30 + ``generations`` 7 x ``offspring``
  10); each group changes with probability ``p_group`` = 0.25 (``weight_change_prob``), each kept slot of a changed
  group with ``p_mutation`` = 0.15 (``discrete_mutate.prob``);
- phase 2, merging: about 300 more steps (``total_iter: 400``: ``merge_generations`` 30 x 10) from the whole
  phase-1 archive, with crossover ``p_crossover`` = 0.3 (``crossover.prob``, row-wise, ``from_front_prob: 0.6``),
  Gaussian noise ``merge_sigma`` = 0.065 on each entry with ``merge_p_mutation`` = 0.25 (``mutate.scale``,
  ``mutate.prob``) and row re-normalisation with ``p_normalise`` = 0.1 (``norm_prob``);
- parents uniformly from the archive candidates within ``parent_threshold`` = 3 metric points of the best
  (``mutate.parents_threshold``), ties ranked at random from the seeded generator (``shuffle_same``);
- the top ``validate_top`` = 20 candidates re-ranked on the task's validation split (search.py ``--dev_num`` 20,
  ``eval_results``); without one the calibration best is returned and the plan says so;
- the router mapping is the paper's, ``router_mapping`` = "probs" (p' = R · softmax(W x), ``core.router_mapping``).

Beyond the official code: ties of the task metric on generative tasks are broken by the teacher-forced
log-likelihood of the reference answer (``tie_break``), which the evaluation's decoding pass yields from the prompt's
KV cache; every fitness is cached by genome, so a repeated candidate costs no forward pass. The search reports
progress, records the best-so-far curve, can be cancelled between evaluations and saves its state after every
generation of ``offspring`` steps, so a run resumes where it stopped. Operators: ``eep_operators``; loop:
``eep_search``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoEScopeError
from ..evaluation import Evaluator
from ..model import MoEModel
from ..plan import Plan
from ..router_mapping import check_mapping, probs_normalisation
from .base import (
    RUNTIME,
    SEARCH,
    Calibration,
    Described,
    ProgressFn,
    Target,
    finish_plan,
    top_experts,
)
from .eep_distributed import collective_stop, split_evaluator, world
from .eep_operators import assign_slots, evolve, evolve_merge, merging_genome
from .eep_search import Fitness, Genome, Ranked, SearchState, genome_key, metric_of
from .usage import Frequency

__all__ = ["EEP", "PRIMARY_METRIC", "SearchState", "evolve", "evolve_merge"]

PRIMARY_METRIC = {"squad": "f1", "exact_match": "exact_match", "multiple_choice": "accuracy", "lm_loss": "nll"}
GENERATIVE = ("squad", "exact_match")  # metrics from greedy answers: their ties are broken by the answer likelihood


@dataclass
class EEP(Described):
    """Evolutionary expert pruning: search kept sets (phase 1), then merging matrices (phase 2, when
    ``merge_generations`` > 0), by the calibration split's task metric; the best candidates are re-ranked on the
    validation split."""

    label = "EEP (evolutionary search)"
    kind = SEARCH
    can_stop = True  # between evaluations, keeping the best plan so far
    can_resume = True  # from the archive saved at ``state_path``

    population: int = 30  # random initial candidates (max_init_num: 30)
    offspring: int = 10  # steps per generation: only the unit of progress, the curve and saving
    generations: int = 7  # 30 + 7 x 10 = 100 pruning candidates (discrete_iter: 100)
    p_mutation: float = 0.15  # discrete_mutate.prob
    p_group: float = 0.25  # weight_change_prob, transfer_change_prob
    parent_threshold: float = 3.0  # mutate.parents_threshold (metric points)
    merge_generations: int = 30  # 300 merging candidates (total_iter: 400)
    merge_p_mutation: float = 0.25  # mutate.prob
    merge_sigma: float = 0.065  # mutate.scale
    p_crossover: float = 0.3  # crossover.prob (phase 2 only)
    p_normalise: float = 0.1  # norm_prob
    router_mapping: str = "probs"  # the paper's p' = R · softmax(W x); "logits" mixes the router's rows
    validate_top: int = 20  # search.py --dev_num
    validation_split: str = "validation"
    tie_break: bool = True  # generative tasks: ties of the metric broken by the reference answer's log-likelihood
    layer_groups: int = 4
    batched: bool = False  # a generation's children from one archive snapshot: what torchrun runs (eep_distributed)
    init: str = "random"  # "frequency": the frequency baseline's kept sets join the random first generation
    seed: int = 0
    metric: str | None = None  # default: the task's primary metric (f1, exact_match, accuracy, -nll)
    # save each phase's search here after every generation and resume from it
    state_path: str | None = field(default=None, metadata=RUNTIME)
    batch_size: int = 32
    should_stop: Callable[[], bool] | None = field(default=None, repr=False, metadata=RUNTIME)
    name: str = "eep"

    def plan(self, mm: MoEModel, calibration: Calibration, target: Target, progress: ProgressFn | None = None) -> Plan:
        started = time.perf_counter()
        keep = target.experts_kept(mm)
        check_mapping(self.router_mapping)
        layers = mm.layer_indices
        groups = [[int(i) for i in chunk] for chunk in np.array_split(layers, max(1, min(self.layer_groups, len(layers))))]
        metric = self.metric or PRIMARY_METRIC[calibration.task.metric]
        sign = -1.0 if metric == "nll" else 1.0
        tie = self.tie_break and calibration.task.metric in GENERATIVE
        evaluator = Evaluator(mm, batch_size=self.batch_size, cache_size=4)
        rank, processes = world()
        distributed, batched = processes > 1, self.batched or processes > 1
        say = progress if progress is not None and rank == 0 else (lambda *_: None)
        merging = self.merge_generations > 0
        mapping = self.router_mapping
        if mapping == "probs" and probs_normalisation(mm.adapter, mm.config) is None:
            mapping = "logits"  # the paper's mapping is defined for softmax routers only (core.router_mapping)
        spread = mm.routing_spec().n_groups

        def pruning_plan(genome: Genome) -> Plan:
            return Plan(layers={layer: list(kept) for kept, group in zip(genome, groups) for layer in group},
                        top_k=target.top_k)

        def merging_plan(genome: Genome) -> Plan:
            kept_sets = _kept_sets(genome, mm.n_experts, spread)
            if kept_sets is not None:  # equal one-hot matrices: plain pruning
                return pruning_plan(kept_sets)
            slotted = [assign_slots(router, experts, mm.n_experts, spread) for router, experts in genome]
            plan = Plan(layers={layer: kept for (kept, _, _), group in zip(slotted, groups) for layer in group},
                        top_k=target.top_k)
            plan.extra["merge"] = {str(layer): {"router": router, "experts": experts}
                                   for (_, router, experts), group in zip(slotted, groups) for layer in group}
            plan.extra["router_mapping"] = mapping
            return plan

        def score(plan: Plan, split: str = calibration.split, limit: int | None = calibration.limit) -> Fitness:
            result = evaluator.evaluate(calibration.task, plan=plan, split=split, limit=limit, agreement=False,
                                        answer_likelihood=tie)
            value = sign * result.metrics[metric]
            return (value, result.metrics["answer_logprob"]) if tie else value

        def parallel(fitness: Callable[[Genome], Fitness]) -> Callable[[list[Genome]], list[Fitness]] | None:
            return split_evaluator(fitness) if distributed else None

        common = {"seed": self.seed, "batched": batched,
                  "should_stop": collective_stop(self.should_stop) if distributed else self.should_stop}
        start, start_passes = self._start(mm, calibration, groups, keep)
        phase1 = self._run(lambda s, save: evolve(
            lambda g: score(pruning_plan(g)), len(groups), mm.n_experts, keep, spread,
            population=self.population, offspring=self.offspring, generations=self.generations,
            p_mutation=self.p_mutation, p_group=self.p_group, threshold=self.parent_threshold, start=start, state=s,
            on_generation=save, progress=lambda msg, f: say(f"pruning: {msg}", f / (2 if merging else 1)),
            evaluate_many=parallel(lambda g: score(pruning_plan(g))), **common), "", None, rank)
        if not phase1.archive:
            raise MoEScopeError("EEP was cancelled before it evaluated any candidate; no plan to return.")
        final, make_plan, curve, evaluations = phase1, pruning_plan, list(phase1.curve), phase1.evaluations
        phase2 = None
        if merging and not phase1.cancelled:
            archive = [(merging_genome(g, mm.n_experts), f) for g, f in phase1.archive]
            digest = hashlib.sha256(json.dumps(archive).encode()).hexdigest()[:16]
            phase2 = self._run(lambda s, save: evolve_merge(
                lambda g: score(merging_plan(g)), archive, offspring=self.offspring,
                generations=self.merge_generations, p_mutation=self.merge_p_mutation, sigma=self.merge_sigma,
                p_group=self.p_group, p_crossover=self.p_crossover, p_normalise=self.p_normalise,
                threshold=self.parent_threshold, state=s, on_generation=save,
                progress=lambda msg, f: say(f"merging: {msg}", 0.5 + f / 2),
                evaluate_many=parallel(lambda g: score(merging_plan(g))), **common), ".merge", digest, rank)
            final, make_plan = phase2, merging_plan
            curve += phase2.curve
            evaluations += phase2.evaluations
        cancelled = phase1.cancelled or bool(phase2 and phase2.cancelled)
        def validate(genomes: list[Genome]) -> list[float]:
            def one(g: Genome) -> float:
                return metric_of(score(make_plan(g), self.validation_split, calibration.limit))
            many = parallel(one)
            return many(genomes) if many is not None else [one(g) for g in genomes]

        genome, fit, validation, validation_passes = self._validate(final.ranked(), validate, calibration, cancelled)
        plan = make_plan(genome)
        params = self.parameters() | {"metric": metric, "batched": batched}
        if distributed:
            params["processes"] = processes
        extra: dict[str, Any] = {"merge": plan.extra["merge"], "router_mapping": mapping} if "merge" in plan.extra else {}
        if mapping != self.router_mapping:
            extra["router_mapping_note"] = (f"{mm.adapter.family} routers have no probs mapping; merging used the "
                                            f"logits mapping")
        fitness = {"metric": metric, "best": sign * metric_of(fit), "curve": [sign * f for f in curve],
                   "pruning_generations": len(phase1.curve),
                   "tie_break": "answer_logprob" if tie else None}
        if tie:
            fitness["best_answer_logprob"] = float(fit[1])
        passes = evaluations * len(calibration.rows()) + validation_passes
        return finish_plan(mm, plan.layers, target, self.name, params, calibration, started,
                           forward_passes=passes + start_passes, seed=self.seed, fitness=fitness,
                           validation=validation, evaluations=evaluations,
                           steps=final.steps, generations_done=phase1.generation,
                           merge_generations_done=phase2.generation if phase2 else 0, cancelled=cancelled,
                           layer_groups=groups, **extra)

    def _validate(self, ranked: Ranked, validate: Callable[[list[Genome]], list[float]], calibration: Calibration,
                  cancelled: bool) -> tuple[Genome, Fitness, dict[str, Any], int]:
        """The candidate to return: of the ``validate_top`` best distinct candidates, the one with the best
        validation metric (ties to the better calibration rank, as np.argmax in search.py's ``eval_results``);
        the calibration best when the task has no validation split (or it is the calibration split), when
        ``validate_top`` < 2, or when the search was stopped. Returns it, its calibration fitness, what the plan
        records of the re-ranking and the forward passes (examples run) it took."""
        top: dict[str, tuple[Genome, Fitness]] = {}
        for genome, fit in ranked:
            if len(top) == max(1, self.validate_top):
                break
            top.setdefault(genome_key(genome), (genome, fit))
        candidates = list(top.values())
        split, splits = self.validation_split, calibration.task.splits
        reason = ("search stopped" if cancelled else "validate_top < 2" if self.validate_top < 2
                  else f"task has no {split!r} split" if split not in splits
                  else "validation split is the calibration split" if split == calibration.split else None)
        if reason is not None:
            genome, fit = candidates[0]
            return genome, fit, {"split": None, "reason": reason}, 0
        scores = validate([genome for genome, _ in candidates])
        chosen = int(np.argmax(scores))
        rows = len(Calibration.of(calibration.task, split, calibration.limit).rows())
        genome, fit = candidates[chosen]
        return genome, fit, {"split": split, "candidates": len(candidates), "scores": scores,
                             "chosen_rank": chosen}, len(candidates) * rows

    def _start(self, mm: MoEModel, calibration: Calibration, groups: list[list[int]],
               keep: int) -> tuple[list[Genome], int]:
        """Genomes to seed the first generation with, and the forward passes spent finding them."""
        if self.init == "random":
            return [], 0
        if self.init != "frequency":
            raise MoEScopeError(f"Unknown EEP init {self.init!r}; choose random or frequency.")
        scored = Frequency().expert_scores(mm, calibration)
        spread = mm.routing_spec().n_groups
        genome = tuple(tuple(top_experts(sum(scored.scores[layer] for layer in group), keep, spread))
                       for group in groups)
        return [genome], scored.forward_passes

    def _run(self, run: Callable[[SearchState | None, Callable | None], SearchState], suffix: str,
             seed_digest: str | None, rank: int = 0) -> SearchState:
        """Run one phase, resuming from and saving to ``state_path`` (+ suffix) when one is set (rank 0 writes it).
        A saved phase 2 that started from another phase-1 archive (the pruning search went on since) starts
        afresh."""
        fresh = SearchState(seed_digest=seed_digest)
        if not self.state_path:
            return run(fresh, None)
        path = Path(self.state_path + suffix)
        state = SearchState.load(path) if path.exists() else None
        if state is None or state.seed_digest != seed_digest:
            state = fresh
        return run(state, (lambda s: s.save(path)) if rank == 0 else None)


def _kept_sets(genome: Genome, n: int, routing_groups: int) -> Genome | None:
    """The pruning a merging genome amounts to, or None: every group's router and expert matrices equal, one-hot,
    on distinct experts balanced over the routing groups (row-wise crossover can put two rows on one expert)."""
    out = []
    for router, experts in genome:
        if router != experts or not all(max(row) == 1.0 and sum(x != 0 for x in row) == 1 for row in experts):
            return None
        kept = sorted(int(np.argmax(row)) for row in experts)
        per_group = [sum(e // (n // routing_groups) == g for e in kept) for g in range(routing_groups)]
        if len(set(kept)) != len(kept) or len(set(per_group)) != 1:
            return None
        out.append(tuple(kept))
    return tuple(out)
