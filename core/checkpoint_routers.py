"""A loaded model's router tensors read back from its safetensors shards, and nothing else.

The routers' weights digest (``MoEModel.weights_digest``) reads them from here when the model came from a local
folder of safetensors: a few small tensors instead of every router's ``state_dict`` on whatever device holds
it, and routers offloaded to disk by accelerate need not be brought back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .checkpoint_conversion import ModelView
from .checkpoint_files import SafetensorsCheckpoint, has_safetensors

if TYPE_CHECKING:
    from .model import MoEModel


def stored_router_states(mm: MoEModel) -> dict[int, dict[str, torch.Tensor]] | None:
    """Each MoE layer's router tensors (keyed like ``router.state_dict()``), read from the shards of ``mm.source``
    and cast to the dtype the model holds each in, so they equal the loaded ones bit for bit. Only router
    tensors are read. None when ``mm.source`` is no local safetensors folder or its shards do not hold the
    model's routers under the same names and shapes (the caller then reads the model)."""
    if not has_safetensors(mm.source):
        return None
    names = {module: name for name, module in mm.model.named_modules()}
    held = {f"{names[layer.router]}.{name}": (layer.index, name, tensor)
            for layer in mm.layers for name, tensor in layer.router.state_dict().items()}
    found: dict[str, torch.Tensor] = {}
    with SafetensorsCheckpoint(mm.source) as checkpoint:
        view = ModelView(mm.model, checkpoint)
        for group in view.groups.values():
            if group.model_keys & held.keys():
                found.update({k: t for k, t in view.realize(group).items() if k in held})
    if found.keys() != held.keys():
        return None
    states: dict[int, dict[str, torch.Tensor]] = {}
    for key, (index, name, tensor) in held.items():
        if found[key].shape != tensor.shape:
            return None
        states.setdefault(index, {})[name] = found[key].to(tensor.dtype)
    return states
