"""One evaluation harness: a task's metrics for the model, optionally under a pruning plan, with the
pruned model's agreement with the unpruned one and what it costs.

Generative tasks (SQuAD-style, exact match) use batched greedy generation with the KV cache and stop at
the task's stop string; LM tasks score the text's token log-likelihood; multiple-choice tasks pick the
option with the highest log-likelihood. Agreement (top-1 next-token agreement and mean KL(full || pruned))
is measured teacher-forced on each example's reference text: the prompt followed by its reference answer,
the correct option, or the text itself. Everything is deterministic; results are cached by
(model weights, task, split, limit, plan digest).
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import metrics
from .kv_cache import GrowingCache
from .masking import masked
from .model import MoEModel
from .plan import Plan
from .tasks import TaskError, TaskSpec, TaskWarning, get_task_spec, load_task, render_example, warn_empty

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
_FULL_CACHE_BYTES = 512 * 2**20  # unpruned log-probs kept for agreement, at most this much per task
# Model types whose cache is not a plain per-layer key/value cache that can be repeated per option (state-space
# or linear-attention layers); their multiple-choice options are scored as whole prompt + option sequences.
_NO_CACHE_REPEAT = {"jamba", "granitemoehybrid", "qwen3_next"}


@dataclass
class EvalResult:
    """A task's scores for one model (and plan) on one split."""

    task: str
    split: str
    metric_kind: str
    n_examples: int
    metrics: dict[str, float]
    agreement: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    plan_digest: str | None = None
    seconds: float = 0.0
    predictions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Example:
    prompt_ids: list[int]
    references: list[str]
    scored: list[list[int]]       # continuations scored by log-likelihood (options, or the text)
    agreement_ids: list[int]      # the sequence agreement is measured on
    label: int = -1


def plan_cost(mm: MoEModel, plan: Plan | None) -> dict[str, float]:
    """Total and active parameters and weight bytes of the model a plan would leave."""
    info = mm.info()
    n, top_k = mm.n_experts, mm.top_k if plan is None or plan.top_k is None else plan.top_k
    per_expert = {layer.index: sum(p.numel() for p in layer.experts.parameters()) / n for layer in mm.layers}
    bytes_per_param = info.weight_bytes / info.total_params
    kept = {i: len(plan.keep(i, n)) if plan else n for i in per_expert}
    removed = sum((n - kept[i]) * per_expert[i] for i in per_expert)
    total = info.total_params - removed
    active = info.total_params - info.expert_params + sum(min(top_k, kept[i]) * per_expert[i] for i in per_expert)
    return {"total_params": total, "active_params": active, "weight_bytes": total * bytes_per_param,
            "total_params_full": info.total_params, "active_params_full": info.active_params}


class Evaluator:
    """Evaluates tasks on one model, caching results and the unpruned model's reference log-probs."""

    def __init__(self, mm: MoEModel, batch_size: int = 32, cache_size: int = 256, token_budget: int = 2048) -> None:
        """``batch_size`` sequences at most per forward (and per generation batch); ``token_budget`` padded
        tokens at most per scoring forward, which keeps its [batch, length, vocabulary] log-probs small: on
        CPU that measured faster than larger batches."""
        self.mm = mm
        self.batch_size = batch_size
        self.token_budget = token_budget
        self._results: OrderedDict[tuple, EvalResult] = OrderedDict()
        self._cache_size = cache_size
        self._full_logprobs: dict[tuple, list[_Reference]] = {}
        self._stop_ids: dict[str, torch.Tensor] = {}
        self._digest = mm.weights_digest()
        self._cache_lock = threading.Lock()  # sessions sharing this evaluator read and fill the cache at once

    # ----- public -----------------------------------------------------------------------------
    def evaluate(self, task: TaskSpec | str, plan: Plan | None = None, split: str = "test", limit: int | None = None,
                 progress: ProgressFn | None = None, agreement: bool = True) -> EvalResult:
        spec = get_task_spec(task)
        key = (self._digest, spec.name, split, limit, plan.digest() if plan else None, agreement)
        with self._cache_lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        examples = self._prepare(spec, split, limit)
        say = progress or (lambda *_: None)
        start = time.perf_counter()
        compare = agreement and plan is not None
        with self.mm.lock, torch.inference_mode():  # one evaluation at a time per model
            reference = self._reference((spec.name, split, limit), examples, say) if compare else None
            tally = _Agreement()
            # tokens/s counts the task's own forwards, not the reference's; they also yield the agreement when
            # the reference is cached and the model's cache allows it (else it takes a pass of its own)
            scoring = time.perf_counter()
            with masked(self.mm, plan):
                if spec.metric in ("squad", "exact_match"):
                    predictions, tokens = self._generate(spec, examples, say, reference if compare else None, tally)
                    scores = self._score_generation(spec, predictions, examples)
                else:
                    predictions = []
                    scores, tokens = self._score_likelihood(spec, examples, say, reference if compare else None, tally)
            scoring = time.perf_counter() - scoring - tally.seconds
            if compare and not tally.tokens:
                self._agreement(examples, plan, reference, tally, say)
            seconds = time.perf_counter() - start
            agree = tally.result() if compare else {}
        cost = plan_cost(self.mm, plan)
        cost["tokens_per_s"] = tokens / scoring if scoring > 0 else 0.0
        result = EvalResult(task=spec.name, split=split, metric_kind=spec.metric, n_examples=len(examples),
                            metrics=scores, agreement=agree, cost=cost, plan_digest=plan.digest() if plan else None,
                            seconds=seconds, predictions=predictions)
        with self._cache_lock:
            self._results[key] = result
            while len(self._results) > self._cache_size:
                self._results.popitem(last=False)
        return result

    # ----- data -------------------------------------------------------------------------------
    def _encode(self, text: str, bos: bool) -> list[int]:
        tok = self.mm.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids

    def _context_length(self) -> int | None:
        """The most positions the model was built for (None where its config does not say)."""
        text = self.mm.config.get_text_config()
        for name in ("max_position_embeddings", "max_seq_len", "n_positions"):
            value = getattr(text, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
        return None

    def _prepare(self, spec: TaskSpec, split: str, limit: int | None) -> list[_Example]:
        """Encode the examples, each fitted to the model's context: a prompt keeps its end (bos, then the
        tokens nearest the answer, which follows it), leaving room for ``max_new_tokens`` when generating
        or for the longest option; an LM text keeps its start. Empty LM texts are skipped with a warning
        (they hold no tokens, so the token-weighted loss is unchanged); empty options are refused."""
        data = load_task(spec, split)
        if limit:
            data = data.select(range(min(limit, len(data))))
        ctx = self._context_length()
        bos = self.mm.tokenizer.bos_token_id is not None
        if ctx is not None and spec.metric in ("squad", "exact_match") and spec.max_new_tokens >= ctx:
            raise TaskError(f"task {spec.name!r}: max_new_tokens {spec.max_new_tokens} leaves no room for a prompt "
                            f"in the model's context of {ctx} tokens: lower max_new_tokens in the task's spec")
        out, empty, truncated = [], [], 0
        for index, row in enumerate(data):
            r = render_example(spec, row, index)
            if spec.metric == "lm_loss":
                prompt = self._encode("", bos=True)
                text = self._encode(r.text, bos=False)
                if not text:
                    empty.append(index)
                    continue
                if ctx is not None and len(prompt) + len(text) > ctx:
                    text, truncated = text[:max(ctx - len(prompt), 1)], truncated + 1
                out.append(_Example(prompt, [], [text], prompt + text))
            elif spec.metric == "multiple_choice":
                prompt = self._encode(r.prompt, bos=True)
                options = [self._encode(o, bos=False) for o in r.options]
                if not all(options):
                    raise TaskError(f"task {spec.name!r}: example {index} has an empty option "
                                    f"(option {[len(o) for o in options].index(0)}): give every option some text")
                if ctx is not None and len(prompt) + max(map(len, options)) > ctx:
                    options = [o[:ctx - 1] for o in options]
                    prompt, truncated = _keep_end(prompt, ctx - max(map(len, options)), bos), truncated + 1
                out.append(_Example(prompt, [], options, prompt + options[r.label], r.label))
            else:
                prompt = self._encode(r.prompt, bos=True)
                target = self._encode(spec.target_prefix + r.references[0] + spec.stop, bos=False)
                if ctx is not None and len(prompt) + max(spec.max_new_tokens, len(target)) > ctx:
                    prompt = _keep_end(prompt, ctx - spec.max_new_tokens, bos)
                    target, truncated = target[:ctx - len(prompt)], truncated + 1
                out.append(_Example(prompt, r.references, [], prompt + target))
        if empty and not out:
            raise TaskError(f"task {spec.name!r} split {split!r} has no text in any of its {len(empty)} example(s): "
                            f"fill {spec.text_field!r} in the data")
        if empty:
            warn_empty(spec, split, empty)
        if truncated:
            warnings.warn(f"task {spec.name!r} split {split!r}: {truncated} example(s) were longer than the model's "
                          f"context of {ctx} tokens and were cut to fit it ("
                          + ("texts keep their start)" if spec.metric == "lm_loss" else "prompts keep their end)"),
                          TaskWarning, stacklevel=3)
        return out

    # ----- generation -------------------------------------------------------------------------
    def _stop_lookup(self, stop: str) -> torch.Tensor:
        """Boolean [vocab] table: tokens whose text contains the stop string (or are end-of-sequence)."""
        if stop not in self._stop_ids:
            tok = self.mm.tokenizer
            # the model's vocabulary can be larger than the tokenizer's (padded embeddings)
            table = torch.zeros(max(len(tok), self.mm.config.get_text_config().vocab_size), dtype=torch.bool)
            if stop:
                for i in range(len(tok)):
                    if stop in tok.decode([i]):
                        table[i] = True
            table[self._eos_ids()] = True
            self._stop_ids[stop] = table
        return self._stop_ids[stop]

    def _eos_ids(self) -> list[int]:
        """End-of-sequence ids as the tokenizer and the model's generation config name them."""
        eos = getattr(getattr(self.mm.model, "generation_config", None), "eos_token_id", None)
        named = [] if eos is None else torch.as_tensor(eos).flatten().tolist()
        return sorted({*named, self.mm.tokenizer.eos_token_id} - {None})

    def _generate(self, spec: TaskSpec, examples: list[_Example], say: ProgressFn,
                  reference: list[_Reference] | None = None, tally: _Agreement | None = None) -> tuple[list[str], int]:
        """Batched greedy decoding with the KV cache, each answer ended at the task's stop string. Where the
        model's cache can be cropped, decoding runs on the cache of one pass over the prompts, and with a
        cached ``reference`` that pass also yields the agreement (see :meth:`_greedy`); other models decode
        with ``model.generate`` and agreement takes its own pass."""
        tok = self.mm.tokenizer
        device = next(self.mm.model.parameters()).device
        stop_table = self._stop_lookup(spec.stop).to(device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        own = self._cache_reusable()
        compare = (own and reference is not None and tally is not None
                   and all(len(e.agreement_ids) > len(e.prompt_ids) for e in examples))
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
        predictions: list[str] = [""] * len(examples)
        tokens = 0
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            # left padding so every prompt ends where generation starts
            ids, mask = _padded([examples[i].prompt_ids for i in idx], pad, left=True)
            if own:
                answers = [examples[i].agreement_ids[len(examples[i].prompt_ids):] for i in idx] if compare else None
                new, pruned, seconds = self._greedy(ids, mask, spec.max_new_tokens, stop_table, pad, answers)
                if answers is not None and pruned is not None:
                    tally.seconds += seconds  # type: ignore[union-attr]
                    for row, i in enumerate(idx):
                        tally.add(reference[i], pruned[row])  # type: ignore[union-attr,index]
            else:
                new = self._hf_generate(ids, mask, spec.max_new_tokens, stop_table, pad)
            tokens += int(mask.sum()) + new.numel()
            for row, i in enumerate(idx):
                text = tok.decode(new[row], skip_special_tokens=True)
                predictions[i] = (text.split(spec.stop)[0] if spec.stop else text).strip()
            say("generating", min(lo + self.batch_size, len(order)), len(order))
        return predictions, tokens

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, stop_table: torch.Tensor, pad: int,
                answers: list[list[int]] | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None, float]:
        """Greedy continuations [B, <= max_new] of left-padded prompts (pure greedy: no repetition penalty or
        other processor a generation config may name; finished rows continue with padding). With ``answers``
        (each row's reference continuation) also each row's log-probs on prompt + answer, teacher-forced, for
        agreement: the prompt's from the prompt pass, the answer's from one pass on the prompt's cache, which
        is then cropped back for decoding; and the seconds that agreement-only work took."""
        model = self.mm.model
        device = next(model.parameters()).device
        plen = mask.sum(-1).to(device)
        mask = mask.to(device)
        keep = {} if answers is not None or not self._keeps_last_logits() else {"logits_to_keep": 1}
        out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    cache=GrowingCache(), use_cache=True, **keep)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
        texts, start = None, time.perf_counter()
        if answers is not None:
            prompt_logp = F.log_softmax(out.logits.float(), dim=-1).cpu()
            ans_ids, ans_mask = _padded(answers, pad)
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

    def _hf_generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, stop_table: torch.Tensor,
                     pad: int) -> torch.Tensor:
        """``model.generate``'s greedy continuations, for models whose cache :meth:`_greedy` cannot crop."""
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class StopAtStopToken(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return stop_table[input_ids[:, -1]]

        model = self.mm.model
        device = next(model.parameters()).device
        saved = model.generation_config  # pure greedy, as _greedy decodes: none of the config's processors
        model.generation_config = GenerationConfig(eos_token_id=self._eos_ids() or None, pad_token_id=pad)
        try:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([StopAtStopToken()]))
        finally:
            model.generation_config = saved
        return out[:, ids.size(1):].cpu()

    def _keeps_last_logits(self) -> bool:
        """Whether the model's forward can compute the logits of the last position only."""
        return "logits_to_keep" in inspect.signature(self.mm.model.forward).parameters

    @staticmethod
    def _score_generation(spec: TaskSpec, predictions: Sequence[str], examples: list[_Example]) -> dict[str, float]:
        refs = [e.references for e in examples]
        if spec.metric == "squad":
            return {"exact_match": 100 * metrics.mean(metrics.squad_exact_match(p, r) for p, r in zip(predictions, refs)),
                    "f1": 100 * metrics.mean(metrics.squad_f1(p, r) for p, r in zip(predictions, refs))}
        return {"exact_match": 100 * metrics.mean(metrics.exact_match(p, r) for p, r in zip(predictions, refs))}

    # ----- likelihood -------------------------------------------------------------------------
    def _batches(self, seqs: list[list[int]], size: int | None = None) -> list[list[int]]:
        """Indices of the sequences in batches of at most ``size`` (default batch_size) sequences and
        ``token_budget`` padded tokens, sorted by length so batches carry little padding."""
        size = size or self.batch_size
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches: list[list[int]] = [[]]
        for i in order:  # lengths only grow along ``order``, so a batch's padded size is its last length
            if batches[-1] and (len(batches[-1]) == size or (len(batches[-1]) + 1) * len(seqs[i]) > self.token_budget):
                batches.append([])
            batches[-1].append(i)
        return batches if batches[0] else []

    def _logprobs(self, seqs: list[list[int]], idx: list[int]) -> torch.Tensor:
        """Next-token log-probs [B, T, V] of the sequences ``idx``, right-padded (positions start at 0)."""
        tok, model = self.mm.tokenizer, self.mm.model
        device = next(model.parameters()).device
        ids, mask = _padded([seqs[i] for i in idx], tok.pad_token_id if tok.pad_token_id is not None else 0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _score_likelihood(self, spec: TaskSpec, examples: list[_Example], say: ProgressFn,
                          reference: list[_Reference] | None = None,
                          tally: _Agreement | None = None) -> tuple[dict[str, float], int]:
        pairs = [(e, k) for e in range(len(examples)) for k in range(len(examples[e].scored))]
        seqs = [examples[e].prompt_ids + examples[e].scored[k] for e, k in pairs]
        if spec.metric == "multiple_choice" and self._shares_prompts(examples):
            logp_sum = self._score_options(examples, say, reference, tally)
            tokens = sum(len(e.prompt_ids) + sum(map(len, e.scored)) for e in examples)
            return self._choice_metrics(examples, pairs, logp_sum), tokens
        logp_sum = [0.0] * len(seqs)
        batches = self._batches(seqs)
        for done, idx in enumerate(batches, 1):
            logp = self._logprobs(seqs, idx)
            say("scoring", done, len(batches))
            for row, i in enumerate(idx):
                e, k = pairs[i]
                start = len(examples[e].prompt_ids)
                target = torch.tensor(examples[e].scored[k])
                positions = torch.arange(start - 1, start - 1 + len(target))
                logp_sum[i] = float(logp[row, positions, target].sum())
                if reference is not None and tally is not None and k == max(examples[e].label, 0):
                    tally.add(reference[e], logp[row, :len(seqs[i]) - 1])  # the agreement text
        tokens = sum(len(s) for s in seqs)
        if spec.metric == "lm_loss":
            n = sum(len(e.scored[0]) for e in examples)
            nll = -sum(logp_sum) / n
            return {"nll": nll, "perplexity": metrics.perplexity(nll)}, tokens
        return self._choice_metrics(examples, pairs, logp_sum), tokens

    @staticmethod
    def _choice_metrics(examples: list[_Example], pairs: list[tuple[int, int]], logp_sum: list[float]) -> dict[str, float]:
        by_example: dict[int, list[tuple[float, int]]] = {}
        for (e, k), lp in zip(pairs, logp_sum):
            by_example.setdefault(e, []).append((lp, len(examples[e].scored[k])))
        chosen = [metrics.choose_option([lp for lp, _ in v]) for _, v in sorted(by_example.items())]
        chosen_norm = [metrics.choose_option([lp for lp, _ in v], [n for _, n in v]) for _, v in sorted(by_example.items())]
        labels = [e.label for e in examples]
        return {"accuracy": 100 * metrics.accuracy(chosen, labels),
                "accuracy_norm": 100 * metrics.accuracy(chosen_norm, labels)}

    def _shares_prompts(self, examples: list[_Example]) -> bool:
        """Options can reuse their prompt's KV cache when every example has the same number of non-empty
        options and the model's cache can be repeated per option."""
        counts = {len(e.scored) for e in examples}
        return (len(counts) == 1 and all(len(o) for e in examples for o in e.scored)
                and all(e.prompt_ids for e in examples) and self._cache_reusable())

    def _cache_reusable(self) -> bool:
        """Whether a pass can continue on another pass's KV cache and the cache be repeated per row or cropped:
        plain per-layer key/value caches over full attention. Right-padded prompts leave a gap before what
        follows, which a sliding window would count."""
        text = self.mm.config.get_text_config()
        windowed = (getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
                    or getattr(text, "attention_chunk_size", None)
                    or any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()))
        return not windowed and self.mm.config.model_type not in _NO_CACHE_REPEAT

    def _score_options(self, examples: list[_Example], say: ProgressFn, reference: list[_Reference] | None,
                       tally: _Agreement | None) -> list[float]:
        """Option log-likelihoods with each prompt run once: its KV cache is repeated for the options, which
        then run together (about options-times fewer tokens than scoring prompt + option sequences)."""
        model = self.mm.model
        device = next(model.parameters()).device
        pad = self.mm.tokenizer.pad_token_id if self.mm.tokenizer.pad_token_id is not None else 0
        n_opt = len(examples[0].scored)
        out = [0.0] * (len(examples) * n_opt)
        # the options pass holds batch_size rows, as other passes do
        batches = self._batches([e.prompt_ids for e in examples], max(1, self.batch_size // n_opt))
        keep_last = reference is None and self._keeps_last_logits()
        for done, idx in enumerate(batches, 1):
            plen = torch.tensor([len(examples[i].prompt_ids) for i in idx])
            ids, mask = _padded([examples[i].prompt_ids for i in idx], pad)
            # without agreement only each prompt's last position matters: the output layer runs there alone
            last = torch.unique(plen - 1)
            keep = {"logits_to_keep": last.to(device)} if keep_last else {}
            first = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **keep)
            prompt_logp = F.log_softmax(first.logits.float(), dim=-1).cpu()
            cache = first.cache
            cache.batch_repeat_interleave(n_opt)
            options = [o for i in idx for o in examples[i].scored]
            opt_ids, opt_mask = _padded(options, pad)
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
        return out

    # ----- agreement with the unpruned model --------------------------------------------------
    def _reference(self, key: tuple, examples: list[_Example], say: ProgressFn) -> list[_Reference] | None:
        """The unpruned model on each example's agreement text, computed once per task and cached, or None
        when its probabilities (fp16) would not fit the cache budget (then both models run batch by batch)."""
        if key in self._full_logprobs:
            return self._full_logprobs[key]
        seqs = [e.agreement_ids for e in examples]
        vocab = self.mm.model.config.get_text_config().vocab_size
        if sum(len(s) for s in seqs) * vocab * 2 > _FULL_CACHE_BYTES:
            return None
        out: list[_Reference] = [None] * len(seqs)  # type: ignore[list-item]
        batches = self._batches(seqs)
        with masked(self.mm, None):
            for done, idx in enumerate(batches, 1):
                for i, ref in zip(idx, self._references(seqs, idx)):
                    out[i] = ref
                say("unpruned reference", done, len(batches))
        self._full_logprobs[key] = out
        return out

    def _references(self, seqs: list[list[int]], idx: list[int]) -> list[_Reference]:
        """The model as it is now (unpruned) on the sequences ``idx``, in the form agreement needs."""
        logp = self._logprobs(seqs, idx)
        return [_Reference.of(logp[row, :len(seqs[i]) - 1]) for row, i in enumerate(idx)]

    def _agreement(self, examples: list[_Example], plan: Plan, reference: list[_Reference] | None,
                   tally: _Agreement, say: ProgressFn) -> None:
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


def _keep_end(ids: list[int], budget: int, bos: bool) -> list[int]:
    """At most ``budget`` (at least 1) tokens of a prompt: its first (bos) token where it has one, then its end."""
    budget = max(budget, 1)
    if len(ids) <= budget:
        return ids
    return ids[:1] + ids[len(ids) - budget + 1:] if bos else ids[len(ids) - budget:]


def _padded(seqs: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, T] of the sequences padded on the right (or the left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """Log-probs with -inf (a masked vocabulary entry) made the lowest finite value, so that a zero
    probability times it is 0 rather than NaN."""
    return logp.clamp(min=torch.finfo(logp.dtype).min)


@dataclass
class _Reference:
    """The unpruned model on one agreement text: next-token probabilities P (fp16, the cache's precision),
    its top-1 tokens and the text's sum of P log p, so that KL(full || pruned) over the text costs one dot
    product. Built the same way whether or not it is cached, so agreement never depends on the cache."""

    probs: torch.Tensor   # [T, V] fp16
    top1: torch.Tensor    # [T]
    plogp: float          # sum over positions and vocabulary of P * log p (log p in fp32)

    @classmethod
    def of(cls, logp: torch.Tensor) -> _Reference:
        probs = logp.exp().half()
        return cls(probs, logp.argmax(-1), float((probs.float() * _finite(logp)).sum()))


@dataclass
class _Agreement:
    """Running top-1 agreement and KL(full || pruned) over tokens."""

    agree: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    seconds: float = 0.0  # spent on agreement alone, which tokens/s leaves out

    def add(self, full: _Reference, pruned: torch.Tensor) -> None:
        """``pruned``: the pruned model's log-probs [T, V] on the same positions as ``full``. Top-1 agrees where
        the full model's top token is (one of) the pruned model's most likely; only sums over positions are
        kept, so the KL's cross term is one dot product over the whole text (an elementwise product and
        argmax took ~8x as long on code-sized inputs)."""
        start = time.perf_counter()
        at_full_top1 = pruned.gather(-1, full.top1[:, None]).squeeze(-1)
        self.agree += float((at_full_top1 >= pruned.amax(-1)).sum())
        cross = torch.dot(full.probs.reshape(-1).float(), pruned.reshape(-1))  # sum of P log p_pruned
        if not torch.isfinite(cross):  # a -inf log-prob: 0 * -inf gave NaN; count it as the lowest finite value
            cross = (full.probs.float() * _finite(pruned)).sum()
        self.kl += full.plogp - float(cross)
        self.tokens += len(pruned)
        self.seconds += time.perf_counter() - start

    def result(self) -> dict[str, float]:
        return {"top1_agreement": self.agree / self.tokens, "mean_kl": self.kl / self.tokens}


def evaluate(mm: MoEModel, task: TaskSpec | str, plan: Plan | None = None, split: str = "test",
             limit: int | None = None, batch_size: int = 32, progress: ProgressFn | None = None) -> EvalResult:
    """Evaluate one task (see :class:`Evaluator`; keep an Evaluator to reuse its caches)."""
    return Evaluator(mm, batch_size=batch_size).evaluate(task, plan=plan, split=split, limit=limit, progress=progress)
