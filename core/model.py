"""Loading a MoE causal LM and describing it: the handle every other part of MoEScope works on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from .adapters import Adapter, MoELayer, adapter_for_config, adapter_for_model, get_field
from .errors import MoEScopeError
from .plan import Plan, RoutingSpec

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("cpu", "cuda", "auto")
# None keeps transformers' default (grouped_mm, which is also the fast choice on CPU).
EXPERTS_IMPLEMENTATIONS = (None, "grouped_mm", "eager", "batched_mm")


@dataclass(frozen=True)
class ModelInfo:
    """A model summary for the CLI and the dashboard."""

    source: str
    family: str
    model_type: str
    n_layers: int
    moe_layers: list[int]
    n_experts: int
    top_k: int
    n_groups: int
    shared_experts: list[str]
    total_params: int
    active_params: int
    expert_params: int
    weight_bytes: int
    dtype: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MoEModel:
    """A loaded MoE causal LM with its adapter and tokenizer.

    ``lock`` serialises everything that changes routing in place (masking), so one cached model can serve
    several dashboard sessions: each evaluation holds the lock while its plan is applied.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, source: str = "<in memory>",
                 adapter: Adapter | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.adapter = adapter or adapter_for_model(model)
        self.layers: list[MoELayer] = self.adapter.moe_layers(model)
        self.lock = threading.RLock()
        self.active_plan: Plan | None = None  # set while a plan is masked in (see core.masking)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_experts(self) -> int:
        return self.adapter.n_experts(self.config)

    @property
    def top_k(self) -> int:
        return self.adapter.top_k(self.config)

    @property
    def effective_top_k(self) -> int:
        """The top-k routing uses right now: the masked plan's, else the model's own."""
        plan = self.active_plan
        return plan.top_k if plan is not None and plan.top_k is not None else self.top_k

    @property
    def layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise MoEScopeError(f"Layer {index} is not a MoE layer; MoE layers are {self.layer_indices}.")

    def routing_spec(self) -> RoutingSpec:
        config = self.config
        n_groups = self.adapter.n_groups(config)
        topk_group = getattr(config, self.adapter.group_fields[1], None) if n_groups > 1 else None
        return RoutingSpec(
            family=self.adapter.family,
            moe_layers=tuple(self.layer_indices),
            n_experts=self.n_experts,
            top_k=self.top_k,
            n_groups=n_groups,
            topk_group=topk_group,
            fixed_top_k=self.adapter.fixed_top_k is not None,
            group_top_needs=2 if self.adapter.bias_corrected and n_groups > 1 else 1,
            skippable=self.adapter.router_output == "decisions",
        )

    def token_texts(self, ids: list[int]) -> list[str]:
        """The text each token adds to the sequence, for showing routed tokens one by one. Decoded
        incrementally, so SentencePiece word-start spaces and multi-byte characters come out right."""
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        pieces, previous = [], ""
        for end in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:end])
            pieces.append(text[len(previous):] if text.startswith(previous) else self.tokenizer.decode(ids[end - 1:end]))
            previous = text
        return pieces

    def weights_digest(self) -> str:
        """sha256 of every MoE router's weights: cheap, and changes whenever routing could."""
        digest = hashlib.sha256()
        for layer in self.layers:
            for name, tensor in sorted(layer.router.state_dict().items()):
                digest.update(f"{layer.index}.{name}".encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def info(self) -> ModelInfo:
        params = list(self.model.parameters())
        total = sum(p.numel() for p in params)
        expert = sum(p.numel() for layer in self.layers for p in layer.experts.parameters())
        active = total - expert + expert * self.top_k // self.n_experts
        first = params[0]
        return ModelInfo(
            source=self.source,
            family=self.adapter.family,
            model_type=self.config.model_type,
            n_layers=len(self.adapter.decoder_layers(self.model)),
            moe_layers=self.layer_indices,
            n_experts=self.n_experts,
            top_k=self.top_k,
            n_groups=self.adapter.n_groups(self.config),
            shared_experts=sorted({a for layer in self.layers for a in self.adapter.shared_experts(layer)}),
            total_params=total,
            active_params=active,
            expert_params=expert,
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            dtype=str(first.dtype).replace("torch.", ""),
            device=str(first.device),
        )


def load_model(source: str | Path, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
               experts_implementation: str | None = None, offload_folder: str | None = None) -> MoEModel:
    """Load a local directory or hub id as a :class:`MoEModel`.

    ``device="auto"`` spreads the model with accelerate's ``device_map`` over the GPUs, then CPU memory,
    then ``offload_folder`` on disk when given. ``trust_remote_code`` stays off
    unless the caller asks: remote code runs arbitrary Python from the checkpoint.

    A model that cannot be used as it is gets one :class:`MoEScopeError` sentence naming the path and what to
    change, never a traceback: a missing or unreadable ``config.json``, damaged safetensors files, a pickle
    ``.bin`` that torch's ``weights_only`` loader refuses (pickles are never run), weights whose shapes or names
    do not match the config (transformers would randomly initialise those tensors), and expert counts or top-k
    values the router cannot use (top-k null, below 1, or above the number of experts).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise MoEScopeError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if device not in DEVICES:
        raise MoEScopeError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise MoEScopeError(f"Unknown experts implementation {experts_implementation!r}; choose one of "
                            f"{', '.join(i for i in EXPERTS_IMPLEMENTATIONS if i)}.")
    if experts_implementation == "batched_mm" and device == "cpu":
        raise MoEScopeError("batched_mm is about 80x slower than grouped_mm on CPU; use grouped_mm (the default) "
                            "or eager there.")
    if device == "cuda" and not torch.cuda.is_available():
        raise MoEScopeError("Device 'cuda' was asked for but no CUDA GPU is available; use --device cpu.")
    source = str(source)
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not path.is_dir():
        raise MoEScopeError(f"No model directory at {source}; give a local directory or a hub id like "
                            f"'mistralai/Mixtral-8x7B-v0.1'.")
    local = path.is_dir()
    config_name = str(path / "config.json") if local else f"the config of {source}"
    if local:  # cheap checks first, each naming the file, before transformers reads anything
        raw = _read_config_json(path)
        _check_routing(raw, _adapter_for(SimpleNamespace(model_type=raw.get("model_type")), source), config_name)
        _check_safetensors_files(path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except StrictDataclassError as exc:  # a field of the wrong type, e.g. "num_experts_per_tok": null for Mixtral
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise MoEScopeError(f"{config_name} has a value of the wrong type ({detail}); "
                            f"correct that field.") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MoEScopeError(f"Could not read a model config from {source}: {_first_line(exc)}") from None
    adapter = _adapter_for(config, source)  # refuse unsupported families before loading any weights
    _check_routing(config, adapter, config_name)
    # weights_only=True is transformers' default too; said here so a .bin pickle is never run whatever changes.
    # Mismatched shapes are collected (not raised mid-report) and refused below with one sentence.
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "weights_only": True,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if device == "auto":
        kwargs["device_map"] = "auto"
        if offload_folder:
            kwargs["offload_folder"] = offload_folder
    elif device == "cuda":  # one GPU per process under torchrun / accelerate launch
        kwargs["device_map"] = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    with _HeldLoadReport() as report:
        try:
            model, loading_info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except MoEScopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - each known family becomes one sentence, the rest re-raised
            raise _weights_error(exc, source, path if local else None) from None
        _check_loading_info(loading_info, config, adapter, source, config_name)
        report.release()  # nothing refused: unexpected keys etc. are still shown as transformers reports them
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise _tokenizer_error(exc, source) from None
        tokenizer = None  # no tokenizer files: token ids are shown instead of text
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file (KeyError, tokenizers' own exception)
        raise _tokenizer_error(exc, source) from None
    try:
        return MoEModel(model, tokenizer, source=source)
    except MoEScopeError as exc:
        raise MoEScopeError(f"{source}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _adapter_for(config: Any, source: str) -> Adapter:
    try:
        return adapter_for_config(config)
    except MoEScopeError as exc:
        raise MoEScopeError(f"{source}: {exc}") from None


def _read_json(file: Path, what: str) -> Any:
    """A JSON file of the model directory, or one sentence saying why it cannot be read."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise MoEScopeError(f"Could not read {file} ({exc.strerror or _first_line(exc)}); {what}.") from None
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


def _read_config_json(path: Path) -> dict[str, Any]:
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


def _check_safetensors_files(path: Path) -> None:
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
    detail = _first_line(exc).removeprefix("Error while deserializing header: ")
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


def _weights_error(exc: BaseException, source: str, path: Path | None) -> BaseException:
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
                             f"({type(exc).__name__}: {_first_line(exc)}); re-download or re-save them, "
                             f"preferably as safetensors.")
    if isinstance(exc, (OSError, ValueError)):
        return MoEScopeError(f"Could not load model weights from {source}: {_first_line(exc)}")
    if isinstance(exc, RuntimeError) and ("loading state_dict" in str(exc) or "conversion" in str(exc)):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__
        return MoEScopeError(f"The weights in {source} do not fit its config ({detail}); correct config.json or "
                             f"use the weights it was saved with.")
    return exc


def _check_loading_info(info: dict[str, Any], config: Any, adapter: Adapter, source: str, config_name: str) -> None:
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


def _check_routing(config: Any, adapter: Adapter, config_name: str) -> None:
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


class _HeldLoadReport(logging.Filter):
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

    def __enter__(self) -> _HeldLoadReport:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)

    def release(self) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)
        self.records.clear()


def _tokenizer_error(exc: BaseException, source: str) -> MoEScopeError:
    return MoEScopeError(f"Could not read the tokenizer files in {source} ({type(exc).__name__}: {_first_line(exc)}); "
                         f"fix or re-download them, or remove them to work with token ids.")
