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

from core.adapters import _BY_MODEL_TYPE, adapter_for_config

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


# Families whose tiny model this suite cannot check yet: each is neither supported nor refused, so its test is a
# strict xfail naming what was observed (a fixed one then fails the suite until it is taken off this list).
KNOWN_GAPS: dict[str, str] = {
    "dots3_note": "its config class refuses small global sizes (per-layer attributes); no tiny model built",
    "dots3_note_text": "its config class refuses small global sizes (per-layer attributes); no tiny model built",
    "granitemoehybrid": "its config validator refuses the tiny layer layout; no tiny model built",
    "kolibri1_1": "its config validator refuses the tiny layer layout; no tiny model built",
    "zaya": "its config validator refuses the tiny layer layout; no tiny model built",
    "lfm2_moe": "the default config has layer_types None and cannot build a model; no tiny model built",
    "qwen4_exp": "the tiny config leaves linear-attention head sizes unset; no tiny model built",
    "qwen4_exp_text": "the tiny config leaves linear-attention head sizes unset; no tiny model built",
    "kimi_linear": "the tiny model's all-linear-attention cache cannot take an attention mask (recording check)",
    "inkling2_text": "the export of its tiny model fails (a negative embedding size after pruning)",
    "inkling2_loop_text": "the export of its tiny model fails (a negative embedding size after pruning)",
    "nemotron_h": "no MoE layer found in its tiny model (the generic adapter does not find its router)",
}


def _cases():
    moe, _ = discover()
    return [pytest.param(mt, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[mt])) if mt in KNOWN_GAPS
            else mt for mt in sorted(moe)]


class _Shared:
    """One tiny model shared by the engine checks of a family (they undo what they change)."""

    def __init__(self, model):
        self._model = model

    def model(self, _model_type):
        return self._model


def test_known_gaps_are_discovered_families():
    moe, _ = discover()
    assert set(KNOWN_GAPS) <= set(moe)


@pytest.mark.numeric
@pytest.mark.parametrize("model_type", _cases())
def test_every_discovered_family_is_checked_or_refused(model_type, tmp_path, tiny_models):
    """Each MoE family: its own adapter (checked on tests.tiny_models by test_engine), or a tiny model of it passes
    the engine's checks (recording == router outputs, counts == independent top-k of router logits, masked logits
    == exported and reloaded model's, undo bit-exact), or MoEScope refuses it with one sentence naming the feature."""
    from core.errors import UnsupportedFamilyFeature
    from core.model import MoEModel

    from . import test_engine
    from .family_models import build_family, tiny_config
    from .tiny_models import FAMILIES

    if model_type in _BY_MODEL_TYPE:
        assert model_type in FAMILIES, f"{model_type} has an adapter but no tiny model in tests/tiny_models.py"
        return
    try:
        adapter_for_config(tiny_config(model_type))
        mm = MoEModel(build_family(model_type), source=model_type)
    except UnsupportedFamilyFeature as refusal:
        message = str(refusal)
        assert "\n" not in message and len(message) > 60 and "MoEScope" in message, message
        return
    assert mm.layers, f"{model_type}: no MoE layer"
    shared = _Shared(mm.model)
    test_engine.test_recording_equals_router_outputs(model_type, None, tmp_path, shared)
    test_engine.test_counts_match_output_router_logits(model_type, None, tmp_path, shared)
    test_engine.test_masking_matches_export_and_undoes_exactly(model_type, None, tmp_path, shared)


def test_every_discovered_family_has_an_adapter_or_a_refusal():
    """From its config alone, every discovered family gets an adapter or a one-sentence refusal naming a feature."""
    from core.errors import UnsupportedFamilyFeature

    moe, _ = discover()
    gaps = []
    for model_type in moe:
        try:
            adapter_for_config(CONFIG_MAPPING[model_type]())
        except UnsupportedFamilyFeature:
            continue
        except Exception as error:  # noqa: BLE001 - collected and shown below
            gaps.append(f"{model_type}: {error}")
    assert not gaps, f"{len(gaps)} of {len(moe)} MoE families neither supported nor refused: {gaps}"
