"""EEP's two searches and their operators, with the official defaults (imagination-research/EEP,
``configs/search/search.yml``; operators in ``opencompass/tasks/search_utils.py``, loop in ``search.py``).

Phase 1 (pruning, the first ``discrete_iter: 100`` candidates) searches which experts each layer group keeps. A step
mutates one parent (no crossover: search.py only crosses over once the archive holds more than ``discrete_iter``):
each group's kept set changes with probability ``weight_change_prob: 0.25`` (:func:`changed_groups`), and in a
changed group each kept slot is redrawn with probability ``discrete_mutate.prob: 0.15`` uniformly among the experts
no other slot holds (its own included), as ``discrete_mutate`` does.

Phase 2 (merging, up to ``total_iter: 400``) searches real router-mapping and expert-merging matrices
[kept, experts] per group, starting from the phase-1 archive as one-hot matrices. A step changes each matrix with
probability 0.25 (``weight_change_prob``, ``transfer_change_prob``); with probability ``crossover.prob: 0.3`` the
child is a crossover of two parents drawn from the top of the archive (``parents_threshold: 1.0`` point,
``parents_rank: 6``): a changed matrix takes each row from the first parent with probability
``from_front_prob: 0.6``, an unchanged one the whole matrix, so a group's router and expert rows may come from
different parents; otherwise the child copies one parent (``mutate.parents_threshold: 3.0``). Then every entry of a
changed matrix gets Gaussian noise ``scale: 0.065`` with probability ``mutate.prob: 0.25``, and with probability
``norm_prob: 0.1`` every expert-merging row is divided by its sum (router rows are not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .eep_search import (
    Fitness,
    Genome,
    Ranked,
    SearchState,
    changed_groups,
    first_beyond,
    parent_pool,
    search,
)


def _pick(ranked: Ranked, threshold: float, rng: np.random.Generator, floor: int = 0) -> Genome:
    return ranked[int(rng.integers(0, parent_pool(ranked, threshold, floor)))][0]


def evolve(fitness: Any, n_layer_groups: int, n_experts: int, keep: int, routing_groups: int = 1,
           population: int = 12, offspring: int = 12, generations: int = 15, p_mutation: float = 0.15,
           p_group: float = 0.25, threshold: float = 3.0, start: Sequence[Genome] = (), **kwargs: Any) -> SearchState:
    """Phase 1: maximise ``fitness`` over genomes of ``n_layer_groups`` kept sets of size ``keep``, balanced over
    ``routing_groups`` equal blocks of expert ids. Up to ``population`` distinct random genomes start the archive
    (``start`` genomes first); ``generations`` x ``offspring`` mutation steps follow."""
    size, per_group = n_experts // routing_groups, keep // routing_groups

    def random_set(rng: np.random.Generator) -> tuple[int, ...]:
        return tuple(sorted(int(e) for g in range(routing_groups)
                            for e in rng.choice(np.arange(g * size, (g + 1) * size), per_group, replace=False)))

    def first_generation(rng: np.random.Generator) -> list[Genome]:
        seen: dict[Genome, None] = dict.fromkeys(tuple(tuple(k) for k in g) for g in start[:population])
        for _ in range(population * 20):  # small spaces have few distinct genomes (get_init skips repeats too)
            if len(seen) >= population:
                break
            seen.setdefault(tuple(random_set(rng) for _ in range(n_layer_groups)), None)
        return list(seen)

    def propose(ranked: Ranked, rng: np.random.Generator) -> Genome:
        # flags for the expert matrices, then the router matrices (phase 1 keeps them equal, as check_discrete)
        flags = changed_groups(2 * n_layer_groups, p_group, rng)
        parent = _pick(ranked, threshold, rng)
        child = []
        for g, kept in enumerate(parent):
            rows = list(kept)
            if flags[g]:
                for i in range(len(rows)):
                    if rng.random() < p_mutation:
                        block = range(rows[i] // size * size, (rows[i] // size + 1) * size)
                        others = set(rows[:i] + rows[i + 1:])
                        rows[i] = int(rng.choice([e for e in block if e not in others]))
            child.append(tuple(sorted(rows)))
        return tuple(child)

    return search(fitness, first_generation, propose, offspring, generations, **kwargs)


def one_hot(kept: Sequence[int], n: int) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(1.0 if i == e else 0.0 for i in range(n)) for e in kept)


def merging_genome(kept_sets: Genome, n: int) -> Genome:
    """A pruning genome as merging matrices: router mapping and expert merging both one-hot on the kept set."""
    return tuple((one_hot(kept, n), one_hot(kept, n)) for kept in kept_sets)


def evolve_merge(fitness: Any, archive: Sequence[tuple[Genome, Fitness]], offspring: int = 12, generations: int = 15,
                 p_mutation: float = 0.25, sigma: float = 0.065, p_group: float = 0.25, p_crossover: float = 0.3,
                 from_front: float = 0.6, crossover_threshold: float = 1.0, crossover_rank: int = 6,
                 p_normalise: float = 0.1, threshold: float = 3.0, **kwargs: Any) -> SearchState:
    """Phase 2: maximise ``fitness`` over per-group (router mapping, expert merging) matrices, continuing from
    ``archive`` (scored merging genomes: the phase-1 archive as one-hot matrices)."""

    def mutate(genome: list[list[np.ndarray]], flags: list[bool], rng: np.random.Generator) -> None:
        n_groups = len(genome)
        for k, changed in enumerate(flags):
            if changed:
                m = genome[k % n_groups][1 if k < n_groups else 0]
                hit = rng.random(m.shape) < p_mutation
                m += hit * rng.normal(0.0, 1.0, m.shape) * sigma

    def propose(ranked: Ranked, rng: np.random.Generator) -> Genome:
        n_groups = len(ranked[0][0])
        # keys: the groups' expert-merging matrices, then their router mappings (search.py's weight_group order)
        flags = changed_groups(2 * n_groups, p_group, rng)
        # crossover samples population[:max(i, parents_rank)] (search_utils.py crossover)
        pool = min(max(first_beyond(ranked, crossover_threshold), crossover_rank), len(ranked))
        if rng.random() < p_crossover and pool >= 2:
            a, b = (ranked[int(i)][0] for i in rng.choice(pool, 2, replace=False))
            child = []
            for g in range(n_groups):
                pair = []
                for which, k in ((0, n_groups + g), (1, g)):
                    ma, mb = np.asarray(a[g][which], float), np.asarray(b[g][which], float)
                    if flags[k]:
                        rows = rng.random(len(ma)) < from_front
                        pair.append(np.where(rows[:, None], ma, mb))
                    else:
                        pair.append((ma if rng.random() < from_front else mb).copy())
                child.append(pair)
        else:
            parent = _pick(ranked, threshold, rng)
            child = [[np.asarray(router, float).copy(), np.asarray(experts, float).copy()] for router, experts in parent]
        mutate(child, flags, rng)
        if rng.random() < p_normalise:
            for pair in child:
                sums = pair[1].sum(axis=1, keepdims=True)
                pair[1] = np.where(np.abs(sums) > 1e-12, pair[1] / np.where(sums == 0, 1.0, sums), pair[1])
        return tuple(tuple(tuple(tuple(round(float(x), 6) for x in row) for row in m) for m in pair) for pair in child)

    return search(fitness, lambda rng: [], propose, offspring, generations, start_archive=archive, **kwargs)


def assign_slots(router: Sequence[Sequence[float]], experts: Sequence[Sequence[float]], n: int,
                 routing_groups: int = 1) -> tuple[list[int], list, list]:
    """Distinct expert slots for a group's merged experts (merged expert j is written over kept expert
    ``keep[j]``; which slots is immaterial to the function, the official code uses slots 0..kept-1): each row takes
    the expert it weighs most that is still free, balanced over routing groups, rows with the clearest winner
    first. One-hot rows get exactly their expert. Returns the sorted slots and the rows in that order."""
    weights = np.asarray(experts, float)
    size, capacity = n // routing_groups, len(weights) // routing_groups
    free = [capacity] * routing_groups
    taken: set[int] = set()
    slot = [0] * len(weights)
    for j in sorted(range(len(weights)), key=lambda r: -float(np.max(weights[r]))):
        for e in sorted(range(n), key=lambda e: (-weights[j, e], e)):
            if e not in taken and free[e // size] > 0:
                slot[j], free[e // size] = e, free[e // size] - 1
                taken.add(e)
                break
    order = sorted(range(len(weights)), key=lambda r: slot[r])
    return [slot[r] for r in order], [list(router[r]) for r in order], [list(experts[r]) for r in order]
