"""EEP phase 1 (Liu et al. 2024): gradient-free evolutionary search over which experts each layer keeps,
fitness = the task metric on the calibration split, forward passes only.

A genome holds one kept set per *layer group* (consecutive MoE layers sharing a choice; the paper uses
4 depth groups). Each generation makes ``offspring`` children by uniform crossover of two tournament-
chosen parents (each group's kept set taken whole from one parent) and mutation (each kept expert
swapped, with probability ``p_mutation``, for a dropped one of the same routing group), evaluates them,
and keeps the best ``population`` of parents and children, so the best-so-far never decreases. Fitness is
cached by genome. The search reports progress, records its best-so-far curve, can be cancelled between
evaluations, and saves its state after every generation so it can resume.

Phase 2 (real-valued expert-merging and router-mapping matrices) is not implemented yet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoEScopeError
from ..evaluation import Evaluator
from ..io import atomic_write_text
from ..model import MoEModel
from ..plan import Plan
from .base import Calibration, ProgressFn, Target, finish_plan

Genome = tuple[tuple[int, ...], ...]  # one sorted kept set per layer group


@dataclass
class SearchState:
    """Everything needed to resume a search: the population with fitness, the curve, the cache."""

    generation: int = 0
    population: list[tuple[list[list[int]], float]] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)
    evaluations: int = 0
    cache: dict[str, float] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False

    @property
    def best(self) -> tuple[Genome, float]:
        genome, fit = max(self.population, key=lambda p: p[1])
        return tuple(tuple(g) for g in genome), fit

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> "SearchState":
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise MoEScopeError(f"{path} is not a saved EEP search state ({exc}); delete it to start afresh.") from None


def _key(genome: Genome) -> str:
    return json.dumps(genome)


def evolve(fitness: Callable[[Genome], float], n_layer_groups: int, n_experts: int, keep: int, routing_groups: int = 1,
           population: int = 12, offspring: int = 12, generations: int = 15, p_mutation: float = 0.15,
           tournament: int = 2, seed: int = 0, state: SearchState | None = None,
           progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
           on_generation: Callable[[SearchState], None] | None = None) -> SearchState:
    """Maximise ``fitness`` over genomes of ``n_layer_groups`` kept sets of size ``keep`` (balanced over
    ``routing_groups`` equal blocks of expert ids). Returns the final (or cancelled) search state."""
    size, per_group = n_experts // routing_groups, keep // routing_groups
    rng = np.random.default_rng(seed)
    state = state or SearchState()
    if state.rng:
        rng.bit_generator.state = state.rng
    say = progress or (lambda *_: None)
    stop = should_stop or (lambda: False)
    total = population + offspring * generations

    def evaluate(genome: Genome) -> float:
        key = _key(genome)
        if key not in state.cache:
            state.cache[key] = float(fitness(genome))
            state.evaluations += 1
            say(f"generation {state.generation}: {state.evaluations} evaluations", min(1.0, state.evaluations / total))
        return state.cache[key]

    def random_set() -> tuple[int, ...]:
        return tuple(sorted(int(e) for g in range(routing_groups)
                            for e in rng.choice(np.arange(g * size, (g + 1) * size), per_group, replace=False)))

    def mutate(genome: Genome) -> Genome:
        out = []
        for kept in genome:
            kept = set(kept)
            for e in sorted(kept):
                if rng.random() < p_mutation:
                    block = range(e // size * size, (e // size + 1) * size)
                    dropped = [d for d in block if d not in kept]
                    if dropped:
                        kept.remove(e)
                        kept.add(int(rng.choice(dropped)))
            out.append(tuple(sorted(kept)))
        return tuple(out)

    def pick(pop: list[tuple[Genome, float]]) -> Genome:
        contenders = rng.choice(len(pop), min(tournament, len(pop)), replace=False)
        return max((pop[i] for i in contenders), key=lambda p: p[1])[0]

    pop: list[tuple[Genome, float]] = [(tuple(tuple(g) for g in genome), fit) for genome, fit in state.population]
    if not pop:
        seen: set[Genome] = set()
        attempts = 0
        while len(pop) < population and attempts < population * 20:  # small spaces have few distinct genomes
            attempts += 1
            if stop():
                state.cancelled = True
                break
            genome = tuple(random_set() for _ in range(n_layer_groups))
            if genome not in seen:
                seen.add(genome)
                pop.append((genome, evaluate(genome)))
        state.population = [([list(g) for g in genome], fit) for genome, fit in pop]
        state.curve.append(max(fit for _, fit in pop))
        state.rng = rng.bit_generator.state
        if on_generation:
            on_generation(state)
    while state.generation < generations and not state.cancelled:
        children = []
        for _ in range(offspring):
            if stop():
                state.cancelled = True
                break
            a, b = pick(pop), pick(pop)
            child = tuple(a[i] if rng.random() < 0.5 else b[i] for i in range(n_layer_groups))
            child = mutate(child)
            children.append((child, evaluate(child)))
        merged = {g: f for g, f in pop + children}
        pop = sorted(merged.items(), key=lambda p: (-p[1], _key(p[0])))[:population]
        state.generation += 1
        state.population = [([list(g) for g in genome], fit) for genome, fit in pop]
        state.curve.append(pop[0][1])
        state.rng = rng.bit_generator.state
        if on_generation:
            on_generation(state)
    return state


PRIMARY_METRIC = {"squad": "f1", "exact_match": "exact_match", "multiple_choice": "accuracy", "lm_loss": "nll"}


@dataclass
class EEP:
    """Evolutionary expert pruning (phase 1): search kept sets by calibration-split task metric."""

    population: int = 12
    offspring: int = 12
    generations: int = 15
    p_mutation: float = 0.15
    layer_groups: int = 4
    seed: int = 0
    metric: str | None = None  # default: the task's primary metric (f1, exact_match, accuracy, -nll)
    state_path: str | None = None  # save the search here after every generation and resume from it
    batch_size: int = 32
    should_stop: Callable[[], bool] | None = field(default=None, repr=False)
    name: str = "eep"

    def plan(self, mm: MoEModel, calibration: Calibration, target: Target, progress: ProgressFn | None = None) -> Plan:
        started = time.perf_counter()
        keep = target.experts_kept(mm)
        layers = mm.layer_indices
        n_groups = max(1, min(self.layer_groups, len(layers)))
        groups = [list(chunk) for chunk in np.array_split(layers, n_groups)]
        metric = self.metric or PRIMARY_METRIC[calibration.task.metric]
        sign = -1.0 if metric == "nll" else 1.0
        evaluator = Evaluator(mm, batch_size=self.batch_size, cache_size=4)
        examples = len(calibration.rows())

        def to_plan(genome: Genome) -> Plan:
            return Plan(layers={int(layer): list(kept) for kept, group in zip(genome, groups) for layer in group},
                        top_k=target.top_k)

        def fitness(genome: Genome) -> float:
            result = evaluator.evaluate(calibration.task, plan=to_plan(genome), split=calibration.split,
                                        limit=calibration.limit, agreement=False)
            return sign * result.metrics[metric]

        path = Path(self.state_path) if self.state_path else None
        state = SearchState.load(path) if path and path.exists() else None
        state = evolve(fitness, len(groups), mm.n_experts, keep, mm.routing_spec().n_groups,
                       population=self.population, offspring=self.offspring, generations=self.generations,
                       p_mutation=self.p_mutation, seed=self.seed, state=state, progress=progress,
                       should_stop=self.should_stop, on_generation=(lambda s: s.save(path)) if path else None)
        if not state.population:
            raise MoEScopeError("EEP was cancelled before it evaluated any candidate; no plan to return.")
        best, best_fit = state.best
        params = {k: getattr(self, k) for k in ("population", "offspring", "generations", "p_mutation",
                                                 "layer_groups", "seed")} | {"metric": metric}
        return finish_plan(mm, to_plan(best).layers, target, self.name, params, calibration, started,
                           forward_passes=state.evaluations * examples, seed=self.seed,
                           fitness={"metric": metric, "best": sign * best_fit,
                                    "curve": [sign * f for f in state.curve]},
                           evaluations=state.evaluations, generations_done=state.generation,
                           cancelled=state.cancelled, layer_groups=[[int(i) for i in g] for g in groups])
