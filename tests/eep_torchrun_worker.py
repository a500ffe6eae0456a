"""Run by tests/test_eep_distributed.py under ``torchrun --nproc_per_node 2``: the EEP search with its candidates
split over the processes, on a synthetic fitness and on a tiny model. Rank 0 writes what the test compares."""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch.distributed as dist


def main(out: str, task_dir: str) -> None:
    dist.init_process_group("gloo")
    from core.methods import Calibration, Target, make_method
    from core.methods.eep_distributed import split_evaluator, world
    from core.methods.eep_operators import evolve
    from core.tasks import TaskSpec
    from tests.test_eep import overlap
    from tests.test_methods import with_dead_experts

    rank, size = world()
    scored: Counter = Counter()

    def counted(genome):
        scored[rank] += 1
        return overlap(genome)

    state = evolve(counted, 3, 8, 4, population=6, offspring=5, generations=4, seed=7,
                   evaluate_many=split_evaluator(counted))
    per_rank: list = [None] * size
    dist.all_gather_object(per_rank, scored[rank])
    plan = make_method("eep", population=4, offspring=4, generations=2, merge_generations=2, parent_threshold=0.02,
                       seed=3).plan(with_dead_experts(), Calibration(TaskSpec.from_json(task_dir)), Target(keep=5))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"archive": state.archive, "curve": state.curve, "evaluations": state.evaluations,
                       "per_rank": per_rank, "plan": json.loads(plan.to_json())}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
