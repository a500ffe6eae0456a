"""Task metrics: SQuAD EM/F1, exact match, multiple-choice accuracy, token NLL and perplexity.

Pure Python (torch only for the NLL helpers), no model loading, so harness and tests share them.
The SQuAD normalisation follows the official v1.1 evaluation script.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _exact(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:  # both empty -> 1, one empty -> 0 (SQuAD v2 convention)
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str | None, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    if not references:
        raise ValueError("squad_exact_match needs at least one reference answer")
    return max(_exact(prediction or "", r) for r in references)


def squad_f1(prediction: str | None, references: Sequence[str]) -> float:
    """Token-overlap F1 after normalisation, maximised over the references."""
    if not references:
        raise ValueError("squad_f1 needs at least one reference answer")
    return max(_f1(prediction or "", r) for r in references)


def exact_match(prediction: str | None, references: Sequence[str] | str) -> float:
    """Strict match after stripping surrounding whitespace (for arithmetic answers)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("exact_match needs at least one reference answer")
    pred = (prediction or "").strip()
    return float(any(pred == r.strip() for r in refs))


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 in percent, as the SQuAD script reports them."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    return {"exact_match": 100 * mean(squad_exact_match(p, r) for p, r in zip(predictions, references)),
            "f1": 100 * mean(squad_f1(p, r) for p, r in zip(predictions, references))}


def accuracy(predicted: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predicted labels equal to the true ones."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions but {len(labels)} labels")
    return mean(float(int(p) == int(l)) for p, l in zip(predicted, labels))


def choose_option(option_logprobs: Sequence[float], option_lengths: Sequence[int] | None = None) -> int:
    """Index of the best option by total log-likelihood, or per-token if lengths are given."""
    if not option_logprobs:
        raise ValueError("choose_option needs at least one option")
    scores = list(option_logprobs)
    if option_lengths is not None:
        scores = [s / max(1, n) for s, n in zip(scores, option_lengths)]
    return max(range(len(scores)), key=lambda i: scores[i])


def perplexity(mean_token_nll: float) -> float:
    """exp(mean NLL in nats)."""
    return math.exp(mean_token_nll)
