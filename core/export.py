"""Write a physically pruned checkpoint that plain ``transformers`` loads, without touching the source.

The pruned router is sliced by the same function masking uses, so the exported model routes exactly as
the masked one. The checkpoint is built in a temporary directory beside the target and renamed into
place only when complete.

Two ways to the same tensors (``core.export_tensors`` decides each one for both):

- **streaming** (``core.streaming_export``) from a local folder of safetensors, the model never loaded
  (``export_checkpoint``) or loaded (``export_pruned(..., streaming=None)``): the shards are read and the pruned
  shards written one tensor group at a time, so memory holds a layer's kept experts at most, never a model;
- **in memory** (``export_pruned``'s default): a pruned model is built from the loaded one and saved with
  ``save_pretrained``; the only way for models without such a folder (built in memory, ``.bin`` weights, a hub
  id) or loaded in another layout than the files hold.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import set_field
from .atomic import atomic_directory
from .checkpoint_files import has_safetensors
from .checkpoint_writer import DEFAULT_MAX_SHARD_SIZE
from .errors import MoEScopeError
from .export_tensors import exported_expert_tensor, exported_router_state
from .model import MoEModel
from .outputs import EXPORT_MARKER, check_output, output_lock
from .plan import Plan, validate_plan

PLAN_FILENAME = EXPORT_MARKER  # its presence marks a directory as an export MoEScope may replace


def pruned_state_dict(mm: MoEModel, plan: Plan,
                      fitted: dict[int, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every MoE layer's router and experts restricted to the kept experts,
    or, for layers the plan merges, replaced by the mapped (or ``fitted``) router and the merged experts."""
    state = mm.model.state_dict()
    n = mm.n_experts
    names = {module: name for name, module in mm.model.named_modules()}
    for layer in mm.layers:
        router_prefix, experts_prefix = names[layer.router], names[layer.experts]
        for name, tensor in exported_router_state(mm.adapter, layer.router, plan, layer.index, n, fitted).items():
            state[f"{router_prefix}.{name}"] = tensor
        for name, tensor in layer.experts.state_dict().items():
            state[f"{experts_prefix}.{name}"] = exported_expert_tensor(tensor, plan, layer.index, n)
    return state


def pruned_config(mm: MoEModel, plan: Plan):
    config = copy.deepcopy(mm.config)
    counts = {len(plan.keep(layer.index, mm.n_experts)) for layer in mm.layers}
    set_field(config, mm.adapter.n_experts_field, counts.pop())
    if plan.top_k is not None and mm.adapter.top_k_field is not None:
        set_field(config, mm.adapter.top_k_field, plan.top_k)
    return config


def build_pruned_model(mm: MoEModel, plan: Plan, device: str | torch.device = "cpu",
                       fitted: dict[int, dict[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    """The physically pruned model in memory: a fresh model of the pruned config holding the kept experts."""
    from transformers import AutoModelForCausalLM

    validate_plan(plan, mm.routing_spec(), for_export=True)
    dtype = next(mm.model.parameters()).dtype
    with torch.device(device):
        pruned = AutoModelForCausalLM.from_config(pruned_config(mm, plan), dtype=dtype)
    with mm.lock:  # another thread's merging plan writes expert weights in place while it evaluates
        state = pruned_state_dict(mm, plan, fitted)
        pruned.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return pruned.eval()


def export_pruned(mm: MoEModel, plan: Plan, out_dir: str | Path, overwrite: bool = False,
                  progress: Callable[[str], None] | None = None, streaming: bool | None = None,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, fit_texts: list[str] | None = None,
                  min_router_agreement: float | None = None) -> Path:
    """Write the pruned checkpoint (config, safetensors, tokenizer, plan) to ``out_dir`` atomically.

    ``out_dir`` must be new, or an earlier MoEScope export when ``overwrite``; it may never be, hold or lie
    inside the source model (``core.outputs.check_output``). It is locked for the export.
    ``streaming``: None (the default) streams from the source's safetensors shards when the loaded model holds
    their tensors under the same names and shapes, else builds the pruned model in memory; False always builds it
    in memory; True insists on streaming. ``max_shard_size`` bounds the streamed shards. (The CLI exports a
    local safetensors folder with ``core.streaming_export.export_checkpoint`` directly, never loading it.)
    A plan merged under the 'probs' router mapping gets linear routers fitted on this model
    (``core.router_fit.fit_plan_routers``, on ``fit_texts`` or the plan's calibration split), refused in one
    sentence where a fit agrees with it on fewer than ``min_router_agreement`` of held-out tokens (default
    ``core.router_fit.DEFAULT_MIN_AGREEMENT``).
    """
    validate_plan(plan, mm.routing_spec(), for_export=True)
    say = progress or (lambda _msg: None)
    sources = [mm.source] + [p for p in (getattr(mm.model, "name_or_path", None),) if p]
    out_dir = check_output(out_dir, "export", overwrite, sources=sources)
    fitted = _fitted_routers(mm, plan, fit_texts, say, min_router_agreement)
    if streaming is not False and (streaming or has_safetensors(mm.source)):
        from .streaming_export import StreamingExport

        try:
            job = StreamingExport(mm.source, plan, loaded=mm.model, fitted=fitted)
        except MoEScopeError:
            if streaming:
                raise
            job = None  # a checkpoint the streaming export cannot read as the model holds it: build in memory
        if job is not None and job.matches(mm.model):
            say(f"streaming from the safetensors shards of {mm.source}")
            return job.write(out_dir, overwrite=overwrite, progress=progress, max_shard_size=max_shard_size,
                             tokenizer=mm.tokenizer, sources=tuple(sources[1:]))
        if job is not None:
            job.checkpoint.close()
        if streaming:
            raise MoEScopeError(f"The safetensors in {mm.source} do not hold the loaded model's tensors (names or "
                                f"shapes differ: changed since loading?); export it in memory.")
    with output_lock(out_dir), atomic_directory(check_output(out_dir, "export", overwrite, sources=sources)) as tmp:
        say("slicing experts and building the pruned model")
        pruned = build_pruned_model(mm, plan, fitted=fitted)
        say("writing safetensors")
        pruned.save_pretrained(tmp)
        if mm.tokenizer is not None:
            mm.tokenizer.save_pretrained(tmp)
        save_export_plan(plan, mm.source, tmp)
    say(f"wrote {out_dir}")
    return out_dir


def _fitted_routers(mm: MoEModel, plan: Plan, texts: list[str] | None,
                    say: Callable[[str], None],
                    min_agreement: float | None = None) -> dict[int, dict[str, torch.Tensor]] | None:
    """Linear routers fitted to a 'probs'-mapped merging plan (None for any other plan)."""
    if getattr(plan, "mapping", "logits") == "logits" or not plan.merge:
        return None
    from .router_fit import fit_plan_routers

    say("fitting linear routers to the plan's probs mapping")
    options = {} if min_agreement is None else {"min_agreement": min_agreement}
    fits = fit_plan_routers(mm, plan, texts=texts, **options)
    worst = min(fits.values(), key=lambda fit: fit.agreement)
    say(f"fitted routers agree with the probs mapping's top-k on {worst.agreement:.1%} or more of held-out tokens "
        f"(lowest: layer {worst.layer})")
    return {layer: fit.state for layer, fit in fits.items()}


def save_export_plan(plan: Plan, source: str, folder: Path) -> None:
    """The plan as applied, beside the checkpoint: ``model`` is the source it was applied to."""
    provenance = plan.provenance
    if plan.model and plan.model != source:  # the plan was made on another model; record where it was applied
        provenance = dataclasses.replace(provenance, planned_on=plan.model)
    dataclasses.replace(plan, model=source, provenance=provenance).save(Path(folder) / PLAN_FILENAME)


def directory_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
