"""Batched greedy decoding on the KV cache: one pass over the left-padded prompts (which can also give the
agreement), then one token per step on a :class:`~core.evaluation.kv_cache.GrowingCache`, each answer ended
at the task's stop string. Models whose cache cannot be cropped decode with ``model.generate`` instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..model import MoEModel
from ..tasks import TaskSpec
from .agreement import Agreement, Reference
from .examples import Example, padded
from .fallback import generate_greedy
from .kv_cache import GrowingCache
from .result import ProgressFn


def stop_table(tokenizer: Any, stop: str, vocab_size: int, eos_ids: list[int]) -> torch.Tensor:
    """Boolean [vocab] table: tokens whose text contains the stop string (or are end-of-sequence)."""
    # the model's vocabulary can be larger than the tokenizer's (padded embeddings)
    table = torch.zeros(max(len(tokenizer), vocab_size), dtype=torch.bool)
    if stop:
        for i in range(len(tokenizer)):
            if stop in tokenizer.decode([i]):
                table[i] = True
    table[eos_ids] = True
    return table


class DecodingMixin:
    """The generation of :class:`~core.evaluation.harness.Evaluator`."""

    mm: MoEModel
    batch_size: int
    _stop_ids: dict[str, torch.Tensor]
    _cache_reusable: Callable[[], bool]
    _keeps_last_logits: Callable[[], bool]

    def _stop_lookup(self, stop: str) -> torch.Tensor:
        """:func:`stop_table` of the stop string, built once per string."""
        if stop not in self._stop_ids:
            self._stop_ids[stop] = stop_table(self.mm.tokenizer, stop, self.mm.vocab_size, self.mm.eos_token_ids)
        return self._stop_ids[stop]

    def _generate(self, spec: TaskSpec, examples: list[Example], say: ProgressFn,
                  reference: list[Reference] | None = None, tally: Agreement | None = None,
                  likelihood: list[tuple[float, int]] | None = None) -> tuple[list[str], int]:
        """Batched greedy decoding with the KV cache, each answer ended at the task's stop string. Where the
        model's cache can be cropped, decoding runs on the cache of one pass over the prompts, and with a
        cached ``reference`` that pass also yields the agreement (see :meth:`_greedy`); other models decode
        with ``model.generate`` and agreement takes its own pass. ``likelihood``, an empty list, receives each
        example's (log-likelihood of its reference answer, answer tokens), teacher-forced on the same prompt cache
        (models decoding with ``model.generate`` leave it empty: the caller runs a pass of its own)."""
        tok = self.mm.tokenizer
        stops = self._stop_lookup(spec.stop).to(self.mm.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        own = self._cache_reusable()
        forced = own and all(len(e.agreement_ids) > len(e.prompt_ids) for e in examples)
        compare = forced and reference is not None and tally is not None
        answer_lp: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
        predictions: list[str] = [""] * len(examples)
        tokens = 0
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            # left padding so every prompt ends where generation starts
            ids, mask = padded([examples[i].prompt_ids for i in idx], pad, left=True)
            if own:
                wanted = compare or (forced and likelihood is not None)
                answers = [examples[i].agreement_ids[len(examples[i].prompt_ids):] for i in idx] if wanted else None
                new, pruned, seconds = self._greedy(ids, mask, spec.max_new_tokens, stops, pad, answers)
                if answers is not None and pruned is not None:
                    for row, i in enumerate(idx):
                        if compare:
                            tally.add(reference[i], pruned[row])  # type: ignore[union-attr,index]
                        start = len(examples[i].prompt_ids) - 1  # the prompt's last position predicts the answer
                        target = torch.tensor(answers[row])
                        lp = pruned[row][start:start + len(target)].gather(-1, target[:, None]).sum()
                        answer_lp[i] = (float(lp), len(target))
                    if compare:
                        tally.seconds += seconds  # type: ignore[union-attr]
            else:
                new = generate_greedy(self.mm.model, ids, mask, spec.max_new_tokens, stops, pad,
                                      self.mm.eos_token_ids)
            tokens += int(mask.sum()) + new.numel()
            for row, i in enumerate(idx):
                text = tok.decode(new[row], skip_special_tokens=True)
                predictions[i] = (text.split(spec.stop)[0] if spec.stop else text).strip()
            say("generating", min(lo + self.batch_size, len(order)), len(order))
        if likelihood is not None and forced:
            likelihood.extend(answer_lp)
        return predictions, tokens

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, stop_table: torch.Tensor, pad: int,
                answers: list[list[int]] | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None, float]:
        """Greedy continuations [B, <= max_new] of left-padded prompts (pure greedy: no repetition penalty or
        other processor a generation config may name; finished rows continue with padding). With ``answers``
        (each row's reference continuation) also each row's log-probs on prompt + answer, teacher-forced, for
        agreement: the prompt's from the prompt pass, the answer's from one pass on the prompt's cache, which
        is then cropped back for decoding; and the seconds that agreement-only work took."""
        model, device = self.mm.model, self.mm.device
        plen = mask.sum(-1).to(device)
        mask = mask.to(device)
        keep = {} if answers is not None or not self._keeps_last_logits() else {"logits_to_keep": 1}
        out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    cache=GrowingCache(), use_cache=True, **keep)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
        texts, start = None, time.perf_counter()
        if answers is not None:
            prompt_logp = F.log_softmax(out.logits.float(), dim=-1).cpu()
            ans_ids, ans_mask = padded(answers, pad)
            positions = plen[:, None] + torch.arange(ans_ids.size(1), device=device)[None]
            second = model(input_ids=ans_ids.to(device), attention_mask=torch.cat([mask, ans_mask.to(device)], 1),
                           position_ids=positions, cache=cache, use_cache=True)
            ans_logp = F.log_softmax(second.logits.float(), dim=-1).cpu()
            cache.crop(-ans_ids.size(1))
            width = ids.size(1)
            texts = [torch.cat([prompt_logp[row, width - int(plen[row]):], ans_logp[row, :len(a) - 1]])
                     for row, a in enumerate(answers)]
        seconds = time.perf_counter() - start
        done = torch.zeros_like(nxt, dtype=torch.bool)
        steps = []
        for step in range(max_new):
            self._checkpoint()  # type: ignore[attr-defined] - the Evaluator's: a caller may stop between steps
            nxt = torch.where(done, pad, nxt)
            steps.append(nxt)
            done |= stop_table[nxt]
            if step == max_new - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=(plen + step)[:, None],
                        cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
        return torch.stack(steps, 1).cpu(), texts, seconds
