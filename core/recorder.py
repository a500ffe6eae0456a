"""Per-token router decisions, recorded with forward hooks on the routers.

Hooks (not ``output_router_logits``) because they see exactly the ids and weights the experts receive
under every experts implementation, skip dense layers naturally, and work inside ``generate``, which
``output_router_logits`` breaks for several families. A forward pre-hook on the whole model notes which
rows of the flattened batch are real tokens and where they sit, so padding never reaches the profile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .adapters import MoELayer
from .model import MoEModel
from .profile_writer import ProfileWriter, TokenBatch


class RoutingSink(Protocol):
    """Where recorded decisions go: a :class:`ProfileWriter` (rows on disk), or an in-memory counter."""

    def add(self, tokens: TokenBatch, layer: int, experts: Any, weights: Any, probs: Any = None) -> None: ...


@dataclass
class _BatchContext:
    task: str
    example_ids: np.ndarray
    forwards: int = 0
    example_tensor: torch.Tensor | None = None
    tokens: TokenBatch | None = None  # the current forward's tokens, shared by every layer's rows


class RouterRecorder:
    """Records every MoE layer's routing decisions into a :class:`ProfileWriter` (or another
    :class:`RoutingSink`; give ``with_probs`` then, as only a writer's metadata says it).

    Usage::

        with RouterRecorder(mm, writer) as rec:
            with rec.batch("qa", example_ids=[0, 1]):
                mm.model(**inputs)            # or mm.model.generate(**inputs)

    Inside one ``batch`` the first forward is the prompt (``step`` 0); each later forward is a decode
    step (``step`` 1, 2, ...). ``position`` is the token's index in its own unpadded sequence.
    """

    def __init__(self, mm: MoEModel, writer: ProfileWriter | RoutingSink, with_probs: bool | None = None) -> None:
        self.mm = mm
        self.writer = writer
        self.with_probs = writer.meta.with_probs if with_probs is None else with_probs
        self._handles: list[Any] = []
        self._ctx: _BatchContext | None = None

    def __enter__(self) -> "RouterRecorder":
        self._handles.append(self.mm.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        for layer in self.mm.layers:
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def batch(self, task: str, example_ids: list[int] | np.ndarray) -> Iterator[None]:
        self._ctx = _BatchContext(task, np.asarray(example_ids, dtype=np.int64))
        try:
            yield
        finally:
            self._ctx = None

    # ----- hooks ------------------------------------------------------------------------------
    def _on_model_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("Recording needs input_ids (token ids), not inputs_embeds.")
        batch, length = input_ids.shape
        device = input_ids.device
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            mask = mask.to(device)
            positions = (mask.long().cumsum(dim=1) - 1)[:, -length:]
            valid = mask[:, -length:].bool().reshape(-1)
        else:
            past = _past_length(kwargs)
            positions = torch.arange(past, past + length, device=device).expand(batch, length)
            valid = None
        if ctx.example_tensor is None or ctx.example_tensor.device != device:
            ctx.example_tensor = torch.as_tensor(ctx.example_ids, device=device)
        ctx.tokens = TokenBatch(task=ctx.task, example=ctx.example_tensor.repeat_interleave(length),
                                position=positions.reshape(-1), token_id=input_ids.reshape(-1), step=ctx.forwards,
                                valid=valid)
        ctx.forwards += 1

    def _router_hook(self, layer: MoELayer):
        adapter = self.mm.adapter

        def hook(module: Any, args: tuple, output: Any) -> None:
            ctx = self._ctx
            if ctx is None or ctx.tokens is None:
                return
            ids, weights = adapter.decisions(output, layer, self.mm.effective_top_k)
            probs = adapter.probabilities(output) if self.with_probs else None
            self.writer.add(ctx.tokens, layer.index, ids.to(torch.int16), weights.float(), probs)

        return hook


def _past_length(kwargs: dict) -> int:
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        try:
            return int(cache.get_seq_length())
        except (ValueError, AttributeError):
            return 0
    return 0
