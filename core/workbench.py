"""One model's interactive pruning bench: the plan for a (method, target, calibration task) and its scores
beside the unpruned model's, cached so that returning to a setting is instant.

While the user looks at a result, :meth:`Workbench.prefetch` plans and scores the settings they are likely to
try next (:meth:`Workbench.neighbours`) on a background thread, so that moving a control usually lands on a
cached result. The look-ahead gives way to the user's own work: it waits while a foreground call (or a page
rerun, :meth:`Workbench.serving_user`) runs, and what it has started stops at its next MoE block, decoding step
or scoring batch when a foreground call begins (retried later).

The dashboard's pruning controls call only this. Score-based methods (frequency, soft activation, REAP)
make their calibration pass once per calibration task; every ratio after that is a sort. Searches (EEP,
NAEE, dynamic skipping) run on request, report progress, stop when asked, and EEP resumes from its saved
population.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import MoEScopeError
from .evaluation import EvalResult, Evaluator
from .methods import Calibration, Target, describe, make_method, quick_methods
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


_LOOKING_AHEAD: weakref.WeakSet[Workbench] = weakref.WeakSet()


@atexit.register
def _close_look_aheads() -> None:
    for bench in list(_LOOKING_AHEAD):
        bench.close()


class _GiveWay(Exception):
    """Raised inside the look-ahead's progress callback to stop its work when the user's own call starts."""


class Workbench:
    """Plans and comparisons for one loaded model; safe to share between dashboard sessions."""

    def __init__(self, mm: MoEModel, batch_size: int = 64, state_dir: str | Path | None = None,
                 look_ahead: bool = True) -> None:
        """``look_ahead``: whether :meth:`prefetch` scores settings in the background (off, it does nothing)."""
        self.mm = mm
        self.look_ahead = look_ahead
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
        # the look-ahead: a queue of settings to score, one daemon thread, and a count of foreground calls
        self._ahead: list[tuple] = []
        self._ahead_thread: threading.Thread | None = None
        self._ahead_busy = False
        self._front = 0
        self._front_changed = threading.Condition(self._lock)
        self._background = threading.local()
        self.look_ahead_stats = {"scored": 0, "gave_way": 0, "failed": 0}

    def has_plan(self, request: PlanRequest) -> bool:
        return request.key() in self._plans

    def is_calibrated(self, request: PlanRequest) -> bool:
        """Whether ``request``'s plan is made, or its method's calibration pass is done so that the plan is a
        sort: the page then needs no progress or Stop button for it."""
        return request.key() in self._plans or self._score_key(request) in self._scores

    @staticmethod
    def _score_key(request: PlanRequest) -> tuple:
        return request.method, request.params, request.calibration_task, request.calibration_limit

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
        with self._foreground(), self._key_lock(("plan", key)):
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
                skey = self._score_key(request)
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
                progress: Callable[[str, int, int], None] | None = None, agreement: bool = True,
                estimate: Callable[[Comparison], None] | None = None) -> Comparison:
        """Evaluate ``plan`` and the unpruned model on each task (both cached by the evaluator); with
        ``agreement`` also top-1 agreement and KL against the unpruned model (its reference computed once
        per task, and log-probs at every position of each example). With ``estimate``, a task not cached is
        first scored on its first batch of examples and ``estimate`` gets that comparison (with 95% intervals)
        before the full one is computed."""
        started = time.perf_counter()
        pairs = []
        with self._foreground():
            for name in tasks:
                spec = get_task_spec(name)
                if estimate is not None and plan is not None:
                    self._estimate(spec, plan, split, limit, agreement, pairs, started, estimate, progress)
                full = self.evaluator.evaluate(spec, None, split, limit, progress=progress)
                pruned = self.evaluator.evaluate(spec, plan, split, limit, progress=progress,
                                                 agreement=agreement) if plan else full
                self._record(full, None)
                if plan is not None:
                    self._record(pruned, plan)
                pairs.append((spec, full, pruned))
        return Comparison.of(pairs, time.perf_counter() - started)

    FIRST_BATCH = 16  # examples in a streamed comparison's first estimate

    def _estimate(self, spec, plan: Plan, split: str, limit: int | None, agreement: bool, pairs: list,
                  started: float, estimate: Callable[[Comparison], None], progress) -> None:
        """Before scoring ``spec`` in full, when that is not cached and has more than :attr:`FIRST_BATCH`
        examples: score its first batch with both models and hand ``estimate`` the comparison so far (finished
        tasks in full, this one on its first batch, with 95% intervals), so the page can show it at once."""
        first = self.FIRST_BATCH
        if self.evaluator.cached(spec, plan, split, limit, agreement) or (limit is not None and limit <= first):
            return
        if len(self.evaluator.examples(spec, split, limit)) <= first:
            return
        full = self.evaluator.evaluate(spec, None, split, first, progress=progress)
        pruned = self.evaluator.evaluate(spec, plan, split, first, progress=progress, agreement=False)
        estimate(Comparison.of([*pairs, (spec, full, pruned)], time.perf_counter() - started))

    def is_cached(self, request: PlanRequest, tasks: Sequence[str], split: str = "test", limit: int | None = None,
                  agreement: bool = False) -> bool:
        """Whether ``request``'s plan and its scores on every task are ready (a call would not compute)."""
        plan = self._plans.get(request.key())
        return plan is not None and self.is_scored(plan, tasks, split, limit, agreement)

    def is_scored(self, plan: Plan | None, tasks: Sequence[str], split: str = "test", limit: int | None = None,
                  agreement: bool = False) -> bool:
        """Whether :meth:`compare` would return at once (both models' scores on every task are cached)."""
        return all(self.evaluator.cached(get_task_spec(t), None, split, limit, False)
                   and self.evaluator.cached(get_task_spec(t), plan, split, limit, agreement) for t in tasks)

    # ----- the look-ahead ----------------------------------------------------------------------------------
    def neighbours(self, request: PlanRequest) -> list[PlanRequest]:
        """The settings a user is likely to try after ``request``, nearest first: one and two experts more and
        fewer kept (among :meth:`feasible_keeps`), top-k one lower and higher, and the other fast methods at the
        same number kept. Only fast methods (one calibration pass, then a sort) are looked ahead; a search's
        neighbours are the fast methods at its number kept."""
        fast = quick_methods()
        near: list[PlanRequest] = []
        k = self.mm.top_k
        top_k = request.top_k or k
        if request.method in fast and request.keep is not None:
            keeps = self.feasible_keeps()
            at = min(range(len(keeps)), key=lambda i: abs(keeps[i] - request.keep))
            for step in (1, -1, 2, -2):
                if 0 <= at + step < len(keeps):
                    near.append(replace(request, keep=keeps[at + step]))
        if request.ratio == 0.0:  # top-k reduction keeps every expert: its only setting is a top-k below k
            near += [replace(request, top_k=t) for t in (top_k - 1, top_k + 1) if 1 <= t < k]
        elif request.method in fast and request.keep is not None:
            near += [replace(request, top_k=None if t == k else t)  # the page says None for the model's top-k
                     for t in (top_k - 1, top_k + 1) if 1 <= t <= min(k, request.keep)]
        if request.keep is not None:
            for method in fast:
                if method != request.method:
                    near.append(PlanRequest(method, request.calibration_task, keep=request.keep, top_k=request.top_k,
                                            params=(("seed", 0),) if "seed" in describe(method).parameters else ()))
        seen, unique = {request.key()}, []
        for r in near:
            if r.key() not in seen:
                seen.add(r.key())
                unique.append(r)
        return unique

    def prefetch(self, requests: Sequence[PlanRequest], tasks: Sequence[str], split: str = "test",
                 limit: int | None = None, agreement: bool = False) -> None:
        """Plan and score ``requests`` on ``tasks`` in the background, in order, replacing whatever earlier
        look-ahead has not started. Results land in the same caches as the user's own calls and are not added
        to :meth:`sweep_table` until the user asks for them."""
        if not self.look_ahead:
            return
        with self._lock:
            self._ahead = [(r, tuple(tasks), split, limit, agreement) for r in requests]
            if self._ahead_thread is None or not self._ahead_thread.is_alive():
                _LOOKING_AHEAD.add(self)
                self._ahead_thread = threading.Thread(target=self._look_ahead, name="moescope-look-ahead",
                                                      daemon=True)
                self._ahead_thread.start()
            self._front_changed.notify_all()

    def wait_for_look_ahead(self, timeout: float | None = None) -> bool:
        """Block until the look-ahead queue is empty and idle (tests, benchmarks); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._ahead or self._ahead_busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._front_changed.wait(left)
        return True

    def serving_user(self):
        """A context in which the page serves the user (a slider move's whole rerun, not only its plan and
        scores): the look-ahead waits meanwhile. Between the page's calls it would otherwise resume, and its
        forwards (Python-heavy on a tiny model) would hold the GIL against the page and the web server."""
        return self._foreground()

    @contextmanager
    def _foreground(self):
        """Marks a call made for the user: the look-ahead waits, and stops what it has started."""
        if getattr(self._background, "active", False):
            yield
            return
        with self._lock:
            self._front += 1
        try:
            yield
        finally:
            with self._lock:
                self._front -= 1
                self._front_changed.notify_all()

    def _give_way(self, *_: Any) -> None:
        if self._front:
            raise _GiveWay

    def close(self) -> None:
        """Stop the look-ahead: drop its queue, stop what it is scoring at its next batch, and wait for it (a
        daemon thread killed inside a forward at interpreter exit aborts the process)."""
        with self._lock:
            self.look_ahead, self._ahead = False, []
            self._front += 1  # makes a running evaluation give way
            self._front_changed.notify_all()
        if self._ahead_thread is not None:
            self._ahead_thread.join(timeout=60)
        with self._lock:
            self._front -= 1

    def _look_ahead(self) -> None:
        self._background.active = True
        # Progress callbacks come between batches, and one calibration batch of a 24 x 128 model took 3 s on
        # CPU: a hook before every MoE block also stops a forward part-way, so the user's call waits for one
        # block at most. It raises only in this thread; forwards stopped this way cache nothing (as between
        # batches), and the `with` blocks around them restore masks and remove their own hooks.
        handles = [layer.block.register_forward_pre_hook(self._give_way_in_forward) for layer in self.mm.layers]
        try:
            self._serve_look_ahead()
        finally:
            for handle in handles:
                handle.remove()

    def _give_way_in_forward(self, *_: Any) -> None:
        if threading.current_thread() is self._ahead_thread:
            self._give_way()

    def _serve_look_ahead(self) -> None:
        while True:
            with self._lock:
                while (not self._ahead or self._front) and self.look_ahead:
                    self._ahead_busy = False
                    self._front_changed.notify_all()
                    self._front_changed.wait()
                if not self.look_ahead:
                    self._ahead_busy = False
                    self._front_changed.notify_all()
                    return
                item = self._ahead.pop(0)
                self._ahead_busy = True
            try:
                self._score_ahead(*item)
                self.look_ahead_stats["scored"] += 1
            except _GiveWay:
                self.look_ahead_stats["gave_way"] += 1
                with self._lock:
                    if self.look_ahead:
                        self._ahead.insert(0, item)  # retried once the user's call is done
            except Exception:  # noqa: BLE001 - a setting that cannot be planned is simply not looked ahead
                self.look_ahead_stats["failed"] += 1

    def _score_ahead(self, request: PlanRequest, tasks: tuple[str, ...], split: str, limit: int | None,
                     agreement: bool) -> None:
        self._give_way()
        plan = self.plan(request, progress=self._give_way)
        for name in tasks:
            spec = get_task_spec(name)
            for target, agree in ((None, False), (plan, agreement)):
                self._give_way()
                self.evaluator.evaluate(spec, target, split, limit, progress=self._give_way, agreement=agree,
                                        interrupt=self._give_way)

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
