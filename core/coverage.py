"""How concentrated routing is per layer: experts ranked by usage, and the coverage curve (the share of a
layer's routing carried by its n most-used experts), which tells how prunable a layer is.

All functions take the table of :func:`core.aggregate.expert_usage` (columns task, layer, expert, count,
weight_mass, share, weight_share, ...) or a :class:`~core.routing_profile.Profile` (aggregated here)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import MoEScopeError
from .routing_profile import Profile

VALUES = ("share", "weight_share")


def _usage(source: pd.DataFrame | Profile) -> pd.DataFrame:
    if isinstance(source, Profile):
        from .aggregate import expert_usage
        return expert_usage(source)
    return source


def _rows(source: pd.DataFrame | Profile, task: str | None, value: str) -> pd.DataFrame:
    if value not in VALUES:
        raise MoEScopeError(f"Coverage is measured on {' or '.join(VALUES)}, not {value!r}.")
    usage = _usage(source)
    if task is not None:
        if task not in set(usage["task"]):
            raise MoEScopeError(f"Task {task!r} is not in this profile; its tasks are {sorted(set(usage['task']))}.")
        usage = usage[usage["task"] == task]
    return usage


def ranked_usage(source: pd.DataFrame | Profile, task: str | None = None, value: str = "share") -> pd.DataFrame:
    """Experts sorted by ``value`` within each task × layer, most used first.

    Columns: task, layer, rank (0 = most used), expert, v (the expert's ``value``). Ties keep the lower
    expert id first, so the order is deterministic."""
    usage = _rows(source, task, value)
    ordered = usage.sort_values(["task", "layer", value, "expert"], ascending=[True, True, False, True], kind="stable")
    ranked = ordered[["task", "layer", "expert", value]].rename(columns={value: "v"}).reset_index(drop=True)
    ranked.insert(2, "rank", ranked.groupby(["task", "layer"]).cumcount())
    return ranked


def coverage_curves(source: pd.DataFrame | Profile, task: str | None = None, value: str = "share") -> pd.DataFrame:
    """Per task × layer, the share of routing carried by the ``n`` most-used experts, for n = 1..E.

    ``source``: the :func:`core.aggregate.expert_usage` table or a profile. ``task``: one task, or every task
    (None). ``value``: ``share`` (of top-k slots) or ``weight_share`` (of applied gate weight).
    Returns columns task, layer, n (1..E), coverage (0..1, non-decreasing in n, 1 at n = E when the layer
    routed any token; all 0 for a layer that routed none), and fraction_of_experts (n / E)."""
    ranked = ranked_usage(source, task, value)
    total = ranked.groupby(["task", "layer"])["v"].transform("sum")
    cumulative = ranked.groupby(["task", "layer"])["v"].cumsum()
    coverage = np.where(total > 0, cumulative / total.where(total > 0, 1.0), 0.0)
    n_experts = ranked.groupby(["task", "layer"])["expert"].transform("size")
    n = ranked["rank"] + 1
    return pd.DataFrame({"task": ranked["task"], "layer": ranked["layer"], "n": n,
                         "coverage": np.minimum(coverage, 1.0), "fraction_of_experts": n / n_experts})


def experts_for_coverage(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per task × layer, the fewest experts whose coverage reaches ``target`` (0 < target <= 1), from
    :func:`coverage_curves`. Columns: task, layer, experts."""
    if not 0 < target <= 1:
        raise MoEScopeError(f"Coverage target must be in (0, 1], not {target}.")
    reached = curves[curves["coverage"] >= target - 1e-12]
    fewest = reached.groupby(["task", "layer"], as_index=False)["n"].min().rename(columns={"n": "experts"})
    everything = curves.groupby(["task", "layer"], as_index=False)["n"].max().rename(columns={"n": "all"})
    merged = everything.merge(fewest, on=["task", "layer"], how="left")
    merged["experts"] = merged["experts"].fillna(merged["all"]).astype(int)
    return merged[["task", "layer", "experts"]]


def kept_share(usage: pd.DataFrame, dropped: list[tuple[int, int]], value: str = "share") -> pd.DataFrame:
    """Per layer, the share of routing (``value`` of ``usage``, columns layer, expert, value; one task) that
    the experts not in ``dropped`` (layer, expert) carry. Columns: layer, kept_share (0..1)."""
    gone = set(map(tuple, dropped))
    keep = [(int(layer), int(expert)) not in gone for layer, expert in zip(usage["layer"], usage["expert"])]
    totals = usage.groupby("layer")[value].sum()
    kept = usage[keep].groupby("layer")[value].sum().reindex(totals.index, fill_value=0.0)
    share = (kept / totals.where(totals > 0, 1.0)).where(totals > 0, 0.0)
    return pd.DataFrame({"layer": totals.index.astype(int), "kept_share": share.to_numpy(float)})


def most_chosen_experts(first_choices: list[int] | np.ndarray, limit: int) -> list[int]:
    """The ``limit`` experts chosen first most often among ``first_choices`` (one per token), most chosen
    first; ties go to the lower id."""
    ids, counts = np.unique(np.asarray(first_choices, dtype=np.int64), return_counts=True)
    order = np.lexsort((ids, -counts))
    return [int(e) for e in ids[order][:limit]]


def band(usage: pd.DataFrame, layers: tuple[int, int], experts: tuple[int, int]) -> pd.DataFrame:
    """The rows of ``usage`` with layer and expert within the inclusive ranges ``layers`` and ``experts``."""
    sel = usage["layer"].between(*layers) & usage["expert"].between(*experts)
    return usage[sel]
