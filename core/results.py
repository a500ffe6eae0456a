"""Results: the row each evaluation adds to a sweep table, sweep tables on disk, a plan's scores beside the
unpruned model's, trade-off points, and each task's headline metric and which way it is better.

``moescope sweep`` (``core.sweep``) and the dashboard's workbench (``core.workbench``) both make their rows
here, so their tables share one format; "experts kept" is :func:`experts_kept`, nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pandas as pd

from .atomic import atomic_file
from .errors import MoEScopeError
from .evaluation.interval import change_interval
from .tasks import get_task_spec

if TYPE_CHECKING:
    from .evaluation import EvalResult
    from .plan import Plan
    from .tasks import TaskSpec

# The one number per task kind that headlines a comparison.
HEADLINE_METRIC = {"squad": "exact_match", "exact_match": "exact_match", "multiple_choice": "accuracy", "lm_loss": "nll"}
# The metrics the harness reports where lower is better; every other metric is better higher.
LOWER_IS_BETTER = frozenset({"nll", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})
# lm-eval tasks ("lm_eval:NAME") report their own metrics; the first of these they report headlines them.
LM_EVAL_HEADLINES = ("acc", "exact_match", "f1", "mcc", "word_perplexity")
LM_EVAL_PREFIX = "lm_eval:"
# Columns every sweep table has (besides metric_* columns).
SWEEP_COLUMNS = ("method", "keep", "top_k", "eval_task")


# ----- metrics ------------------------------------------------------------------------------------------
def headline_metric(task: str, metrics: Sequence[str] = ()) -> str:
    """The metric that headlines ``task`` (a name or task folder). An lm-eval task ("lm_eval:NAME") has no
    spec here: its headline is the first of :data:`LM_EVAL_HEADLINES` among the ``metrics`` it reported, else
    its first reported metric, else "acc"."""
    if task.startswith(LM_EVAL_PREFIX):
        reported = [m for m in metrics if not m.endswith("_stderr")]
        return next((m for m in LM_EVAL_HEADLINES if m in reported), reported[0] if reported else "acc")
    return HEADLINE_METRIC[get_task_spec(task).metric]


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def better(metric: str) -> str:
    """Which way ``metric`` improves: "higher" or "lower"."""
    return "higher" if higher_is_better(metric) else "lower"


# ----- plans --------------------------------------------------------------------------------------------
def experts_kept(plan: Plan | None, n_experts: int) -> int:
    """Experts kept per MoE layer (the fewest over layers); all of them without a plan or for top-k only."""
    return n_experts if plan is None else plan.experts_kept(n_experts)


def removed_fraction(keep: Any, n_experts: int) -> Any:
    """The fraction of experts removed when ``keep`` of ``n_experts`` stay (a number or a column)."""
    return 1 - keep / n_experts


def plan_name(plan: Plan, n_experts: int, model_top_k: int) -> str:
    """A plan in words a stakeholder reads: method, experts kept and top-k, and whether a search stopped
    early ("frequency: 4 of 8 experts kept per layer, top-2"); the digest belongs in the details."""
    method = str(plan.extra.get("method", "custom")).replace("_", " ")
    kept = experts_kept(plan, n_experts)
    words = f"{method}: {kept} of {n_experts} experts kept per layer, top-{plan.top_k or model_top_k}"
    if plan.merge_matrices:
        words += ", merged experts"
    if plan.extra.get("cancelled"):
        words += f", search stopped after {plan.extra.get('evaluations', 0)} evaluations"
    return words


def dropped_experts(plan: Plan, n_experts: int) -> list[tuple[int, int]]:
    """(layer, expert) for every expert the plan removes."""
    return [(layer, e) for layer, kept in plan.layers.items() for e in range(n_experts) if e not in kept]


# ----- sweep rows ---------------------------------------------------------------------------------------
def row_keys(plan: Plan | None, n_experts: int, model_top_k: int, **overrides: Any) -> dict[str, Any]:
    """What identifies a sweep row: the method and its setting, read from the plan's provenance (``None``:
    the unpruned model). ``overrides`` replace keys the caller knows better (a sweep's requested ratio)."""
    if plan is None:
        keys: dict[str, Any] = {"method": "full", "ratio": 0.0, "keep": n_experts, "top_k": model_top_k,
                                "seed": None, "calibration_task": None, "search_seconds": 0.0, "forward_passes": 0}
    else:
        keep = experts_kept(plan, n_experts)
        keys = {"method": plan.extra.get("method", "custom"), "ratio": removed_fraction(keep, n_experts),
                "keep": keep, "top_k": plan.top_k or model_top_k, "seed": plan.extra.get("seed"),
                "calibration_task": (plan.extra.get("calibration") or {}).get("task"),
                "search_seconds": plan.extra.get("wall_time_s"), "forward_passes": plan.extra.get("forward_passes")}
    keys["stopped"] = bool(plan is not None and plan.extra.get("cancelled"))  # a search stopped before its end
    keys["evaluations"] = None if plan is None else plan.extra.get("evaluations")  # a search's candidates scored
    keys.update(overrides)
    return keys


def result_row(result: EvalResult, **keys: object) -> dict[str, object]:
    """One sweep-table row: ``keys`` (see :func:`row_keys`), then the evaluation's metrics, agreement and cost."""
    row = dict(keys)
    row.update({"eval_task": result.task, "split": result.split, "examples": result.n_examples,
                "eval_seconds": result.seconds, "plan_digest": result.plan_digest})
    if getattr(result, "weights_digest", None):  # lm-eval results carry the digest of the weights they scored
        row["weights_digest"] = result.weights_digest
    row.update({f"metric_{k}": v for k, v in result.metrics.items()})
    row.update({f"agreement_{k}": v for k, v in result.agreement.items()})
    row.update({k: v for k, v in result.cost.items()})
    return row


def plan_row(result: EvalResult, plan: Plan | None, n_experts: int, model_top_k: int,
             **overrides: Any) -> dict[str, object]:
    """The sweep-table row of ``result``, the evaluation of ``plan`` (``None``: the unpruned model)."""
    return result_row(result, **row_keys(plan, n_experts, model_top_k, **overrides))


# ----- sweep tables on disk -----------------------------------------------------------------------------
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


# ----- a plan beside the unpruned model -----------------------------------------------------------------
def _intervals(full: EvalResult, pruned: EvalResult, metric: str) -> dict[str, float]:
    """95% intervals of the pruned score and of the change (paired: the same examples scored by both models),
    NaN where the metric has no per-example values."""
    low, high = pruned.interval(metric) or (math.nan, math.nan)
    change = (math.nan, math.nan)
    a, b = pruned.samples.get(metric), full.samples.get(metric)
    if a is not None and b is not None and len(a) == len(b):
        change = change_interval(a, b, full.weights.get(metric))
    return {"pruned_low": low, "pruned_high": high, "delta_low": change[0], "delta_high": change[1]}


@dataclass
class Comparison:
    """A plan's scores next to the unpruned model's, task by task, with what it saves."""

    table: pd.DataFrame  # task, metric, headline, full, pruned, delta, better ("higher"/"lower"), examples
    agreement: pd.DataFrame  # task, top1_agreement, mean_kl
    cost: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def of(cls, pairs: Sequence[tuple[TaskSpec, EvalResult, EvalResult]], seconds: float) -> "Comparison":
        """From (task, unpruned result, pruned result) per task: metrics side by side, agreement, and the
        cost of the pruned model with both models' speed averaged over the tasks."""
        rows, agreements, cost = [], [], {}
        for spec, full, pruned in pairs:
            for metric, value in full.metrics.items():
                new = pruned.metrics[metric]
                rows.append({"task": spec.name, "metric": metric, "headline": metric == HEADLINE_METRIC[spec.metric],
                             "full": value, "pruned": new, "delta": new - value, "better": better(metric),
                             "examples": full.n_examples, **_intervals(full, pruned, metric)})
            if pruned.agreement:
                agreements.append({"task": spec.name, **pruned.agreement})
            cost.setdefault("tokens_per_s_full", 0.0)
            cost["tokens_per_s_full"] += full.cost["tokens_per_s"] / len(pairs)
            cost["tokens_per_s"] = cost.get("tokens_per_s", 0.0) + pruned.cost["tokens_per_s"] / len(pairs)
            cost.update({k: v for k, v in pruned.cost.items() if k != "tokens_per_s"})
        return cls(pd.DataFrame(rows), pd.DataFrame(agreements), cost, seconds)

    def headlines(self) -> pd.DataFrame:
        """The headline metric's row of each task."""
        return self.table[self.table["headline"]]

    def examples(self, task: str) -> int:
        """How many test examples ``task`` (its name) was scored on."""
        return int(self.table.loc[self.table["task"] == task, "examples"].iloc[0])

    def pruned(self, task: str, metric: str) -> float:
        """The pruned model's ``metric`` on ``task`` (its name)."""
        rows = self.table[(self.table["task"] == task) & (self.table["metric"] == metric)]
        return rows["pruned"].iloc[0]

    def change(self, what: str) -> float:
        """The pruned model's ``what`` (``total_params``, ``active_params``) relative to the unpruned
        model's, minus one (-0.25: a quarter smaller)."""
        return self.cost[what] / self.cost[f"{what}_full"] - 1


# ----- trade-off charts ---------------------------------------------------------------------------------
def tradeoff_points(tables: Sequence[pd.DataFrame], task: str, metric: str, split: str | None = None,
                    examples: int | None = None) -> pd.DataFrame:
    """One line per method and top-k for a trade-off chart: fraction of experts removed vs ``metric`` on
    ``task``, from sweep tables (``moescope sweep`` or :meth:`Workbench.sweep_table`), counting only rows on
    ``split`` with ``examples`` examples when given so that lines compare like with like. A line starts at the
    unpruned model when its top-k is the model's."""
    column = f"metric_{metric}"
    frames = [t for t in tables if not t.empty]
    empty = pd.DataFrame(columns=["method", "top_k", "removed", "keep", "value"])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if table.empty or column not in table or "eval_task" not in table:
        return empty
    rows = table[table["eval_task"] == task].dropna(subset=[column])
    if split is not None:
        rows = rows[rows["split"] == split]
    if examples is not None:
        rows = rows[rows["examples"] == examples]
    full = rows[rows["method"] == "full"]
    if full.empty:  # both table writers evaluate the unpruned model first; without it there is no axis
        return empty
    n, model_top_k = int(full["keep"].max()), int(full["top_k"].iloc[0])
    points = rows[rows["method"] != "full"].groupby(["method", "top_k", "keep"], as_index=False)[column].mean()
    lines = points[["method", "top_k"]].drop_duplicates()
    starts = lines[lines["top_k"] == model_top_k].assign(keep=n, **{column: full[column].mean()})
    points = pd.concat([starts, points]).drop_duplicates(["method", "top_k", "keep"], keep="last")
    points["removed"] = removed_fraction(points["keep"], n)
    return points.rename(columns={column: "value"}).sort_values(["method", "top_k", "removed"]).reset_index(drop=True)


def measured_tradeoff(tables: Sequence[pd.DataFrame], task: str, metric: str, split: str | None = None,
                      examples: int | None = None) -> tuple[float | None, pd.DataFrame]:
    """The points a trade-off chart may draw, each a setting actually evaluated: the unpruned model's
    ``metric`` on ``task`` (``None`` when the tables lack it), and one row per method, top-k, experts kept and
    whether the search was stopped early (columns method, top_k, keep, removed, value, stopped, evaluations:
    the most candidates a stopped search scored), from rows on ``split`` with ``examples`` examples when
    given. Unlike :func:`tradeoff_points`, no line is made to start at the unpruned model."""
    column = f"metric_{metric}"
    columns = ["method", "top_k", "keep", "removed", "value", "stopped", "evaluations"]
    frames = [t for t in tables if not t.empty]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if table.empty or column not in table or "eval_task" not in table:
        return None, pd.DataFrame(columns=columns)
    rows = table[table["eval_task"] == task].dropna(subset=[column])
    if split is not None and "split" in rows:
        rows = rows[rows["split"] == split]
    if examples is not None and "examples" in rows:
        rows = rows[rows["examples"] == examples]
    full = rows[rows["method"] == "full"]
    if full.empty:  # both table writers evaluate the unpruned model first; without it there is no axis
        return None, pd.DataFrame(columns=columns)
    n = int(full["keep"].max())
    rows = rows[rows["method"] != "full"].copy()
    rows["stopped"] = rows["stopped"].fillna(False).astype(bool) if "stopped" in rows else False
    rows["evaluations"] = pd.to_numeric(rows["evaluations"], errors="coerce") if "evaluations" in rows else float("nan")
    points = rows.groupby(["method", "top_k", "keep", "stopped"], as_index=False).agg(
        value=(column, "mean"), evaluations=("evaluations", "max"))
    points["removed"] = removed_fraction(points["keep"], n)
    points = points.sort_values(["method", "top_k", "stopped", "removed"]).reset_index(drop=True)
    return float(full[column].mean()), points[columns]
