"""The generic adapter: a family's router and experts found from the module structure and the config (issue 13).

Most MoE families of transformers 5.x share one shape: in each MoE decoder layer, a block holds a router module
(the class transformers records ``router_logits`` from) whose forward returns ``(logits [N, E], top-k weights
[N, k], top-k ids [N, k])``, and an ``experts`` module whose tensors are stacked on axis 0 over the ``E``
experts (fused ``gate_up_proj`` / ``down_proj`` behind the experts-implementation interface). Correction biases
(``e_score_correction_bias``) and grouped top-k (``n_group`` / ``topk_group``) live in the router and the config.

:class:`DiscoveredAdapter` finds these per model; anything that breaks the shape (an expert-indexed tensor outside
router and experts, a router tensor not indexed by expert, a router that does not return decisions, a layer with
another expert count) is refused with one sentence naming it (:class:`~core.errors.UnsupportedFamilyFeature`),
never guessed at.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from .adapters import Adapter, MoELayer, get_field
from .errors import UnsupportedFamilyFeature

N_EXPERTS_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k", "top_k")
GROUP_FIELDS = (("n_group", "topk_group"), ("num_expert_group", "topk_group"))
SHARED_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")
SUB_CONFIGS = ("text_config",)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _find_field(config: Any, names: tuple[str, ...]) -> str | None:
    """The dotted name of the first of ``names`` set to a positive integer, at the top level or in a text config."""
    for prefix, sub in (("", config), *((f"{a}.", getattr(config, a, None)) for a in SUB_CONFIGS)):
        if sub is None:
            continue
        aliases = getattr(type(sub), "attribute_map", None) or {}
        for name in names:
            if _is_count(getattr(sub, name, None)):
                return prefix + aliases.get(name, name)  # the attribute itself, not transformers' alias of it
    return None


def _list_field(config: Any, names: tuple[str, ...]) -> str | None:
    for prefix, sub in (("", config), *((f"{a}.", getattr(config, a, None)) for a in SUB_CONFIGS)):
        if sub is None:
            continue
        for name in names:
            if isinstance(getattr(sub, name, None), (list, tuple)):
                return prefix + name
    return None


def discover_adapter(config: Any) -> DiscoveredAdapter | None:
    """The generic adapter for ``config``, or None when it names no expert count and top-k (not a MoE config).
    Refuses, in one sentence, expert counts or top-k given per layer as lists."""
    model_type = getattr(config, "model_type", None)
    listed = _list_field(config, N_EXPERTS_FIELDS + TOP_K_FIELDS)
    if listed is not None:
        raise UnsupportedFamilyFeature(
            f"{model_type}: {listed} gives the expert count or top-k per layer as a list; MoEScope's plans, "
            f"profiles and exports assume one expert count and top-k for every MoE layer.")
    n_field, k_field = _find_field(config, N_EXPERTS_FIELDS), _find_field(config, TOP_K_FIELDS)
    if n_field is None or k_field is None:
        return None
    text = config if "." not in n_field else get_field(config, n_field.rsplit(".", 1)[0])
    prefix = n_field.rsplit(".", 1)[0] + "." if "." in n_field else ""
    groups = next(((prefix + g, prefix + t) for g, t in GROUP_FIELDS if _is_count(getattr(text, g, None))), None)
    return DiscoveredAdapter(family=f"{model_type} (discovered)", model_types=(model_type,), n_experts_field=n_field,
                             top_k_field=k_field, group_fields=groups, weights_sorted=False,
                             scoring=_scoring(model_type, text), bias_corrected=_bias_corrected(model_type),
                             shared_expert_attrs=SHARED_ATTRS,
                             weights_semantics="the router's own top-k weights as the block applies them (its "
                                               "scores of the chosen experts, renormalised or scaled where it does)")


def _scoring(model_type: str, text_config: Any) -> str:
    """Whether the family's router scores experts by sigmoid or softmax, read from its router's source code (and,
    where the router does both, the config field that chooses)."""
    chosen = getattr(text_config, "scoring_func", None) or getattr(text_config, "expert_selection_fn", None)
    if chosen in ("sigmoid", "softmax"):
        return chosen
    router = router_class_of(model_type)
    source = inspect.getsource(router.forward) if router is not None else ""
    return "sigmoid" if "sigmoid" in source and "softmax" not in source else "softmax"


def _bias_corrected(model_type: str) -> bool:
    """Whether the family's router chooses on scores plus a correction bias (``e_score_correction_bias``)."""
    router = router_class_of(model_type)
    return router is not None and "e_score_correction_bias" in inspect.getsource(router)


def router_class_of(model_type: str) -> type | None:
    """The router class the family's modeling module records ``router_logits`` from, without building a model."""
    import importlib

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        causal_lm = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        module = importlib.import_module(causal_lm.__module__)
    except (KeyError, AttributeError, ImportError):
        return None
    for value in vars(module).values():
        target = (getattr(value, "_can_record_outputs", None) or {}).get("router_logits") if isinstance(value, type) \
            else None
        cls = getattr(target, "target_class", target)
        if isinstance(cls, type):
            return cls
    return None


@dataclass(frozen=True)
class DiscoveredAdapter(Adapter):
    """An adapter whose layout is found per model: see the module docstring."""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        lists = [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")]
        for layers in lists:
            if count is None or len(layers) == count:
                return layers
        raise UnsupportedFamilyFeature(f"{type(model).__name__} has no list of {count} decoder layers MoEScope "
                                       f"can find.")

    def n_groups(self, config: Any) -> int:
        if self.group_fields is None:
            return 1
        return int(get_field(config, self.group_fields[0]) or 1)

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        router_class = _router_class(model)
        n = self.n_experts(model.config)
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            routers = [(name, m) for name, m in layer.named_modules()
                       if (type(m) is router_class if router_class else name.rsplit(".", 1)[-1] in ("gate", "router"))]
            if not routers:
                continue
            name, router = routers[0]
            block_name = name.rpartition(".")[0]
            block = layer.get_submodule(block_name) if block_name else layer
            experts = getattr(block, "experts", None)
            if experts is None:
                raise UnsupportedFamilyFeature(f"{type(model).__name__} layer {index}: the router {name} has no "
                                               f"experts module beside it; MoEScope prunes stacked experts.")
            _check_layer(model, index, block, router, experts, n)
            found.append(MoELayer(index, block, router, experts))
        return found


def _router_class(model: nn.Module) -> type | None:
    """The class transformers records ``router_logits`` from (None where the model does not say)."""
    for module in model.modules():
        target = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if target is None:
            continue
        index = getattr(target, "index", 0)
        cls = getattr(target, "target_class", target)
        if index != 0:
            raise UnsupportedFamilyFeature(
                f"{type(model).__name__}'s router {cls.__name__} returns its logits at position {index}, not as "
                f"(logits, top-k weights, top-k ids); its routing needs a family adapter MoEScope does not have.")
        return cls if isinstance(cls, type) else None
    return None


def _check_layer(model: nn.Module, index: int, block: nn.Module, router: nn.Module, experts: nn.Module,
                 n: int) -> None:
    """Refuse a layer whose expert-indexed tensors are not all in the router (axis 0) and the experts (axis 0)."""
    where = f"{type(model).__name__} layer {index}"
    extra = [name for name, p in list(inspect.signature(type(router).forward).parameters.items())[2:]
             if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if extra:
        raise UnsupportedFamilyFeature(
            f"{where}: the router {type(router).__name__} takes {', '.join(extra)} from its block besides the hidden "
            f"states; masking replaces the router alone, so MoEScope cannot prune it.")
    for name, tensor in router.state_dict().items():
        if tensor.dim() == 0 or tensor.shape[0] != n and not (tensor.dim() == 2 and tensor.shape == (1, n)):
            raise UnsupportedFamilyFeature(
                f"{where}: the router tensor {name} of shape {tuple(tensor.shape)} is not indexed by the {n} routed "
                f"experts alone (scores of shared experts, a scale, or a token table); MoEScope slices every router "
                f"tensor by expert to prune, so it cannot prune this router.")
    for name, tensor in experts.state_dict().items():
        if tensor.dim() == 0 or tensor.shape[0] != n:
            raise UnsupportedFamilyFeature(
                f"{where}: the experts tensor {name} of shape {tuple(tensor.shape)} has not its {n} experts on "
                f"axis 0 (extra or zero-computation experts); MoEScope cannot slice it.")
    owners = {module: name for name, module in block.named_modules()}
    inside = (owners[router] + ".", owners[experts] + ".", *(a + "." for a in SHARED_ATTRS))
    for name, tensor in block.state_dict().items():
        if not name.startswith(inside) and tensor.dim() == 1 and tensor.shape[0] == n:
            raise UnsupportedFamilyFeature(
                f"{where}: the block holds {name}, indexed by expert, outside the router; masking replaces the "
                f"router alone, so MoEScope cannot prune this family.")
