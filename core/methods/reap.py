"""REAP (Lasby et al. 2025): prune the experts whose routed contribution is smallest.

Saliency ``S_j = mean over tokens x routed to j of g_j(x) * ||f_j(x)||_2``, with ``f_j(x)`` expert j's own output
before weighting and ``g_j`` the router's gate value as the official code takes it (CerebrasResearch/reap
``src/reap/main.py``: ``renormalize_router_weights = getattr(model.config, "norm_topk_prob", False) and
obs_args.renormalize_router_weights``, the flag defaulting to False in ``src/reap/args.py``): for softmax routers the
softmax probability over all experts of a chosen expert, not renormalised over the top-k (so on Mixtral, whose
config has no ``norm_topk_prob``, never), renormalised only with ``renormalize`` and a config whose
``norm_topk_prob`` is true; sigmoid routers keep the weight the block applies. One
calibration pass collects it without keeping activations: per layer, a router hook notes the routing, a
pre-hook on the (fused) experts module re-runs that module once per expert on just the tokens routed to it,
with weight 1, so ``f_j`` is computed by the model's own code for every fused layout and experts
implementation; only running sums and counts [E] per layer are kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters import MoELayer
from ..errors import MoEScopeError
from ..masking import masked
from ..model import MoEModel
from ..plan import Plan
from .base import Calibration, ExpertScores, ProgressFn, ScoredMethod


def encode_calibration(mm: MoEModel, calibration: Calibration, max_length: int) -> list[list[int]]:
    """Token ids of every calibration text (truncated to ``max_length``), shortest first so batches pad little."""
    tok = mm.tokenizer
    if tok is None:
        raise MoEScopeError(f"{mm.source} has no tokenizer; calibration needs one to turn texts into tokens.")
    texts = calibration.texts()
    if not texts:
        raise MoEScopeError("The calibration split has no examples; give a task with calibration data.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    seqs = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    return sorted(seqs, key=len)


def padded_batches(mm: MoEModel, seqs: list[list[int]],
                   batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Right-padded model inputs per batch, with the [B*L] mask of real (non-padding) token rows: MoE blocks
    see the batch flattened in that order."""
    tok = mm.tokenizer
    tok.padding_side = "right"
    device = next(mm.model.parameters()).device
    for lo in range(0, len(seqs), batch_size):
        batch = tok.pad({"input_ids": seqs[lo:lo + batch_size]}, return_tensors="pt").to(device)
        yield batch, batch["attention_mask"].reshape(-1).bool()


def forward_calibration(mm: MoEModel, seqs: list[list[int]], batch_size: int, state: dict[str, torch.Tensor],
                        handles: list[Any], label: str, progress: ProgressFn | None = None,
                        plan: Plan | None = None) -> None:
    """Run the calibration sequences through the model (``plan`` masked in) with hooks attached, keeping
    ``state["valid"]`` the current batch's mask of real tokens for them; the hooks are removed afterwards."""
    try:
        with masked(mm, plan), torch.inference_mode():
            for i, (batch, valid) in enumerate(padded_batches(mm, seqs, batch_size)):
                state["valid"] = valid
                mm.model(**batch)
                if progress:
                    progress(label, min(1.0, (i + 1) * batch_size / len(seqs)))
    finally:
        for handle in handles:
            handle.remove()


def refuse_input_scaled_experts(mm: MoEModel, method: str) -> None:
    """Llama4 multiplies the gate into the expert *input*, so its experts module cannot be asked for f_j(x)."""
    if mm.adapter.router_output == "scores":
        raise MoEScopeError(f"{method} does not support {mm.adapter.family} yet: its experts scale their input by "
                            f"the gate weight, so an expert's own output f_j(x) is not what the block adds; use "
                            f"another method (frequency, soft_activation, naee).")


@dataclass
class REAP(ScoredMethod):
    """Keep the experts with the largest mean gated output norm on the tokens routed to them (REAP saliency);
    an expert no calibration token reaches scores 0. Same count per layer; top-k only changes if the target
    asks."""

    label = "REAP saliency"
    name: str = "reap"
    batch_size: int = 8
    max_length: int = 512
    renormalize: bool = False  # official renormalize_router_weights (only where the config's norm_topk_prob is true)

    def expert_scores(self, mm: MoEModel, calibration: Calibration,
                      progress: ProgressFn | None = None) -> ExpertScores:
        started = time.perf_counter()
        refuse_input_scaled_experts(mm, "REAP")
        seqs = encode_calibration(mm, calibration, self.max_length)
        renormalise = self.renormalize and bool(getattr(mm.config, "norm_topk_prob", False))
        sums, counts = saliency_sums(mm, seqs, self.batch_size, progress, renormalise)
        scores = {layer: np.divide(sums[layer], counts[layer], out=np.zeros_like(sums[layer]),
                                   where=counts[layer] > 0) for layer in sums}
        return ExpertScores(scores, len(seqs), time.perf_counter() - started,
                            {"routed_tokens": {str(k): [int(c) for c in v] for k, v in counts.items()}})


def saliency_sums(mm: MoEModel, seqs: list[list[int]], batch_size: int, progress: ProgressFn | None = None,
                  renormalise: bool = False) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per MoE layer: sum over routed real tokens of g_j(x)·||f_j(x)||_2, and the number of such tokens, [E] each
    (g_j: see the module's docstring)."""
    n = mm.n_experts
    sums = {layer.index: torch.zeros(n, dtype=torch.float64) for layer in mm.layers}
    counts = {layer.index: torch.zeros(n, dtype=torch.int64) for layer in mm.layers}
    state: dict[str, Any] = {"valid": None, "routing": {}}

    def router_hook(layer: MoELayer):
        def hook(module: Any, args: tuple, output: Any) -> None:
            ids, weights = mm.adapter.decisions(output, layer, mm.effective_top_k)
            if mm.adapter.scoring == "softmax":  # the official gate: softmax over all experts at the chosen ones
                weights = mm.adapter.probabilities(output).gather(1, ids.to(torch.long))
                if renormalise:
                    weights = weights / weights.sum(dim=-1, keepdim=True)
            state["routing"][layer.index] = ids, weights
        return hook

    def experts_pre_hook(layer: MoELayer):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else next(iter(kwargs.values()))
            ids, weights = state["routing"].pop(layer.index)
            valid = state["valid"].to(ids.device)
            x = hidden.reshape(-1, hidden.shape[-1])[valid.to(hidden.device)]
            ids, weights = ids[valid], weights[valid]
            for expert in torch.unique(ids).tolist():
                rows, slot = (ids == expert).nonzero(as_tuple=True)
                index = torch.full((len(rows), 1), expert, dtype=ids.dtype, device=ids.device)
                ones = torch.ones((len(rows), 1), dtype=x.dtype, device=x.device)
                # .forward, not __call__: this very pre-hook must not fire again on the re-run.
                out = module.forward(x[rows.to(x.device)], index, ones)
                norms = out.reshape(len(rows), -1).float().norm(dim=-1).to(weights.device)
                gated = (weights[rows, slot].float() * norms).sum()
                sums[layer.index][expert] += gated.double().cpu()
                counts[layer.index][expert] += len(rows)
        return hook

    handles = []
    for layer in mm.layers:
        handles.append(layer.router.register_forward_hook(router_hook(layer)))
        handles.append(layer.experts.register_forward_pre_hook(experts_pre_hook(layer), with_kwargs=True))
    forward_calibration(mm, seqs, batch_size, state, handles, "REAP saliency", progress)
    return ({k: v.numpy() for k, v in sums.items()}, {k: v.numpy() for k, v in counts.items()})
