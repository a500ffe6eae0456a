"""Sweeps: pruning methods × ratios × tasks → one table of metrics, size and speed, for trade-off charts.

Each (method, ratio, seed, calibration task) makes one plan on the calibration split; the plan is then
evaluated on the test split of every evaluation task beside the unpruned model. By default every task
calibrates on itself (task-specific pruning, as in EEP's tables).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from .errors import MoEScopeError
from .evaluation import EvalResult, Evaluator
from .io import atomic_file
from .methods import Calibration, Target, make_method
from .model import MoEModel
from .tasks import get_task_spec

SweepProgress = Callable[[str, int, int], None]  # (what, done, total)


def result_row(result: EvalResult, **keys: object) -> dict[str, object]:
    row = dict(keys)
    row.update({"eval_task": result.task, "split": result.split, "examples": result.n_examples,
                "eval_seconds": result.seconds, "plan_digest": result.plan_digest})
    row.update({f"metric_{k}": v for k, v in result.metrics.items()})
    row.update({f"agreement_{k}": v for k, v in result.agreement.items()})
    row.update({k: v for k, v in result.cost.items()})
    return row


def run_sweep(mm: MoEModel, methods: Sequence[str], ratios: Sequence[float], tasks: Sequence[str],
              calibration_tasks: Sequence[str] | None = None, top_k: int | None = None, seeds: Sequence[int] = (0,),
              split: str = "test", limit: int | None = None, calibration_limit: int | None = None,
              method_params: dict[str, dict] | None = None, progress: SweepProgress | None = None) -> pd.DataFrame:
    """Run the grid and return one row per (method, ratio, seed, calibration task, evaluation task)."""
    specs = [get_task_spec(t) for t in tasks]
    calibrations = [get_task_spec(t) for t in calibration_tasks] if calibration_tasks else None
    say = progress or (lambda *_: None)
    evaluator = Evaluator(mm)
    rows = []
    for spec in specs:
        rows.append(result_row(evaluator.evaluate(spec, split=split, limit=limit), method="full", ratio=0.0,
                         keep=mm.n_experts, top_k=mm.top_k, seed=None, calibration_task=None, search_seconds=0.0,
                         forward_passes=0))
    jobs = [(m, r, s, c) for m in methods for r in ratios for s in (seeds if m == "random" else seeds[:1])
            for c in (calibrations or specs)]
    for done, (method, ratio, seed, calib) in enumerate(jobs, 1):
        say(f"{method} ratio {ratio} on {calib.name}", done, len(jobs))
        params = dict((method_params or {}).get(method, {}))
        if method in ("random", "eep"):
            params.setdefault("seed", seed)
        plan = make_method(method, **params).plan(mm, Calibration(calib, limit=calibration_limit),
                                                  Target(ratio=ratio, top_k=top_k))
        kept = len(next(iter(plan.layers.values()))) if plan.layers else mm.n_experts
        targets = [calib] if calibrations is None else specs
        for spec in targets:
            result = evaluator.evaluate(spec, plan=plan, split=split, limit=limit)
            rows.append(result_row(result, method=method, ratio=ratio, keep=kept, top_k=plan.top_k or mm.top_k,
                             seed=seed if method in ("random", "eep") else None, calibration_task=calib.name,
                             search_seconds=plan.extra.get("wall_time_s"),
                             forward_passes=plan.extra.get("forward_passes")))
    return pd.DataFrame(rows)


def save_table(table: pd.DataFrame, out: str | Path) -> Path:
    """Write a sweep as CSV or Parquet (by suffix), atomically."""
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise MoEScopeError(f"{out} must end in .csv or .parquet.")
    with atomic_file(out) as tmp:
        if out.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    return out


SWEEP_COLUMNS = ("method", "keep", "top_k", "eval_task")


def load_table(source: str | Path | BinaryIO, name: str | None = None) -> pd.DataFrame:
    """Read a sweep table written by :func:`save_table` (CSV or Parquet, by name), refusing other files."""
    name = name or str(source)
    try:
        table = pd.read_parquet(source) if name.endswith(".parquet") else pd.read_csv(source)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a file that is not a table
        raise MoEScopeError(f"{name} is not a readable sweep table ({type(exc).__name__}: {exc}).") from None
    missing = [c for c in SWEEP_COLUMNS if c not in table.columns]
    if missing or not any(c.startswith("metric_") for c in table.columns):
        raise MoEScopeError(f"{name} is not a MoEScope sweep table: it lacks {missing or 'metric_* columns'}; "
                            f"make one with `moescope sweep`.")
    return table
