"""The fields of a plan file: each one read from JSON and checked, refusing anything wrong with one sentence that
says which field to change, and the typed pieces a plan carries besides its kept experts (EEP merge matrices,
NAEE dynamic skipping thresholds, the provenance methods record).

Validation is hand-written rather than a pydantic model: it needs no dependency, every refusal is one sentence
(pydantic's errors are multi-line and would have to be rewritten anyway), and unknown fields must round-trip exactly
as written, which a schema library would make us opt out of field by field.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .errors import MoEScopeError

PLAN_FORMAT = "moescope-plan"
PLAN_VERSION = 1
# Plans nest five levels (plan > merge > layer > matrix > row); anything much deeper is not a plan.
MAX_NESTING = 64
HEADER_FIELDS = ("format", "version", "model", "top_k", "layers")

_LAYER_KEY = re.compile(r"[0-9]{1,9}")  # ASCII only: "²".isdigit() is true but int("²") fails
_FLOAT32_MAX = 3.4028234663852886e38  # merge matrices become float32 tensors
_CONTAINERS = frozenset({dict, list})
_INTS = frozenset({int})
_FLOATS = frozenset({float})


# Typed fields ------------------------------------------------------------------------------------------------


@dataclass
class MergeMatrices:
    """EEP merging of one MoE layer (file field ``merge``): the router-mapping and expert-merging matrices, each
    [kept, n_experts] rows of numbers as written; merged expert j takes kept expert j's place."""

    router: list[list[float]]
    experts: list[list[float]]
    extra: dict[str, Any] = field(default_factory=dict)  # any other keys of the layer's entry, kept as written

    def to_json(self) -> dict[str, Any]:
        return {"router": self.router, "experts": self.experts, **self.extra}


@dataclass
class Provenance:
    """How a plan was made, as pruning methods record it (``core.methods.base.finish_plan``). Each field is its
    own top-level key of the plan file; None is JSON null, and a field that is None and was never written is left
    out of the file."""

    method: str | None = None
    parameters: dict[str, Any] | None = None
    seed: int | None = None
    target: dict[str, Any] | None = None  # {"keep", "ratio", "top_k"} as the method was asked
    calibration: dict[str, Any] | None = None  # {"task", "split", "limit", "digest"}
    forward_passes: int | None = None
    wall_time_s: float | None = None
    cancelled: bool | None = None  # a stopped search's best-so-far
    planned_on: str | None = None  # export: the model the plan was made on, when another than the exported one


PROVENANCE_FIELDS = tuple(f.name for f in fields(Provenance))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# what each provenance field must hold (or null), and how a message names it
_PROVENANCE_TYPES: dict[str, tuple[Any, str]] = {
    "method": (lambda v: isinstance(v, str), "the method's name as a string"),
    "parameters": (lambda v: isinstance(v, dict), "an object of the method's parameters"),
    "seed": (_is_int, "an integer"),
    "target": (lambda v: isinstance(v, dict), "an object"),
    "calibration": (lambda v: isinstance(v, dict), "an object"),
    "forward_passes": (_is_int, "an integer"),
    "wall_time_s": (_is_real, "a number of seconds"),
    "cancelled": (lambda v: isinstance(v, bool), "true or false"),
    "planned_on": (lambda v: isinstance(v, str), "a model path or hub id as a string"),
}


def check_provenance(name: str, value: Any) -> Any:
    """``value`` for the provenance field ``name``, refused with one sentence when it has the wrong type."""
    accepts, what = _PROVENANCE_TYPES[name]
    if value is not None and not accepts(value):
        raise MoEScopeError(f"Plan \"{name}\" must be {what} or null, not {show(value)}.")
    return value


# Messages ----------------------------------------------------------------------------------------------------


def show(value: Any, limit: int = 40) -> str:
    """A user's value quoted for a one-line message: JSON's name for null and booleans, otherwise repr (so
    control characters and lone surrogates are escaped), shortened; containers by their kind."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # null, true, false: what the user wrote
    text = repr(value) if not isinstance(value, (dict, list)) else _kind(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, numbers.Number):
        return "a number"
    return type(value).__name__


def too_deep(name: str) -> MoEScopeError:
    return MoEScopeError(f"{name} nests JSON deeper than {MAX_NESTING} levels, which no plan does; check that it is "
                         f"a MoEScope plan.")


# The document ------------------------------------------------------------------------------------------------


def check_header(data: Any) -> None:
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise MoEScopeError(f"Not a MoEScope plan: expected a JSON object with \"format\": \"{PLAN_FORMAT}\".")
    version = data.get("version")
    if isinstance(version, bool) or version != PLAN_VERSION:
        raise MoEScopeError(f"Plan version {show(version)} is not supported; this MoEScope reads "
                            f"version {PLAN_VERSION}.")


def check_nesting(data: Any) -> None:
    """Refuse absurdly deep documents here, iteratively, so that nothing later (json.dumps, the dashboard)
    recurses into them."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise too_deep("Plan")
        children = value.values() if isinstance(value, dict) else value
        if _CONTAINERS.isdisjoint(map(type, children)):  # a list of ten million ids is checked in C
            continue
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _layer_index(key: Any, where: str, json_keys: bool) -> int:
    """A layer key: a digit string in JSON; plans built in code may also use ints."""
    if isinstance(key, str) and _LAYER_KEY.fullmatch(key):
        return int(key)
    if not json_keys and _is_int(key) and key >= 0:
        return int(key)
    raise MoEScopeError(f"{where} has key {show(key)}, which is not a layer index; use layer numbers such as \"0\".")


def _layer_map(raw: Any, where: str, what: str, json_keys: bool) -> dict[int, Any]:
    """An object keyed by layer index, as {int: value}; two keys naming one layer ("1" and "01") are refused."""
    if not isinstance(raw, dict):
        raise MoEScopeError(f"{where} must be an object mapping layer index to {what}, not {_kind(raw)}.")
    out: dict[int, Any] = {}
    for key, value in raw.items():
        layer = _layer_index(key, where, json_keys)
        if layer in out:
            raise MoEScopeError(f"{where} names layer {layer} twice; give each layer once.")
        out[layer] = value
    return out


# Kept experts, top-k, model ----------------------------------------------------------------------------------


def parse_layers(raw: Any) -> dict[int, list[int]]:
    if not isinstance(raw, dict):
        raise MoEScopeError("Plan has no \"layers\" object; give {\"<layer index>\": {\"keep\": [ids]}}.")
    layers = _layer_map(raw, "Plan \"layers\"", "{\"keep\": [expert ids]}", json_keys=True)
    for layer, entry in layers.items():
        if not isinstance(entry, dict):
            raise MoEScopeError(f"Plan layer {layer} must map to {{\"keep\": [expert ids]}}, not {_kind(entry)}.")
        keep = entry.get("keep")
        if not isinstance(keep, list):
            raise MoEScopeError(f"Plan layer {layer} has no \"keep\" list of expert ids; give {{\"keep\": [ids]}}.")
        if not _INTS.issuperset(map(type, keep)):  # plain ints pass in C; the rest are looked at one by one
            for e in keep:
                if not _is_int(e):
                    raise MoEScopeError(f"Plan layer {layer} keeps {show(e)}; expert ids must be integers.")
        layers[layer] = keep
    return layers


def parse_top_k(raw: Any) -> int | None:
    if raw is not None and not _is_int(raw):
        raise MoEScopeError(f"Plan top_k must be an integer or null, not {show(raw)}.")
    return raw


def parse_model(raw: Any) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise MoEScopeError(f"Plan \"model\" must be the model's path or hub id as a string, or null, not "
                            f"{_kind(raw)}.")
    return raw


# Dynamic skipping and merging --------------------------------------------------------------------------------


def parse_dynamic_skip(raw: Any, json_keys: bool) -> dict[int, float]:
    """Thresholds per layer, each kept as written (an int 0 or 1 stays an int, so the file saves unchanged)."""
    where = "Plan \"dynamic_skip\""
    betas = _layer_map(raw, where, "a threshold between 0 and 1", json_keys)
    for layer, beta in betas.items():
        if not _is_real(beta) or not 0 <= beta <= 1:  # NaN fails the comparison too
            raise MoEScopeError(f"{where} for layer {layer} is {show(beta)}; give a number between 0 and 1.")
    return betas


ROUTER_MAPPINGS = ("probs", "logits")


def parse_router_mapping(raw: Any) -> str:
    """EEP's router mapping of a merging plan (file field ``router_mapping``): "probs", the paper's
    ``p' = R · softmax(W x)``, or "logits", R applied to the router's rows. A plan without the field means
    "logits", the only mapping plans had before (see ``core.router_mapping``)."""
    if raw not in ROUTER_MAPPINGS:
        raise MoEScopeError(f"Plan \"router_mapping\" must be \"probs\" or \"logits\", not {show(raw)}.")
    return raw


def parse_merge(raw: Any, json_keys: bool, check_values: bool) -> dict[int, MergeMatrices]:
    """Merge matrices per layer. Files get every entry checked (``check_values``); plans built in code get the
    cheap structural check, and torch reports what else is wrong when the matrices become tensors."""
    where = "Plan \"merge\""
    entries = _layer_map(raw, where, "{\"router\": matrix, \"experts\": matrix}", json_keys)
    out: dict[int, MergeMatrices] = {}
    for layer, entry in entries.items():
        if not isinstance(entry, dict):
            raise MoEScopeError(f"{where} for layer {layer} must be {{\"router\": matrix, \"experts\": matrix}}, "
                                f"not {_kind(entry)}.")
        missing = [name for name in ("router", "experts") if name not in entry]
        if missing:
            raise MoEScopeError(f"{where} for layer {layer} lacks {' and '.join(map(repr, missing))}; give both "
                                f"\"router\" and \"experts\" matrices.")
        if check_values:
            for name in ("router", "experts"):
                _check_matrix(entry[name], f"{where} matrix {name!r} of layer {layer}")
        out[layer] = MergeMatrices(entry["router"], entry["experts"],
                                   {k: v for k, v in entry.items() if k not in ("router", "experts")})
    return out


def _check_matrix(matrix: Any, where: str) -> None:
    """A non-empty list of equal-length non-empty rows of finite numbers (within float32's range)."""
    if not isinstance(matrix, list) or not matrix:
        raise MoEScopeError(f"{where} must be a non-empty list of rows of numbers, not "
                            f"{'an empty list' if isinstance(matrix, list) else _kind(matrix)}.")
    width = len(matrix[0]) if isinstance(matrix[0], list) else 0
    for i, row in enumerate(matrix):
        if not isinstance(row, list):
            raise MoEScopeError(f"{where} has {_kind(row)} as row {i}; each row must be a list of numbers.")
        if not row:
            raise MoEScopeError(f"{where} has an empty row {i}; each row needs one number per expert.")
        if len(row) != width:
            raise MoEScopeError(f"{where} is ragged: row {i} has {len(row)} entries where row 0 has {width}; give "
                                f"every row the same length.")
        if not _finite_row(row):
            bad = next(x for x in row if not _finite_number(x))
            raise MoEScopeError(f"{where} holds {show(bad)} in row {i}; entries must be finite numbers.")


def _finite_number(x: Any) -> bool:
    return _is_real(x) and -_FLOAT32_MAX <= x <= _FLOAT32_MAX  # NaN fails the comparison too


def _finite_row(row: list) -> bool:
    if _FLOATS.issuperset(map(type, row)):  # the usual row of plain floats is checked in C
        return all(map(math.isfinite, row)) and -_FLOAT32_MAX <= min(row) and max(row) <= _FLOAT32_MAX
    return all(map(_finite_number, row))


def as_tensor(matrix: Any, layer: int, name: str) -> torch.Tensor:
    import torch

    try:
        tensor = torch.tensor(matrix, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        tensor = None
    if tensor is None or tensor.dim() != 2:
        raise MoEScopeError(f"Plan \"merge\" matrix {name!r} of layer {layer} must be a list of equal-length rows "
                            f"of numbers.")
    return tensor
