"""Pruning plans: which experts each MoE layer keeps, and the top-k to route with.

A plan is plain JSON so that any method can produce it, the dashboard can download it, and export can
apply it later on another machine. Later work adds fields (method, scores, merge matrices, provenance);
they travel in ``extra`` untouched, except the two that change what the plan does (``merge`` and
``dynamic_skip``), which are checked where they enter.

Validation is hand-written rather than a pydantic model: it needs no dependency, every refusal is one sentence
saying which field to change (pydantic's errors are multi-line and would have to be rewritten anyway), and the
unknown extras must round-trip exactly as written, which a schema library would make us opt out of field by field.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

from .errors import MoEScopeError
from .io import atomic_write_text

PLAN_FORMAT = "moescope-plan"
PLAN_VERSION = 1
# The largest legitimate plans carry EEP merge matrices: DeepSeek-V3 (256 experts, 58 MoE layers, half kept) writes
# about 115 MB of indented JSON. 256 MB leaves room for that and bounds the memory a wrong file can take.
MAX_PLAN_BYTES = 256 * 1024 * 1024
# Plans nest five levels (plan > merge > layer > matrix > row); anything much deeper is not a plan.
MAX_NESTING = 64

_KNOWN_FIELDS = ("format", "version", "model", "top_k", "layers")
_LAYER_KEY = re.compile(r"[0-9]{1,9}")  # ASCII only: "²".isdigit() is true but int("²") fails
_FLOAT32_MAX = 3.4028234663852886e38  # merge matrices become float32 tensors
_CONTAINERS = frozenset({dict, list})
_INTS = frozenset({int})
_FLOATS = frozenset({float})
_T = TypeVar("_T")


@dataclass
class Plan:
    """Experts kept per MoE layer (real layer index); MoE layers not listed keep every expert."""

    layers: dict[int, list[int]]
    top_k: int | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {int(k): list(map(int, v)) for k, v in self.layers.items()}

    def keep(self, layer: int, n_experts: int) -> list[int]:
        """Kept experts of a layer in ascending order (the order physical pruning renumbers them in)."""
        return sorted(self.layers.get(layer, range(n_experts)))

    def experts_kept(self, n_experts: int) -> int:
        """Experts kept per MoE layer (the fewest over layers); all of them for a plan that only changes top-k."""
        return min((len(kept) for kept in self.layers.values()), default=n_experts)

    @property
    def dynamic_skip(self) -> dict[int, float]:
        """NAEE dynamic skipping thresholds per layer (``extra["dynamic_skip"]``): at inference a chosen
        expert whose gate weight is below beta times the strongest one's is skipped."""
        return _parse_dynamic_skip(self.extra.get("dynamic_skip", {}), json_keys=False)

    @property
    def merge(self) -> dict[int, tuple["torch.Tensor", "torch.Tensor"]]:
        """EEP merging per layer (``extra["merge"]``): the router-mapping and expert-merging matrices, each
        [kept, n_experts]; merged expert j takes kept expert j's place."""
        # from_dict checked every entry; plans built in code get the cheap structural check here, and torch
        # reports what else is wrong (this runs once per layer on every masking, so it stays light).
        merges = _parse_merge(self.extra.get("merge", {}), json_keys=False, check_values=False)
        return {layer: (_as_tensor(router, layer, "router"), _as_tensor(experts, layer, "experts"))
                for layer, (router, experts) in merges.items()}

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
    def from_dict(cls, data: Any) -> "Plan":
        """A plan from parsed JSON; anything that is not a valid plan is refused with one sentence."""
        _check_header(data)
        _check_nesting(data)
        layers = _parse_layers(data.get("layers"))
        top_k = _parse_top_k(data.get("top_k"))
        model = _parse_model(data.get("model"))
        extra = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
        if "merge" in extra:
            _parse_merge(extra["merge"], json_keys=True, check_values=True)
        if "dynamic_skip" in extra:
            _parse_dynamic_skip(extra["dynamic_skip"], json_keys=True)
        return cls(layers=layers, top_k=top_k, model=model, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file; every problem with it (missing, a folder, too large, not UTF-8, not JSON, not a
        valid plan) is one sentence naming the file."""
        path = Path(path)
        return cls.loads(_read_bounded(path), name=str(path))

    @classmethod
    def loads(cls, text: str | bytes, name: str = "the plan") -> "Plan":
        """A plan from the text of a plan file (an upload, say); ``name`` is what messages call it."""
        if len(text) > MAX_PLAN_BYTES:
            raise _too_large(name)
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise MoEScopeError(f"{name} is not UTF-8 text (byte {exc.start} is 0x{text[exc.start]:02x}); "
                                    f"save the plan as UTF-8 JSON.") from None
        try:
            data = json.loads(text)
        except RecursionError:
            raise _too_deep(name) from None
        except json.JSONDecodeError as exc:
            raise MoEScopeError(f"{name} is not a MoEScope plan: it is not valid JSON ({exc}).") from None
        except ValueError:  # an integer longer than Python's 4300-digit limit
            raise MoEScopeError(f"{name} is not a MoEScope plan: it holds a number too long to read.") from None
        try:
            return cls.from_dict(data)
        except MoEScopeError as exc:
            raise MoEScopeError(f"{name}: {exc}") from None

    def digest(self) -> str:
        """Identity of what the plan does to the model (kept sets, top-k, merging, skipping), for caches."""
        core = {"top_k": self.top_k, "layers": {str(k): sorted(v) for k, v in sorted(self.layers.items())},
                "merge": self.extra.get("merge"), "dynamic_skip": self.extra.get("dynamic_skip")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def plan_source_warning(plan: Plan, source: str | Path | None, path: str | Path | None = None) -> str | None:
    """One line warning that ``plan`` was made for another model than ``source`` (the model loaded now), or
    None when the plan names no model or the same one. Local folders compare by resolved path, anything else
    (hub ids) as written; ``path`` is the plan file, named in the warning when given."""
    if plan.model is None or source is None or _source_key(plan.model) == _source_key(source):
        return None
    where = f"Plan {path}" if path is not None else "This plan"
    return (f"{where} was made for model {_show(str(plan.model), 200)}, but the loaded model is "
            f"{_show(str(source), 200)}; its expert choices may not suit this model, so check it is the plan you "
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


# Plan files --------------------------------------------------------------------------------------------------


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, refusing folders and anything over MAX_PLAN_BYTES before reading it (and, for files that
    stat cannot size, such as pipes, after reading one byte more than the bound)."""
    info = _os_call(path, path.stat)
    if stat.S_ISDIR(info.st_mode):
        raise MoEScopeError(f"{path} is a folder, not a plan file; give the path of the plan JSON file.")
    if info.st_size > MAX_PLAN_BYTES:
        raise _too_large(str(path))

    def read_head() -> bytes:
        with path.open("rb") as handle:
            return handle.read(MAX_PLAN_BYTES + 1)

    data = _os_call(path, read_head)
    if len(data) > MAX_PLAN_BYTES:
        raise _too_large(str(path))
    return data


def _os_call(path: Path, call: Callable[[], _T]) -> _T:
    """``call()``, with the ways the file system can refuse a plan path turned into one sentence."""
    try:
        return call()
    except (FileNotFoundError, NotADirectoryError):
        raise MoEScopeError(f"No plan file at {path}.") from None
    except IsADirectoryError:
        raise MoEScopeError(f"{path} is a folder, not a plan file; give the path of the plan JSON file.") from None
    except PermissionError:
        raise MoEScopeError(f"{path} cannot be read (permission denied); make the plan file readable.") from None
    except OSError as exc:
        raise MoEScopeError(f"{path} cannot be read ({exc.strerror or exc}); give a readable plan file.") from None
    except ValueError:  # a NUL byte in the path
        raise MoEScopeError(f"{str(path)!r} is not a valid file path; give the path of the plan JSON file.") from None


def _too_large(name: str) -> MoEScopeError:
    return MoEScopeError(f"{name} is larger than {MAX_PLAN_BYTES // 2**20} MB, far more than any plan needs; "
                         f"check that it is a MoEScope plan.")


def _too_deep(name: str) -> MoEScopeError:
    return MoEScopeError(f"{name} nests JSON deeper than {MAX_NESTING} levels, which no plan does; check that it is "
                         f"a MoEScope plan.")


# Fields ------------------------------------------------------------------------------------------------------


def _show(value: Any, limit: int = 40) -> str:
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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_header(data: Any) -> None:
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise MoEScopeError(f"Not a MoEScope plan: expected a JSON object with \"format\": \"{PLAN_FORMAT}\".")
    version = data.get("version")
    if isinstance(version, bool) or version != PLAN_VERSION:
        raise MoEScopeError(f"Plan version {_show(version)} is not supported; this MoEScope reads "
                            f"version {PLAN_VERSION}.")


def _check_nesting(data: Any) -> None:
    """Refuse absurdly deep documents here, iteratively, so that nothing later (json.dumps, the dashboard)
    recurses into them."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise _too_deep("Plan")
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
    raise MoEScopeError(f"{where} has key {_show(key)}, which is not a layer index; use layer numbers such as \"0\".")


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


def _parse_layers(raw: Any) -> dict[int, list[int]]:
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
                    raise MoEScopeError(f"Plan layer {layer} keeps {_show(e)}; expert ids must be integers.")
        layers[layer] = keep
    return layers


def _parse_top_k(raw: Any) -> int | None:
    if raw is not None and not _is_int(raw):
        raise MoEScopeError(f"Plan top_k must be an integer or null, not {_show(raw)}.")
    return raw


def _parse_model(raw: Any) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise MoEScopeError(f"Plan \"model\" must be the model's path or hub id as a string, or null, not "
                            f"{_kind(raw)}.")
    return raw


def _parse_dynamic_skip(raw: Any, json_keys: bool) -> dict[int, float]:
    where = "Plan \"dynamic_skip\""
    betas = _layer_map(raw, where, "a threshold between 0 and 1", json_keys)
    for layer, beta in betas.items():
        if not _is_real(beta) or not 0 <= beta <= 1:  # NaN fails the comparison too
            raise MoEScopeError(f"{where} for layer {layer} is {_show(beta)}; give a number between 0 and 1.")
        betas[layer] = float(beta)
    return betas


def _parse_merge(raw: Any, json_keys: bool, check_values: bool) -> dict[int, tuple[Any, Any]]:
    where = "Plan \"merge\""
    entries = _layer_map(raw, where, "{\"router\": matrix, \"experts\": matrix}", json_keys)
    out: dict[int, tuple[Any, Any]] = {}
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
        out[layer] = (entry["router"], entry["experts"])
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
            raise MoEScopeError(f"{where} holds {_show(bad)} in row {i}; entries must be finite numbers.")


def _finite_number(x: Any) -> bool:
    return _is_real(x) and -_FLOAT32_MAX <= x <= _FLOAT32_MAX  # NaN fails the comparison too


def _finite_row(row: list) -> bool:
    if _FLOATS.issuperset(map(type, row)):  # the usual row of plain floats is checked in C
        return all(map(math.isfinite, row)) and -_FLOAT32_MAX <= min(row) and max(row) <= _FLOAT32_MAX
    return all(map(_finite_number, row))


def _as_tensor(matrix: Any, layer: int, name: str) -> "torch.Tensor":
    import torch

    try:
        tensor = torch.tensor(matrix, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        tensor = None
    if tensor is None or tensor.dim() != 2:
        raise MoEScopeError(f"Plan \"merge\" matrix {name!r} of layer {layer} must be a list of equal-length rows "
                            f"of numbers.")
    return tensor


# Validation against a model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingSpec:
    """What validation needs to know about a model's routing (see ``MoEModel.routing_spec``)."""

    family: str
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    n_groups: int = 1
    topk_group: int | None = None
    fixed_top_k: bool = False
    group_top_needs: int = 1  # experts a group must keep for its group score (DeepSeek-V3 sums the top 2)
    skippable: bool = True  # whether masking can apply dynamic skipping (routers that return decisions)


def validate_plan(plan: Plan, spec: RoutingSpec, for_export: bool = False) -> None:
    """Reject plans masking or export cannot honour, saying what to change. Linear in the plan's size."""
    n = spec.n_experts
    top_k = plan.top_k if plan.top_k is not None else spec.top_k
    if plan.top_k is not None:
        if spec.fixed_top_k and plan.top_k != spec.top_k:
            raise MoEScopeError(f"{spec.family} always routes to {spec.top_k} experts; set top_k to null or "
                                f"{spec.top_k}.")
        if not 1 <= plan.top_k <= n:
            raise MoEScopeError(f"top_k {_show(plan.top_k)} is out of range; choose 1 to {n}.")
    for layer, beta in plan.dynamic_skip.items():
        _check_moe_layer(f"dynamic_skip names layer {layer}, which is", layer, spec)
        if not 0 <= beta <= 1:
            raise MoEScopeError(f"dynamic_skip beta {beta} for layer {layer} must lie between 0 and 1.")
        if not spec.skippable:
            raise MoEScopeError(f"{spec.family} routers cannot skip experts dynamically; remove dynamic_skip.")
    if for_export and plan.dynamic_skip:
        raise MoEScopeError("dynamic_skip is a rule applied at inference that plain transformers cannot store; "
                            "remove it from the plan to export (keep it for masked evaluation).")
    for layer, keep in plan.layers.items():
        _check_moe_layer(f"Layer {layer} is", layer, spec)
        _check_keep(layer, keep, spec, top_k)
    for layer, (router_map, expert_map) in plan.merge.items():
        _check_moe_layer(f"merge names layer {layer}, which is", layer, spec)
        keep = plan.keep(layer, n)
        for what, matrix in (("router", router_map), ("experts", expert_map)):
            if tuple(matrix.shape) != (len(keep), n):
                raise MoEScopeError(f"merge matrix {what!r} of layer {layer} is {tuple(matrix.shape)}; it must be "
                                    f"[{len(keep)} kept, {n} experts].")
            if not bool(matrix.isfinite().all()):
                raise MoEScopeError(f"merge matrix {what!r} of layer {layer} holds non-finite values.")
    if for_export:
        counts = {layer: len(plan.keep(layer, n)) for layer in spec.moe_layers}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise MoEScopeError(f"{spec.family} checkpoints need the same number of experts in every MoE layer "
                                f"(kept per layer: {shown}); make the counts equal to export.")


def _ids(ids: list[int], limit: int = 8) -> str:
    """A list of ids for a message, cut after ``limit`` so that a huge plan still gets a one-line message."""
    shown = ", ".join(_show(e, 24) for e in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def _check_moe_layer(subject: str, layer: int, spec: RoutingSpec) -> None:
    if layer not in spec.moe_layers:
        raise MoEScopeError(f"{subject} not a MoE layer of this model; MoE layers are "
                            f"{_ids(list(spec.moe_layers), 16)}.")


def _check_keep(layer: int, keep: list[int], spec: RoutingSpec, top_k: int) -> None:
    n = spec.n_experts
    if len(keep) > n:
        raise MoEScopeError(f"Layer {layer} lists {len(keep)} experts but the model has only {n}; list each kept "
                            f"expert once, with ids 0 to {n - 1}.")
    bad = [e for e in keep if not 0 <= e < n]
    if bad:
        raise MoEScopeError(f"Layer {layer} keeps expert(s) {_ids(bad)} out of range; expert ids run 0 to {n - 1}.")
    counts = Counter(keep)
    if len(counts) != len(keep):
        dup = sorted(e for e, c in counts.items() if c > 1)
        raise MoEScopeError(f"Layer {layer} lists expert(s) {_ids(dup)} more than once; list each kept expert once.")
    if len(keep) < top_k:
        raise MoEScopeError(f"Layer {layer} keeps {len(keep)} expert(s) but routing picks top-{top_k}; keep at "
                            f"least {top_k} or lower top_k.")
    if spec.n_groups > 1:
        _check_groups(layer, keep, spec, top_k)


def _check_groups(layer: int, keep: list[int], spec: RoutingSpec, top_k: int) -> None:
    size = spec.n_experts // spec.n_groups
    per_group = [sum(1 for e in keep if e // size == g) for g in range(spec.n_groups)]
    if len(set(per_group)) > 1:
        raise MoEScopeError(f"Layer {layer} keeps {per_group} experts in its {spec.n_groups} routing groups; grouped "
                            f"routing needs the same number kept in every group of {size}.")
    if per_group[0] < spec.group_top_needs:
        raise MoEScopeError(f"Layer {layer} keeps {per_group[0]} expert(s) per group; {spec.family} scores a group by "
                            f"its top {spec.group_top_needs}, so keep at least {spec.group_top_needs} per group.")
    if spec.topk_group is not None and top_k > spec.topk_group * per_group[0]:
        raise MoEScopeError(f"Layer {layer}: top-{top_k} cannot be chosen from {spec.topk_group} group(s) of "
                            f"{per_group[0]} kept experts; keep more per group or lower top_k.")
