"""Where each MoE family keeps its router and experts: the one place in MoEScope that knows.

Everything else (recording, masking, export) asks an :class:`Adapter` for the MoE layers of a model and
for the routing decisions in a router's output, so supporting a new family means adding one entry here.
Facts per family were checked against the installed transformers' modeling files (see the README).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .errors import MoEScopeError

RouterOutput = Literal["decisions", "scores", "logits"]


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a model; ``index`` is the decoder layer's real index (dense layers counted)."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


@dataclass(frozen=True)
class Adapter:
    """How one model family lays out its MoE blocks.

    ``router_output`` says what the router's forward returns:
    ``decisions``: ``(logits [N, E], top-k weights [N, k], top-k ids [N, k])`` (most families);
    ``scores``: ``(scores [N, E], logits [N, E])`` with the applied weight in ``scores`` (Llama4);
    ``logits``: logits only, the block routes them itself (DBRX).
    """

    family: str
    model_types: tuple[str, ...]
    n_experts_field: str
    top_k_field: str | None
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    layers_path: str = "model.layers"
    router_output: RouterOutput = "decisions"
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    shared_expert_attrs: tuple[str, ...] = ()
    # Routers whose choice uses a correction bias (names of router tensors indexed by expert).
    bias_corrected: bool = False
    # Config fields (number of groups, groups chosen per token) for grouped routing, if the family has it.
    group_fields: tuple[str, str] | None = None
    # Block attribute the block itself reads top-k from at forward time (DBRX routes in the block).
    block_top_k_attr: str | None = None
    fixed_top_k: int | None = None
    # Whether the router already returns its top-k largest weight first (then recording skips a sort).
    weights_sorted: bool = True
    # What the recorded gate weights are: the values the block multiplies into (or, Llama4, before) experts.
    weights_semantics: str = ""

    # ----- structure -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        obj: Any = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The MoE blocks in model order, dense layers skipped but counted in ``index``."""
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.block_attr, None)
            router = getattr(block, self.router_attr, None) if block is not None else None
            experts = getattr(block, self.experts_attr, None) if block is not None else None
            if router is not None and experts is not None:
                found.append(MoELayer(index, block, router, experts))
        return found

    def n_experts(self, config: Any) -> int:
        return int(get_field(config, self.n_experts_field))

    def top_k(self, config: Any) -> int:
        if self.fixed_top_k is not None:
            return self.fixed_top_k
        return int(get_field(config, self.top_k_field))

    def n_groups(self, config: Any) -> int:
        """Expert groups the router chooses among (1 when routing is not grouped)."""
        if self.group_fields is None:
            return 1
        if getattr(config, "topk_method", "group_limited_greedy") != "group_limited_greedy":
            return 1
        return int(getattr(config, self.group_fields[0], None) or 1)

    def shared_experts(self, layer: MoELayer) -> list[str]:
        return [a for a in self.shared_expert_attrs if getattr(layer.block, a, None) is not None]

    # ----- routing decisions -----------------------------------------------------------------
    def decisions(self, output: Any, layer: MoELayer, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [N, k] in rank order and the gate weights [N, k] the block applies to them."""
        if self.router_output == "decisions":
            _, weights, ids = output
        elif self.router_output == "scores":
            scores, logits = output
            ids = torch.topk(logits, top_k, dim=-1).indices
            weights = scores.gather(1, ids)
        else:
            weights, ids = layer.block.route_tokens_to_experts(output)
        if self.weights_sorted:
            return ids, weights
        # Rank order means largest applied weight first; these routers choose in another order
        # (unsorted top-k, or a biased choice score).
        order = torch.argsort(weights.float(), dim=-1, descending=True, stable=True)
        return ids.gather(1, order), weights.gather(1, order)

    def logits(self, output: Any) -> torch.Tensor:
        if self.router_output == "decisions":
            return output[0]
        if self.router_output == "scores":
            return output[1]
        return output

    def probabilities(self, output: Any) -> torch.Tensor:
        """Router probabilities over all experts, before any top-k, bias or grouping."""
        logits = self.logits(output).float()
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def router_expert_dim(self, name: str, tensor: torch.Tensor) -> int:
        """Axis of a router tensor that is indexed by expert ([E, H] weights, [E] biases, ERNIE's [1, E])."""
        return 1 if tensor.dim() == 2 and tensor.shape[0] == 1 else 0


def get_field(config: Any, dotted: str) -> Any:
    obj = config
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_field(config: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    obj = config
    for part in parents:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


_ADAPTERS: list[Adapter] = [
    Adapter("Mixtral", ("mixtral",), "num_local_experts", "num_experts_per_tok", weights_semantics="softmax probabilities of the chosen experts, renormalised to sum to 1"),
    Adapter("Qwen2-MoE", ("qwen2_moe",), "num_experts", "num_experts_per_tok",
            shared_expert_attrs=("shared_expert",), weights_semantics="softmax probabilities of the chosen experts, renormalised if norm_topk_prob"),
    Adapter("Qwen3-MoE", ("qwen3_moe",), "num_experts", "num_experts_per_tok", weights_semantics="softmax probabilities of the chosen experts, renormalised if norm_topk_prob"),
    Adapter("Qwen3-Next", ("qwen3_next",), "num_experts", "num_experts_per_tok",
            shared_expert_attrs=("shared_expert",), weights_semantics="softmax probabilities of the chosen experts, renormalised if norm_topk_prob"),
    Adapter("OLMoE", ("olmoe",), "num_experts", "num_experts_per_tok", weights_semantics="softmax probabilities of the chosen experts, renormalised if norm_topk_prob"),
    Adapter("DeepSeek-V2", ("deepseek_v2",), "n_routed_experts", "num_experts_per_tok",
            shared_expert_attrs=("shared_experts",), group_fields=("n_group", "topk_group"),
            weights_semantics="softmax probabilities of the chosen experts times routed_scaling_factor",
            weights_sorted=False),
    Adapter("DeepSeek-V3", ("deepseek_v3",), "n_routed_experts", "num_experts_per_tok",
            scoring="sigmoid", shared_expert_attrs=("shared_experts",), bias_corrected=True,
            group_fields=("n_group", "topk_group"),
            weights_semantics="sigmoid scores of the chosen experts, renormalised if norm_topk_prob, "
                              "times routed_scaling_factor",
            weights_sorted=False),
    Adapter("GLM4-MoE", ("glm4_moe",), "n_routed_experts", "num_experts_per_tok", scoring="sigmoid",
            shared_expert_attrs=("shared_experts",), bias_corrected=True, group_fields=("n_group", "topk_group"),
            weights_semantics="sigmoid scores of the chosen experts, renormalised if norm_topk_prob, "
                              "times routed_scaling_factor",
            weights_sorted=False),
    Adapter("ERNIE-4.5-MoE", ("ernie4_5_moe",), "moe_num_experts", "moe_k",
            shared_expert_attrs=("shared_experts",), bias_corrected=True,
            weights_semantics="softmax probabilities of the chosen experts renormalised (sum clamped at moe_norm_min)",
            weights_sorted=False),
    Adapter("Hunyuan-MoE", ("hunyuan_v1_moe",), "num_experts", "moe_topk", shared_expert_attrs=("shared_mlp",),
            weights_semantics="softmax probabilities of the chosen experts, renormalised to sum to 1"),
    Adapter("PhiMoE", ("phimoe",), "num_local_experts", None, router_attr="router", fixed_top_k=2,
            weights_semantics="sparsemixer multipliers", weights_sorted=False),
    Adapter("GraniteMoe", ("granitemoe",), "num_local_experts", "num_experts_per_tok",
            block_attr="block_sparse_moe", router_attr="router",
            weights_semantics="softmax over the top-k logits"),
    Adapter("gpt-oss", ("gpt_oss",), "num_local_experts", "num_experts_per_tok", router_attr="router",
            weights_semantics="softmax over the top-k logits (router bias included)"),
    Adapter("Jamba", ("jamba",), "num_experts", "num_experts_per_tok", block_attr="feed_forward",
            router_attr="router", weights_semantics="softmax probabilities of the chosen experts, not renormalised"),
    Adapter("Llama4", ("llama4_text",), "num_local_experts", "num_experts_per_tok", block_attr="feed_forward",
            router_attr="router", router_output="scores", scoring="sigmoid", shared_expert_attrs=("shared_expert",),
            weights_semantics="sigmoid of the chosen logits; Llama4 scales the expert *input* by it"),
    Adapter("DBRX", ("dbrx",), "ffn_config.moe_num_experts", "ffn_config.moe_top_k", block_attr="ffn",
            router_attr="router", layers_path="transformer.blocks", router_output="logits",
            block_top_k_attr="top_k",
            weights_semantics="softmax probabilities of the chosen experts, p-normalised if moe_normalize_expert_weights"),
]

_BY_MODEL_TYPE = {mt: a for a in _ADAPTERS for mt in a.model_types}


def supported_families() -> list[str]:
    return [a.family for a in _ADAPTERS]


def adapter_for_config(config: Any) -> Adapter:
    """The adapter for a transformers config: the family's own, else one discovered from the module structure
    (``core.adapter_discovery``); a family with a feature MoEScope cannot handle is refused in one sentence
    (``core.families.REFUSED``), and a config that is no MoE at all gets a sentence naming what is supported."""
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is not None:
        return adapter
    from .adapter_discovery import discover_adapter
    from .families import refuse_if_unsupported

    refuse_if_unsupported(model_type)
    found = discover_adapter(config) or _discover_from_default_config(model_type)
    if found is None:
        raise MoEScopeError(
            f"Model type {model_type!r} is not a supported MoE family; supported: "
            f"{', '.join(supported_families())} and the families whose router and experts MoEScope discovers "
            f"(docs/families.md)."
        )
    return found


@functools.cache
def _discover_from_default_config(model_type: Any) -> Adapter | None:
    """The generic adapter from the family's default config (for a raw config.json read before transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .adapter_discovery import discover_adapter

    try:
        default = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - unknown model type or a config class that needs arguments: nothing found
        return None
    return discover_adapter(default)


def adapter_for_model(model: nn.Module) -> Adapter:
    """The adapter for a loaded model; refuses models in which no MoE layer is found."""
    adapter = adapter_for_config(model.config)
    try:
        layers = adapter.moe_layers(model)
    except AttributeError:
        layers = []
    if not layers:
        raise MoEScopeError(
            f"{type(model).__name__} has no MoE layer MoEScope can find; it works on MoE causal LMs of the "
            f"families {', '.join(supported_families())}."
        )
    return adapter
