"""What a shareable report says, as tables: the model card, expert usage and coverage curves per task, the
task divergence, the trade-off points of every evaluated setting, each plan's scores against the full model
with its savings, and how to reproduce it.

This module computes numbers only (pandas tables and plain values); the HTML and the Plotly figures are laid
out by ``dashboard.report``, because figures are built by ``dashboard.charts`` and core never imports the
dashboard. The CLI (``moescope report``) imports ``dashboard.report`` lazily."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .aggregate import expert_usage, task_divergence
from .coverage import coverage_curves
from .plan import Plan
from .results import better, dropped_experts, experts_kept, measured_tradeoff, plan_name
from .routing_profile import Profile

SECTIONS = {"model": "Model", "usage": "Expert usage per task", "coverage": "Coverage curves per task",
            "divergence": "Task divergence", "tradeoff": "Trade-off of every evaluated setting",
            "plans": "Chosen plan against the full model", "reproduce": "How to reproduce"}


@dataclass
class PlanSummary:
    """A plan in words, what it removes, and its rows of the results table beside the full model's."""

    name: str
    digest: str
    kept: int
    removed_fraction: float
    dropped: list[tuple[int, int]]
    scores: pd.DataFrame  # eval_task, metric, better, full, pruned, delta
    # total_params, active_params, weight_bytes relative to the full model, minus one (-0.25: a quarter less)
    savings: dict[str, float] = field(default_factory=dict)


@dataclass
class ReportData:
    model_card: dict[str, object]
    usage: pd.DataFrame
    coverage: pd.DataFrame
    divergence: pd.DataFrame
    tradeoffs: dict[str, tuple[str, float | None, pd.DataFrame]]  # task -> (metric, full value, points)
    plans: list[PlanSummary]
    reproduce: list[str]
    digests: dict[str, str]


def model_card(profile: Profile) -> dict[str, object]:
    """The profile sidecar's description of the model and the run."""
    m = profile.meta
    return {"model": m.model, "family": m.family, "MoE layers": len(m.layers), "layer indices": m.layers,
            "experts per layer": m.n_experts, "top-k": m.top_k, "tasks": ", ".join(m.tasks),
            "tokens recorded": m.tokens, "router weights digest": m.weights_digest[:16],
            "recorded under plan": m.plan_digest or "none (full model)", "MoEScope version": m.tool_version,
            "recorded": m.created}


def _headline(table: pd.DataFrame, task: str) -> str | None:
    """The task's headline metric when known, else the first metric column its rows fill."""
    rows = table[table["eval_task"] == task]
    try:
        from .results import headline_metric
        metric = headline_metric(task)
        if f"metric_{metric}" in rows and rows[f"metric_{metric}"].notna().any():
            return metric
    except Exception:  # noqa: BLE001 - an lm-eval or custom task name: fall back to the columns present
        pass
    filled = [c for c in rows.columns if c.startswith("metric_") and rows[c].notna().any()]
    return filled[0][len("metric_"):] if filled else None


def plan_summary(plan: Plan, n_experts: int, top_k: int, table: pd.DataFrame | None) -> PlanSummary:
    """``plan`` in words, and, when ``table`` holds rows evaluated under it (by plan digest), each task's
    metrics against the full model's rows and the parameter and memory savings those rows measured."""
    kept = experts_kept(plan, n_experts)
    digest = plan.digest()
    scores, savings = pd.DataFrame(columns=["eval_task", "metric", "better", "full", "pruned", "delta"]), {}
    if table is not None and "plan_digest" in table:
        mine = table[table["plan_digest"] == digest]
        full = table[table["method"] == "full"]
        rows = []
        for task in sorted(set(mine["eval_task"])):
            ours, theirs = mine[mine["eval_task"] == task], full[full["eval_task"] == task]
            for column in [c for c in ours.columns if c.startswith("metric_") and ours[c].notna().any()]:
                if theirs.empty or column not in theirs or theirs[column].isna().all():
                    continue
                a, b = float(theirs[column].mean()), float(ours[column].mean())
                rows.append((task, column[len("metric_"):], better(column[len("metric_"):]), a, b, b - a))
        if rows:
            scores = pd.DataFrame(rows, columns=scores.columns)
        for what in ("total_params", "active_params"):
            if {what, f"{what}_full"} <= set(mine.columns) and not mine.empty:
                savings[what] = float(mine[what].iloc[0] / mine[f"{what}_full"].iloc[0] - 1)
        if "weight_bytes" in mine.columns and "total_params" in savings:
            savings["weight_bytes"] = savings["total_params"]  # bytes per parameter is the model's, unchanged
    return PlanSummary(plan_name(plan, n_experts, top_k), digest, kept, 1 - kept / n_experts,
                       dropped_experts(plan, n_experts), scores, savings)


def prune_command(plan: Plan, model: str, n_experts: int, out: str) -> str | None:
    """The ``moescope prune`` command that remakes ``plan`` from its provenance (method, experts kept, top-k,
    calibration task, split, limit, seed); None when the plan does not record its method and calibration."""
    method, calibration = plan.extra.get("method"), plan.extra.get("calibration") or {}
    if not method or not calibration.get("task"):
        return None
    command = ["moescope", "prune", plan.model or model, "--method", str(method),
               "--keep", str(experts_kept(plan, n_experts))]
    if plan.top_k:
        command += ["--top-k", str(plan.top_k)]
    command += ["--task", str(calibration["task"]), "--split", str(calibration.get("split") or "calibration")]
    if calibration.get("limit"):
        command += ["--limit", str(calibration["limit"])]
    if plan.extra.get("seed") is not None:
        command += ["--seed", str(plan.extra["seed"])]
    return " ".join(shlex.quote(c) for c in [*command, "--out", out])


def reproduce_commands(profile_path: Path, plan_paths: list[Path], results_path: Path | None,
                       out: Path | None) -> list[str]:
    """The ``moescope report`` command that rebuilds this report (the profile, plans and table record how
    they were made in their own files: sidecar, plan provenance, table rows)."""
    command = ["moescope", "report", "--profile", str(profile_path)]
    for p in plan_paths:
        command += ["--plan", str(p)]
    if results_path is not None:
        command += ["--results", str(results_path)]
    command += ["--out", str(out or "report.html")]
    return [" ".join(shlex.quote(c) for c in command)]


def build_report_data(profile_path: str | Path, plan_paths: list[str | Path] = (),
                      results_path: str | Path | None = None, out: str | Path | None = None,
                      plans: list[Plan] | None = None, table: pd.DataFrame | None = None) -> ReportData:
    """Every number of the report. ``plans``/``table`` may be given as objects (the dashboard's session)
    instead of paths."""
    from .results import load_table

    profile = Profile(profile_path)
    meta = profile.meta
    loaded = list(plans or []) + [Plan.load(p) for p in plan_paths]
    if table is None and results_path is not None:
        table = load_table(results_path)
    usage = expert_usage(profile)
    tradeoffs = {}
    if table is not None and not table.empty:
        for task in sorted(set(table["eval_task"].dropna())):
            metric = _headline(table, task)
            if metric is None:
                continue
            full, points = measured_tradeoff([table], task, metric)
            tradeoffs[task] = (metric, full, points)
    digests = {"profile fingerprint": meta.fingerprint, "router weights": meta.weights_digest}
    digests.update({f"plan {i + 1}": p.digest() for i, p in enumerate(loaded)})
    return ReportData(model_card=model_card(profile), usage=usage, coverage=coverage_curves(usage),
                      divergence=task_divergence(profile), tradeoffs=tradeoffs,
                      plans=[plan_summary(p, meta.n_experts, meta.top_k, table) for p in loaded],
                      reproduce=[c for i, p in enumerate(loaded)
                                 if (c := prune_command(p, meta.model, meta.n_experts, f"plan-{i + 1}.json"))]
                      + reproduce_commands(Path(profile_path), [Path(p) for p in plan_paths],
                                           None if results_path is None else Path(results_path),
                                           None if out is None else Path(out)),
                      digests=digests)


__all__ = ["SECTIONS", "ReportData", "PlanSummary", "build_report_data", "plan_summary", "model_card"]
