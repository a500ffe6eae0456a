"""The user's names and pins for saved plans, and the tables that compare pinned plans side by side.

The dashboard keeps every plan it makes in one folder per model (``<home>/plans/<weights digest>/<plan
digest>.json``). A plan digest means nothing to a stakeholder, so the user may give a plan a name, and pin the
plans worth comparing. :class:`PlanBook` keeps those names and pins in ``book.json`` in that folder, keyed by plan
digest. Several dashboard sessions (browser tabs, users of one server) may rename and pin at once: every change is
a read-modify-write under an OS lock (``fcntl.flock``, blocking: unlike an export, a rename should wait a moment for
another, not fail), written atomically (``core.atomic``), so no writer loses another's entries and a reader never
sees half a file.

The comparison tables (:func:`kept_experts_table`, :func:`overlap_table`, :func:`task_scores`) are built here so
that the dashboard only lays them out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from .atomic import atomic_write_text
from .errors import MoEScopeError
from .plan import Plan, RoutingSpec, validate_plan
from .results import experts_kept, headline_metric, higher_is_better, plan_name
from .tasks import get_task_spec

try:  # POSIX; the dashboard's writers need it (Linux and macOS)
    import fcntl
except ImportError:  # pragma: no cover - Windows: one session at a time
    fcntl = None  # type: ignore[assignment]

BOOK_FORMAT = "moescope-plan-book"
BOOK_VERSION = 1
BOOK_FILE = "book.json"
MAX_PINNED = 4  # a side-by-side comparison stays readable up to four plans
MAX_NAME = 80  # characters; a name is a table header, not a note
_PLAN_FILE = re.compile(r"^[0-9a-f]{16}\.json$")  # what ``Plan.digest`` names a saved plan; skips book.json, latest
# Column names the comparison tables use themselves; a plan is never labelled with one of them.
RESERVED_LABELS = frozenset({"Layer", "Kept by every plan", "Kept by only some", "Task", "Metric", "Better when",
                             "Examples", "Full model", "Best plan"})


@dataclass(frozen=True)
class SavedPlan:
    """A plan kept in a model's plans folder, with what the user said about it."""

    digest: str
    plan: Plan
    saved_at: float  # seconds since the epoch the file was last written (made, or chosen again)
    name: str | None  # the user's name; None: the plan is called by :func:`default_name`
    pinned: bool

    @property
    def method(self) -> str:
        return str(self.plan.extra.get("method", "custom"))

    def label(self, n_experts: int, model_top_k: int) -> str:
        """What tables and lists call the plan: the user's name, else the plan in words."""
        return self.name or default_name(self.plan, n_experts, model_top_k)


def default_name(plan: Plan, n_experts: int, model_top_k: int) -> str:
    """A plan the user has not named, in words (``core.results.plan_name``: method, experts kept, top-k)."""
    return plan_name(plan, n_experts, model_top_k)


def _clean_name(name: str | None) -> str | None:
    """A name as stored: one line, spaces collapsed; empty means "no name of its own"."""
    text = " ".join((name or "").split())
    if len(text) > MAX_NAME:
        raise MoEScopeError(f"A plan name has at most {MAX_NAME} characters; this one has {len(text)}, so shorten it.")
    if text in RESERVED_LABELS:
        raise MoEScopeError(f'"{text}" names a column of the comparison tables; choose another plan name.')
    return text or None


class PlanBook:
    """Names and pins of the plans saved in ``folder`` (one model's plans folder), kept in ``folder/book.json``.

    Every instance reads the file afresh, so what another session wrote is seen at once; changes take the
    folder's lock and write the whole file atomically."""

    def __init__(self, folder: str | Path, weights_digest: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / BOOK_FILE
        self.weights_digest = weights_digest

    # ----- the file ------------------------------------------------------------------------------------
    def _read(self) -> dict[str, dict[str, Any]]:
        """The entries on disk, by plan digest; none when there is no book yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("format") != BOOK_FORMAT or not isinstance(data.get("plans"), dict):
            raise MoEScopeError(f"{self.path} is not a MoEScope plan book; move it away to start a new one (plan "
                                f"names and pins start empty again).")
        return {str(d): e for d, e in data["plans"].items() if isinstance(e, dict)}

    def _write(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        data = {"format": BOOK_FORMAT, "version": BOOK_VERSION, "weights_digest": self.weights_digest,
                "plans": {d: dict(e) for d, e in sorted(entries.items())}}
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the book's lock (blocking) for a read-modify-write. The lock file stays in place: removing it
        would let a waiting writer lock a file nobody else sees."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - no OS locks on this platform
            yield
            return
        fd = os.open(self.folder / f".{BOOK_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _put(entries: dict[str, dict[str, Any]], digest: str, entry: Mapping[str, Any]) -> None:
        """Store ``entry`` (its None fields left out) as ``digest``'s; an entry with nothing to say is dropped."""
        entry = {k: v for k, v in entry.items() if v is not None}
        if entry:
            entries[digest] = entry
        else:
            entries.pop(digest, None)

    # ----- plans in the folder ---------------------------------------------------------------------------
    def _plan_path(self, digest: str) -> Path:
        """The saved plan ``digest`` (a full plan digest), or one sentence when this model has no such plan."""
        path = self.folder / f"{digest}.json"
        if not _PLAN_FILE.match(path.name) or not path.is_file():
            raise MoEScopeError(f"No plan {str(digest)[:16]!r} is saved for this model; make it (or load it) first, "
                                f"then name or pin it.")
        return path

    def plans(self, spec: RoutingSpec | None = None, limit: int | None = None) -> list[SavedPlan]:
        """The plans saved in the folder, most recently saved first (at most ``limit``), each with its name and
        pin. Files that are not readable plans, or (given ``spec``) do not fit the model, are left out."""
        try:
            files = [p for p in self.folder.iterdir() if _PLAN_FILE.match(p.name)]
        except OSError:
            return []
        dated = []
        for path in files:
            with contextlib.suppress(OSError):
                dated.append((path.stat().st_mtime, path))
        dated.sort(key=lambda item: (-item[0], item[1].name))
        entries = self._read()
        out: list[SavedPlan] = []
        for saved_at, path in dated:
            if limit is not None and len(out) >= limit:
                break
            try:
                plan = Plan.load(path)
                if spec is not None:
                    validate_plan(plan, spec)
            except Exception:  # noqa: BLE001 - a damaged or foreign file is not one of this model's plans
                continue
            digest = path.stem
            entry = entries.get(digest, {})
            out.append(SavedPlan(digest, plan, saved_at, entry.get("name"), entry.get("pinned_at") is not None))
        return out

    # ----- names and pins --------------------------------------------------------------------------------
    def names(self) -> dict[str, str]:
        """The user's names, by plan digest."""
        return {d: e["name"] for d, e in self._read().items() if isinstance(e.get("name"), str)}

    def name(self, digest: str) -> str | None:
        return self.names().get(digest)

    def rename(self, digest: str, name: str | None) -> str | None:
        """Give plan ``digest`` the name ``name`` (spaces collapsed; empty or None: back to its name in words).
        Two plans of a model never share a name, so the comparison tables stay unambiguous. Returns the name."""
        self._plan_path(digest)
        text = _clean_name(name)
        with self._locked():
            entries = self._read()
            if text is not None and any(e.get("name") == text for d, e in entries.items() if d != digest):
                raise MoEScopeError(f'Another plan of this model is already named "{text}"; choose another name.')
            self._put(entries, digest, {**entries.get(digest, {}), "name": text})
            self._write(entries)
        return text

    def pinned(self) -> list[str]:
        """The pinned plans' digests, in the order they were pinned, whose plan files still exist."""
        entries = self._read()
        pins = sorted((e["pinned_at"], d) for d, e in entries.items() if isinstance(e.get("pinned_at"), (int, float)))
        return [d for _, d in pins if (self.folder / f"{d}.json").is_file()]

    def pin(self, digest: str, pinned: bool = True) -> None:
        """Pin (or unpin) plan ``digest``; at most :data:`MAX_PINNED` plans are pinned at once."""
        self._plan_path(digest)
        with self._locked():
            entries = self._read()
            entry = dict(entries.get(digest, {}))
            if pinned and entry.get("pinned_at") is None:
                others = [d for d, e in entries.items() if e.get("pinned_at") is not None
                          and (self.folder / f"{d}.json").is_file()]
                if len(others) >= MAX_PINNED:
                    raise MoEScopeError(f"{MAX_PINNED} plans are pinned already, the most a comparison shows; unpin "
                                        f"one first.")
                entry["pinned_at"] = time.time()
            elif not pinned:
                entry.pop("pinned_at", None)
            self._put(entries, digest, entry)
            self._write(entries)


# ----- comparing pinned plans ----------------------------------------------------------------------------
def distinct_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` made unique and kept apart from the tables' own column names ("name (2)"), in order."""
    out: list[str] = []
    for label in labels:
        candidate, n = label, 1
        while candidate in out or candidate in RESERVED_LABELS:
            n += 1
            candidate = f"{label} ({n})"
        out.append(candidate)
    return out


def _experts(experts: Sequence[int]) -> str:
    """A set of experts in words: how many, then which ("3: 0, 2, 5"; "0" when none)."""
    return f"{len(experts)}: {', '.join(map(str, experts))}" if experts else "0"


def kept_experts_table(plans: Mapping[str, Plan], n_experts: int, layers: Sequence[int]) -> pd.DataFrame:
    """For each MoE layer: how many and which experts each plan (by label) keeps, which experts every plan keeps,
    and which only some keep. Columns: Layer, one per plan, "Kept by every plan", "Kept by only some"."""
    rows = []
    for layer in layers:
        kept = {label: plan.keep(layer, n_experts) for label, plan in plans.items()}
        every = set.intersection(*map(set, kept.values())) if kept else set()
        some = set().union(*map(set, kept.values())) - every
        rows.append({"Layer": layer, **{label: _experts(k) for label, k in kept.items()},
                     "Kept by every plan": _experts(sorted(every)), "Kept by only some": _experts(sorted(some))})
    return pd.DataFrame(rows, columns=["Layer", *plans, "Kept by every plan", "Kept by only some"])


def overlap_table(plans: Mapping[str, Plan], n_experts: int, layers: Sequence[int]) -> pd.DataFrame:
    """How alike two plans are, for every pair: the experts both keep as a share of the experts either keeps
    (1.0: the same experts), averaged over the MoE layers. A square table indexed and columned by label."""
    labels = list(plans)
    table = pd.DataFrame(1.0, index=labels, columns=labels)
    for a, b in combinations(labels, 2):
        shares = []
        for layer in layers:
            x, y = set(plans[a].keep(layer, n_experts)), set(plans[b].keep(layer, n_experts))
            shares.append(len(x & y) / len(x | y) if x | y else 1.0)
        table.loc[a, b] = table.loc[b, a] = sum(shares) / len(shares) if shares else 1.0
    return table


def task_scores(table: pd.DataFrame, plans: Mapping[str, str], tasks: Sequence[str], split: str = "test",
                limit: int | None = None) -> pd.DataFrame:
    """Each plan's headline score on each task beside the full model's, from what has been scored already
    (``table``: a sweep table, as :meth:`core.workbench.Workbench.sweep_table` returns it).

    ``plans``: label -> plan digest. ``tasks``: task names or folders. For each task the scores are those on the
    most test examples the full model was scored on, up to ``limit`` (all: ``None``), so every plan is measured on
    the same examples. One row per task and plan: task, metric, better ("higher"/"lower"), examples (None: the
    task was never scored), plan, score, full, change (score minus full), best (the best plan scored on the task);
    a plan not scored yet on those examples has NaN score and change."""
    rows = []
    for task in tasks:
        spec = get_task_spec(task)
        metric = headline_metric(task)
        column = f"metric_{metric}"
        mine = table
        if not mine.empty and {"eval_task", "split", "examples", "plan_digest", column} <= set(mine.columns):
            mine = mine[(mine["eval_task"] == spec.name) & (mine["split"] == split)].dropna(subset=[column])
        else:
            mine = pd.DataFrame(columns=["examples", "plan_digest", column])
        full_rows = mine[mine["plan_digest"].isna()]
        if limit is not None:
            full_rows = full_rows[full_rows["examples"] <= limit]
        examples = int(full_rows["examples"].max()) if not full_rows.empty else None
        at = mine[mine["examples"] == examples] if examples is not None else mine.iloc[0:0]
        full = float(at.loc[at["plan_digest"].isna(), column].iloc[0]) if examples is not None else float("nan")
        for label, digest in plans.items():
            scored = at.loc[at["plan_digest"] == digest, column]
            score = float(scored.iloc[0]) if not scored.empty else float("nan")
            rows.append({"task": spec.name, "metric": metric, "better": "higher" if higher_is_better(metric)
                         else "lower", "examples": examples, "plan": label, "score": score, "full": full,
                         "change": score - full})
    out = pd.DataFrame(rows, columns=["task", "metric", "better", "examples", "plan", "score", "full", "change"])
    out["best"] = False
    for _, group in out.dropna(subset=["score"]).groupby("task", sort=False):
        pick = group["score"].idxmax() if group["better"].iloc[0] == "higher" else group["score"].idxmin()
        top = group.loc[pick, "score"]
        out.loc[group.index[group["score"] == top], "best"] = True  # ties are all best
    return out


def plan_summary(saved: SavedPlan, n_experts: int, model_top_k: int) -> dict[str, Any]:
    """A saved plan's row in the list of plans: label, method, experts kept, top-k, when saved, pinned."""
    return {"name": saved.label(n_experts, model_top_k), "method": saved.method.replace("_", " "),
            "experts_kept": experts_kept(saved.plan, n_experts), "n_experts": n_experts,
            "top_k": saved.plan.top_k or model_top_k, "saved_at": saved.saved_at, "pinned": saved.pinned}
