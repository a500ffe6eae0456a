"""Every MoE causal-LM family of the installed transformers, found from the library (issue 13).

The list of families is never written here: it comes from transformers' causal-LM mapping and each
family's default config (a field that counts experts, at the top level or in a text/ffn sub-config).
A new transformers version with new MoE families therefore shows up here, not as a silent gap.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import pytest
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from core.adapters import _BY_MODEL_TYPE

EXPERT_COUNT_FIELDS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
)
SUB_CONFIGS = ("text_config", "ffn_config")


def _expert_count(config) -> int:
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
    try:
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        modeling = importlib.import_module(cls.__module__)
    except Exception:  # noqa: BLE001 - a family whose class cannot be imported has no expert classes here
        return False
    return any("Expert" in attr for attr in dir(modeling))


@functools.cache
def discover() -> tuple[dict[str, int], dict[str, str]]:
    """(MoE model types -> default expert count, model types whose default config cannot be built -> why)."""
    moe, unbuildable = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            try:
                config = CONFIG_MAPPING[model_type]()
            except Exception as error:  # noqa: BLE001 - a config class that needs arguments: reported, not hidden
                unbuildable[model_type] = (
                    f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                )
                continue
            count = _expert_count(config)
            if count > 1 or (count == 1 and _has_expert_classes(model_type)):
                moe[model_type] = count
    return moe, unbuildable


def test_discovery_finds_every_family_we_support():
    moe, _ = discover()
    # Every model type with a hand-written adapter is an MoE causal LM the library knows.
    missing = sorted(
        mt
        for mt in _BY_MODEL_TYPE
        if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in moe
    )
    assert not missing, f"discovery misses supported MoE families: {missing}"
    assert len(moe) >= len(_BY_MODEL_TYPE) // 2


def test_discovery_uses_the_library_not_a_list():
    moe, _ = discover()
    for model_type in moe:
        assert model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


@pytest.mark.xfail(
    strict=True,
    reason="issue 13: most discovered MoE families are not yet supported or refused",
)
def test_every_discovered_family_is_supported_or_refused():
    moe, _ = discover()
    gaps = sorted(mt for mt in moe if mt not in _BY_MODEL_TYPE)
    assert not gaps, (
        f"{len(gaps)} of {len(moe)} MoE families neither supported nor refused: {gaps}"
    )
