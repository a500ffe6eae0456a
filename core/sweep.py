"""Sweeps: pruning methods × ratios × tasks → one table of metrics, size and speed, for trade-off charts.

Each (method, ratio, seed, calibration task) makes one plan on the calibration split; the plan is then
evaluated on the test split of every evaluation task beside the unpruned model. By default every task
calibrates on itself (task-specific pruning, as in EEP's tables).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from .errors import MoEScopeError
from .evaluation import Evaluator
from .evaluation.lm_eval_bridge import PREFIX, LmEvalRunner, is_lm_eval_task
from .methods import Calibration, Target, make_method
from .model import MoEModel
from .results import SWEEP_COLUMNS, load_table, plan_row, result_row, save_table
from .tasks import get_task_spec

# The table's rows and files belong to ``core.results``; these names stay importable from here.
__all__ = ["SWEEP_COLUMNS", "SweepProgress", "load_table", "result_row", "run_sweep", "save_table"]

SweepProgress = Callable[[str, int, int], None]  # (what, done, total)


def run_sweep(mm: MoEModel, methods: Sequence[str], ratios: Sequence[float], tasks: Sequence[str],
              calibration_tasks: Sequence[str] | None = None, top_k: int | None = None, seeds: Sequence[int] = (0,),
              split: str = "test", limit: int | None = None, calibration_limit: int | None = None,
              method_params: dict[str, dict] | None = None, progress: SweepProgress | None = None,
              lm_eval_include: Sequence[str] = (), num_fewshot: int | None = None,
              lm_eval_batch_size: int | str = "auto") -> pd.DataFrame:
    """Run the grid and return one row per (method, ratio, seed, calibration task, evaluation task).

    Tasks named ``lm_eval:NAME`` are lm-evaluation-harness tasks (``core.evaluation.lm_eval_bridge``, folders
    of task YAMLs in ``lm_eval_include``): they never calibrate, and every plan is also scored on them."""
    lm_tasks = [t for t in tasks if is_lm_eval_task(t)]
    specs = [get_task_spec(t) for t in tasks if not is_lm_eval_task(t)]
    calibrations = [get_task_spec(t) for t in calibration_tasks] if calibration_tasks else None
    if lm_tasks and not specs and calibrations is None:
        raise MoEScopeError("lm-eval tasks do not calibrate plans; add a MoEScope task to --tasks or give "
                            "--calibration-tasks.")
    runner = None
    if lm_tasks:
        runner = LmEvalRunner(mm, include=lm_eval_include, batch_size=lm_eval_batch_size)
        runner.check_tasks([t[len(PREFIX):] for t in lm_tasks])
    say = progress or (lambda *_: None)
    evaluator = Evaluator(mm)
    rows = []

    def lm_eval_rows(plan, **overrides) -> list[dict]:
        return [plan_row(r, plan, mm.n_experts, mm.top_k, **overrides) for t in lm_tasks
                for r in runner.evaluate(t, plan=plan, limit=limit, num_fewshot=num_fewshot)]

    for spec in specs:
        rows.append(plan_row(evaluator.evaluate(spec, split=split, limit=limit), None, mm.n_experts, mm.top_k))
    rows.extend(lm_eval_rows(None))
    jobs = [(m, r, s, c) for m in methods for r in ratios for s in (seeds if m == "random" else seeds[:1])
            for c in (calibrations or specs)]
    for done, (method, ratio, seed, calib) in enumerate(jobs, 1):
        say(f"{method} ratio {ratio} on {calib.name}", done, len(jobs))
        params = dict((method_params or {}).get(method, {}))
        if method in ("random", "eep"):
            params.setdefault("seed", seed)
        plan = make_method(method, **params).plan(mm, Calibration(calib, limit=calibration_limit),
                                                  Target(ratio=ratio, top_k=top_k))
        targets = [calib] if calibrations is None else specs
        for spec in targets:
            result = evaluator.evaluate(spec, plan=plan, split=split, limit=limit)
            rows.append(plan_row(result, plan, mm.n_experts, mm.top_k, method=method, ratio=ratio,
                                 seed=seed if method in ("random", "eep") else None, calibration_task=calib.name))
        rows.extend(lm_eval_rows(plan, method=method, ratio=ratio, seed=seed if method in ("random", "eep") else None,
                                 calibration_task=calib.name))
    return pd.DataFrame(rows)

