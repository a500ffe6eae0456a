"""Pruning methods behind one interface (see ``base``): ``make_method(name, **params).plan(mm, calibration, target)``.

Each method class describes itself (``describe(name)``: label, kind, whether it stops early or resumes, and
its parameters), so the dashboard and the workbench keep no lists of their own."""

from __future__ import annotations

from typing import Any

from ..errors import MoEScopeError
from .base import SCORE, SEARCH, Calibration, MethodInfo, PruningMethod, Target
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


def _method_class(name: str) -> type:
    if name not in METHODS:
        raise MoEScopeError(f"Unknown pruning method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def make_method(name: str, **params: Any) -> PruningMethod:
    return _method_class(name)(**params)


def describe(name: str) -> MethodInfo:
    """What the method ``name`` says about itself."""
    return _method_class(name).describe()


def catalog() -> dict[str, MethodInfo]:
    """Every method's description, by name, in the order methods are offered."""
    return {name: cls.describe() for name, cls in METHODS.items()}


def quick_methods() -> list[str]:
    """Methods whose plan for any number of kept experts follows from one calibration pass (score-based
    methods that prune experts): the ones a sweep over every keep can afford."""
    return [name for name, info in catalog().items() if info.kind == SCORE and not info.keeps_all_experts]


__all__ = ["METHODS", "SCORE", "SEARCH", "Calibration", "MethodInfo", "PruningMethod", "Target", "catalog",
           "describe", "make_method", "quick_methods"]
