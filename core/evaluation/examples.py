"""A task's examples as token ids fitted to the model's context, and their padding and batching."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..model import MoEModel
from ..tasks import TaskError, TaskWarning, load_task, render_example, warn_empty

if TYPE_CHECKING:
    from .kinds import TaskKind


@dataclass
class Example:
    """One example as the model sees it."""

    prompt_ids: list[int]
    references: list[str]
    scored: list[list[int]]       # continuations scored by log-likelihood (options, or the text)
    agreement_ids: list[int]      # the sequence agreement is measured on
    label: int = -1


def encode(tokenizer: Any, text: str, bos: bool) -> list[int]:
    """The text's token ids, after the tokenizer's bos token where ``bos`` asks for it and it has one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def prepare_examples(mm: MoEModel, kind: TaskKind, split: str, limit: int | None) -> list[Example]:
    """Encode the examples, each fitted to the model's context by its task kind. Empty LM texts are skipped
    with a warning (they hold no tokens, so the token-weighted loss is unchanged)."""
    spec = kind.spec
    data = load_task(spec, split)
    if limit:
        data = data.select(range(min(limit, len(data))))
    ctx = mm.context_length
    kind.check_context(ctx)
    out, empty, truncated = [], [], 0
    for index, row in enumerate(data):
        fitted = kind.example(mm.tokenizer, render_example(spec, row, index), index, ctx)
        if fitted is None:
            empty.append(index)
            continue
        example, cut = fitted
        out.append(example)
        truncated += cut
    if empty and not out:
        raise TaskError(f"task {spec.name!r} split {split!r} has no text in any of its {len(empty)} example(s): "
                        f"fill {spec.text_field!r} in the data")
    if empty:
        warn_empty(spec, split, empty)
    if truncated:
        warnings.warn(f"task {spec.name!r} split {split!r}: {truncated} example(s) were longer than the model's "
                      f"context of {ctx} tokens and were cut to fit it ({kind.truncation})",
                      TaskWarning, stacklevel=4)
    return out


def keep_end(ids: list[int], budget: int, bos: bool) -> list[int]:
    """At most ``budget`` (at least 1) tokens of a prompt: its first (bos) token where it has one, then its end."""
    budget = max(budget, 1)
    if len(ids) <= budget:
        return ids
    return ids[:1] + ids[len(ids) - budget + 1:] if bos else ids[len(ids) - budget:]


def padded(seqs: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, T] of the sequences padded on the right (or the left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def length_batches(seqs: Sequence[Sequence[int]], size: int, token_budget: int) -> list[list[int]]:
    """Indices of the sequences in batches of at most ``size`` sequences and ``token_budget`` padded tokens,
    sorted by length so batches carry little padding."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches: list[list[int]] = [[]]
    for i in order:  # lengths only grow along ``order``, so a batch's padded size is its last length
        if batches[-1] and (len(batches[-1]) == size or (len(batches[-1]) + 1) * len(seqs[i]) > token_budget):
            batches.append([])
        batches[-1].append(i)
    return batches if batches[0] else []
