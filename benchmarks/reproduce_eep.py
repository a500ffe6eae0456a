"""The analogue of EEP's Table 1 (methods x tasks with 4 and 2 of 8 experts kept) and Table 3 (top-2 -> top-1)
on the bundled sample model: every method calibrates on a task's calibration split and is scored on its
held-out test split. Random is reported as mean ± std over seeds.

    python benchmarks/reproduce_eep.py [--model sample_data/model] [--tasks qa,arithmetic,...]

Run it from the repository root with MoEScope installed (``pip install -e .``; ``make setup`` does it).

Writes benchmarks/results/eep_reproduction.md (the tables) and eep_reproduction.csv (every run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from core.evaluation import Evaluator  # noqa: E402
from core.methods import METHODS, Calibration, Target, make_method  # noqa: E402
from core.methods.eep import PRIMARY_METRIC  # noqa: E402
from core.model import load_model  # noqa: E402
from core.tasks import get_task_spec  # noqa: E402

BASELINES = ["frequency", "soft_activation", "reap", "naee"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_data/model")
    parser.add_argument("--tasks", default="qa,arithmetic,qa_choice,code,prose")
    parser.add_argument("--keeps", default="4,2")
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--merge-generations", type=int, default=8)
    parser.add_argument("--calibration-limit", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/eep_reproduction")
    args = parser.parse_args()
    mm = load_model(args.model)
    evaluator = Evaluator(mm)
    rows = []
    tasks = [get_task_spec(t) for t in args.tasks.split(",")]
    started = time.perf_counter()

    def record(task, variant, keep, top_k, plan, seed=None):
        result = evaluator.evaluate(task, plan=plan, split="test")
        metric = PRIMARY_METRIC[task.metric] if task.metric != "squad" else "exact_match"
        rows.append({"task": task.name, "variant": variant, "keep": keep, "top_k": top_k, "seed": seed,
                     "metric": metric, "score": result.metrics[metric], **{f"m_{k}": v for k, v in result.metrics.items()},
                     "search_s": plan.extra.get("wall_time_s") if plan else 0,
                     "forward_passes": plan.extra.get("forward_passes") if plan else 0})
        print(f"{time.perf_counter() - started:7.0f}s {task.name:11s} {variant:22s} keep {keep} top-{top_k}: "
              f"{metric} {result.metrics[metric]:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            calib = Calibration(task, limit=args.calibration_limit)
            record(task, "full", 8, 2, None)
            for keep in map(int, args.keeps.split(",")):
                target = Target(keep=keep)
                for seed in range(args.random_seeds):
                    record(task, "random", keep, 2, make_method("random", seed=seed).plan(mm, calib, target), seed)
                for name in BASELINES:
                    if name in METHODS:
                        record(task, name, keep, 2, make_method(name).plan(mm, calib, target))
                for init, label in (("random", ""), ("frequency", " (frequency start)")):
                    eep = dict(population=args.population, offspring=args.population, generations=args.generations,
                               init=init, state_path=f"{tmp}/{task.name}-{keep}-{init}")
                    record(task, "eep prune" + label, keep, 2, make_method("eep", **eep).plan(mm, calib, target))
                    merged = make_method("eep", **eep, merge_generations=args.merge_generations).plan(mm, calib, target)
                    record(task, "eep prune+merge" + label, keep, 2, merged)
            # Table 3: route to one expert instead of two
            record(task, "full top-1", 8, 1, make_method("top_k").plan(mm, calib, Target(keep=8, top_k=1)))
            for keep in (8, 4):
                eep = dict(population=args.population, offspring=args.population, generations=args.generations,
                           merge_generations=args.merge_generations, state_path=f"{tmp}/{task.name}-{keep}-top1")
                record(task, f"eep top-1, {keep} experts", keep, 1,
                       make_method("eep", **eep).plan(mm, calib, Target(keep=keep, top_k=1)))
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out + ".csv", index=False)
    Path(args.out + ".md").write_text(render(table, tasks, args) + "\n")
    print(render(table, tasks, args))


def render(table: pd.DataFrame, tasks, args) -> str:
    def cell(rows: pd.DataFrame) -> str:
        scores = rows.score.tolist()
        if not scores:
            return "-"
        if len(scores) > 1:
            return f"{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f}"
        return f"{scores[0]:.2f}" if rows.metric.iloc[0] == "nll" else f"{scores[0]:.1f}"

    names = [t.name for t in tasks]
    metrics = [table[table.task == n].metric.iloc[0] for n in names]
    head = "| variant | " + " | ".join(f"{n} ({m})" for n, m in zip(names, metrics)) + " |"
    rule = "|---" * (len(names) + 1) + "|"
    out = [f"Sample model, calibration split ({args.calibration_limit} examples) -> test split. EEP budget: "
           f"population {args.population}, {args.generations} pruning + {args.merge_generations} merging "
           f"generations. nll: lower is better; the others: higher is better.", ""]
    for keep in map(int, args.keeps.split(",")):
        out += [f"**Table 1 analogue: {keep} of 8 experts kept (top-2)**", "", head, rule]
        for variant in ["full", "random", *BASELINES, "eep prune", "eep prune+merge", "eep prune (frequency start)",
                        "eep prune+merge (frequency start)"]:
            sel = table[(table.variant == variant) & ((table.keep == keep) | (table.variant == "full"))]
            if len(sel):
                out.append(f"| {variant} | " + " | ".join(cell(sel[sel.task == n]) for n in names) + " |")
        out.append("")
    out += ["**Table 3 analogue: top-2 -> top-1**", "", head, rule]
    for variant in ["full", "full top-1", "eep top-1, 8 experts", "eep top-1, 4 experts"]:
        sel = table[table.variant == variant]
        out.append(f"| {variant} | " + " | ".join(cell(sel[sel.task == n]) for n in names) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
