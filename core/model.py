"""Loading a MoE causal LM and describing it: the handle every other part of MoEScope works on."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, MoELayer, adapter_for_config, adapter_for_model
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
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MoEScopeError(f"Could not read a model config from {source}: {_first_line(exc)}") from None
    adapter_for_config(config)  # refuse unsupported families before loading any weights
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device == "auto":
        kwargs["device_map"] = "auto"
        if offload_folder:
            kwargs["offload_folder"] = offload_folder
    elif device == "cuda":  # one GPU per process under torchrun / accelerate launch
        kwargs["device_map"] = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise MoEScopeError(f"Could not load model weights from {source}: {_first_line(exc)}") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return MoEModel(model, tokenizer, source=source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
