"""Pruning methods behind one interface (see ``base``): ``make_method(name, **params).plan(mm, calibration, target)``."""

from __future__ import annotations

from typing import Any

from ..errors import MoEScopeError
from .base import Calibration, PruningMethod, Target
from .eep import EEP
from .naee import NAEE, DynamicSkipping
from .reap import REAP
from .usage import Frequency, Random, SoftActivation, TopKReduction

METHODS: dict[str, type] = {
    "random": Random,
    "frequency": Frequency,
    "soft_activation": SoftActivation,
    "top_k": TopKReduction,
    "reap": REAP,
    "naee": NAEE,
    "dynamic_skip": DynamicSkipping,
    "eep": EEP,
}


def make_method(name: str, **params: Any) -> PruningMethod:
    if name not in METHODS:
        raise MoEScopeError(f"Unknown pruning method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name](**params)


__all__ = ["METHODS", "Calibration", "PruningMethod", "Target", "make_method"]
