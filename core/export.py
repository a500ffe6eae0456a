"""Write a physically pruned checkpoint that plain ``transformers`` loads, without touching the source.

The pruned router is sliced by the same function masking uses, so the exported model routes exactly as
the masked one. The checkpoint is built in a temporary directory beside the target and renamed into
place only when complete.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import set_field
from .atomic import atomic_directory
from .errors import MoEScopeError
from .masking import mapped_router_state, merged_expert_tensor, slice_router_state
from .model import MoEModel
from .outputs import EXPORT_MARKER, check_output, output_lock
from .plan import Plan, validate_plan

PLAN_FILENAME = EXPORT_MARKER  # its presence marks a directory as an export MoEScope may replace


def pruned_state_dict(mm: MoEModel, plan: Plan) -> dict[str, torch.Tensor]:
    """The model's state dict with every MoE layer's router and experts restricted to the kept experts,
    or, for layers the plan merges, replaced by the mapped router and the merged experts."""
    state = mm.model.state_dict()
    n = mm.n_experts
    names = {module: name for name, module in mm.model.named_modules()}
    merges = plan.merge
    for layer in mm.layers:
        keep = plan.keep(layer.index, n)
        merge = merges.get(layer.index)
        router_prefix, experts_prefix = names[layer.router], names[layer.experts]
        router_state = (slice_router_state(mm.adapter, layer.router, keep) if merge is None
                        else mapped_router_state(mm.adapter, layer.router, merge[0]))
        for name, tensor in router_state.items():
            state[f"{router_prefix}.{name}"] = tensor
        for name, tensor in layer.experts.state_dict().items():
            state[f"{experts_prefix}.{name}"] = (_slice_experts(tensor, keep, n) if merge is None
                                                 else merged_expert_tensor(tensor, merge[1], n))
    return state


def _slice_experts(tensor: torch.Tensor, keep: list[int], n_experts: int) -> torch.Tensor:
    index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
    if tensor.shape[0] == n_experts:
        return tensor.index_select(0, index).clone()
    if tensor.shape[0] % n_experts == 0:  # DBRX stores experts flat: [E * F, H]
        per = tensor.view(n_experts, -1, *tensor.shape[1:]).index_select(0, index)
        return per.reshape(-1, *tensor.shape[1:]).clone()
    raise MoEScopeError(f"Cannot find the expert axis of a tensor of shape {tuple(tensor.shape)}.")


def pruned_config(mm: MoEModel, plan: Plan):
    config = copy.deepcopy(mm.config)
    counts = {len(plan.keep(layer.index, mm.n_experts)) for layer in mm.layers}
    set_field(config, mm.adapter.n_experts_field, counts.pop())
    if plan.top_k is not None and mm.adapter.top_k_field is not None:
        set_field(config, mm.adapter.top_k_field, plan.top_k)
    return config


def build_pruned_model(mm: MoEModel, plan: Plan, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The physically pruned model in memory: a fresh model of the pruned config holding the kept experts."""
    from transformers import AutoModelForCausalLM

    validate_plan(plan, mm.routing_spec(), for_export=True)
    dtype = next(mm.model.parameters()).dtype
    with torch.device(device):
        pruned = AutoModelForCausalLM.from_config(pruned_config(mm, plan), dtype=dtype)
    with mm.lock:  # another thread's merging plan writes expert weights in place while it evaluates
        state = pruned_state_dict(mm, plan)
        pruned.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return pruned.eval()


def export_pruned(mm: MoEModel, plan: Plan, out_dir: str | Path, overwrite: bool = False,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Write the pruned checkpoint (config, safetensors, tokenizer, plan) to ``out_dir`` atomically.

    ``out_dir`` must be new, or an earlier MoEScope export when ``overwrite``; it may never be, hold or lie
    inside the source model (``core.outputs.check_output``). It is locked for the export.
    """
    validate_plan(plan, mm.routing_spec(), for_export=True)
    say = progress or (lambda _msg: None)
    sources = [mm.source] + [p for p in (getattr(mm.model, "name_or_path", None),) if p]
    out_dir = check_output(out_dir, "export", overwrite, sources=sources)
    with output_lock(out_dir), atomic_directory(check_output(out_dir, "export", overwrite, sources=sources)) as tmp:
        say("slicing experts and building the pruned model")
        pruned = build_pruned_model(mm, plan)
        say("writing safetensors")
        pruned.save_pretrained(tmp)
        if mm.tokenizer is not None:
            mm.tokenizer.save_pretrained(tmp)
        provenance = plan.provenance
        if plan.model and plan.model != mm.source:  # the plan was made on another model; record where it was applied
            provenance = dataclasses.replace(provenance, planned_on=plan.model)
        exported = dataclasses.replace(plan, model=mm.source, provenance=provenance)
        exported.save(tmp / PLAN_FILENAME)
    say(f"wrote {out_dir}")
    return out_dir


def directory_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
