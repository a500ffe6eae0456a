"""A plain linear router for a plan merged under the paper's probs mapping, so it can be exported.

Under ``router_mapping = "probs"`` the merged model routes on ``p' = R · softmax(W x)`` (``core.router_mapping``),
which no linear router computes exactly. The official EEP code never exports merged models; MoEScope fits, per
merged layer, a logit-space router ``W' x (+ b')`` [kept, H] by least squares on ``log p'`` over router inputs
collected from the merged model on calibration text, and measures on held-out tokens how often its top-k set equals
the probs mapping's. A fit that agrees less than ``min_agreement`` is refused.

Why this fit: softmax ignores a per-token constant, so the target is ``log p'`` minus its mean over the kept slots
(the fitted logits need only match ``log p'`` up to that constant, and a linear router cannot produce arbitrary
per-token constants anyway). With one-hot R the target is exactly linear in x (the kept rows of W x, centred), so
the fit is exact and agreement is 1. A zero or negative ``p'`` (R may have negative entries) is fitted as
``RELATIVE_FLOOR`` times the token's largest, or the token's smallest positive ``p'`` if that is lower: such slots
are far from the top-k, and a fixed floor far below (log 1e-13) would dominate the squares. A linear router
reproduces the probs mapping of a real-valued R only roughly (measured in docs/methods.md), which is why the
agreement is reported and a threshold refuses poor fits.

Export's call (``core.export``), for a plan with ``plan.mapping == "probs"`` and merge matrices::

    fits = fit_plan_routers(mm, plan, texts=None, min_agreement=threshold)  # texts None: the plan's calibration
    router_state = fits[layer.index].state  # in place of mapped_router_state(...) for that merged layer
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import MoEScopeError
from .masking import masked
from .model import MoEModel
from .plan import Plan
from .router_mapping import PROBS, mapped_probs

RELATIVE_FLOOR = 1e-3  # a non-positive p' is fitted as this share of the token's largest
DEFAULT_MIN_AGREEMENT = 0.95  # held-out tokens whose fitted top-k set equals the probs mapping's


@dataclass
class RouterFit:
    """One merged layer's fitted router and how well it agrees with the probs mapping."""

    layer: int
    state: dict[str, torch.Tensor]  # the router's expert-indexed tensors over the kept slots, keyed as state_dict
    agreement: float  # held-out tokens whose top-k set equals the probs mapping's
    fit_tokens: int
    held_out_tokens: int

    def report(self) -> dict[str, float | int]:
        return {"top_k_agreement": self.agreement, "fit_tokens": self.fit_tokens,
                "held_out_tokens": self.held_out_tokens}


def fit_logit_router(mm: MoEModel, layer: int, mapping: torch.Tensor, inputs: torch.Tensor, top_k: int,
                     held_out: float = 0.25, seed: int = 0) -> RouterFit:
    """Fit layer ``layer``'s router to ``log(R · softmax(router(x)))`` on ``inputs`` [N, H] (router inputs of the
    merged model), holding out a ``seed``-ed ``held_out`` share of tokens to measure top-k agreement."""
    router = mm.layer(layer).router
    names = _expert_tensors(mm, router)
    with torch.no_grad():
        logits = mm.adapter.logits(router(inputs)).float()
        mapped = mapped_probs(logits, mapping)
    positive = torch.where(mapped > 0, mapped, torch.full_like(mapped, float("inf")))
    floor = torch.minimum(RELATIVE_FLOOR * mapped.amax(dim=1, keepdim=True), positive.amin(dim=1, keepdim=True))
    target = torch.where(mapped > 0, mapped, floor.clamp(min=1e-38)).log().double()
    target = target - target.mean(dim=1, keepdim=True)
    order = np.random.default_rng(seed).permutation(len(inputs))
    n_test = max(1, round(held_out * len(inputs))) if len(inputs) > 1 else 0
    test, train = torch.as_tensor(order[:n_test]), torch.as_tensor(order[n_test:])
    x = inputs.double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if "bias" in names else x
    solution = torch.linalg.lstsq(design[train], target[train], driver="gelsd").solution  # [H(+1), kept]
    weight_name = names["weight"]
    dtype = router.state_dict()[weight_name].dtype
    state = {weight_name: solution[: x.shape[1]].T.contiguous().to(dtype)}
    if "bias" in names:
        state[names["bias"]] = solution[x.shape[1]].contiguous().to(dtype)
    fitted = design[test] @ solution
    k = min(top_k, mapped.shape[1])
    same = [set(a) == set(b) for a, b in zip(fitted.topk(k, dim=1).indices.tolist(),
                                             mapped[test].topk(k, dim=1).indices.tolist())]
    return RouterFit(layer, state, float(np.mean(same)) if same else 0.0, len(train), len(test))


def collect_router_inputs(mm: MoEModel, plan: Plan, texts: list[str], max_tokens: int = 4096,
                          max_length: int = 512, seed: int = 0) -> dict[int, torch.Tensor]:
    """The inputs [n, H] each merged layer's router sees when ``plan`` runs on ``texts`` (real tokens only, at
    most ``max_tokens`` per layer, a ``seed``-ed sample)."""
    tok = mm.tokenizer
    if tok is None:
        raise MoEScopeError(f"{mm.source} has no tokenizer; fitting a router needs one to read calibration text.")
    layers = [layer for layer in mm.layers if layer.index in plan.merge]
    seen: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    handles = [layer.router.register_forward_pre_hook(
        lambda module, args, index=layer.index: seen[index].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for layer in layers]
    try:
        with masked(mm, plan), torch.inference_mode():
            for text in texts:  # one text at a time: no padding tokens among the inputs
                ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
                mm.model(input_ids=ids.to(mm.device))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for index, parts in seen.items():
        if not parts:
            raise MoEScopeError("No calibration text reached the merged layers; give some calibration text.")
        rows = torch.cat(parts).float().cpu()
        if len(rows) > max_tokens:
            rows = rows[torch.as_tensor(np.sort(np.random.default_rng(seed).choice(len(rows), max_tokens, False)))]
        out[index] = rows
    return out


def fit_plan_routers(mm: MoEModel, plan: Plan, texts: list[str] | None = None,
                     min_agreement: float = DEFAULT_MIN_AGREEMENT, max_tokens: int = 4096,
                     seed: int = 0) -> dict[int, RouterFit]:
    """Fitted routers of every merged layer of a probs-mapped plan, refused in one sentence where one agrees with
    the probs mapping on fewer than ``min_agreement`` of the held-out tokens. ``texts`` default to the plan's
    calibration split (its provenance)."""
    if plan.mapping != PROBS or not plan.merge:
        raise MoEScopeError("Only a merging plan with router_mapping probs needs a fitted router.")
    if texts is None:
        texts = _calibration_texts(plan)
    inputs = collect_router_inputs(mm, plan, texts, max_tokens=max_tokens, seed=seed)
    top_k = plan.top_k or mm.top_k
    fits = {}
    for layer, (router_map, _) in sorted(plan.merge.items()):
        fit = fit_logit_router(mm, layer, router_map, inputs[layer], top_k, seed=seed)
        if fit.agreement < min_agreement:
            raise MoEScopeError(f"Layer {layer}: a linear router reproduces the probs mapping's top-{top_k} choice on "
                                f"only {fit.agreement:.1%} of {fit.held_out_tokens} held-out tokens (threshold "
                                f"{min_agreement:.1%}); lower the agreement threshold or search with "
                                f"router_mapping=logits.")
        fits[layer] = fit
    return fits


def _calibration_texts(plan: Plan) -> list[str]:
    from .methods.base import (
        Calibration,  # methods import the engine, not the other way round at import time
    )

    calibration = plan.provenance.calibration
    if not calibration or not calibration.get("task"):
        raise MoEScopeError("This plan records no calibration task; give calibration text to fit its routers.")
    return Calibration.of(calibration["task"], calibration.get("split") or "calibration",
                          calibration.get("limit")).texts()


def _expert_tensors(mm: MoEModel, router: torch.nn.Module) -> dict[str, str]:
    """The router's expert-indexed weight (and bias) names; other tensors (a selection bias) cannot be fitted."""
    names = {}
    for name, tensor in router.state_dict().items():
        leaf = name.rpartition(".")[2]
        if leaf in ("weight", "bias") and tensor.shape[mm.adapter.router_expert_dim(name, tensor)] == mm.n_experts:
            names[leaf] = name
        else:
            raise MoEScopeError(f"{mm.adapter.family} routers hold {name!r}, which a fitted router cannot set; "
                                f"export this plan with router_mapping=logits.")
    if "weight" not in names:
        raise MoEScopeError(f"{mm.adapter.family} routers have no weight matrix to fit.")
    return names
