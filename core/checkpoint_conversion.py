"""Checkpoint tensors as the model holds them, one group at a time, by transformers' own conversion.

transformers 5 renames some checkpoint keys when it loads them and fuses others (``experts.{i}.w1`` of every
expert become one ``experts.gate_up_proj``), and reverts both when it saves. :class:`ModelView` groups a
checkpoint's keys exactly as ``from_pretrained`` does (``get_model_conversion_mapping`` and
``rename_source_key``, in the loader's key order), so that realising a group gives the tensors the loaded
model would hold under their model names, without loading anything else. :func:`to_checkpoint_names` is the
reverse, the one ``save_pretrained`` applies. Both work on meta tensors too (shapes only, no data).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint_files import SafetensorsCheckpoint


@dataclass
class TensorGroup:
    """Checkpoint keys that become model tensors together (one key for a rename, every expert's for a fusion)."""

    first_key: str  # the model key transformers names the group by
    template: object  # the WeightRenaming / WeightConverter that converts it
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (model key, checkpoint key, pattern)

    @property
    def checkpoint_keys(self) -> list[str]:
        return [key for _, key, _ in self.entries]

    @property
    def model_keys(self) -> set[str]:
        """The model keys the group's checkpoint keys were renamed to (a one-to-many split names its first)."""
        return {model_key for model_key, _, _ in self.entries}


class ModelView:
    """A checkpoint seen through a model's conversion: ``groups`` in the loader's order, checkpoint keys the model
    does not use (``unused``), and realising a group into model tensors (``realize``)."""

    def __init__(self, model: nn.Module, checkpoint: SafetensorsCheckpoint) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.model = model
        self.checkpoint = checkpoint
        mapping = get_model_conversion_mapping(model)  # what from_pretrained uses (no key_mapping, no quantizer)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        model_keys = model.state_dict()
        prefix = model.base_model_prefix
        self.groups: dict[str, TensorGroup] = {}
        self.unused: list[str] = []
        for key in sorted(checkpoint.keys(), key=dot_natural_key):  # the loader's order (stacking order of experts)
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
            if renamed not in model_keys and key in model_keys:
                renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=model_keys)
            if renamed not in model_keys:
                self.unused.append(key)
                continue
            if pattern is not None:
                group = self.groups.setdefault(renamed, TensorGroup(renamed, by_pattern[pattern]))
            else:
                pattern = key
                group = self.groups.setdefault(renamed, TensorGroup(renamed, WeightRenaming(key, renamed)))
            group.entries.append((renamed, key, pattern))

    def realize(self, group: TensorGroup, meta: bool = False,
                entries: list[tuple[str, str, str]] | None = None) -> dict[str, torch.Tensor]:
        """The group's tensors under their model names, read from the shards now (or as meta tensors).
        ``entries``: read only these of the group's entries (see ``stacked_positions``)."""
        read: Callable[[str], torch.Tensor] = self.checkpoint.meta_tensor if meta else self.checkpoint.tensor
        transform = copy.deepcopy(group.template)
        for model_key, key, pattern in group.entries if entries is None else entries:
            transform.add_tensor(model_key, key, pattern, functools.partial(read, key))
        with torch.no_grad():
            realized = transform.convert(group.first_key, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in realized.items()}


def stacked_positions(group: TensorGroup, count: int) -> list[list[tuple[str, str, str]]] | None:
    """For a group that transformers fuses by stacking ``count`` checkpoint tensors per pattern on a new axis 0
    (``MergeModulelist(dim=0)`` first: per-expert tensors becoming one tensor of all experts), its entries by
    position on that axis; else None. Realising the entries of some positions gives exactly those rows of the
    fused tensor (stacking is in the order collected, which is this order)."""
    from transformers.core_model_loading import MergeModulelist

    operations = getattr(group.template, "operations", None)
    if not operations or not isinstance(operations[0], MergeModulelist) or operations[0].dim != 0:
        return None
    by_pattern: dict[str, list[tuple[str, str, str]]] = {}
    for entry in group.entries:
        by_pattern.setdefault(entry[2], []).append(entry)
    if any(len(entries) != count for entries in by_pattern.values()):
        return None
    return [[entries[i] for entries in by_pattern.values()] for i in range(count)]


def to_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model tensors as ``save_pretrained`` of ``model`` (built by ``from_config``) would write them: transformers'
    ``revert_weight_conversion``, applied to a part of the state dict (the parts one conversion needs together)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)
