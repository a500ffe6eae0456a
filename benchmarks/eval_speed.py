"""Seconds to evaluate each task's test split under a masked plan, with the model already loaded — what the
dashboard waits for after a control changes. Target: at most 1 s per task on CPU.

Each task is evaluated once unpruned and once under a warm-up plan (which fills the cached unpruned
reference used for agreement, as the dashboard's first evaluation does), then timed under ``--reps``
other plans that keep 4 of 8 experts; the median is reported.

    python benchmarks/eval_speed.py [--model sample_data/model] [--tasks qa,arithmetic,qa_choice,code,prose]
                                    [--baseline GIT_REVISION]

This machine's speed drifts (a shared 2-core VM measured up to 2x apart within an hour), so the run reports
a speed index, the milliseconds of one fixed fp32 matrix product, before and after the run and before each
task; and ``--baseline``
times the evaluation harness of another revision (its ``core/evaluation``) interleaved with this one,
plan by plan, so that their ratio does not depend on the drift.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import evaluation  # noqa: E402
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


def harness_at(revision: str) -> ModuleType:
    """The evaluation harness as it was at ``revision``, imported beside today's as ``core._baseline_evaluation``
    (it shares the rest of core): the package ``core/evaluation/``, or the older single ``core/evaluation.py``
    with any sibling module it imports that this tree no longer has (``core/kv_cache.py``)."""
    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "core/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    folder = Path(tempfile.mkdtemp())
    if "core/evaluation.py" in files:
        source = show("core/evaluation.py")
        for name in sorted(set(re.findall(r"^from \.(\w+) import", source, re.MULTILINE))):
            if f"core/{name}.py" in files and not (ROOT / "core" / f"{name}.py").exists():
                _load(f"core.{name}", folder / f"{name}.py", show(f"core/{name}.py"), "core")
        return _load("core._baseline_evaluation", folder / "evaluation.py", source, "core")
    package = folder / "evaluation"
    package.mkdir()
    for file in files:
        if file.startswith("core/evaluation/") and file.endswith(".py"):
            (package / Path(file).name).write_text(show(file))
    return _load("core._baseline_evaluation", package / "__init__.py", None, "core._baseline_evaluation",
                 [str(package)])


def _load(name: str, path: Path, source: str | None, package: str, search: list[str] | None = None) -> ModuleType:
    if source is not None:
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_data/model")
    parser.add_argument("--tasks", default="qa,arithmetic,qa_choice,code,prose")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline", help="a git revision whose evaluation harness to time alongside")
    args = parser.parse_args()
    mm = load_model(args.model)
    harnesses = {"current": evaluation}
    if args.baseline:
        harnesses["baseline"] = harness_at(args.baseline)
    evaluators = {name: module.Evaluator(mm, batch_size=args.batch_size) for name, module in harnesses.items()}
    rng = np.random.default_rng(0)
    out = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "baseline": args.baseline,
           "speed_index_ms_before": speed_index()}
    for task in args.tasks.split(","):
        plans = [Plan(layers={i: sorted(rng.choice(mm.n_experts, 4, replace=False).tolist()) for i in mm.layer_indices})
                 for _ in range(args.reps + 1)]
        row: dict = {"speed_index_ms": speed_index()}
        times: dict[str, list[float]] = {name: [] for name in evaluators}
        for name, evaluator in evaluators.items():
            start = time.perf_counter()
            full = evaluator.evaluate(task)
            row["examples"] = full.n_examples
            row[f"{name}_unpruned_first_s"] = round(time.perf_counter() - start, 3)
            evaluator.evaluate(task, plan=plans[0])  # warm-up: fills the cached reference
        for plan in plans[1:]:
            for name, evaluator in evaluators.items():
                start = time.perf_counter()
                evaluator.evaluate(task, plan=plan)
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            row[f"{name}_masked_median_s"] = round(statistics.median(values), 3)
        if args.baseline:
            row["current_over_baseline"] = round(statistics.median(
                c / b for c, b in zip(times["current"], times["baseline"])), 3)
        out[task] = row
        print(task, row, flush=True)
    out["speed_index_ms_after"] = speed_index()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
