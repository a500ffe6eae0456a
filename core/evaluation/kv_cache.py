"""A key/value cache that grows in place, for the evaluation's own greedy decoding.

transformers' ``DynamicCache`` concatenates each layer's keys and values with every new token, so every
decoding step copies the whole cache; on the sample model that copy was ~40% of a step (batch 64, 150 cached
tokens). This cache writes new positions into spare room and gives attention a view of the filled part, so a
step copies only its own token. Everything else (cropping, masks, sequence length) is ``DynamicCache``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare positions; ``keys``/``values`` view its filled part."""

    headroom = 64  # spare positions added whenever the buffer is full: a few dozen decoding steps per copy

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if not self._buffer_holds(new, key_states):
            self._reallocate(new + self.headroom, old, key_states, value_states)
        self._key_buffer[..., old:new, :] = key_states
        self._value_buffer[..., old:new, :] = value_states
        self.keys, self.values = self._key_buffer[..., :new, :], self._value_buffer[..., :new, :]
        return self.keys, self.values

    def _buffer_holds(self, length: int, key_states: torch.Tensor) -> bool:
        """Whether ``keys`` still views the buffer (cropping keeps it; batch reordering replaces it) with room
        for ``length`` positions of this batch."""
        buffer = self._key_buffer
        return (buffer is not None and self.keys.data_ptr() == buffer.data_ptr()
                and buffer.shape[:2] == key_states.shape[:2] and length <= buffer.shape[-2])

    def _reallocate(self, capacity: int, filled: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._key_buffer = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
        self._value_buffer = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
        if filled:
            self._key_buffer[..., :filled, :] = self.keys
            self._value_buffer[..., :filled, :] = self.values


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer` (plain full-attention models: no sliding or hybrid layers)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
