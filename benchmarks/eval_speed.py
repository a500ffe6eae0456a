"""Seconds to evaluate each task's test split under a masked plan, with the model already loaded — what the
dashboard waits for after a control changes. Target: at most 1 s per task on CPU.

Each task is evaluated once unpruned and once under a warm-up plan (which fills the cached unpruned
reference used for agreement, as the dashboard's first evaluation does), then timed under ``--reps``
other plans that keep 4 of 8 experts; the median is reported.

    python benchmarks/eval_speed.py [--model sample_data/model] [--tasks qa,arithmetic,qa_choice,code,prose]

This machine's speed drifts (a shared 2-core VM measured up to 2x apart within an hour), so the run also
reports a speed index, the milliseconds of one fixed fp32 matrix product, taken before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.evaluation import Evaluator  # noqa: E402
from core.model import load_model  # noqa: E402
from core.plan import Plan  # noqa: E402


def speed_index() -> float:
    """Milliseconds per [16384 x 160] @ [160 x 640] fp32 product (median of 30): the machine's speed now."""
    x, w = torch.randn(16384, 160), torch.randn(640, 160)
    times = []
    for _ in range(33):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times[3:]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_data/model")
    parser.add_argument("--tasks", default="qa,arithmetic,qa_choice,code,prose")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    mm = load_model(args.model)
    evaluator = Evaluator(mm, batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    out = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "speed_index_ms_before": speed_index()}
    for task in args.tasks.split(","):
        start = time.perf_counter()
        full = evaluator.evaluate(task)
        first = time.perf_counter() - start
        times = []
        for rep in range(args.reps + 1):
            plan = Plan(layers={i: sorted(rng.choice(mm.n_experts, 4, replace=False).tolist())
                                for i in mm.layer_indices})
            start = time.perf_counter()
            evaluator.evaluate(task, plan=plan)
            if rep:  # the first plan is the warm-up
                times.append(time.perf_counter() - start)
        out[task] = {"examples": full.n_examples, "unpruned_first_s": round(first, 3),
                     "masked_median_s": round(statistics.median(times), 3)}
        print(task, out[task], flush=True)
    out["speed_index_ms_after"] = speed_index()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
