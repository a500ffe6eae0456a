"""What a routing profile says: expert usage, entropy and imbalance, co-activation, per-token routes,
and how differently tasks are routed. Every function streams the profile in batches."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from .errors import MoEScopeError
from .routing_profile import Profile, list_matrix


def _usage_arrays(profile: Profile, first_only: bool = False) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray, int]]:
    """(task, layer) -> (counts [E], gate-weight mass [E], tokens)."""
    n, k = profile.meta.n_experts, profile.meta.top_k
    acc: dict[tuple[str, int], list] = defaultdict(lambda: [np.zeros(n, np.int64), np.zeros(n, np.float64), 0])
    for batch in profile.batches(columns=["task", "layer", "experts", "weights"]):
        tasks = batch.column("task").to_numpy(zero_copy_only=False)
        layers = batch.column("layer").to_numpy()
        experts = list_matrix(batch.column("experts"), k)
        weights = list_matrix(batch.column("weights"), k)
        if first_only:
            experts, weights = experts[:, :1], weights[:, :1]
        for task in np.unique(tasks):
            for layer in np.unique(layers):
                sel = (tasks == task) & (layers == layer)
                if not sel.any():
                    continue
                entry = acc[(str(task), int(layer))]
                entry[0] += np.bincount(experts[sel].ravel(), minlength=n)
                entry[1] += np.bincount(experts[sel].ravel(), weights=weights[sel].ravel(), minlength=n)
                entry[2] += int(sel.sum())
    return {key: (v[0], v[1], v[2]) for key, v in acc.items()}


def expert_usage(profile: Profile) -> pd.DataFrame:
    """Counts, gate-weight mass and shares per task × layer × expert.

    ``share`` is the fraction of the layer's top-k slots the expert filled (sums to 1 per task × layer);
    ``weight_share`` is its fraction of the applied gate weight.
    """
    rows = []
    for (task, layer), (counts, mass, tokens) in sorted(_usage_arrays(profile).items()):
        total, total_mass = counts.sum(), mass.sum()
        for expert in range(len(counts)):
            rows.append((task, layer, expert, int(counts[expert]), float(mass[expert]),
                         counts[expert] / total if total else 0.0,
                         mass[expert] / total_mass if total_mass else 0.0, tokens))
    return pd.DataFrame(rows, columns=["task", "layer", "expert", "count", "weight_mass", "share",
                                       "weight_share", "tokens"])


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def layer_stats(profile: Profile) -> pd.DataFrame:
    """Per task × layer: routing entropy (bits, and as a fraction of log2 E), load imbalance (max/mean
    count), coefficient of variation, and experts that received no token."""
    rows = []
    n = profile.meta.n_experts
    for (task, layer), (counts, _, tokens) in sorted(_usage_arrays(profile).items()):
        share = counts / counts.sum()
        h = entropy_bits(share)
        mean = counts.mean()
        rows.append((task, layer, tokens, h, h / np.log2(n), float(counts.max() / mean),
                     float(counts.std() / mean), int((counts == 0).sum())))
    return pd.DataFrame(rows, columns=["task", "layer", "tokens", "entropy_bits", "entropy_norm",
                                       "imbalance", "cv", "unused_experts"])


def coactivation(profile: Profile, layer: int, task: str | None = None) -> np.ndarray:
    """[E, E] counts of tokens whose top-k holds both experts; the diagonal counts each expert's tokens."""
    n, k = profile.meta.n_experts, profile.meta.top_k
    if layer not in profile.meta.layers:
        raise MoEScopeError(f"Layer {layer} is not in this profile; its layers are {profile.meta.layers}.")
    matrix = np.zeros((n, n), np.int64)
    for batch in profile.batches(columns=["task", "layer", "experts"]):
        sel = pc.equal(batch.column("layer"), layer)
        if task is not None:
            sel = pc.and_(sel, pc.equal(batch.column("task"), task))
        experts = list_matrix(batch.filter(sel).column("experts"), k)
        for a in range(k):
            for b in range(k):
                np.add.at(matrix, (experts[:, a], experts[:, b]), 1)
    return matrix


def token_routes(profile: Profile, task: str, example: int, layer: int) -> pd.DataFrame:
    """One example's tokens in order with their experts and weights at ``layer`` (for colouring text)."""
    table = profile.table(filters=[("task", "=", task), ("example", "=", example), ("layer", "=", layer)],
                          columns=["position", "token_id", "step", "experts", "weights"])
    df = table.to_pandas().sort_values(["step", "position"], kind="stable").reset_index(drop=True)
    df["experts"] = df["experts"].map(lambda v: [int(x) for x in v])
    df["weights"] = df["weights"].map(lambda v: [float(x) for x in v])
    return df


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2
    return 0.5 * (_kl_bits(p, m) + _kl_bits(q, m))


def _kl_bits(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float((p[mask] * np.log2(p[mask] / q[mask])).sum())


def task_divergence(profile: Profile) -> pd.DataFrame:
    """Jensen–Shannon divergence (bits, 0..1) between every pair of tasks' expert usage, per layer."""
    usage = _usage_arrays(profile)
    tasks = sorted({t for t, _ in usage})
    rows = []
    for layer in profile.meta.layers:
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                if (a, layer) in usage and (b, layer) in usage:
                    rows.append((layer, a, b, js_divergence_bits(usage[(a, layer)][0].astype(float),
                                                                 usage[(b, layer)][0].astype(float))))
    return pd.DataFrame(rows, columns=["layer", "task_a", "task_b", "jsd_bits"])


def consecutive_same_expert(profile: Profile, task: str, layer: int) -> float:
    """Rate at which consecutive tokens of an example share their first-choice expert (chance is 1/E)."""
    table = profile.table(filters=[("task", "=", task), ("layer", "=", layer)],
                          columns=["example", "step", "position", "experts"])
    if table.num_rows < 2:
        return float("nan")
    df = table.to_pandas().sort_values(["example", "step", "position"], kind="stable")
    first = df["experts"].map(lambda v: int(v[0])).to_numpy()
    ex = df["example"].to_numpy()
    same_example = ex[1:] == ex[:-1]
    return float((first[1:] == first[:-1])[same_example].mean())


def _routed_rows(profile: Profile, layer: int, expert: int, task: str | None) -> pd.DataFrame:
    """Rows (task, example, step, position, token_id, rank) where ``expert`` is in the token's top-k at ``layer``."""
    if layer not in profile.meta.layers:
        raise MoEScopeError(f"Layer {layer} is not in this profile; its layers are {profile.meta.layers}.")
    k = profile.meta.top_k
    filters = [("layer", "=", layer)] + ([("task", "=", task)] if task is not None else [])
    table = profile.table(columns=["task", "example", "step", "position", "token_id", "experts"], filters=filters)
    experts = list_matrix(table.column("experts"), k)
    hit = experts == expert
    rows = hit.any(axis=1)
    df = table.select(["task", "example", "step", "position", "token_id"]).to_pandas()[rows]
    df["rank"] = hit[rows].argmax(axis=1)
    return df.reset_index(drop=True)


def expert_tokens(profile: Profile, layer: int, expert: int, task: str | None = None, top: int = 15) -> pd.DataFrame:
    """The tokens most often routed to ``expert`` at ``layer``: count, and the fraction of all that token's
    occurrences that went to this expert (1.0 = the expert takes every occurrence)."""
    routed = _routed_rows(profile, layer, expert, task)
    filters = [("layer", "=", layer)] + ([("task", "=", task)] if task is not None else [])
    all_ids = profile.table(columns=["token_id"], filters=filters).column("token_id").to_numpy()
    totals = pd.Series(all_ids).value_counts()
    counts = routed["token_id"].value_counts().head(top)
    return pd.DataFrame({"token_id": counts.index.astype(int), "count": counts.to_numpy(),
                         "fraction_of_token": (counts / totals.reindex(counts.index)).to_numpy()})


def expert_snippets(profile: Profile, layer: int, expert: int, task: str | None = None, n: int = 5,
                    window: int = 8) -> list[dict]:
    """Up to ``n`` places (from different examples) where ``expert`` was chosen first at ``layer``: the token
    and up to ``window`` prompt tokens each side, as ids, for showing what the expert reads."""
    routed = _routed_rows(profile, layer, expert, task)
    first = routed[(routed["rank"] == 0) & (routed["step"] == 0)].drop_duplicates(["task", "example"]).head(n)
    out = []
    for row in first.itertuples():
        ids = token_routes(profile, row.task, int(row.example), layer)
        ids = ids[ids["step"] == 0].set_index("position")["token_id"]
        p = int(row.position)
        out.append({"task": row.task, "example": int(row.example), "position": p,
                    "before": [int(t) for t in ids.loc[max(0, p - window):p - 1]],
                    "token": int(row.token_id),
                    "after": [int(t) for t in ids.loc[p + 1:p + window]]})
    return out


def profile_examples(profile: Profile) -> pd.DataFrame:
    """Every recorded example: task, example index and its number of prompt tokens."""
    table = profile.table(columns=["task", "example", "layer", "step"],
                          filters=[("layer", "=", profile.meta.layers[0]), ("step", "=", 0)])
    df = table.to_pandas()
    return df.groupby(["task", "example"], as_index=False).size().rename(columns={"size": "tokens"})


# ----- views of these tables for the dashboard ----------------------------------------------------------
def examples_per_task(profile: Profile) -> pd.DataFrame:
    """Per task: how many examples the profile recorded and their prompt tokens."""
    return (profile_examples(profile).groupby("task", as_index=False)
            .agg(examples=("example", "count"), tokens=("tokens", "sum")))


def task_usage(usage: pd.DataFrame, task: str, value: str) -> pd.DataFrame:
    """``task``'s rows of :func:`expert_usage`, with ``value`` (share, weight_share or count) as column ``v``."""
    cells = usage[usage["task"] == task]
    return cells.assign(v=cells[value])


def usage_difference(usage: pd.DataFrame, task: str, other: str, value: str) -> tuple[pd.DataFrame, str]:
    """Per layer × expert, ``task``'s ``value`` minus ``other``'s (column ``v``), and the column compared:
    raw counts of different-sized tasks do not compare, so ``count`` compares shares."""
    column = "share" if value == "count" else value
    a = usage[usage["task"] == task].set_index(["layer", "expert"])
    b = usage[usage["task"] == other].set_index(["layer", "expert"])
    return (a[column] - b[column]).rename("v").reset_index(), column


def usage_difference_points(usage: pd.DataFrame, task: str, other: str, value: str) -> pd.DataFrame:
    """:func:`usage_difference` of ``share`` or ``weight_share`` in percentage points (column ``v``: +4.0 means
    ``task`` gives that expert 4 % more of its routing than ``other``)."""
    if value not in ("share", "weight_share"):
        raise ValueError(f"a difference compares shares, not {value}")
    cells, _ = usage_difference(usage, task, other, value)
    return cells.assign(v=cells["v"] * 100.0)


def divergence_between(divergence: pd.DataFrame, task: str, other: str) -> pd.DataFrame:
    """The rows of :func:`task_divergence` for one pair of tasks (either order): layer and jsd_bits."""
    d = divergence
    pair = ((d.task_a == task) & (d.task_b == other)) | ((d.task_a == other) & (d.task_b == task))
    return d[pair][["layer", "jsd_bits"]]


def usage_for_plan(usage: pd.DataFrame, task: str | None) -> tuple[pd.DataFrame, bool]:
    """Expert shares to show a plan over: ``task``'s (the plan's calibration task) when the profile has it,
    else the mean share over the profile's tasks; and whether it was ``task``'s."""
    if task in set(usage["task"]):
        return usage[usage["task"] == task], True
    return usage.groupby(["layer", "expert"], as_index=False)["share"].mean(), False


def task_example_ids(examples: pd.DataFrame, task: str) -> list[int]:
    """The example indices of ``task`` in :func:`profile_examples`."""
    return examples[examples["task"] == task]["example"].tolist()


def prompt_routes(profile: Profile, task: str, example: int, layer: int) -> pd.DataFrame:
    """:func:`token_routes` of the prompt only (decode steps left out)."""
    routes = token_routes(profile, task, example, layer)
    return routes[routes["step"] == 0]


def chance_same_expert(n_experts: int) -> float:
    """How often consecutive tokens would share their first-choice expert if routing were uniform."""
    return 1 / n_experts
