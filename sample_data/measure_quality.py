"""Measure the bundled model's test-split quality with MoEScope's own evaluation harness and store it beside
the model (``sample_data/model/quality.json``): the full test split of every task, plus the first
``--subset`` examples, which the test suite re-measures to check the figures are reproducible.

    python sample_data/measure_quality.py [--model sample_data/model] [--subset 48]

Run it with MoEScope installed (``pip install -e .``; ``make setup`` does it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.atomic import atomic_write_text
from core.evaluation import Evaluator
from core.model import load_model
from core.tasks import list_sample_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent / "model"))
    parser.add_argument("--subset", type=int, default=48)
    args = parser.parse_args()
    evaluator = Evaluator(load_model(args.model))
    report: dict[str, object] = {"harness": "core.evaluation.Evaluator (batch 32)", "split": "test",
                                 "subset_examples": args.subset, "tasks": {}}
    for task in list_sample_tasks():
        start = time.perf_counter()
        full = evaluator.evaluate(task)
        subset = evaluator.evaluate(task, limit=args.subset)
        report["tasks"][task] = {"examples": full.n_examples, "metrics": full.metrics, "subset_metrics": subset.metrics,
                                 "seconds": round(time.perf_counter() - start, 2)}
        print(task, full.metrics, flush=True)
    atomic_write_text(Path(args.model) / "quality.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
