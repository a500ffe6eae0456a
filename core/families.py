"""Which MoE families MoEScope supports and how: the registry's explicit adapters, the discovered ones, and the
families refused with one sentence naming the unsupported feature (issue 13)."""

from __future__ import annotations

from .errors import UnsupportedFamilyFeature

# model_type -> why MoEScope refuses it (one sentence, shown as is). Every entry is checked by
# tests/test_families.py against the family's tiny model.
REFUSED: dict[str, str] = {
    "longcat_flash": "its zero-computation experts (zero_expert_num) are router slots with no expert weights, and "
                     "MoEScope's masking, counts and export assume every routed slot is a stacked expert.",
}


def refuse_if_unsupported(model_type: str | None) -> None:
    reason = REFUSED.get(model_type or "")
    if reason is not None:
        raise UnsupportedFamilyFeature(f"Model type {model_type!r} is not supported: {reason}")
