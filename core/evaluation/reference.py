"""The unpruned model's side of agreement: its log-probs on each example's agreement text, cached per task
when they fit the budget, and the teacher-forced passes that compare a plan with them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masking import masked
from ..model import MoEModel
from ..plan import Plan
from .agreement import Agreement, Reference
from .examples import Example
from .result import ProgressFn

_FULL_CACHE_BYTES = 512 * 2**20  # unpruned log-probs kept for agreement, at most this much per task


class ReferenceMixin:
    """The unpruned reference and the agreement pass of :class:`~core.evaluation.harness.Evaluator`."""

    mm: MoEModel
    _full_logprobs: dict[tuple, list[Reference]]
    _batches: Callable[..., list[list[int]]]
    _logprobs: Callable[[list[list[int]], list[int]], torch.Tensor]

    def _reference(self, key: tuple, examples: list[Example], say: ProgressFn) -> list[Reference] | None:
        """The unpruned model on each example's agreement text, computed once per task and cached, or None
        when its probabilities (fp16) would not fit the cache budget (then both models run batch by batch)."""
        if key in self._full_logprobs:
            return self._full_logprobs[key]
        seqs = [e.agreement_ids for e in examples]
        if sum(len(s) for s in seqs) * self.mm.vocab_size * 2 > _FULL_CACHE_BYTES:
            return None
        out: list[Reference] = [None] * len(seqs)  # type: ignore[list-item]
        batches = self._batches(seqs)
        with masked(self.mm, None):
            for done, idx in enumerate(batches, 1):
                for i, ref in zip(idx, self._references(seqs, idx)):
                    out[i] = ref
                say("unpruned reference", done, len(batches))
        self._full_logprobs[key] = out
        return out

    def _references(self, seqs: list[list[int]], idx: list[int]) -> list[Reference]:
        """The model as it is now (unpruned) on the sequences ``idx``, in the form agreement needs."""
        logp = self._logprobs(seqs, idx)
        return [Reference.of(logp[row, :len(seqs[i]) - 1]) for row, i in enumerate(idx)]

    def _agreement(self, examples: list[Example], plan: Plan, reference: list[Reference] | None,
                   tally: Agreement, say: ProgressFn) -> None:
        """Teacher-forced pruned pass over the agreement texts, where the task's own forwards could not yield
        the agreement (no cached reference, or generation with ``model.generate``)."""
        seqs = [e.agreement_ids for e in examples]
        batches = self._batches(seqs)
        for done, idx in enumerate(batches, 1):
            if reference is None:
                with masked(self.mm, None):
                    full = self._references(seqs, idx)
            with masked(self.mm, plan):
                pruned = self._logprobs(seqs, idx)
            for row, i in enumerate(idx):
                tally.add(reference[i] if reference is not None else full[row], pruned[row, :len(seqs[i]) - 1])
            say("comparing", done, len(batches))
