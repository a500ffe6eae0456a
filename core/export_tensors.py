"""What export writes for each tensor of a pruned model: unchanged, expert-sliced, merged, or the sliced or
mapped router. Both exports use these functions: the in-memory one on the loaded model's state dict, the
streaming one (:class:`PrunedTensorStream`) on a checkpoint's tensors one conversion group at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .adapters import Adapter, MoELayer
from .checkpoint_conversion import ModelView, TensorGroup, stacked_positions, to_checkpoint_names
from .errors import MoEScopeError
from .masking import mapped_router_state, merged_expert_tensor, slice_router_state
from .plan import Plan


def exported_router_state(adapter: Adapter, router: nn.Module, plan: Plan, layer: int, n_experts: int,
                          fitted: Mapping[int, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The pruned router's tensors (keyed like ``router.state_dict()``): sliced to the kept experts, or, for a
    layer the plan merges, mapped by the plan's router matrix ('logits' mapping) or the linear router fitted to
    its 'probs' mapping (``fitted``, from ``core.router_fit``). The one place export decides the router."""
    merge = plan.merge.get(layer)
    if merge is None:
        return slice_router_state(adapter, router, plan.keep(layer, n_experts))
    mapping = getattr(plan, "mapping", "logits")
    if mapping == "logits":
        return mapped_router_state(adapter, router, merge[0])
    if fitted is None or layer not in fitted:  # p' = R · softmax(W x) is no linear router: it must be fitted
        raise MoEScopeError(f"Plans with the {mapping!r} router mapping are exported with linear routers fitted on "
                            f"the loaded model (core.router_fit); export this plan from a loaded model.")
    return {name: tensor.clone() for name, tensor in fitted[layer].items()}


def exported_expert_tensor(tensor: torch.Tensor, plan: Plan, layer: int, n_experts: int) -> torch.Tensor:
    """One stacked expert tensor of the pruned model: the kept experts, or the plan's merged experts."""
    merge = plan.merge.get(layer)
    if merge is None:
        return sliced_expert_tensor(tensor, plan.keep(layer, n_experts), n_experts)
    return merged_expert_tensor(tensor, merge[1], n_experts)


def sliced_expert_tensor(tensor: torch.Tensor, keep: list[int], n_experts: int) -> torch.Tensor:
    index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
    if tensor.shape[0] == n_experts:
        return tensor.index_select(0, index).clone()
    if tensor.shape[0] % n_experts == 0:  # DBRX stores experts flat: [E * F, H]
        per = tensor.view(n_experts, -1, *tensor.shape[1:]).index_select(0, index)
        return per.reshape(-1, *tensor.shape[1:]).clone()
    raise MoEScopeError(f"Cannot find the expert axis of a tensor of shape {tuple(tensor.shape)}.")


def _as(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


@contextlib.contextmanager
def _holding(module: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``module`` (of a meta model) holding ``state`` for the block, then its meta tensors again."""
    empty = module.state_dict()
    module.load_state_dict(state, strict=True, assign=True)
    try:
        yield module
    finally:
        module.load_state_dict(empty, strict=True, assign=True)


class PrunedTensorStream:
    """The pruned checkpoint's tensors, in checkpoint names, produced one conversion group at a time.

    ``view`` sees the source checkpoint through ``original`` (the source model built on the meta device);
    ``pruned`` is the pruned model on the meta device, whose conversion names the output like
    ``save_pretrained`` would. Model tensors are read in ``held`` dtypes (as a loaded model holds them) and
    written in ``written`` ones (as the pruned model holds them); a name missing from either keeps its dtype.
    ``fitted``: the fitted routers of a 'probs'-mapped plan's merged layers (``exported_router_state``).
    Router tensors wait until their router is complete, so a router is decided as a whole.
    """

    def __init__(self, view: ModelView, adapter: Adapter, layers: list[MoELayer], n_experts: int,
                 pruned: nn.Module, plan: Plan, held: dict[str, torch.dtype] | None = None,
                 written: dict[str, torch.dtype] | None = None,
                 fitted: Mapping[int, dict[str, torch.Tensor]] | None = None) -> None:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.view, self.adapter, self.n_experts, self.pruned, self.plan = view, adapter, n_experts, pruned, plan
        self.held, self.written_dtypes, self.fitted = held or {}, written or {}, fitted
        names = {module: name for name, module in view.model.named_modules()}
        self.owner: dict[str, tuple[str, MoELayer]] = {}
        for layer in layers:
            self.owner[names[layer.router]] = ("router", layer)
            self.owner[names[layer.experts]] = ("experts", layer)
        self.router_names = {layer.index: set(layer.router.state_dict()) for layer in layers}
        self.written = set(remove_tied_weights_from_state_dict(pruned.state_dict(), pruned))

    def expected(self) -> dict[str, torch.Size]:
        """What ``save_pretrained`` of the pruned model writes: checkpoint names and shapes (from meta tensors)."""
        state = {name: tensor for name, tensor in self.pruned.state_dict().items() if name in self.written}
        return {name: tensor.shape for name, tensor in to_checkpoint_names(self.pruned, state).items()}

    def _owner(self, key: str) -> tuple[str, MoELayer, str] | None:
        parts = key.split(".")
        for end in range(len(parts) - 1, 0, -1):
            found = self.owner.get(".".join(parts[:end]))
            if found is not None:
                return found[0], found[1], ".".join(parts[end:])
        return None

    def tensors(self, meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) of the pruned checkpoint in a fixed order; ``meta``: shapes only."""
        pending: dict[int, dict[str, torch.Tensor]] = {}
        reads = {group.first_key: self._reads(group) for group in self.view.groups.values()}
        if not meta:  # each shard is closed once its last tensor is read, so its pages leave memory
            self.view.checkpoint.plan_reads(key for entries, _ in reads.values() for _, key, _ in entries)
        for group in self.view.groups.values():
            entries, kept_only = reads[group.first_key]
            try:
                model_tensors = self.view.realize(group, meta=meta, entries=entries)
            except Exception as exc:  # noqa: BLE001 - transformers' conversion failing on this checkpoint
                raise MoEScopeError(f"transformers could not convert the checkpoint tensors of {group.first_key} "
                                    f"({type(exc).__name__}: {exc}); export needs a checkpoint that "
                                    f"from_pretrained loads.") from None
            out: dict[str, torch.Tensor] = {}
            for key, tensor in model_tensors.items():
                if key not in self.written:
                    continue  # a tied copy (save_pretrained drops it too)
                tensor = _as(tensor, self.held.get(key))
                owner = self._owner(key)
                if owner is None:
                    out[key] = tensor
                elif owner[0] == "experts":
                    out[key] = tensor if kept_only else exported_expert_tensor(tensor, self.plan, owner[1].index,
                                                                               self.n_experts)
                else:
                    pending.setdefault(owner[1].index, {})[owner[2]] = tensor
            for index in [i for i, state in pending.items() if set(state) == self.router_names[i]]:
                out.update(self._router(index, pending.pop(index)))
            out = {key: _as(tensor, self.written_dtypes.get(key)) for key, tensor in out.items()}
            yield from to_checkpoint_names(self.pruned, out).items()
        if pending:
            layer, state = next(iter(pending.items()))
            missing = sorted(self.router_names[layer] - set(state))
            raise MoEScopeError(f"The checkpoint lacks the router tensor {missing[0]} of layer {layer}; "
                                f"re-save it with save_pretrained.")

    def _reads(self, group: TensorGroup) -> tuple[list[tuple[str, str, str]], bool]:
        """The group's checkpoint entries to read, and whether they are the kept experts only: a pruned layer's
        per-expert tensors that transformers stacks are read for the kept experts alone (the stacked result is
        the sliced tensor, bit for bit), so the others are never read."""
        owner = self._owner(group.first_key)
        if owner is None or owner[0] != "experts" or owner[1].index in self.plan.merge:
            return group.entries, False
        positions = stacked_positions(group, self.n_experts)
        if positions is None:
            return group.entries, False
        return [entry for i in self.plan.keep(owner[1].index, self.n_experts) for entry in positions[i]], True

    def _router(self, index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix, layer = next((p, owner[1]) for p, owner in self.owner.items()
                             if owner[0] == "router" and owner[1].index == index)
        with _holding(layer.router, state) as router:
            pruned = exported_router_state(self.adapter, router, self.plan, index, self.n_experts, self.fitted)
        return {f"{prefix}.{name}": tensor for name, tensor in pruned.items()}
