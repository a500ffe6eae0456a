"""EEP's candidates scored in parallel under ``torchrun``: each process holds a model replica, each generation's
new candidates are dealt out round-robin over the processes, and the fitnesses are gathered to all of them.

Every process runs the same seeded search, so all propose the same children; only scoring is split. The search
then runs generation-batched (``eep_search.search(batched=True)``: a generation's children are proposed from the
archive as it stood at the generation's start, as the official code's parallel workers sharing one archive do),
and one process with ``EEP(batched=True)`` gives the same plan. Only rank 0 writes the state file and reports
progress; a stop request is rank 0's, broadcast at each generation. Launch::

    torchrun --standalone --nproc_per_node N benchmarks/eep_distributed.py MODEL --task T --keep K --out plan.json
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from .eep_search import Fitness, Genome


def world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_evaluator(score: Callable[[Genome], Fitness]) -> Callable[[list[Genome]], list[Fitness]]:
    """``evaluate_many`` for the search: this process scores genomes rank, rank + N, ...; all get every fitness."""
    rank, size = world()

    def evaluate_many(genomes: list[Genome]) -> list[Fitness]:
        mine = {i: score(g) for i, g in enumerate(genomes) if i % size == rank}
        parts: list[Any] = [None] * size
        dist.all_gather_object(parts, mine)
        found = {i: fit for part in parts for i, fit in part.items()}
        return [found[i] for i in range(len(genomes))]

    return evaluate_many


def collective_stop(should_stop: Callable[[], bool] | None) -> Callable[[], bool]:
    """A stop check every process calls at the same points: rank 0's answer, broadcast."""
    rank, _ = world()

    def stop() -> bool:
        flag = [bool(should_stop()) if should_stop is not None and rank == 0 else False]
        dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    return stop
