"""Which MoE families the installed transformers has, and how MoEScope handles each (issue 13).

The families are found from the library, never listed here: every causal-LM model type whose default config
counts experts (``moe_model_types``). Each is handled by its explicit adapter (``core.adapters``), by the adapter
discovered from its module structure (``core.adapter_discovery``), or refused with one sentence naming the feature
(``REFUSED``). ``UNVERIFIED`` names the families whose tiny model the test suite cannot build or check yet (each
a strict xfail in tests/test_families.py). ``family_rows`` is what docs/families.md shows
(``python -m core.families_table``).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any

from .errors import UnsupportedFamilyFeature

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                       "num_routed_experts")
SUB_CONFIGS = ("text_config", "ffn_config")

_TAKES_BLOCK_BIAS = ("its router takes the expert-selection bias (e_score_correction_bias / expert_bias) from its "
                     "MoE block as an argument; MoEScope masks by replacing the router alone and exports router and "
                     "experts, so the block's bias would keep the pruned experts' slots.")
_ROUTER_NOT_DECISIONS = ("its router does not return (logits, top-k weights, top-k ids) and routes in a layout of its "
                         "own; recording, masking and export need a family adapter MoEScope does not have.")
# model_type -> why MoEScope refuses it (one sentence, shown as is). tests/test_families.py checks that the
# discovered adapter refuses each of these on its tiny model too, so none is refused on the list's word alone.
REFUSED: dict[str, str] = {
    "longcat_flash": "its zero-computation experts (zero_expert_num) are router slots with no expert weights, and "
                     "MoEScope's masking, counts and export assume every routed slot is a stacked expert.",
    "afmoe": _TAKES_BLOCK_BIAS,
    "hy_v3": _TAKES_BLOCK_BIAS,
    "minimax_m2": _TAKES_BLOCK_BIAS,
    "doge": _ROUTER_NOT_DECISIONS.replace("its router", "its router (DogeCDMoE, product-key retrieval of experts)"),
    "jetmoe": _ROUTER_NOT_DECISIONS.replace("its router", "its router (JetMoeTopKGating, shared by attention "
                                                          "and MLP experts)"),
    "lfm2_moe": _TAKES_BLOCK_BIAS,
    "zaya": "its router has a skip expert (num_experts + 1 router classes, the last a zero-computation slot with a "
            "balancing bias), and MoEScope's masking, counts and export assume every routed slot is a stacked expert.",
    "inkling_text": "its router scores the shared experts in the same weight rows as the routed ones (n_routed + "
                    "n_shared rows), which MoEScope cannot slice by routed expert to prune.",
}

# model_type -> why the suite cannot check it on a tiny model yet: neither supported (verified) nor refused.
UNVERIFIED: dict[str, str] = {}


def refuse_if_unsupported(model_type: str | None) -> None:
    reason = REFUSED.get(model_type or "")
    if reason is not None:
        raise UnsupportedFamilyFeature(f"Model type {model_type!r} is not supported by MoEScope: {reason}")


def _expert_count(config: Any) -> int:
    for sub in (config, *(getattr(config, a, None) for a in SUB_CONFIGS)):
        if sub is None:
            continue
        for name in EXPERT_COUNT_FIELDS:
            value = getattr(sub, name, None)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (list, tuple)) and value:
                value = max(int(v) for v in value)
            if isinstance(value, int) and value >= 1:
                return value
    return 0


def _has_expert_classes(model_type: str) -> bool:
    """Whether the family's modeling module defines expert modules (a default config may use 1 expert)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        modeling = importlib.import_module(cls.__module__)
    except Exception:  # noqa: BLE001 - a family whose class cannot be imported has no expert classes here
        return False
    return any("Expert" in attr for attr in dir(modeling))


@functools.cache
def moe_model_types() -> tuple[dict[str, int], dict[str, str]]:
    """(MoE causal-LM model types -> default expert count, model types whose default config cannot be built -> why),
    from the installed transformers' causal-LM mapping and each family's default config."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    moe, unbuildable = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            try:
                config = CONFIG_MAPPING[model_type]()
            except Exception as error:  # noqa: BLE001 - a config class that needs arguments: reported, not hidden
                unbuildable[model_type] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                continue
            count = _expert_count(config)
            if count > 1 or (count == 1 and _has_expert_classes(model_type)):
                moe[model_type] = count
    return moe, unbuildable


def family_rows() -> list[dict[str, str]]:
    """One row per MoE family of the installed transformers: how MoEScope handles it (docs/families.md)."""
    return [dict(row) for row in _family_rows()]


@functools.cache
def _family_rows() -> tuple[dict[str, str], ...]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .adapter_discovery import DiscoveredAdapter, router_class_of
    from .adapters import _BY_MODEL_TYPE, adapter_for_config

    moe, _ = moe_model_types()
    rows = []
    for model_type in sorted(set(moe) | set(_BY_MODEL_TYPE)):
        row = dict(model_type=model_type, family="", status="", router="", n_field="", k_field="", shared="",
                   bias="", groups="", weights="")
        router = router_class_of(model_type)
        row["router"] = router.__name__ if router is not None else ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CONFIG_MAPPING[model_type]()
                text_type = config.get_text_config().model_type  # a multimodal config's MoE text tower
                adapter = _BY_MODEL_TYPE.get(model_type) or _BY_MODEL_TYPE.get(text_type) or adapter_for_config(config)
        except UnsupportedFamilyFeature as refusal:
            rows.append({**row, "status": f"refused: {str(refusal).split(': ', 1)[-1]}"})
            continue
        discovered = isinstance(adapter, DiscoveredAdapter)
        status = "discovered" if discovered else "explicit adapter"
        if text_type != model_type:
            status += f" (the text tower, {text_type}, of a multimodal config)"
        if model_type in UNVERIFIED:
            status += f", not verified on a tiny model ({UNVERIFIED[model_type]})"
        rows.append({**row, "family": adapter.family.removesuffix(" (discovered)"), "status": status,
                     "n_field": adapter.n_experts_field,
                     "k_field": adapter.top_k_field or f"fixed at {adapter.fixed_top_k}",
                     "shared": "found per layer" if discovered else ", ".join(adapter.shared_expert_attrs),
                     "bias": "yes" if adapter.bias_corrected else "", "groups": "/".join(adapter.group_fields or ()),
                     "weights": adapter.weights_semantics})
    return tuple(rows)
