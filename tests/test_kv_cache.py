"""The growing cache holds exactly what DynamicCache holds, through cropping and batch reordering, without
copying the cache for every new position."""

import torch
from transformers.cache_utils import DynamicCache

from core.evaluation.kv_cache import GrowingCache, GrowingLayer


def _states(gen: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # values have their own head dim, as MLA models (DeepSeek) store them
    return torch.randn(batch, 2, length, 4, generator=gen), torch.randn(batch, 2, length, 3, generator=gen)


def _assert_same(growing: DynamicCache, plain: DynamicCache) -> None:
    assert growing.get_seq_length() == plain.get_seq_length()
    for mine, theirs in zip(growing.layers, plain.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_growing_cache_matches_dynamic_cache_through_crop_and_reordering():
    gen = torch.Generator().manual_seed(0)
    growing, plain = GrowingCache(), DynamicCache()

    def update(batch: int, length: int) -> None:
        for layer in range(2):
            k, v = _states(gen, batch, length)
            out_mine, out_theirs = growing.update(k, v, layer), plain.update(k, v, layer)
            assert all(torch.equal(a, b) for a, b in zip(out_mine, out_theirs))

    update(3, 10)                 # a prompt pass
    for _ in range(GrowingLayer.headroom + 5):
        update(3, 1)              # decoding past the first buffer's room
    _assert_same(growing, plain)
    update(3, 6)                  # a teacher-forced answer ...
    growing.crop(-6), plain.crop(-6)  # ... taken back
    update(3, 1)
    _assert_same(growing, plain)
    growing.batch_repeat_interleave(2), plain.batch_repeat_interleave(2)
    update(6, 2)
    growing.batch_select_indices(torch.tensor([5, 0])), plain.batch_select_indices(torch.tensor([5, 0]))
    update(2, 1)
    growing.batch_select_indices(torch.tensor([1, 0])), plain.batch_select_indices(torch.tensor([1, 0]))
    update(2, 1)                  # same batch size, rows swapped: the buffer is stale
    _assert_same(growing, plain)


def test_decoding_steps_write_into_the_same_buffer():
    """A new position does not copy the cache (DynamicCache concatenates, moving it every step)."""
    gen = torch.Generator().manual_seed(0)
    cache = GrowingCache()
    cache.update(*_states(gen, 2, 5), 0)
    where = cache.layers[0].keys.data_ptr()
    for _ in range(GrowingLayer.headroom):
        cache.update(*_states(gen, 2, 1), 0)
        assert cache.layers[0].keys.data_ptr() == where
