"""Compare two routing profiles of models of one shape: how each expert's share of routing changed, how far
each layer's routing moved (Jensen–Shannon divergence), and, for a model recorded under a pruning plan against
the full model on the same texts, where the tokens of the dropped experts went instead (re-routing flows).

Typical pairs: a base model against its fine-tune (usage and divergence; the texts may differ), or the full
model against the same model recorded under a plan (``moescope profile --plan``; every number here, flows
included). All shares are shares of top-k slots, as :func:`core.aggregate.expert_usage`'s ``share``: each slot
a token fills at a layer counts once, so a layer's shares sum to 1 whatever its top-k.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .aggregate import expert_usage
from .errors import MoEScopeError
from .plan import Plan
from .routing_profile import Profile, list_matrix

NO_REPLACEMENT = -1  # a flow's to_expert when the pruned model chose no new expert for a dropped one (lower top-k)
_KEY = ("task", "example", "step", "position")


class ProfileMismatch(MoEScopeError):
    """Two profiles that cannot be compared (different shapes, tasks or texts); the message says which."""


def _open(profile: Profile | str | Path) -> Profile:
    return profile if isinstance(profile, Profile) else Profile(profile)


def require_same_shape(a: Profile, b: Profile) -> None:
    """Refuse profiles of models with different MoE layers or expert counts: their experts do not correspond."""
    if list(a.meta.layers) != list(b.meta.layers) or a.meta.n_experts != b.meta.n_experts:
        raise ProfileMismatch(f"The profiles are of models of different shapes ({len(a.meta.layers)} MoE layers × "
                              f"{a.meta.n_experts} experts against {len(b.meta.layers)} × {b.meta.n_experts}, "
                              f"layers {a.meta.layers} against {b.meta.layers}); compare profiles of one model "
                              f"and its fine-tunes or pruning plans.")
    for name, profile in (("A", a), ("B", b)):
        if not profile.meta.rows:
            raise ProfileMismatch(f"Profile {name} ({profile.path.name}) holds no routing rows; record it again.")


def _layer_shares(profile: Profile, task: str | None) -> pd.DataFrame:
    """Per layer × expert, the share of the layer's top-k slots (one task, or every task pooled)."""
    usage = expert_usage(profile)
    if task is not None:
        if task not in set(usage["task"]):
            raise ProfileMismatch(f"Task {task!r} is not in {profile.path.name}; its tasks are "
                                  f"{sorted(set(usage['task']))}.")
        usage = usage[usage["task"] == task]
    counts = usage.groupby(["layer", "expert"], as_index=False)["count"].sum()
    totals = counts.groupby("layer")["count"].transform("sum")
    counts["share"] = np.where(totals > 0, counts["count"] / totals.where(totals > 0, 1), 0.0)
    return counts


def compare_usage(a: Profile | str | Path, b: Profile | str | Path, task: str | None = None) -> pd.DataFrame:
    """Per layer × expert, each profile's share of the layer's top-k slots and B minus A in percentage points.

    ``task``: one task (it must be in both profiles), or None for every task of each profile pooled (the
    profiles may then hold different texts). Columns: layer, expert, share_a, share_b (0..1), diff_pp
    (100 × (share_b − share_a): +4.0 means B gives the expert 4 points more of the layer's routing)."""
    a, b = _open(a), _open(b)
    require_same_shape(a, b)
    left = _layer_shares(a, task).rename(columns={"share": "share_a"})[["layer", "expert", "share_a"]]
    right = _layer_shares(b, task).rename(columns={"share": "share_b"})[["layer", "expert", "share_b"]]
    grid = pd.MultiIndex.from_product([a.meta.layers, range(a.meta.n_experts)], names=["layer", "expert"])
    merged = (pd.DataFrame(index=grid).reset_index()
              .merge(left, on=["layer", "expert"], how="left").merge(right, on=["layer", "expert"], how="left")
              .fillna({"share_a": 0.0, "share_b": 0.0}))
    merged["diff_pp"] = (merged["share_b"] - merged["share_a"]) * 100.0
    return merged


def js_divergence_per_layer(a: Profile | str | Path, b: Profile | str | Path, task: str | None = None) -> pd.DataFrame:
    """Per layer, how differently the two profiles route: Jensen–Shannon divergence of the expert shares of
    top-k slots (every slot counts, as in :func:`compare_usage`), base 2, so 0 for the same experts in the same
    proportions and 1 for no expert in common; and the share of routing that moved (total variation distance,
    half the summed absolute share differences, 0..1).

    Columns: layer, jsd_bits, moved_share. An expert one profile never chose contributes only through the
    other's mass at the midpoint (0 · log 0 is 0), so zeros never give NaN or infinity."""
    return divergence_of(compare_usage(a, b, task))


def divergence_of(cells: pd.DataFrame) -> pd.DataFrame:
    """:func:`js_divergence_per_layer` from a :func:`compare_usage` table already at hand (no second read)."""
    rows = []
    for layer, group in cells.groupby("layer", sort=True):
        p, q = group["share_a"].to_numpy(float), group["share_b"].to_numpy(float)
        rows.append((int(layer), js_bits(p, q), float(np.abs(p - q).sum() / 2)))
    return pd.DataFrame(rows, columns=["layer", "jsd_bits", "moved_share"])


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0..1) of two distributions given as non-negative weights (each
    normalised here); NaN when either has no mass."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    value = 0.5 * (_kl_bits(p, m) + _kl_bits(q, m))
    return float(min(max(value, 0.0), 1.0))  # rounding can step a hair outside [0, 1]


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0  # m >= p / 2 > 0 there
    return float((p[mask] * np.log2(p[mask] / m[mask])).sum())


# ----- re-routing ----------------------------------------------------------------------------------------
def dropped_experts(plan: Plan, layers: Iterable[int], n_experts: int) -> set[tuple[int, int]]:
    """(layer, expert) pairs the plan removes; MoE layers the plan does not list keep every expert."""
    return {(int(layer), e) for layer in layers
            for e in sorted(set(range(n_experts)) - set(plan.keep(layer, n_experts)))}


def _aligned(profile: Profile, task: str | None, tasks: list[str]) -> dict[str, np.ndarray]:
    """The prompt rows (step 0) of ``profile`` as arrays sorted by (layer, task, example, position)."""
    filters = [("step", "=", 0)] + ([("task", "=", task)] if task is not None else [])
    table = profile.table(columns=["task", "example", "position", "token_id", "layer", "experts"], filters=filters)
    task_codes = pd.Categorical(table.column("task").to_pandas(), categories=tasks).codes.astype(np.int64)
    cols = {"layer": table.column("layer").to_numpy().astype(np.int64), "task": task_codes,
            "example": table.column("example").to_numpy().astype(np.int64),
            "position": table.column("position").to_numpy().astype(np.int64),
            "token_id": table.column("token_id").to_numpy().astype(np.int64)}
    order = np.lexsort((cols["position"], cols["example"], cols["task"], cols["layer"]))
    out = {name: values[order] for name, values in cols.items()}
    out["experts"] = list_matrix(table.column("experts"), profile.meta.top_k).astype(np.int64)[order]
    return out


def require_same_tokens(full: dict[str, np.ndarray], pruned: dict[str, np.ndarray], tasks: list[str]) -> None:
    """Refuse rows that do not pair up one to one: other texts, other tokenisation or a cut profile."""
    if len(full["layer"]) != len(pruned["layer"]):
        raise ProfileMismatch(f"The profiles are not of the same texts: A holds {len(full['layer']):,} prompt token "
                              f"rows and B {len(pruned['layer']):,}; record both on the same tasks and texts.")
    for name in ("layer", "task", "example", "position", "token_id"):
        differ = np.flatnonzero(full[name] != pruned[name])
        if len(differ):
            i = differ[0]
            where = (f"task {tasks[full['task'][i]]!r}, text {full['example'][i]}, position {full['position'][i]}, "
                     f"layer {full['layer'][i]}")
            raise ProfileMismatch(f"The profiles are not of the same texts: they differ at {where} ({name}); "
                                  f"record both on the same tasks and texts with the same tokenizer.")


def reroute_flows(full: Profile | str | Path, pruned: Profile | str | Path,
                  dropped: Plan | Iterable[tuple[int, int]] | None = None, task: str | None = None) -> pd.DataFrame:
    """Where the pruned model sent the tokens the full model gave to dropped experts, counted per top-k slot.

    Both profiles must hold the same texts (same tasks, text indices, positions and token ids); tokens are
    paired by (task, text, position), prompt tokens only (decode steps are each model's own continuation).
    For each token and layer: ``lost`` are the experts the full model chose, the pruned model did not, and
    ``dropped`` removes (a :class:`Plan`, (layer, expert) pairs, or None for every expert the pruned model
    stopped choosing), in the full model's rank order; ``gained`` are the experts the pruned model chose and
    the full model did not, in the pruned model's rank order. The i-th lost expert flows to the i-th gained
    one (the strongest dropped expert is replaced by the strongest newcomer); a lost expert left without a
    gained one (a plan with a lower top-k) flows to ``NO_REPLACEMENT`` (-1). Gained experts beyond the lost
    ones replace kept experts the pruned model stopped choosing and are not flows from dropped experts.

    Returns columns layer, from_expert, to_expert, tokens (slots that moved that way), share_of_from (of all
    the slots leaving ``from_expert`` at that layer), sorted by layer then tokens, most first. The tokens of a
    layer sum to the number of the full model's top-k slots at that layer holding a lost expert."""
    full, pruned = _open(full), _open(pruned)
    require_same_shape(full, pruned)
    layers, n = list(full.meta.layers), full.meta.n_experts
    if isinstance(dropped, Plan):
        if pruned.meta.plan_digest and pruned.meta.plan_digest != dropped.digest():
            raise ProfileMismatch(f"Profile B was recorded under plan {pruned.meta.plan_digest}, not under the plan "
                                  f"given ({dropped.digest()}); give the plan B was recorded with.")
        dropped = dropped_experts(dropped, layers, n)
    tasks = sorted(set(full.meta.tasks) | set(pruned.meta.tasks))
    if task is None and set(full.meta.tasks) != set(pruned.meta.tasks):
        raise ProfileMismatch(f"The profiles are not of the same tasks ({sorted(full.meta.tasks)} against "
                              f"{sorted(pruned.meta.tasks)}); record both on the same tasks and texts.")
    if task is not None and not (task in full.meta.tasks and task in pruned.meta.tasks):
        raise ProfileMismatch(f"Task {task!r} is not in both profiles (A: {sorted(full.meta.tasks)}, B: "
                              f"{sorted(pruned.meta.tasks)}).")
    a, b = _aligned(full, task, tasks), _aligned(pruned, task, tasks)
    require_same_tokens(a, b, tasks)
    table = None if dropped is None else _dropped_table(dropped, layers, n)
    return _flows(a["layer"], a["experts"], b["experts"], table, layers, n)


def _dropped_table(dropped: Iterable[tuple[int, int]], layers: list[int], n: int) -> np.ndarray:
    """[max layer + 1, n] booleans: whether (layer, expert) is dropped."""
    table = np.zeros((max(layers) + 1, n), bool)
    for layer, expert in dropped:
        if int(layer) in layers and 0 <= int(expert) < n:
            table[int(layer), int(expert)] = True
    return table


def _flows(layer: np.ndarray, full: np.ndarray, pruned: np.ndarray, dropped: np.ndarray | None, layers: list[int],
           n: int) -> pd.DataFrame:
    """The pairing of :func:`reroute_flows`, vectorised over rows: ``full`` [N, k_full], ``pruned`` [N, k_pruned]
    expert ids in rank order, ``layer`` [N]."""
    lost = ~(full[:, :, None] == pruned[:, None, :]).any(axis=2)  # [N, k_full]
    if dropped is not None:
        lost &= dropped[layer[:, None], full]
    gained = ~(pruned[:, :, None] == full[:, None, :]).any(axis=2)  # [N, k_pruned]
    width = max(full.shape[1], pruned.shape[1])
    by_ordinal = np.full((len(layer), width), NO_REPLACEMENT, np.int64)  # row -> the i-th gained expert
    rows, slots = np.nonzero(gained)
    by_ordinal[rows, (np.cumsum(gained, axis=1) - 1)[rows, slots]] = pruned[rows, slots]
    rows, slots = np.nonzero(lost)
    ordinal = (np.cumsum(lost, axis=1) - 1)[rows, slots]
    frame = pd.DataFrame({"layer": layer[rows], "from_expert": full[rows, slots],
                          "to_expert": by_ordinal[rows, ordinal]})
    flows = (frame.groupby(["layer", "from_expert", "to_expert"], as_index=False).size()
             .rename(columns={"size": "tokens"}))
    flows["share_of_from"] = flows["tokens"] / flows.groupby(["layer", "from_expert"])["tokens"].transform("sum")
    flows = flows.sort_values(["layer", "tokens", "from_expert", "to_expert"], ascending=[True, False, True, True],
                              kind="stable").reset_index(drop=True)
    return flows.astype({"layer": np.int64, "from_expert": np.int64, "to_expert": np.int64, "tokens": np.int64})


def top_flows(flows: pd.DataFrame, layer: int, limit: int = 20) -> pd.DataFrame:
    """The ``limit`` largest flows of one layer (rows of :func:`reroute_flows`), most tokens first."""
    return flows[flows["layer"] == layer].head(limit).reset_index(drop=True)


def flow_totals(flows: pd.DataFrame, layers: Iterable[int]) -> pd.DataFrame:
    """Per layer: slots re-routed away from dropped experts, and how many of them found no replacement.
    Columns: layer, tokens, unreplaced (0 for a layer with no flow)."""
    out = pd.DataFrame({"layer": [int(layer) for layer in layers]})
    moved = flows.groupby("layer")["tokens"].sum()
    lost = flows[flows["to_expert"] == NO_REPLACEMENT].groupby("layer")["tokens"].sum()
    out["tokens"] = out["layer"].map(moved).fillna(0).astype(np.int64)
    out["unreplaced"] = out["layer"].map(lost).fillna(0).astype(np.int64)
    return out
