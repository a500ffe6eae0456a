"""NAEE (Lu et al., ACL 2024): per layer, keep the expert subset that best reconstructs the MoE block's
output, and dynamic skipping of a token's weaker experts at inference.

Subsets are scored exactly as the pruned model would run them: the block module is called on cached
calibration inputs inside ``masked(mm, plan)``, which swaps in the pruned router. Inputs are collected one
layer at a time (a pre-hook on that layer's block captures a bounded, deterministic sample of real tokens and
stops the forward there), so no more than one layer's sample is ever held.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters import MoELayer
from ..errors import MoEScopeError
from ..masking import masked
from ..model import MoEModel
from ..plan import Plan
from .base import SEARCH, Calibration, Described, ProgressFn, Target, finish_plan
from .reap import encode_calibration, forward_calibration, padded_batches


class _Captured(Exception):
    """Raised by the collection hook once the layer's inputs are taken: the rest of the forward is not needed."""


@dataclass
class LayerSearch:
    """The outcome of one layer's subset search."""

    keep: list[int]
    error: float
    reference_norm: float
    scores: np.ndarray
    evaluations: int
    search: str  # "exhaustive" or "greedy"


@dataclass
class NAEE(Described):
    """Keep, per MoE layer, the ``keep``-subset of experts whose masked block output is closest (Frobenius
    norm over sampled calibration tokens) to the unpruned block's. At most ``max_tokens`` real tokens are
    cached per layer: a ``seed``-ed sample, the same tokens in every layer, one layer at a time.

    The search is exhaustive while the number of group-balanced subsets is at most ``max_subsets``;
    beyond that it is greedy backward elimination: each round removes one expert per routing group, the one
    whose removal raises the error least (groups are decided in turn, undecided groups provisionally dropping
    their expert with the least routed gate weight so every evaluated subset stays group-balanced), costing
    about E evaluations per round, so 64-128 experts stay tractable.

    ``progressive`` collects each layer's inputs from the model with the earlier layers already pruned; the
    target stays the original model's block output on the same tokens, as the official ``progressive_pruning``
    (Expert_Sparsity ``method/expert_pruning.py``: Z cached from the unpruned model first, X re-collected per layer). Scores per expert: exhaustive search, minus
    the lowest error of any subset containing it; greedy, the rounds it survived (kept experts survive all).
    """

    label = "NAEE (reconstruction search)"
    kind = SEARCH
    name: str = "naee"
    max_tokens: int = 2048
    max_subsets: int = 5000
    progressive: bool = False
    seed: int = 0
    batch_size: int = 8
    max_length: int = 512

    def plan(self, mm: MoEModel, calibration: Calibration, target: Target,
             progress: ProgressFn | None = None) -> Plan:
        started = time.perf_counter()
        keep = target.experts_kept(mm)
        say = progress or (lambda *_: None)
        seqs = encode_calibration(mm, calibration, self.max_length)
        chosen = sample_tokens(sum(map(len, seqs)), self.max_tokens, self.seed)
        layers: dict[int, list[int]] = {}
        results: dict[int, LayerSearch] = {}
        passes = 0
        for i, layer in enumerate(mm.layers):
            inputs, n = collect_block_inputs(mm, layer, seqs, chosen, self.batch_size, None)
            passes += n
            original = None
            if self.progressive and layers:  # official progressive_pruning: candidates run on the pruned model's
                original = inputs  # inputs, the target stays the original model's cached block output (Z)
                done = Plan(layers=dict(layers), top_k=target.top_k)
                inputs, n = collect_block_inputs(mm, layer, seqs, chosen, self.batch_size, done)
                passes += n

            def report(what: str, frac: float, i: int = i, layer: MoELayer = layer) -> None:
                say(f"NAEE layer {layer.index}: {what}", (i + frac) / len(mm.layers))

            results[layer.index] = search_layer(mm, layer, inputs, keep, target.top_k, self.max_subsets, report,
                                                reference_inputs=original)
            layers[layer.index] = results[layer.index].keep
            del inputs, original
        return finish_plan(mm, layers, target, self.name, self.parameters(), calibration, started, passes,
                           seed=self.seed,
                           scores={str(k): [float(x) for x in r.scores] for k, r in results.items()},
                           **search_extra(results))


def search_extra(results: dict[int, LayerSearch]) -> dict[str, Any]:
    """What the plan records of the search, per layer (string keys, as JSON keeps them)."""
    return {
        "reconstruction_error": {str(k): r.error for k, r in results.items()},
        "relative_error": {str(k): r.error / r.reference_norm if r.reference_norm else 0.0
                           for k, r in results.items()},
        "search": {str(k): r.search for k, r in results.items()},
        "evaluations": {str(k): r.evaluations for k, r in results.items()},
    }


def sample_tokens(total: int, max_tokens: int, seed: int) -> np.ndarray:
    """Sorted indices (in batch order over real tokens) of the tokens to cache: all, or a seeded sample."""
    if total <= max_tokens:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, max_tokens, replace=False))


def collect_block_inputs(mm: MoEModel, layer: MoELayer, seqs: list[list[int]], chosen: np.ndarray,
                         batch_size: int, plan: Plan | None) -> tuple[torch.Tensor, int]:
    """The MoE block's inputs [n, H] for the ``chosen`` real tokens, with ``plan`` masked in; the forward
    stops at the block. Returns the inputs and the number of examples run."""
    parts: list[torch.Tensor] = []
    state: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))
        flat = hidden.reshape(-1, hidden.shape[-1])[state["valid"].to(hidden.device)]
        parts.append(flat[torch.as_tensor(state["local"], device=flat.device)].detach().clone())
        raise _Captured

    handle = layer.block.register_forward_pre_hook(hook, with_kwargs=True)
    offset, examples = 0, 0
    try:
        with masked(mm, plan), torch.inference_mode():
            for lo, (batch, valid) in zip(range(0, len(seqs), batch_size), padded_batches(mm, seqs, batch_size)):
                n_valid = int(valid.sum())
                local = chosen[(chosen >= offset) & (chosen < offset + n_valid)] - offset
                offset += n_valid
                if not len(local):
                    continue
                state.update(valid=valid, local=local)
                examples += len(seqs[lo:lo + batch_size])
                try:
                    mm.model(**batch)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return torch.cat(parts), examples


def block_output(layer: MoELayer, inputs: torch.Tensor) -> torch.Tensor:
    """The block's output [n, H] for token inputs [n, H] (blocks are per token; some also return logits)."""
    out = layer.block(inputs.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, inputs.shape[-1]).float()


def search_layer(mm: MoEModel, layer: MoELayer, inputs: torch.Tensor, keep: int, top_k: int | None,
                 max_subsets: int, progress: ProgressFn, reference_inputs: torch.Tensor | None = None) -> LayerSearch:
    """The group-balanced ``keep``-subset of this layer's experts with the smallest reconstruction error: the
    distance between the unpruned block's output on ``reference_inputs`` (default ``inputs``: the same tokens) and
    the pruned block's on ``inputs``."""
    n, groups = mm.n_experts, mm.routing_spec().n_groups
    size, per_group = n // groups, keep // groups
    members = [list(range(g * size, (g + 1) * size)) for g in range(groups)]
    mass = torch.zeros(n, dtype=torch.float64)

    def note_mass(module: Any, args: tuple, output: Any) -> None:
        ids, weights = mm.adapter.decisions(output, layer, mm.top_k)
        mass.index_add_(0, ids.reshape(-1).cpu(), weights.reshape(-1).double().cpu())

    with mm.lock, torch.inference_mode():
        handle = layer.router.register_forward_hook(note_mass)
        try:
            reference = block_output(layer, inputs if reference_inputs is None else reference_inputs)
        finally:
            handle.remove()
        errors: dict[tuple[int, ...], float] = {}

        def evaluate(subset: list[int]) -> float:
            key = tuple(sorted(subset))
            if key not in errors:
                with masked(mm, Plan(layers={layer.index: list(key)}, top_k=top_k)):
                    errors[key] = float(torch.linalg.norm(reference - block_output(layer, inputs)))
            return errors[key]

        count = math.comb(size, per_group) ** groups
        if count <= max_subsets:
            best, error, scores = _exhaustive(evaluate, members, per_group, n, count, progress)
            search = "exhaustive"
        else:
            best, error, scores = _greedy(evaluate, members, per_group, mass.numpy(), progress)
            search = "greedy"
    return LayerSearch(best, error, float(torch.linalg.norm(reference)), scores, len(errors), search)


def _exhaustive(evaluate: Callable[[list[int]], float], members: list[list[int]], per_group: int, n: int,
                count: int, progress: ProgressFn) -> tuple[list[int], float, np.ndarray]:
    """Every group-balanced subset; score = minus the lowest error of any subset containing the expert."""
    best: list[int] = []
    best_error = math.inf
    lowest = np.full(n, math.inf)
    for i, parts in enumerate(itertools.product(*(itertools.combinations(g, per_group) for g in members))):
        subset = sorted(e for part in parts for e in part)
        error = evaluate(subset)
        if error < best_error:
            best, best_error = subset, error
        lowest[subset] = np.minimum(lowest[subset], error)
        if i % 64 == 0:
            progress("exhaustive search", i / count)
    return best, best_error, 0.0 - lowest


def _greedy(evaluate: Callable[[list[int]], float], members: list[list[int]], per_group: int, mass: np.ndarray,
            progress: ProgressFn) -> tuple[list[int], float, np.ndarray]:
    """Backward elimination, one expert per group per round; score = rounds the expert survived."""
    kept = [list(g) for g in members]
    survived = np.zeros(sum(map(len, members)))
    rounds = len(kept[0]) - per_group
    error = math.inf if rounds else evaluate([e for g in kept for e in g])
    for r in range(rounds):
        removal = [min(g, key=lambda e: (mass[e], e)) for g in kept]  # provisional for undecided groups
        for gi, group in enumerate(kept):
            trials = []
            for e in group:
                trial = removal[:gi] + [e] + removal[gi + 1:]
                trials.append((evaluate([x for g in kept for x in g if x not in trial]), e))
            error, removal[gi] = min(trials)
        for gi, e in enumerate(removal):
            kept[gi].remove(e)
        survived[[e for g in kept for e in g]] += 1
        progress("greedy elimination", (r + 1) / rounds)
    return sorted(e for g in kept for e in g), error, survived


@dataclass
class DynamicSkipping(NAEE):
    """NAEE dynamic skipping: per layer, skip a token's chosen expert when its gate weight is below beta
    times the strongest one's, beta = the median over calibration tokens of g_k / g_1 (g sorted descending,
    k the top-k routed with: g_2/g_1 for top-2; for top-k > 2 the weakest chosen over the strongest, so about
    half the tokens drop at least their weakest expert).

    With a target that keeps every expert the plan only adds the betas. A target that prunes is met with
    :class:`NAEE` first (these parameters), and the betas are measured on the pruned model, whose gate
    weights are what inference will compare. Such plans are for masked evaluation: export refuses
    ``dynamic_skip``.
    """

    label = "NAEE + dynamic skipping"
    name: str = "dynamic_skip"

    def plan(self, mm: MoEModel, calibration: Calibration, target: Target,
             progress: ProgressFn | None = None) -> Plan:
        started = time.perf_counter()
        spec = mm.routing_spec()
        if not spec.skippable:
            raise MoEScopeError(f"{spec.family} routers cannot skip experts dynamically (MoEScope masks skipping "
                                f"only in routers that return their top-k decisions); use naee or another method.")
        top_k = target.top_k or mm.top_k
        if top_k < 2:
            raise MoEScopeError(f"Dynamic skipping drops the weaker of a token's chosen experts, so it needs "
                                f"top-k of at least 2, not {top_k}.")
        extra: dict[str, Any] = {}
        layers: dict[int, list[int]] = {}
        passes = 0
        if target.experts_kept(mm) < mm.n_experts:
            naee = NAEE(**self.get_params())  # same parameters
            pruned = naee.plan(mm, calibration, target, progress)
            layers, passes = pruned.layers, pruned.extra["forward_passes"]
            extra = {k: pruned.extra[k] for k in
                     ("scores", "reconstruction_error", "relative_error", "search", "evaluations")}
        seqs = encode_calibration(mm, calibration, self.max_length)
        ratios = gate_ratios(mm, seqs, self.batch_size, Plan(layers=layers, top_k=target.top_k), progress)
        betas = {str(k): float(np.median(v)) for k, v in ratios.items()}
        return finish_plan(mm, layers, target, self.name, self.parameters(), calibration, started, passes + len(seqs),
                           seed=self.seed, dynamic_skip=betas, **extra)


def gate_ratios(mm: MoEModel, seqs: list[list[int]], batch_size: int, plan: Plan,
                progress: ProgressFn | None = None) -> dict[int, np.ndarray]:
    """Per MoE layer, g_k / g_1 for every real calibration token, with ``plan`` masked in."""
    ratios: dict[int, list[np.ndarray]] = {layer.index: [] for layer in mm.layers}
    state: dict[str, torch.Tensor] = {}

    def router_hook(layer: MoELayer):
        def hook(module: Any, args: tuple, output: Any) -> None:
            _, weights = mm.adapter.decisions(output, layer, mm.effective_top_k)
            weights = weights[state["valid"].to(weights.device)].double()
            ratios[layer.index].append((weights[:, -1] / weights[:, 0]).cpu().numpy())
        return hook

    handles = [layer.router.register_forward_hook(router_hook(layer)) for layer in mm.layers]
    forward_calibration(mm, seqs, batch_size, state, handles, "gate weight ratios", progress, plan)
    return {k: np.concatenate(v) for k, v in ratios.items()}
