"""The evaluation harness: a task's metrics for the model, optionally under a pruning plan, with the pruned
model's agreement with the unpruned one and what it costs. Everything is deterministic; results are cached by
(model weights, task, split, limit, plan digest).

The task's kind (:mod:`.kinds`) says how its examples are fitted and scored; the forwards are the mixins'
(:mod:`.decoding`, :mod:`.scoring`, :mod:`.reference`), as transformers keeps generation beside its models.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..masking import masked
from ..model import MoEModel
from ..plan import Plan
from ..tasks import TaskSpec, get_task_spec
from .agreement import Agreement, Reference
from .decoding import DecodingMixin
from .examples import Example, prepare_examples
from .kinds import Generative, task_kind
from .reference import ReferenceMixin
from .result import EvalResult, ProgressFn, plan_cost
from .scoring import ScoringMixin


class ResultCache:
    """The most recent results by key, at most ``size``; safe for sessions sharing one evaluator."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._results: OrderedDict[tuple, EvalResult] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> EvalResult | None:
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        return None

    def put(self, key: tuple, result: EvalResult) -> None:
        with self._lock:
            self._results[key] = result
            while len(self._results) > self.size:
                self._results.popitem(last=False)


class Evaluator(DecodingMixin, ScoringMixin, ReferenceMixin):
    """Evaluates tasks on one model, caching results and the unpruned model's reference log-probs."""

    def __init__(self, mm: MoEModel, batch_size: int = 32, cache_size: int = 256, token_budget: int = 2048) -> None:
        """``batch_size`` sequences at most per forward (and per generation batch); ``token_budget`` padded
        tokens at most per scoring forward, which keeps its [batch, length, vocabulary] log-probs small: on
        CPU that measured faster than larger batches."""
        self.mm = mm
        self.batch_size = batch_size
        self.token_budget = token_budget
        self._results = ResultCache(cache_size)
        self._full_logprobs: dict[tuple, list[Reference]] = {}
        self._stop_ids: dict[str, torch.Tensor] = {}
        self._digest = mm.weights_digest()
        self._interrupt = threading.local()  # the running evaluation's interrupt, per thread

    def evaluate(self, task: TaskSpec | str, plan: Plan | None = None, split: str = "test", limit: int | None = None,
                 progress: ProgressFn | None = None, agreement: bool = True,
                 answer_likelihood: bool = False, interrupt: Callable[[], None] | None = None) -> EvalResult:
        """The task's metrics on ``split`` (first ``limit`` examples) under ``plan``; with ``agreement`` also the
        agreement with the unpruned model; with ``answer_likelihood`` generative tasks also report
        ``answer_logprob``, the reference answers' mean log-probability per token, teacher-forced on the
        decoding pass's prompt cache where the model allows it. ``interrupt`` is called between forwards (every
        decoding step and scoring batch): an exception it raises stops the evaluation, which caches nothing (the
        dashboard's look-ahead gives way to the user's own call this way)."""
        spec = get_task_spec(task)
        key = self._key(spec, plan, split, limit, agreement, answer_likelihood)
        cached = self._results.get(key)
        if cached is not None:
            return cached
        kind = task_kind(spec)
        if answer_likelihood and isinstance(kind, Generative):
            kind.answer_likelihood = True
        examples = self._prepare(spec, split, limit)
        say = progress or (lambda *_: None)
        start = time.perf_counter()
        compare = agreement and plan is not None
        with self.mm.lock, torch.inference_mode(), self._interrupting(interrupt):  # one evaluation at a time
            reference = self._reference((spec.name, split, limit), examples, say) if compare else None
            tally = Agreement()
            # tokens/s counts the task's own forwards, not the reference's; they also yield the agreement when
            # the reference is cached and the model's cache allows it (else it takes a pass of its own)
            scoring = time.perf_counter()
            with masked(self.mm, plan):
                outcome = kind.run(self, examples, say, reference, tally)
            scoring = time.perf_counter() - scoring - tally.seconds
            if compare and not tally.tokens:
                self._agreement(examples, plan, reference, tally, say)
            seconds = time.perf_counter() - start
            agree = tally.result() if compare else {}
        cost = plan_cost(self.mm, plan)
        cost["tokens_per_s"] = outcome.tokens / scoring if scoring > 0 else 0.0
        result = EvalResult(task=spec.name, split=split, metric_kind=spec.metric, n_examples=len(examples),
                            metrics=outcome.metrics, agreement=agree, cost=cost,
                            plan_digest=plan.digest() if plan else None, seconds=seconds,
                            predictions=outcome.predictions, samples=outcome.samples, weights=outcome.weights)
        self._results.put(key, result)
        return result

    @contextmanager
    def _interrupting(self, interrupt: Callable[[], None] | None) -> Iterator[None]:
        self._interrupt.fn = interrupt
        try:
            yield
        finally:
            self._interrupt.fn = None

    def _checkpoint(self) -> None:
        """Between two forwards: the caller's ``interrupt`` may stop the evaluation here."""
        fn = getattr(self._interrupt, "fn", None)
        if fn is not None:
            fn()

    def _key(self, spec: TaskSpec, plan: Plan | None, split: str, limit: int | None, agreement: bool,
             answer_likelihood: bool = False) -> tuple:
        return (self._digest, spec.name, split, limit, plan.digest() if plan else None, agreement and plan is not None,
                answer_likelihood)

    def cached(self, task: TaskSpec | str, plan: Plan | None = None, split: str = "test", limit: int | None = None,
               agreement: bool = True) -> bool:
        """Whether :meth:`evaluate` with these arguments would return a cached result at once."""
        return self._results.get(self._key(get_task_spec(task), plan, split, limit, agreement)) is not None

    def examples(self, task: TaskSpec | str, split: str = "test", limit: int | None = None) -> list[Example]:
        """The examples :meth:`evaluate` scores (encoded and fitted to the context)."""
        return self._prepare(get_task_spec(task), split, limit)

    def _prepare(self, spec: TaskSpec, split: str, limit: int | None) -> list[Example]:
        """The task's examples encoded and fitted to the model's context (see :func:`.examples.prepare_examples`)."""
        return prepare_examples(self.mm, task_kind(spec), split, limit)

    # what the model allows, as the forwards read it (one place to override)
    def _cache_reusable(self) -> bool:
        return self.mm.reuses_cache

    def _keeps_last_logits(self) -> bool:
        return self.mm.keeps_last_logits


def evaluate(mm: MoEModel, task: TaskSpec | str, plan: Plan | None = None, split: str = "test",
             limit: int | None = None, batch_size: int = 32, progress: ProgressFn | None = None) -> EvalResult:
    """Evaluate one task (see :class:`Evaluator`; keep an Evaluator to reuse its caches)."""
    return Evaluator(mm, batch_size=batch_size).evaluate(task, plan=plan, split=split, limit=limit, progress=progress)
