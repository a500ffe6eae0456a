"""Pruning plans: which experts each MoE layer keeps, the top-k to route with, and how the plan was made.

A plan is plain JSON so that any method can produce it, the dashboard can download it, and export can
apply it later on another machine. Besides the kept experts a plan has typed fields for EEP merge matrices
(``merge_matrices``, file key ``merge``) and their router mapping (``router_mapping``: "probs" or "logits"; absent
means "logits", so version-1 plans keep their meaning), NAEE dynamic skipping (``skip_thresholds``, ``dynamic_skip``) and its
provenance (``provenance``: method, parameters, seed, ...; one top-level key each). Any other key of a plan file
is kept in ``extra`` and written back as it was read, in the same place: version-1 files save byte-identically.

Field parsing lives in ``plan_fields``, file reading in ``plan_files``, checks against a model in
``plan_validation``; this module re-exports what callers import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .atomic import atomic_write_text
from .errors import MoEScopeError
from .plan_fields import (
    HEADER_FIELDS,
    MAX_NESTING,
    PLAN_FORMAT,
    PLAN_VERSION,
    PROVENANCE_FIELDS,
    MergeMatrices,
    Provenance,
    as_tensor,
    check_header,
    check_nesting,
    check_provenance,
    parse_dynamic_skip,
    parse_layers,
    parse_merge,
    parse_model,
    parse_router_mapping,
    parse_top_k,
    show,
)
from .plan_files import parse_plan_text, read_bounded
from .plan_validation import RoutingSpec, validate_plan

__all__ = ["MAX_NESTING", "MAX_PLAN_BYTES", "PLAN_FORMAT", "PLAN_VERSION", "MergeMatrices", "Plan", "PlanExtras",
           "Provenance", "RoutingSpec", "plan_source_warning", "validate_plan"]

# The largest legitimate plans carry EEP merge matrices: DeepSeek-V3 (256 experts, 58 MoE layers, half kept) writes
# about 115 MB of indented JSON. 256 MB leaves room for that and bounds the memory a wrong file can take.
MAX_PLAN_BYTES = 256 * 1024 * 1024

_TYPED_KEYS = ("merge", "dynamic_skip", "router_mapping", *PROVENANCE_FIELDS)  # file keys that have a typed field


@dataclass
class Plan:
    """Experts kept per MoE layer (real layer index); MoE layers not listed keep every expert.

    ``extra`` may be given with any fields of the file format, typed ones included (``{"merge": ...,
    "method": ...}``, as methods have always built plans): those move into the typed fields (where the typed
    argument is not given too) and the rest stay in ``extra``; see ``PlanExtras``."""

    layers: dict[int, list[int]]
    top_k: int | None = None
    model: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    merge_matrices: dict[int, MergeMatrices] | None = None  # None: the plan does not merge ("merge" absent)
    skip_thresholds: dict[int, float] | None = None  # None: no dynamic skipping ("dynamic_skip" absent)
    router_mapping: str | None = None  # EEP's mapping, "probs" or "logits"; None: absent, which means "logits"
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:
        self.layers = {int(k): list(map(int, v)) for k, v in self.layers.items()}
        given = self.extra
        order = list(given._order if isinstance(given, PlanExtras) else given)
        unknown = {k: v for k, v in given.items() if k not in _TYPED_KEYS}
        self.provenance = dataclasses.replace(self.provenance)  # never shared with another plan
        self.extra = PlanExtras(self, unknown, order)
        for key in _TYPED_KEYS:
            if key in given and self.extra._typed(key) is None:
                self.extra[key] = given[key]

    def keep(self, layer: int, n_experts: int) -> list[int]:
        """Kept experts of a layer in ascending order (the order physical pruning renumbers them in)."""
        return sorted(self.layers.get(layer, range(n_experts)))

    def experts_kept(self, n_experts: int) -> int:
        """Experts kept per MoE layer (the fewest over layers); all of them for a plan that only changes top-k."""
        return min((len(kept) for kept in self.layers.values()), default=n_experts)

    @property
    def dynamic_skip(self) -> dict[int, float]:
        """NAEE dynamic skipping thresholds per layer: at inference a chosen expert whose gate weight is below
        beta times the strongest one's is skipped."""
        return {layer: float(beta) for layer, beta in (self.skip_thresholds or {}).items()}

    @property
    def mapping(self) -> str:
        """How the merge matrices' router mapping applies: "probs" (p' = R · softmax(W x), the paper's) or
        "logits" (R mixes the router's rows); plans that do not say were made with "logits"."""
        return self.router_mapping or "logits"

    @property
    def merge(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """EEP merging per layer as tensors: the router-mapping and expert-merging matrices, each
        [kept, n_experts]; merged expert j takes kept expert j's place."""
        return {layer: (as_tensor(m.router, layer, "router"), as_tensor(m.experts, layer, "experts"))
                for layer, m in (self.merge_matrices or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "top_k": self.top_k,
            "layers": {str(k): {"keep": list(v)} for k, v in sorted(self.layers.items())},
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """A plan from parsed JSON; anything that is not a valid plan is refused with one sentence."""
        check_header(data)
        check_nesting(data)
        layers = parse_layers(data.get("layers"))
        top_k = parse_top_k(data.get("top_k"))
        model = parse_model(data.get("model"))
        extra = {k: v for k, v in data.items() if k not in HEADER_FIELDS}
        if "merge" in extra:  # files get every matrix entry checked; plans built in code only the structure
            parse_merge(extra["merge"], json_keys=True, check_values=True)
        if "dynamic_skip" in extra:
            parse_dynamic_skip(extra["dynamic_skip"], json_keys=True)
        if "router_mapping" in extra:
            parse_router_mapping(extra["router_mapping"])
        return cls(layers=layers, top_k=top_k, model=model, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file; every problem with it (missing, a folder, too large, not UTF-8, not JSON, not a
        valid plan) is one sentence naming the file."""
        path = Path(path)
        return cls.loads(read_bounded(path, MAX_PLAN_BYTES), name=str(path))

    @classmethod
    def loads(cls, text: str | bytes, name: str = "the plan") -> Plan:
        """A plan from the text of a plan file (an upload, say); ``name`` is what messages call it."""
        data = parse_plan_text(text, name, MAX_PLAN_BYTES)
        try:
            return cls.from_dict(data)
        except MoEScopeError as exc:
            raise MoEScopeError(f"{name}: {exc}") from None

    def digest(self) -> str:
        """Identity of what the plan does to the model (kept sets, top-k, merging, skipping), for caches."""
        core = {"top_k": self.top_k, "layers": {str(k): sorted(v) for k, v in sorted(self.layers.items())},
                "merge": self.extra.get("merge"), "dynamic_skip": self.extra.get("dynamic_skip")}
        if self.router_mapping is not None:  # older plans keep their digest
            core["router_mapping"] = self.router_mapping
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


class PlanExtras(MutableMapping):
    """``Plan.extra``: the plan's fields beyond the header, as the plan file writes them, in the file's order.

    Only fields MoEScope has no typed field for are stored here (``unknown``). A typed field's file key
    (``"merge"``, ``"dynamic_skip"``, ``"method"``, ``"seed"``, ...) reads and writes the plan's typed field in its
    JSON form, so code written against the free-form dict keeps working; new code should use the typed fields.
    ``merge`` and ``dynamic_skip`` are rebuilt on every read, so change them by assigning, not in place."""

    def __init__(self, plan: Plan, unknown: dict[str, Any], order: list[str]) -> None:
        self._plan = plan
        self.unknown = unknown
        self._order = order  # the keys in the order they were given (the file's order), typed ones included

    def _typed(self, key: str) -> Any:
        """The typed field behind ``key`` in JSON form, None when unset."""
        plan = self._plan
        if key == "merge":
            merges = plan.merge_matrices
            return None if merges is None else {str(k): m.to_json() for k, m in merges.items()}
        if key == "dynamic_skip":
            betas = plan.skip_thresholds
            return None if betas is None else {str(k): beta for k, beta in betas.items()}
        if key == "router_mapping":
            return plan.router_mapping
        return getattr(plan.provenance, key)

    def _has(self, key: str) -> bool:
        if key in self.unknown:
            return True
        if key not in _TYPED_KEYS:
            return False
        # a provenance field given as null is written as null; merge and dynamic_skip are absent when None
        return self._typed(key) is not None or (key in PROVENANCE_FIELDS and key in self._order)

    def __getitem__(self, key: str) -> Any:
        if key in self.unknown:
            return self.unknown[key]
        if not self._has(key):
            raise KeyError(key)
        return self._typed(key)

    def __setitem__(self, key: str, value: Any) -> None:
        plan = self._plan
        if key == "merge":
            plan.merge_matrices = parse_merge(value, json_keys=False, check_values=False)
        elif key == "dynamic_skip":
            plan.skip_thresholds = parse_dynamic_skip(value, json_keys=False)
        elif key == "router_mapping":
            plan.router_mapping = parse_router_mapping(value)
        elif key in PROVENANCE_FIELDS:
            setattr(plan.provenance, key, check_provenance(key, value))
        else:
            self.unknown[key] = value
        if key not in self._order:
            self._order.append(key)

    def __delitem__(self, key: str) -> None:
        if not self._has(key):
            raise KeyError(key)
        if key == "merge":
            self._plan.merge_matrices = None
        elif key == "dynamic_skip":
            self._plan.skip_thresholds = None
        elif key == "router_mapping":
            self._plan.router_mapping = None
        elif key in PROVENANCE_FIELDS:
            setattr(self._plan.provenance, key, None)
        else:
            del self.unknown[key]
        if key in self._order:
            self._order.remove(key)

    def __iter__(self) -> Iterator[str]:
        # the given order first; then keys added since (unknown ones, then typed fields set directly)
        seen = dict.fromkeys(k for k in self._order if self._has(k))
        seen.update(dict.fromkeys(self.unknown))
        seen.update(dict.fromkeys(k for k in _TYPED_KEYS if k not in seen and self._has(k)))
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(self.unknown)


def plan_source_warning(plan: Plan, source: str | Path | None, path: str | Path | None = None) -> str | None:
    """One line warning that ``plan`` was made for another model than ``source`` (the model loaded now), or
    None when the plan names no model or the same one. Local folders compare by resolved path, anything else
    (hub ids) as written; ``path`` is the plan file, named in the warning when given."""
    if plan.model is None or source is None or _source_key(plan.model) == _source_key(source):
        return None
    where = f"Plan {path}" if path is not None else "This plan"
    return (f"{where} was made for model {show(str(plan.model), 200)}, but the loaded model is "
            f"{show(str(source), 200)}; its expert choices may not suit this model, so check it is the plan you "
            f"meant.")


def _source_key(source: str | Path) -> str:
    text = str(source)
    try:
        local = Path(text).expanduser()
        if local.exists():
            return str(local.resolve())
    except (OSError, ValueError, RuntimeError):  # over-long names, NUL bytes, symlink loops: not a local folder
        pass
    return os.path.normpath(text) if text else text
