"""Loading a MoE causal LM and describing it: the handle every other part of MoEScope works on."""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from .adapters import Adapter, MoELayer, adapter_for_model
from .errors import MoEScopeError
from .model_checks import (HeldLoadReport, adapter_for, check_loading_info, check_routing, check_safetensors_files,
                           first_line, read_config_json, tokenizer_error, weights_error)
from .plan import Plan, RoutingSpec

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("cpu", "cuda", "auto")
# None keeps transformers' default (grouped_mm, which is also the fast choice on CPU).
EXPERTS_IMPLEMENTATIONS = (None, "grouped_mm", "eager", "batched_mm")
# Model types whose cache is not a plain per-layer key/value cache that can be repeated per row or cropped
# (state-space or linear-attention layers).
_STATEFUL_CACHE = {"jamba", "granitemoehybrid", "qwen3_next"}


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
    text_tower: str = ""  # set only for the MoE text decoder of a multimodal family

    def to_dict(self) -> dict[str, Any]:
        """The summary's fields; ``text_tower`` only for a multimodal family's text decoder."""
        return {k: v for k, v in asdict(self).items() if k != "text_tower" or v}


def multimodal_parent(config: Any) -> str | None:
    """The multimodal model type whose MoE text decoder ``config`` describes (``qwen3_5_moe`` for
    ``qwen3_5_moe_text``, which a multimodal checkpoint loads as), or None for a text-only family."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = getattr(config, "model_type", "") or ""
    if config.get_text_config() is not config:
        return model_type
    parent = model_type.removesuffix("_text")
    if parent == model_type or parent not in CONFIG_MAPPING:
        return None
    sub_configs = getattr(CONFIG_MAPPING[parent], "sub_configs", None) or {}
    return parent if set(sub_configs) - {"text_config"} else None


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
        self._stored_digest: tuple[tuple, str] | None = None  # (the shards' sizes and times, their routers' digest)

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

    # ----- what the model can do (read by the evaluation harness) -----------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's first parameters are, which is where its inputs go."""
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """The model's output vocabulary (it can be larger than the tokenizer's: padded embeddings)."""
        return self.config.get_text_config().vocab_size

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (None where its config does not say)."""
        text = self.config.get_text_config()
        for name in ("max_position_embeddings", "max_seq_len", "n_positions"):
            value = getattr(text, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return value
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids as the tokenizer and the model's generation config name them."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        named = [] if eos is None else torch.as_tensor(eos).flatten().tolist()
        return sorted({*named, getattr(self.tokenizer, "eos_token_id", None)} - {None})

    @property
    def keeps_last_logits(self) -> bool:
        """Whether the model's forward can compute the logits of the last positions only (``logits_to_keep``)."""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @property
    def reuses_cache(self) -> bool:
        """Whether a pass can continue on another pass's KV cache and the cache be repeated per row or cropped:
        plain per-layer key/value caches over full attention. Not sliding-window or chunked attention (right-padded
        prompts leave a gap before what follows, which a window would count), nor hybrid or state-space caches."""
        text = self.config.get_text_config()
        windowed = (getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
                    or getattr(text, "attention_chunk_size", None)
                    or any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()))
        return not windowed and self.config.model_type not in _STATEFUL_CACHE

    # ----- describing it ------------------------------------------------------------------------------
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
        """sha256 of every MoE router's weights: cheap, and changes whenever routing could. Read from the
        checkpoint's safetensors shards, router tensors only, when the model came from a local folder of them
        (``core.checkpoint_routers``: the same values, offloaded routers included); else from the model."""
        from .checkpoint_routers import stored_router_states

        # The dashboard asks on every rerun (plans and profiles are filed by it); reading the shards again took
        # 0.3 s a slider move at 24 x 128, so the digest read from them is kept while they are unchanged.
        shards = self._shard_stamps()
        if shards is not None and self._stored_digest is not None and self._stored_digest[0] == shards:
            return self._stored_digest[1]
        stored = stored_router_states(self)
        digest = hashlib.sha256()
        for layer in self.layers:
            state = stored[layer.index] if stored is not None else layer.router.state_dict()
            for name, tensor in sorted(state.items()):
                digest.update(f"{layer.index}.{name}".encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if stored is not None and shards is not None:
            self._stored_digest = (shards, digest.hexdigest())
        return digest.hexdigest()

    def _shard_stamps(self) -> tuple | None:
        """Name, size and modification time of each file of a local safetensors checkpoint; else None."""
        from .checkpoint_files import has_safetensors

        if not has_safetensors(self.source):
            return None
        files = [f for f in Path(self.source).iterdir() if f.name.endswith((".safetensors", ".json"))]
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f, st in ((f, f.stat()) for f in files)))

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
            text_tower=_text_tower_note(self.config),
        )


def _text_tower_note(config: Any) -> str:
    parent = multimodal_parent(config)
    if parent is None:
        return ""
    return (f"text tower of a multimodal model ({parent}): only the text decoder is profiled and pruned, and an "
            "export holds the text decoder alone")


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
        raw = read_config_json(path)
        check_routing(raw, adapter_for(SimpleNamespace(model_type=raw.get("model_type")), source), config_name)
        check_safetensors_files(path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except StrictDataclassError as exc:  # a field of the wrong type, e.g. "num_experts_per_tok": null for Mixtral
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise MoEScopeError(f"{config_name} has a value of the wrong type ({detail}); "
                            f"correct that field.") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MoEScopeError(f"Could not read a model config from {source}: {first_line(exc)}") from None
    adapter = adapter_for(config, source)  # refuse unsupported families before loading any weights
    check_routing(config, adapter, config_name)
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
    with HeldLoadReport() as report:
        try:
            model, loading_info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except MoEScopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - each known family becomes one sentence, the rest re-raised
            raise weights_error(exc, source, path if local else None) from None
        check_loading_info(loading_info, config, adapter, source, config_name)
        report.release()  # nothing refused: unexpected keys etc. are still shown as transformers reports them
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise tokenizer_error(exc, source) from None
        tokenizer = None  # no tokenizer files: token ids are shown instead of text
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file (KeyError, tokenizers' own exception)
        raise tokenizer_error(exc, source) from None
    try:
        return MoEModel(model, tokenizer, source=source)
    except MoEScopeError as exc:
        raise MoEScopeError(f"{source}: {exc}") from None
