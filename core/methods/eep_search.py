"""The search loop of EEP as the official code runs it: steady state over an archive of every candidate scored.

Official source: imagination-research/EEP ``opencompass/tasks/search.py`` (``main``'s loop) with
``opencompass/tasks/search_utils.py`` (``get_all_data``, ``shuffle_same``) and ``configs/search/search.yml``:

- the archive (``population`` there) is every candidate evaluated so far, sorted by fitness, ties shuffled at random
  (``shuffle_same``); here the shuffle draws from the search's seeded generator;
- each step makes one child from parents drawn from the archive (:func:`parent_pool`), scores it and adds it to the
  archive (a child equal to an earlier candidate is added again, as there; its fitness comes from the cache);
- the run starts from up to ``max_init_num: 30`` random candidates (``get_init``).

MoEScope groups the steps into generations of ``offspring`` steps only to report progress, record the best-so-far
curve and save the state for resuming; the search itself does not depend on that grouping.

Fitness is a number or a tuple compared lexicographically (the task metric, then a tie-break); parents are chosen
by the first entry (the metric, in its own points: 3 points on a 0-100 metric as in the official config).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..errors import MoEScopeError
from .base import ProgressFn

Genome = tuple  # nested tuples: phase 1 one kept set per group; phase 2 (router rows, expert rows) per group
Fitness = Any  # a float, or a tuple of floats compared lexicographically
Ranked = list[tuple[Genome, Fitness]]  # the archive best first
STATE_VERSION = 2


@dataclass
class SearchState:
    """Everything needed to resume a search: the archive with fitness (in the order found), the generator, the
    curve and the cache of distinct genomes scored."""

    generation: int = 0
    archive: list[tuple[Any, Fitness]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # the archive's ranking at the last record, best first
    curve: list[float] = field(default_factory=list)  # best metric after the start and after each generation
    evaluations: int = 0  # distinct genomes scored (the forwards the search cost)
    cache: dict[str, Fitness] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    seed_digest: str | None = None  # what the search started from (phase 2: the phase-1 archive)
    version: int = STATE_VERSION

    @property
    def steps(self) -> int:
        return len(self.archive)

    def ranked(self) -> Ranked:
        """The archive best first, as ranked at the last record (ties in the order the seeded shuffle gave)."""
        order = self.order if len(self.order) == len(self.archive) else _stable_order(self.archive)
        return [(_tuples(self.archive[i][0]), _fitness(self.archive[i][1])) for i in order]

    @property
    def population(self) -> Ranked:
        return self.ranked()

    @property
    def best(self) -> tuple[Genome, Fitness]:
        return self.ranked()[0]

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> SearchState:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise MoEScopeError(f"{path} was saved by an older EEP (generational search) that cannot be resumed "
                                    f"by the archive search; delete it to start afresh.")
            state = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise MoEScopeError(f"{path} is not a saved EEP search state ({exc}); delete it to start afresh.") from None
        state.archive = [(_tuples(g), _fitness(f)) for g, f in state.archive]
        state.cache = {k: _fitness(v) for k, v in state.cache.items()}
        return state


def _tuples(obj: Any) -> Any:
    return tuple(_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _fitness(value: Any) -> Fitness:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def sort_key(fit: Fitness) -> tuple:
    return tuple(fit) if isinstance(fit, tuple) else (fit,)


def metric_of(fit: Fitness) -> float:
    return float(sort_key(fit)[0])


def genome_key(genome: Genome) -> str:
    return json.dumps(genome)


def _stable_order(archive: Sequence[tuple[Any, Fitness]]) -> list[int]:
    return sorted(range(len(archive)), key=lambda i: tuple(-x for x in sort_key(archive[i][1])))


def rank(archive: Sequence[tuple[Genome, Fitness]], rng: np.random.Generator) -> list[int]:
    """Indices of the archive best first, equal fitnesses in random order (official ``shuffle_same``, which
    shuffles ties with Python's ``random``; here the search's seeded generator)."""
    shuffle = rng.random(len(archive))
    return sorted(range(len(archive)), key=lambda i: (tuple(-x for x in sort_key(archive[i][1])), shuffle[i]))


def parent_pool(ranked: Ranked, threshold: float, floor: int = 0) -> int:
    """How many of the ranked archive may be parents: the official ``absolute`` selection takes index i, the first
    candidate more than ``threshold`` metric points below the best (the last one if none is), at least ``floor``,
    and draws uniformly from indices 0..i inclusive (``random.randint(0, i)``), so the first candidate beyond the
    threshold is eligible too (search.py, the ``parents_select_type == "absolute"`` branch)."""
    return min(max(first_beyond(ranked, threshold), floor), len(ranked) - 1) + 1


def first_beyond(ranked: Ranked, threshold: float) -> int:
    """The index of the first ranked candidate more than ``threshold`` metric points below the best, or the last
    index when none is (the official loop's ``i``)."""
    best = metric_of(ranked[0][1])
    for j in range(1, len(ranked)):
        if best - metric_of(ranked[j][1]) > threshold:
            return j
    return len(ranked) - 1


def search(fitness: Callable[[Genome], Fitness], first_generation: Callable[[np.random.Generator], list[Genome]],
           propose: Callable[[Ranked, np.random.Generator], Genome], offspring: int, generations: int, seed: int = 0,
           state: SearchState | None = None, progress: ProgressFn | None = None,
           should_stop: Callable[[], bool] | None = None, on_generation: Callable[[SearchState], None] | None = None,
           start_archive: Sequence[tuple[Genome, Fitness]] = (), batched: bool = False,
           evaluate_many: Callable[[list[Genome]], list[Fitness]] | None = None) -> SearchState:
    """Steady-state maximisation of ``fitness``: each step ranks the archive, lets ``propose`` make one child
    from it, scores the child and adds it. The archive starts as ``start_archive`` (already scored) plus the
    scored ``first_generation``; ``generations`` groups of ``offspring`` steps follow.

    ``batched``: a generation's ``offspring`` children are all proposed from the archive as it stood at the
    generation's start, then scored together (by ``evaluate_many`` when given: the distributed search splits them
    over processes), as the official code's parallel workers sharing one archive do; one process with
    ``batched`` gives exactly what several give. ``evaluate_many`` implies ``batched``."""
    rng = np.random.default_rng(seed)
    state = state or SearchState()
    state.cancelled = False  # a property of one run, not of the saved search
    if state.rng:
        rng.bit_generator.state = state.rng
    say = progress or (lambda *_: None)
    stop = should_stop or (lambda: False)
    archive: list[tuple[Genome, Fitness]] = [(_tuples(g), _fitness(f)) for g, f in state.archive]
    # the steps this phase will have taken at its end, for progress: the start plus every generation's steps
    total = [max(1, len(archive) - offspring * state.generation + offspring * generations)]

    def evaluate(genome: Genome) -> Fitness:
        key = genome_key(genome)
        if key not in state.cache:
            state.cache[key] = _fitness(fitness(genome))
            state.evaluations += 1
            done = min(1.0, (len(archive) + 1) / total[0])
            say(f"generation {state.generation}: {state.evaluations} evaluations", done)
        return state.cache[key]

    def evaluate_batch(genomes: list[Genome]) -> tuple[list[Fitness], bool]:
        """Fitnesses of ``genomes`` (new ones scored, by ``evaluate_many`` when given) and whether it was stopped
        (then only those scored before the stop)."""
        if evaluate_many is None:
            out = []
            for genome in genomes:
                if stop():
                    return out, True
                out.append(evaluate(genome))
            return out, False
        if stop():
            return [], True
        new = {genome_key(g): g for g in genomes if genome_key(g) not in state.cache}
        for key, fit in zip(new, evaluate_many(list(new.values()))):
            state.cache[key] = _fitness(fit)
        state.evaluations += len(new)
        say(f"generation {state.generation}: {state.evaluations} evaluations",
            min(1.0, (len(archive) + len(genomes)) / total[0]))
        return [state.cache[genome_key(g)] for g in genomes], False

    def record() -> None:
        state.archive = list(archive)
        state.order = rank(archive, rng)
        state.curve.append(metric_of(archive[state.order[0]][1]))
        state.rng = rng.bit_generator.state
        if on_generation:
            on_generation(state)

    def cancel() -> SearchState:
        """Stopped inside a generation: save the last whole generation (archive, generator, curve) with every
        fitness found since, so a resumed run replays this generation from its start, scoring the candidates
        already seen from the cache, and ends exactly as an uninterrupted run would. The returned state holds
        the best so far, this partial generation included."""
        if on_generation:
            on_generation(state)
        state.cancelled = True
        if archive:
            state.archive = list(archive)
            state.order = _stable_order(archive)
            state.curve = [*state.curve, metric_of(archive[state.order[0]][1])]
        return state

    if not archive:
        archive.extend((_tuples(g), _fitness(f)) for g, f in start_archive)
        genomes = first_generation(rng)
        total[0] = max(1, len(archive) + len(genomes) + offspring * generations)
        fits, stopped = evaluate_batch(genomes)
        archive.extend(zip(genomes, fits))
        if stopped:
            return cancel()
        if not archive:
            return state
        record()
    if batched or evaluate_many is not None:
        while state.generation < generations:
            ranked = [archive[i] for i in rank(archive, rng)]
            children = [propose(ranked, rng) for _ in range(offspring)]
            fits, stopped = evaluate_batch(children)
            archive.extend(zip(children, fits))
            if stopped:
                return cancel()
            state.generation += 1
            record()
        return state
    while state.generation < generations:
        for _ in range(offspring):
            if stop():
                return cancel()
            order = rank(archive, rng)
            child = propose([archive[i] for i in order], rng)
            archive.append((child, evaluate(child)))
        state.generation += 1
        record()
    return state


def changed_groups(n_keys: int, p_change: float, rng: np.random.Generator) -> list[bool]:
    """Which of the genome's matrices a step changes: each with probability ``p_change``, drawn again until at
    least one is (search.py: ``group_change``, ``weight_change_prob`` = ``transfer_change_prob`` = 0.25)."""
    while True:
        flags = [bool(rng.random() < p_change) for _ in range(n_keys)]
        if any(flags):
            return flags
