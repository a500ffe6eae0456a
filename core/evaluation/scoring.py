"""Log-likelihood scoring: next-token log-probs of whole sequences in token-budgeted batches, and of options
on a shared prompt KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model import MoEModel
from .agreement import Agreement, Reference
from .examples import Example, length_batches, padded
from .result import ProgressFn


class ScoringMixin:
    """The likelihood forwards of :class:`~core.evaluation.harness.Evaluator`."""

    mm: MoEModel
    batch_size: int
    token_budget: int
    _cache_reusable: Callable[[], bool]
    _keeps_last_logits: Callable[[], bool]

    def _batches(self, seqs: list[list[int]], size: int | None = None) -> list[list[int]]:
        """Indices of the sequences in batches of at most ``size`` (default batch_size) sequences and
        ``token_budget`` padded tokens, sorted by length so batches carry little padding."""
        return length_batches(seqs, size or self.batch_size, self.token_budget)

    def _pad_id(self) -> int:
        tok = self.mm.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def _logprobs(self, seqs: list[list[int]], idx: list[int]) -> torch.Tensor:
        """Next-token log-probs [B, T, V] of the sequences ``idx``, right-padded (positions start at 0)."""
        device = self.mm.device
        ids, mask = padded([seqs[i] for i in idx], self._pad_id())
        logits = self.mm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _score_sequences(self, examples: list[Example], say: ProgressFn, reference: list[Reference] | None,
                         tally: Agreement | None) -> tuple[list[float], int]:
        """The log-likelihood of every continuation each example scores (example then continuation order),
        each run whole after its prompt, and the tokens that took. With a ``reference``, the pass over each
        example's agreement text (its label's continuation) also adds its agreement to ``tally``."""
        pairs = [(e, k) for e in range(len(examples)) for k in range(len(examples[e].scored))]
        seqs = [examples[e].prompt_ids + examples[e].scored[k] for e, k in pairs]
        logp_sum = [0.0] * len(seqs)
        batches = self._batches(seqs)
        for done, idx in enumerate(batches, 1):
            logp = self._logprobs(seqs, idx)
            say("scoring", done, len(batches))
            self._checkpoint()  # type: ignore[attr-defined]
            for row, i in enumerate(idx):
                e, k = pairs[i]
                start = len(examples[e].prompt_ids)
                target = torch.tensor(examples[e].scored[k])
                positions = torch.arange(start - 1, start - 1 + len(target))
                logp_sum[i] = float(logp[row, positions, target].sum())
                if reference is not None and tally is not None and k == max(examples[e].label, 0):
                    tally.add(reference[e], logp[row, :len(seqs[i]) - 1])  # the agreement text
        return logp_sum, sum(len(s) for s in seqs)

    def _answer_likelihood(self, examples: list[Example]) -> list[tuple[float, int]]:
        """Each generative example's (log-likelihood of its reference answer, answer tokens), teacher-forced on
        its agreement text (prompt + answer) in one pass of its own."""
        seqs = [e.agreement_ids for e in examples]
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        for idx in self._batches(seqs):
            logp = self._logprobs(seqs, idx)
            for row, i in enumerate(idx):
                start = len(examples[i].prompt_ids)
                target = torch.tensor(seqs[i][start:])
                positions = torch.arange(start - 1, start - 1 + len(target))
                out[i] = (float(logp[row, positions, target].sum()), len(target))
        return out

    def _shares_prompts(self, examples: list[Example]) -> bool:
        """Options can reuse their prompt's KV cache when every example has the same number of non-empty
        options and the model's cache can be repeated per option."""
        counts = {len(e.scored) for e in examples}
        return (len(counts) == 1 and all(len(o) for e in examples for o in e.scored)
                and all(e.prompt_ids for e in examples) and self._cache_reusable())

    def _score_options(self, examples: list[Example], say: ProgressFn, reference: list[Reference] | None,
                       tally: Agreement | None) -> list[float]:
        """Option log-likelihoods with each prompt run once: its KV cache is repeated for the options, which
        then run together (about options-times fewer tokens than scoring prompt + option sequences)."""
        model, device, pad = self.mm.model, self.mm.device, self._pad_id()
        n_opt = len(examples[0].scored)
        out = [0.0] * (len(examples) * n_opt)
        # the options pass holds batch_size rows, as other passes do
        batches = self._batches([e.prompt_ids for e in examples], max(1, self.batch_size // n_opt))
        keep_last = reference is None and self._keeps_last_logits()
        for done, idx in enumerate(batches, 1):
            plen = torch.tensor([len(examples[i].prompt_ids) for i in idx])
            ids, mask = padded([examples[i].prompt_ids for i in idx], pad)
            # without agreement only each prompt's last position matters: the output layer runs there alone
            last = torch.unique(plen - 1)
            keep = {"logits_to_keep": last.to(device)} if keep_last else {}
            first = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **keep)
            prompt_logp = F.log_softmax(first.logits.float(), dim=-1).cpu()
            cache = first.cache
            cache.batch_repeat_interleave(n_opt)
            options = [o for i in idx for o in examples[i].scored]
            opt_ids, opt_mask = padded(options, pad)
            positions = plen.repeat_interleave(n_opt)[:, None] + torch.arange(opt_ids.size(1))[None]
            full_mask = torch.cat([mask.repeat_interleave(n_opt, 0), opt_mask], dim=1)
            second = model(input_ids=opt_ids.to(device), attention_mask=full_mask.to(device),
                           position_ids=positions.to(device), cache=cache, use_cache=False)
            opt_logp = F.log_softmax(second.logits.float(), dim=-1).cpu()
            # the prompt's last position predicts an option's first token, the option's own positions the rest
            column = torch.searchsorted(last, plen - 1) if keep_last else plen - 1
            rows = torch.arange(len(idx)).repeat_interleave(n_opt)
            head = prompt_logp[rows, column.repeat_interleave(n_opt), opt_ids[:, 0]]
            tail = opt_logp[:, :-1].gather(-1, opt_ids[:, 1:, None]).squeeze(-1)
            tail = torch.where(opt_mask[:, 1:].bool(), tail, 0.0)
            scores = (head + tail.sum(-1)).tolist()
            for row, i in enumerate(idx):
                out[i * n_opt:(i + 1) * n_opt] = scores[row * n_opt:(row + 1) * n_opt]
                if reference is not None and tally is not None:
                    p, k = int(plen[row]), max(examples[i].label, 0)
                    agreed = opt_logp[row * n_opt + k, :len(examples[i].scored[k]) - 1]
                    tally.add(reference[i], torch.cat([prompt_logp[row, :p], agreed]))
            say("scoring", done, len(batches))
            self._checkpoint()  # type: ignore[attr-defined]
        return out
