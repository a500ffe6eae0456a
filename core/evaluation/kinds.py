"""One class per kind of task: how its examples are encoded and fitted to the model's context, which forwards
score them, and the metrics they give.

Generative tasks (SQuAD-style, exact match) decode greedily and stop at the task's stop string; language
modelling scores the text's token log-likelihood; multiple choice picks the option with the highest
log-likelihood. Each example also carries its agreement text: the prompt followed by its reference answer, the
correct option, or the text itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..tasks import TaskError, TaskSpec
from .examples import Example, encode, keep_end

if TYPE_CHECKING:
    from ..tasks import Rendered
    from .agreement import Agreement, Reference
    from .harness import Evaluator
    from .result import ProgressFn


@dataclass
class Outcome:
    """What a task kind's forwards gave: its metrics, the tokens they ran and any generated answers."""

    metrics: dict[str, float]
    tokens: int
    predictions: list[str] = field(default_factory=list)
    # per-example values of each metric that is a (weighted) mean of them, and the weights where not all 1
    # (the loss weighs each text by its scored tokens): their 95% intervals come from these (see .interval)
    samples: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, list[float]] = field(default_factory=dict)


def percent(fractions: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics in percent (100 × the mean of each example's value in [0, 1]) and the per-example values in
    percent, from which their intervals come."""
    return ({m: 100 * metrics.mean(v) for m, v in fractions.items()},
            {m: [100 * x for x in v] for m, v in fractions.items()})


class TaskKind:
    """How one kind of task is evaluated; subclasses fill in :meth:`example` and :meth:`run`."""

    truncation = "prompts keep their end"  # how an over-long example is cut, as the warning says

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def check_context(self, ctx: int | None) -> None:
        """Refuse a task that cannot fit the model's context of ``ctx`` tokens (None: unknown) at all."""

    def example(self, tokenizer: Any, rendered: Rendered, index: int,
                ctx: int | None) -> tuple[Example, bool] | None:
        """The example fitted to the context and whether it had to be cut, or None to skip it."""
        raise NotImplementedError

    def run(self, ev: Evaluator, examples: list[Example], say: ProgressFn, reference: list[Reference] | None,
            tally: Agreement) -> Outcome:
        """Score the examples with the model as it is now (masked by the caller); with a ``reference``, the
        forwards that can also add each example's agreement to ``tally``."""
        raise NotImplementedError


class LanguageModelling(TaskKind):
    """Token log-likelihood of a text: negative log-likelihood per token and perplexity."""

    truncation = "texts keep their start"

    def example(self, tokenizer: Any, rendered: Rendered, index: int,
                ctx: int | None) -> tuple[Example, bool] | None:
        prompt = encode(tokenizer, "", bos=True)
        text = encode(tokenizer, rendered.text, bos=False)
        if not text:
            return None
        cut = ctx is not None and len(prompt) + len(text) > ctx
        if cut:
            text = text[:max(ctx - len(prompt), 1)]
        return Example(prompt, [], [text], prompt + text), cut

    def run(self, ev: Evaluator, examples: list[Example], say: ProgressFn, reference: list[Reference] | None,
            tally: Agreement) -> Outcome:
        logp_sum, tokens = ev._score_sequences(examples, say, reference, tally)
        scored = [len(e.scored[0]) for e in examples]
        nll = -sum(logp_sum) / sum(scored)
        return Outcome({"nll": nll, "perplexity": metrics.perplexity(nll)}, tokens,
                       samples={"nll": [-lp / n for lp, n in zip(logp_sum, scored)]},
                       weights={"nll": [float(n) for n in scored]})


class MultipleChoice(TaskKind):
    """The option with the highest log-likelihood (and per token, for ``accuracy_norm``) against the label."""

    def example(self, tokenizer: Any, rendered: Rendered, index: int,
                ctx: int | None) -> tuple[Example, bool] | None:
        prompt = encode(tokenizer, rendered.prompt, bos=True)
        options = [encode(tokenizer, o, bos=False) for o in rendered.options]
        if not all(options):
            raise TaskError(f"task {self.spec.name!r}: example {index} has an empty option "
                            f"(option {[len(o) for o in options].index(0)}): give every option some text")
        cut = ctx is not None and len(prompt) + max(map(len, options)) > ctx
        if cut:
            options = [o[:ctx - 1] for o in options]
            prompt = keep_end(prompt, ctx - max(map(len, options)), tokenizer.bos_token_id is not None)
        return Example(prompt, [], options, prompt + options[rendered.label], rendered.label), cut

    def run(self, ev: Evaluator, examples: list[Example], say: ProgressFn, reference: list[Reference] | None,
            tally: Agreement) -> Outcome:
        if ev._shares_prompts(examples):  # each prompt runs once, its KV cache repeated per option
            logp_sum = ev._score_options(examples, say, reference, tally)
            tokens = sum(len(e.prompt_ids) + sum(map(len, e.scored)) for e in examples)
        else:
            logp_sum, tokens = ev._score_sequences(examples, say, reference, tally)
        scores, samples = percent(self.per_example(examples, logp_sum))
        return Outcome(scores, tokens, samples=samples)

    @staticmethod
    def per_example(examples: list[Example], logp_sum: list[float]) -> dict[str, list[float]]:
        """Each example's accuracy (1 or 0) by total and by per-token log-likelihood."""
        pairs = [(e, k) for e in range(len(examples)) for k in range(len(examples[e].scored))]
        by_example: dict[int, list[tuple[float, int]]] = {}
        for (e, k), lp in zip(pairs, logp_sum):
            by_example.setdefault(e, []).append((lp, len(examples[e].scored[k])))
        rows = [v for _, v in sorted(by_example.items())]
        chosen = [metrics.choose_option([lp for lp, _ in v]) for v in rows]
        chosen_norm = [metrics.choose_option([lp for lp, _ in v], [n for _, n in v]) for v in rows]
        labels = [e.label for e in examples]
        return {"accuracy": [float(int(c) == int(y)) for c, y in zip(chosen, labels)],
                "accuracy_norm": [float(int(c) == int(y)) for c, y in zip(chosen_norm, labels)]}


class Generative(TaskKind):
    """Greedy answers, each ended at the task's stop string, scored against the references by :meth:`scores`.
    With ``answer_likelihood`` the metrics also hold ``answer_logprob``: the mean log-probability per token of the
    reference answers, teacher-forced (EEP breaks ties of the metric with it)."""

    answer_likelihood = False

    def check_context(self, ctx: int | None) -> None:
        spec = self.spec
        if ctx is not None and spec.max_new_tokens >= ctx:
            raise TaskError(f"task {spec.name!r}: max_new_tokens {spec.max_new_tokens} leaves no room for a prompt "
                            f"in the model's context of {ctx} tokens: lower max_new_tokens in the task's spec")

    def example(self, tokenizer: Any, rendered: Rendered, index: int,
                ctx: int | None) -> tuple[Example, bool] | None:
        spec = self.spec
        prompt = encode(tokenizer, rendered.prompt, bos=True)
        target = encode(tokenizer, spec.target_prefix + rendered.references[0] + spec.stop, bos=False)
        cut = ctx is not None and len(prompt) + max(spec.max_new_tokens, len(target)) > ctx
        if cut:
            prompt = keep_end(prompt, ctx - spec.max_new_tokens, tokenizer.bos_token_id is not None)
            target = target[:ctx - len(prompt)]
        return Example(prompt, rendered.references, [], prompt + target), cut

    def run(self, ev: Evaluator, examples: list[Example], say: ProgressFn, reference: list[Reference] | None,
            tally: Agreement) -> Outcome:
        likelihood: list[tuple[float, int]] | None = [] if self.answer_likelihood else None
        predictions, tokens = ev._generate(self.spec, examples, say, reference, tally, likelihood)
        scores, samples = percent(self.per_example(predictions, [e.references for e in examples]))
        if likelihood is not None:
            if not likelihood:  # decoding could not teacher-force on its cache: one pass of its own
                likelihood = ev._answer_likelihood(examples)
            scores["answer_logprob"] = sum(lp for lp, _ in likelihood) / max(1, sum(n for _, n in likelihood))
        return Outcome(scores, tokens, predictions, samples=samples)

    def per_example(self, predictions: Sequence[str], references: list[list[str]]) -> dict[str, list[float]]:
        """Each example's value in [0, 1] of every metric of the task (its score is their mean, in percent)."""
        raise NotImplementedError


class ExactMatch(Generative):
    """Exact match of the answer with any reference."""

    def per_example(self, predictions: Sequence[str], references: list[list[str]]) -> dict[str, list[float]]:
        return {"exact_match": [metrics.exact_match(p, r) for p, r in zip(predictions, references)]}


class Squad(Generative):
    """SQuAD v1.1 exact match and token F1 against the best-matching reference."""

    def per_example(self, predictions: Sequence[str], references: list[list[str]]) -> dict[str, list[float]]:
        pairs = list(zip(predictions, references))
        return {"exact_match": [metrics.squad_exact_match(p, r) for p, r in pairs],
                "f1": [metrics.squad_f1(p, r) for p, r in pairs]}


KINDS: dict[str, type[TaskKind]] = {"exact_match": ExactMatch, "squad": Squad, "multiple_choice": MultipleChoice,
                                    "lm_loss": LanguageModelling}


def task_kind(spec: TaskSpec) -> TaskKind:
    """The task kind that evaluates ``spec`` (its metric names it)."""
    return KINDS[spec.metric](spec)
