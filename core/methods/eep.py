"""EEP (Liu et al. 2024): gradient-free evolutionary search, forward passes only, fitness = the task metric
on the calibration split.

Phase 1 (pruning) searches which experts each *layer group* keeps (consecutive MoE layers share a choice;
the paper uses 4 depth groups): uniform crossover takes each group's kept set whole from one of two
tournament-chosen parents, and mutation swaps each kept expert, with probability ``p_mutation``, for a
dropped one of the same routing group. Phase 2 (merging) starts from the best pruning, as one-hot
router-mapping and expert-merging matrices [kept, experts] per group, and evolves them as real numbers:
crossover takes each matrix row from one parent, mutation adds Gaussian noise (``merge_sigma``) to each
entry with probability ``merge_p_mutation``; coefficients may turn negative. The router mapping mixes the
router's rows (see ``core.masking.mapped_router_state``), so the merged model is an ordinary checkpoint.

Both phases keep the best ``population`` of parents and children each generation (the best-so-far never
decreases), cache fitness by genome, report progress, record the best-so-far curve, can be cancelled
between evaluations and save their state after every generation so a run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..errors import MoEScopeError
from ..evaluation import Evaluator
from ..model import MoEModel
from ..plan import Plan
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
from .usage import Frequency

Genome = tuple  # nested tuples: phase 1 one kept set per group; phase 2 (router rows, expert rows) per group


@dataclass
class SearchState:
    """Everything needed to resume a search: the population with fitness, the curve, the cache."""

    generation: int = 0
    population: list[tuple[Any, float]] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)
    evaluations: int = 0
    cache: dict[str, float] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False

    @property
    def best(self) -> tuple[Genome, float]:
        genome, fit = max(self.population, key=lambda p: p[1])
        return _tuples(genome), fit

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> "SearchState":
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise MoEScopeError(f"{path} is not a saved EEP search state ({exc}); delete it to start afresh.") from None


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _key(genome: Genome) -> str:
    return json.dumps(genome)


def search(fitness: Callable[[Genome], float], first_generation: Callable[[np.random.Generator], list[Genome]],
           breed: Callable[[Genome, Genome, np.random.Generator], Genome], population: int, offspring: int,
           generations: int, seed: int = 0, tournament: int = 2, state: SearchState | None = None,
           progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
           on_generation: Callable[[SearchState], None] | None = None) -> SearchState:
    """Elitist evolutionary maximisation of ``fitness``: each generation breeds ``offspring`` children from
    tournament-chosen parents and keeps the best ``population`` of parents and children."""
    rng = np.random.default_rng(seed)
    state = state or SearchState()
    state.cancelled = False  # a property of one run, not of the saved search (older state files recorded it)
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

    def record(pop: list[tuple[Genome, float]]) -> None:
        state.population = [(genome, fit) for genome, fit in pop]
        state.curve.append(max(fit for _, fit in pop))
        state.rng = rng.bit_generator.state
        if on_generation:
            on_generation(state)

    def pick(pop: list[tuple[Genome, float]]) -> Genome:
        contenders = rng.choice(len(pop), min(tournament, len(pop)), replace=False)
        return max((pop[i] for i in contenders), key=lambda p: p[1])[0]

    def best_of(candidates: list[tuple[Genome, float]]) -> list[tuple[Genome, float]]:
        merged = {g: f for g, f in candidates}
        return sorted(merged.items(), key=lambda p: (-p[1], _key(p[0])))[:population]

    def cancel(candidates: list[tuple[Genome, float]]) -> SearchState:
        """Stopped inside a generation: save the last whole generation (population, RNG, curve) with every
        fitness found since, so a resumed run replays this generation from its start, scoring the candidates
        already seen from the cache, and ends exactly as an uninterrupted run would. The returned state holds
        the best so far, this partial generation included."""
        if on_generation:
            on_generation(state)
        state.cancelled = True
        if candidates:
            state.population = best_of(candidates)
            state.curve = [*state.curve, max(f for _, f in candidates)]  # the partial generation's best
        return state

    pop: list[tuple[Genome, float]] = [(_tuples(g), f) for g, f in state.population]
    if not pop:
        for genome in first_generation(rng):
            if stop():
                return cancel(pop)
            pop.append((genome, evaluate(genome)))
        if pop:
            record(pop)
    while pop and state.generation < generations:
        children = []
        for _ in range(offspring):
            if stop():
                return cancel(pop + children)
            child = breed(pick(pop), pick(pop), rng)
            children.append((child, evaluate(child)))
        pop = best_of(pop + children)
        state.generation += 1
        record(pop)
    return state


def evolve(fitness: Callable[[Genome], float], n_layer_groups: int, n_experts: int, keep: int, routing_groups: int = 1,
           population: int = 12, offspring: int = 12, generations: int = 15, p_mutation: float = 0.15,
           start: Sequence[Genome] = (), **kwargs: Any) -> SearchState:
    """Phase 1: maximise ``fitness`` over genomes of ``n_layer_groups`` kept sets of size ``keep``, balanced
    over ``routing_groups`` equal blocks of expert ids. ``start`` genomes join the random first generation."""
    size, per_group = n_experts // routing_groups, keep // routing_groups

    def random_set(rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(sorted(int(e) for g in range(routing_groups)
                            for e in rng.choice(np.arange(g * size, (g + 1) * size), per_group, replace=False)))

    def first_generation(rng: np.random.Generator) -> list[Genome]:
        seen: dict[Genome, None] = dict.fromkeys(_tuples(list(start))[:population])
        for _ in range(population * 20):  # small spaces have few distinct genomes
            seen.setdefault(tuple(random_set(rng) for _ in range(n_layer_groups)), None)
            if len(seen) == population:
                break
        return list(seen)

    def breed(a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        child = []
        for i in range(n_layer_groups):
            kept = set(a[i] if rng.random() < 0.5 else b[i])
            for e in sorted(kept):
                if rng.random() < p_mutation:
                    block = range(e // size * size, (e // size + 1) * size)
                    dropped = [d for d in block if d not in kept]
                    if dropped:
                        kept.remove(e)
                        kept.add(int(rng.choice(dropped)))
            child.append(tuple(sorted(kept)))
        return tuple(child)

    return search(fitness, first_generation, breed, population, offspring, generations, **kwargs)


def evolve_merge(fitness: Callable[[Genome], float], start: Genome, population: int = 12, offspring: int = 12,
                 generations: int = 15, p_mutation: float = 0.25, sigma: float = 0.065, **kwargs: Any) -> SearchState:
    """Phase 2: maximise ``fitness`` over per-group (router mapping, expert merging) matrices, starting from
    ``start`` (the best pruning as one-hot matrices) and mutated copies of it."""

    def mutate(genome: Genome, rng: np.random.Generator) -> Genome:
        out = []
        for matrices in genome:
            group = []
            for matrix in matrices:
                m = np.asarray(matrix, float)
                hit = rng.random(m.shape) < p_mutation
                m = m + hit * rng.normal(0.0, sigma, m.shape)
                group.append(tuple(tuple(round(float(x), 6) for x in row) for row in m))
            out.append(tuple(group))
        return tuple(out)

    def first_generation(rng: np.random.Generator) -> list[Genome]:
        return [start] + [mutate(start, rng) for _ in range(population - 1)]

    def breed(a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        child = tuple(tuple(tuple(ra if rng.random() < 0.5 else rb for ra, rb in zip(ma, mb))
                            for ma, mb in zip(ga, gb)) for ga, gb in zip(a, b))
        return mutate(child, rng)

    return search(fitness, first_generation, breed, population, offspring, generations, **kwargs)


PRIMARY_METRIC = {"squad": "f1", "exact_match": "exact_match", "multiple_choice": "accuracy", "lm_loss": "nll"}


@dataclass
class EEP(Described):
    """Evolutionary expert pruning: search kept sets (phase 1), then merging matrices (phase 2, when
    ``merge_generations`` > 0), by the calibration split's task metric."""

    label = "EEP (evolutionary search)"
    kind = SEARCH
    can_stop = True  # between evaluations, keeping the best plan so far
    can_resume = True  # from the population saved at ``state_path``

    population: int = 12
    offspring: int = 12
    generations: int = 15
    p_mutation: float = 0.15
    merge_generations: int = 0
    merge_p_mutation: float = 0.25
    merge_sigma: float = 0.065
    layer_groups: int = 4
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
        layers = mm.layer_indices
        groups = [[int(i) for i in chunk] for chunk in np.array_split(layers, max(1, min(self.layer_groups, len(layers))))]
        metric = self.metric or PRIMARY_METRIC[calibration.task.metric]
        sign = -1.0 if metric == "nll" else 1.0
        evaluator = Evaluator(mm, batch_size=self.batch_size, cache_size=4)
        say = progress or (lambda *_: None)
        merging = self.merge_generations > 0

        def pruning_plan(genome: Genome) -> Plan:
            return Plan(layers={layer: list(kept) for kept, group in zip(genome, groups) for layer in group},
                        top_k=target.top_k)

        def merging_plan(kept_sets: Genome, genome: Genome) -> Plan:
            plan = pruning_plan(kept_sets)
            plan.extra["merge"] = {str(layer): {"router": [list(r) for r in router], "experts": [list(r) for r in experts]}
                                   for (router, experts), group in zip(genome, groups) for layer in group}
            return plan

        def score(plan: Plan) -> float:
            result = evaluator.evaluate(calibration.task, plan=plan, split=calibration.split,
                                        limit=calibration.limit, agreement=False)
            return sign * result.metrics[metric]

        common = dict(seed=self.seed, should_stop=self.should_stop)
        start, start_passes = self._start(mm, calibration, groups, keep)
        phase1 = self._run(lambda s, save: evolve(
            lambda g: score(pruning_plan(g)), len(groups), mm.n_experts, keep, mm.routing_spec().n_groups,
            population=self.population, offspring=self.offspring, generations=self.generations,
            p_mutation=self.p_mutation, start=start, state=s, on_generation=save,
            progress=lambda msg, f: say(f"pruning: {msg}", f / (2 if merging else 1)), **common), "")
        if not phase1.population:
            raise MoEScopeError("EEP was cancelled before it evaluated any candidate; no plan to return.")
        kept_sets, best = phase1.best
        plan = pruning_plan(kept_sets)
        curve = list(phase1.curve)
        evaluations = phase1.evaluations
        phase2 = None
        if merging and not phase1.cancelled:
            start = tuple((_one_hot(kept, mm.n_experts),) * 2 for kept in kept_sets)
            phase2 = self._run(lambda s, save: evolve_merge(
                lambda g: score(merging_plan(kept_sets, g)), start, population=self.population,
                offspring=self.offspring, generations=self.merge_generations, p_mutation=self.merge_p_mutation,
                sigma=self.merge_sigma, state=s, on_generation=save,
                progress=lambda msg, f: say(f"merging: {msg}", 0.5 + f / 2), **common), ".merge")
            if phase2.population:
                genome, merged_best = phase2.best
                if merged_best > best:  # the one-hot start is in the population, so this only adds
                    plan, best = merging_plan(kept_sets, genome), merged_best
                curve += phase2.curve
                evaluations += phase2.evaluations
        params = self.parameters() | {"metric": metric}
        cancelled = phase1.cancelled or bool(phase2 and phase2.cancelled)
        return finish_plan(mm, plan.layers, target, self.name, params, calibration, started,
                           forward_passes=evaluations * len(calibration.rows()) + start_passes, seed=self.seed,
                           fitness={"metric": metric, "best": sign * best, "curve": [sign * f for f in curve],
                                    "pruning_generations": len(phase1.curve)},
                           evaluations=evaluations, generations_done=phase1.generation,
                           merge_generations_done=phase2.generation if phase2 else 0, cancelled=cancelled,
                           layer_groups=groups, **({"merge": plan.extra["merge"]} if "merge" in plan.extra else {}))

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

    def _run(self, run: Callable[[SearchState | None, Callable | None], SearchState], suffix: str) -> SearchState:
        """Run one phase, resuming from and saving to ``state_path`` (+ suffix) when one is set."""
        if not self.state_path:
            return run(None, None)
        path = Path(self.state_path + suffix)
        state = SearchState.load(path) if path.exists() else None
        return run(state, lambda s: s.save(path))


def _one_hot(kept: tuple[int, ...], n: int) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(1.0 if i == e else 0.0 for i in range(n)) for e in kept)
