"""EEP with its candidates scored in parallel: run under torchrun, one model replica per process.

    torchrun --standalone --nproc_per_node N benchmarks/eep_distributed.py [--model sample_data/model]
        [--task qa] [--keep 4] [--out plan.json] [--population 6] [--offspring 6] [--generations 2]

Every process runs the same seeded search and scores its share of each generation's new candidates
(core.methods.eep_distributed); rank 0 writes the plan and prints candidates/s (distinct candidates scored per
second of search). ``--nproc_per_node 1`` is the one-process baseline, giving the same plan.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from core.methods import Calibration, Target, make_method
from core.methods.eep_distributed import world
from core.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_data/model")
    parser.add_argument("--task", default="qa")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--offspring", type=int, default=6)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--merge-generations", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    rank, size = world()
    mm = load_model(args.model)
    eep = make_method("eep", population=args.population, offspring=args.offspring, generations=args.generations,
                      merge_generations=args.merge_generations, validate_top=1, batched=True, seed=0)
    dist.barrier()
    started = time.perf_counter()
    plan = eep.plan(mm, Calibration.of(args.task, limit=args.limit), Target(keep=args.keep))
    seconds = time.perf_counter() - started
    if rank == 0:
        n = plan.extra["evaluations"]
        print(f"{size} process(es) x {args.threads} thread(s): {n} candidates in {seconds:.1f} s = "
              f"{n / seconds:.2f} candidates/s; best {plan.extra['fitness']['metric']} "
              f"{plan.extra['fitness']['best']:.2f}; layers {plan.layers}")
        if args.out:
            plan.save(args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
