"""Load-time checks of a model directory and of what transformers loaded from it: config.json, safetensors
headers, expert counts and top-k, pickle ``.bin`` weights, the tokenizer. Each refusal is one
:class:`MoEScopeError` sentence naming the file and what to change (see :func:`core.model.load_model`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .adapters import Adapter, adapter_for_config, get_field
from .errors import MoEScopeError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def adapter_for(config: Any, source: str) -> Adapter:
    try:
        return adapter_for_config(config)
    except MoEScopeError as exc:
        raise MoEScopeError(f"{source}: {exc}") from None


def _read_json(file: Path, what: str) -> Any:
    """A JSON file of the model directory, or one sentence saying why it cannot be read."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise MoEScopeError(f"Could not read {file} ({exc.strerror or first_line(exc)}); {what}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoEScopeError(f"{file} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            f"re-save it as UTF-8 JSON.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoEScopeError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                            f"fix it or re-save it.") from None
    except RecursionError:
        raise MoEScopeError(f"{file} is nested too deeply to read; {what}.") from None


def read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise MoEScopeError(f"No config.json in {path}; give the directory that holds the model's config.json and "
                            f"weights (as written by save_pretrained).")
    raw = _read_json(file, "give the directory that holds the model's config.json")
    if not isinstance(raw, dict):
        kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(raw), "null")
        raise MoEScopeError(f"{file} holds a JSON {kind}, not an object; it must be the model's "
                            f"config, an object with a model_type field.")
    if not isinstance(raw.get("model_type"), str):
        raise MoEScopeError(f"{file} has no model_type string; add the model's family, e.g. "
                            f"\"model_type\": \"mixtral\".")
    return raw


def check_safetensors_files(path: Path) -> None:
    """Open the header of every safetensors file transformers would read, naming the one that is damaged."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        raw = _read_json(index, "re-download or re-save the checkpoint")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MoEScopeError(f"{index} has no weight_map of tensor names to file names; re-download or re-save "
                                f"the checkpoint.")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise MoEScopeError(f"{index} names the shard {file.name}, which is not in {path}; download the "
                                    f"missing shard or re-save the checkpoint.")
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        return
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise _damaged_safetensors(file, exc) from None


def _damaged_safetensors(file: Path | str, exc: BaseException) -> MoEScopeError:
    detail = first_line(exc).removeprefix("Error while deserializing header: ")
    detail = detail if len(detail) <= 120 else detail[:117] + "..."
    return MoEScopeError(f"{file} is not a readable safetensors file ({detail}); it is truncated or damaged, so "
                         f"re-download or re-save the checkpoint.")


def _bin_checkpoint(path: Path | None) -> bool:
    """Whether transformers reads pickle-format ``.bin`` weights from this directory (no safetensors there)."""
    if path is None:
        return False
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return False
    return (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file()


def weights_error(exc: BaseException, source: str, path: Path | None) -> BaseException:
    """One sentence for a failure while transformers loads the weights; unknown exceptions pass unchanged."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        return _damaged_safetensors(f"a safetensors file of {source}", exc)
    if _bin_checkpoint(path) and isinstance(exc, (pickle.UnpicklingError, EOFError, KeyError, RuntimeError,
                                                  OSError, ValueError)):
        if "weights only load failed" in str(exc).lower():
            return MoEScopeError(f"The pytorch_model.bin weights in {source} hold pickled Python objects, which "
                                 f"MoEScope never unpickles (it loads only safetensors or weights_only torch "
                                 f"checkpoints); convert them to model.safetensors with a tool you trust.")
        return MoEScopeError(f"The pytorch_model.bin weights in {source} are not a readable torch checkpoint "
                             f"({type(exc).__name__}: {first_line(exc)}); re-download or re-save them, "
                             f"preferably as safetensors.")
    if isinstance(exc, (OSError, ValueError)):
        return MoEScopeError(f"Could not load model weights from {source}: {first_line(exc)}")
    if isinstance(exc, RuntimeError) and ("loading state_dict" in str(exc) or "conversion" in str(exc)):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__
        return MoEScopeError(f"The weights in {source} do not fit its config ({detail}); correct config.json or "
                             f"use the weights it was saved with.")
    return exc


def check_loading_info(info: dict[str, Any], config: Any, adapter: Adapter, source: str, config_name: str) -> None:
    """Refuse a model in which transformers randomly initialised tensors (shape mismatch or missing weights)."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
    missing = sorted(info.get("missing_keys") or ())
    if not mismatched and not missing:
        return
    fields = f"{adapter.n_experts_field} = {_field_or_none(config, adapter.n_experts_field)}"
    if mismatched:
        key, in_checkpoint, for_config = mismatched[0]
        others = f" and {len(mismatched) - 1} more tensors" if len(mismatched) > 1 else ""
        raise MoEScopeError(
            f"The weights in {source} do not match its config: {key} is {list(in_checkpoint)} in the checkpoint but "
            f"{list(for_config)} for the config{others}; correct {config_name} (it sets {fields}) to match the "
            f"weights, or use the weights it was saved with.")
    others = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise MoEScopeError(
        f"The checkpoint in {source} has no weights for {missing[0]}{others}, which the config asks for and "
        f"transformers would fill with random values; correct {config_name} to match the checkpoint or add the "
        f"missing weights.")


_ABSENT = object()


def _field_or_none(config: Any, dotted: str, absent: Any = None) -> Any:
    try:
        return get_field(config, dotted)
    except (AttributeError, KeyError, TypeError):
        return absent


def check_routing(config: Any, adapter: Adapter, config_name: str) -> None:
    """The expert count and top-k the router will use must be integers with 1 <= top-k <= experts.

    ``config`` is a transformers config, or the raw ``config.json`` dict (checked before transformers parses
    it, so its type errors get the same sentence); fields a raw dict leaves out are skipped there.

    A null top-k is refused rather than defaulted: no supported family documents a default (the default
    ``DeepseekV2Config`` leaves ``num_experts_per_tok`` at None, while DeepSeek-V2 checkpoints set 6), and a
    guess would silently change routing.
    """
    raw = isinstance(config, dict)
    n_field = adapter.n_experts_field
    n_experts = _field_or_none(config, n_field, _ABSENT if raw else None)
    if n_experts is not _ABSENT and (not _is_int(n_experts) or n_experts < 1):
        raise MoEScopeError(f"{config_name} sets {n_field} to {_show(n_experts)}; set it to the number of experts in "
                            f"each MoE layer of the checkpoint (a positive integer).")
    if adapter.fixed_top_k is not None:
        top_k, k_field = adapter.fixed_top_k, None
    else:
        k_field = adapter.top_k_field
        top_k = _field_or_none(config, k_field, _ABSENT if raw else None)
        limit = n_experts if _is_int(n_experts) else None
        if top_k is not _ABSENT and (not _is_int(top_k) or top_k < 1 or (limit is not None and top_k > limit)):
            shown = _show(top_k) + (f", more than its {limit} experts" if _is_int(top_k) and limit and top_k > limit
                                    else "")
            allowed = f"an integer from 1 to {limit} ({n_field})" if limit else "a positive integer"
            raise MoEScopeError(f"{config_name} sets {k_field} to {shown}; set it to how many experts each token is "
                                f"routed to, {allowed}.")
    if raw:
        return
    n_groups = adapter.n_groups(config)
    if n_groups > 1:
        group_field, topk_group_field = adapter.group_fields
        topk_group = _field_or_none(config, topk_group_field)
        if n_experts % n_groups or not _is_int(topk_group) or not 1 <= topk_group <= n_groups \
                or top_k > topk_group * (n_experts // n_groups):
            raise MoEScopeError(
                f"{config_name} sets {group_field} = {n_groups} and {topk_group_field} = {_show(topk_group)}, which "
                f"cannot route {top_k} of {n_experts} experts per token; {group_field} must divide {n_field} and "
                f"{topk_group_field} groups (1 to {group_field}) must hold at least "
                f"{k_field or 'top-k'} experts.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = "null" if value is None else json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class HeldLoadReport(logging.Filter):
    """Hold back transformers' multi-line load report while weights load; it is dropped when MoEScope refuses
    the model (the refusal says what the report would) and logged as usual otherwise (:meth:`release`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("transformers.modeling_utils")

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> HeldLoadReport:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)

    def release(self) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)
        self.records.clear()


def tokenizer_error(exc: BaseException, source: str) -> MoEScopeError:
    return MoEScopeError(f"Could not read the tokenizer files in {source} ({type(exc).__name__}: {first_line(exc)}); "
                         f"fix or re-download them, or remove them to work with token ids.")
