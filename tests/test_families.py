"""Every MoE causal-LM family of the installed transformers, found from the library (issue 13).

The list of families is never written here: it comes (core.families.moe_model_types) from transformers' causal-LM
mapping and each family's default config (a field that counts experts, at the top level or in a text/ffn
sub-config). A new transformers version with new MoE families therefore shows up here, not as a silent gap.
"""

from __future__ import annotations


import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from core.adapter_discovery import discover_adapter
from core.adapters import _BY_MODEL_TYPE, adapter_for_config
from core.errors import UnsupportedFamilyFeature
from core.families import REFUSED, UNVERIFIED, moe_model_types

discover = moe_model_types  # found from the library (core.families), never from a list here


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


def _cases():
    moe, _ = discover()
    return [pytest.param(mt, marks=pytest.mark.xfail(strict=True, reason=UNVERIFIED[mt])) if mt in UNVERIFIED
            else mt for mt in sorted(moe)]


class _Shared:
    """One tiny model shared by the engine checks of a family (they undo what they change)."""

    def __init__(self, model):
        self._model = model

    def model(self, _model_type):
        return self._model


def test_refused_and_unverified_families_are_discovered_families():
    moe, _ = discover()
    assert set(REFUSED) | set(UNVERIFIED) <= set(moe)
    assert not set(REFUSED) & set(UNVERIFIED)


@pytest.mark.numeric
@pytest.mark.parametrize("model_type", _cases())
def test_every_discovered_family_is_checked_or_refused(model_type, tmp_path, tiny_models):
    """Each MoE family: its own adapter (checked on tests.tiny_models by test_engine), or a tiny model of it passes
    the engine's checks (recording == router outputs, counts == independent top-k of router logits, masked logits
    == exported and reloaded model's, undo bit-exact), or MoEScope refuses it with one sentence naming the feature."""
    from core.model import MoEModel

    from . import test_engine
    from .family_models import build_family, tiny_config
    from .tiny_models import FAMILIES

    if model_type in _BY_MODEL_TYPE:
        assert model_type in FAMILIES, f"{model_type} has an adapter but no tiny model in tests/tiny_models.py"
        return
    if model_type in REFUSED:  # refused from the config, and the discovered adapter refuses its tiny model too
        with pytest.raises(UnsupportedFamilyFeature, match="is not supported by MoEScope: "):
            adapter_for_config(tiny_config(model_type))
        with pytest.raises(UnsupportedFamilyFeature):
            MoEModel(build_family(model_type), adapter=discover_adapter(tiny_config(model_type)))
        return
    adapter_for_config(tiny_config(model_type))
    mm = MoEModel(build_family(model_type), source=model_type)
    assert mm.layers, f"{model_type}: no MoE layer"
    shared = _Shared(mm.model)
    test_engine.test_recording_equals_router_outputs(model_type, None, tmp_path, shared)
    test_engine.test_counts_match_output_router_logits(model_type, None, tmp_path, shared)
    test_engine.test_masking_matches_export_and_undoes_exactly(model_type, None, tmp_path, shared)


def test_every_discovered_family_has_an_adapter_or_a_refusal():
    """From its config alone, every discovered family gets an adapter or a one-sentence refusal naming a feature."""
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
