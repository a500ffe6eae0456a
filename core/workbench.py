"""One model's interactive pruning bench: the plan for a (method, target, calibration task) and its scores
beside the unpruned model's, cached so that returning to a setting is instant.

The dashboard's pruning controls call only this. Score-based methods (frequency, soft activation, REAP)
make their calibration pass once per calibration task; every ratio after that is a sort. Searches (EEP,
NAEE, dynamic skipping) run on request, report progress, stop when asked, and EEP resumes from its saved
population.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import MoEScopeError
from .evaluation import EvalResult, Evaluator
from .methods import Calibration, Target, describe, make_method
from .methods.base import ExpertScores, ProgressFn, ScoredMethod
from .model import MoEModel
from .plan import Plan
from .results import Comparison, plan_row
from .tasks import get_task_spec


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for: a method, a target, and the task whose calibration split guides it."""

    method: str
    calibration_task: str
    keep: int | None = None
    ratio: float | None = None
    top_k: int | None = None
    calibration_limit: int | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def target(self) -> Target:
        return Target(keep=self.keep, ratio=self.ratio, top_k=self.top_k)

    def key(self) -> str:
        blob = json.dumps([self.method, self.calibration_task, self.keep, self.ratio, self.top_k,
                           self.calibration_limit, list(self.params)], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SearchJob:
    """A search running on a background thread, so the page stays responsive and *Stop* is heard at once."""

    request: PlanRequest
    stop: threading.Event = field(default_factory=threading.Event)
    message: str = "starting"
    fraction: float = 0.0
    plan: Plan | None = None  # the result; a stopped EEP search leaves its best so far here
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Workbench:
    """Plans and comparisons for one loaded model; safe to share between dashboard sessions."""

    def __init__(self, mm: MoEModel, batch_size: int = 64, state_dir: str | Path | None = None) -> None:
        self.mm = mm
        self.evaluator = Evaluator(mm, batch_size=batch_size)
        self.state_dir = Path(state_dir) if state_dir else None
        self.digest = mm.weights_digest()
        self._history: dict[tuple, dict[str, Any]] = {}  # one sweep-table row per evaluated (plan, task, split, n)
        self._scores: dict[tuple, ExpertScores] = {}
        self._calibrations: dict[tuple, Calibration] = {}
        self._plans: dict[str, Plan] = {}
        self._jobs: dict[str, SearchJob] = {}
        self._lock = threading.Lock()  # guards the dictionaries and hands out per-key locks, never held long
        self._key_locks: dict[tuple, threading.Lock] = {}

    def has_plan(self, request: PlanRequest) -> bool:
        return request.key() in self._plans

    def feasible_keeps(self, top_k: int | None = None) -> list[int]:
        """Every number of experts per layer a plan can keep (grouped routing rounds up to whole groups)."""
        return sorted({Target(keep=e, top_k=top_k).experts_kept(self.mm)
                       for e in range(top_k or self.mm.top_k, self.mm.n_experts + 1)})

    def _key_lock(self, key: tuple) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _calibration(self, task: str, limit: int | None) -> Calibration:
        """One Calibration per (task, limit): it holds the rows and their digest, read once."""
        with self._key_lock(("calibration", task, limit)):
            if (task, limit) not in self._calibrations:
                calibration = Calibration.of(task, limit=limit)
                calibration.digest()
                self._calibrations[(task, limit)] = calibration
            return self._calibrations[(task, limit)]

    def plan(self, request: PlanRequest, progress: ProgressFn | None = None,
             should_stop: Callable[[], bool] | None = None) -> Plan:
        """The plan for ``request``, made once and then served from memory. Different requests compute in
        parallel (masking still serialises the forwards); the same request waits for the first to finish."""
        key = request.key()
        if key in self._plans:
            return self._plans[key]
        with self._key_lock(("plan", key)):
            if key in self._plans:
                return self._plans[key]
            params = dict(request.params)
            info = describe(request.method)
            if info.can_stop:
                params["should_stop"] = should_stop
            if info.can_resume and self.state_dir is not None:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                params.setdefault("state_path", str(self.state_dir / f"{request.method}-{self.digest[:12]}-{key}.json"))
            method = make_method(request.method, **params)
            calibration = self._calibration(request.calibration_task, request.calibration_limit)
            if isinstance(method, ScoredMethod):
                skey = (request.method, request.params, request.calibration_task, request.calibration_limit)
                with self._key_lock(("scores", *skey)):
                    if skey not in self._scores:
                        self._scores[skey] = method.expert_scores(self.mm, calibration, progress)
                plan = method.plan(self.mm, calibration, request.target, scores=self._scores[skey])
            else:
                plan = method.plan(self.mm, calibration, request.target, progress=progress)
            if not plan.extra.get("cancelled"):  # a stopped search's best-so-far is shown, not cached
                self._plans[key] = plan
            return plan

    def search(self, request: PlanRequest) -> SearchJob:
        """Start (or return the running) background search for ``request``; poll the job for progress."""
        key = request.key()
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and (job.running or job.error is None and job.plan is not None
                                    and not job.plan.extra.get("cancelled")):
                return job
            job = self._jobs[key] = SearchJob(request)

        def progress(message: str, fraction: float) -> None:
            job.message, job.fraction = message, min(max(fraction, 0.0), 1.0)

        def run() -> None:
            try:
                job.plan = self.plan(request, progress=progress, should_stop=job.stop.is_set)
            except Exception as exc:  # noqa: BLE001 - shown to the user by whoever polls the job
                job.error = str(exc) if isinstance(exc, MoEScopeError) else f"{type(exc).__name__}: {exc}"

        job.thread = threading.Thread(target=run, name=f"moescope-search-{key}", daemon=True)
        job.thread.start()
        return job

    def job(self, request: PlanRequest) -> SearchJob | None:
        return self._jobs.get(request.key())

    def compare(self, plan: Plan | None, tasks: Sequence[str], split: str = "test", limit: int | None = None,
                progress: Callable[[str, int, int], None] | None = None, agreement: bool = True) -> Comparison:
        """Evaluate ``plan`` and the unpruned model on each task (both cached by the evaluator); with
        ``agreement`` also top-1 agreement and KL against the unpruned model (its reference computed once
        per task, and log-probs at every position of each example)."""
        started = time.perf_counter()
        pairs = []
        for name in tasks:
            spec = get_task_spec(name)
            full = self.evaluator.evaluate(spec, None, split, limit, progress=progress)
            pruned = self.evaluator.evaluate(spec, plan, split, limit, progress=progress,
                                             agreement=agreement) if plan else full
            self._record(full, None)
            if plan is not None:
                self._record(pruned, plan)
            pairs.append((spec, full, pruned))
        return Comparison.of(pairs, time.perf_counter() - started)

    def sweep(self, methods: Sequence[str], keeps: Sequence[int], calibration_task: str, tasks: Sequence[str],
              top_k: int | None = None, split: str = "test", limit: int | None = None,
              calibration_limit: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> pd.DataFrame:
        """Plan and evaluate every (method, experts kept) pair; returns :meth:`sweep_table`."""
        jobs = [(m, k) for m in methods for k in keeps]
        for done, (method, keep) in enumerate(jobs, 1):
            if progress:
                progress(f"{method}, keep {keep}", done - 1, len(jobs))
            plan = self.plan(PlanRequest(method, calibration_task, keep=keep, top_k=top_k,
                                         calibration_limit=calibration_limit))
            self.compare(plan, tasks, split, limit)
        return self.sweep_table()

    def sweep_table(self) -> pd.DataFrame:
        """Everything evaluated so far, in the format of ``moescope sweep`` tables."""
        return pd.DataFrame(list(self._history.values()))

    def _record(self, result: EvalResult, plan: Plan | None) -> None:
        row = plan_row(result, plan, self.mm.n_experts, self.mm.top_k)
        self._history[(result.plan_digest, result.task, result.split, result.n_examples)] = row
