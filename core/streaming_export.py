"""Export a pruned checkpoint shard by shard, without ever loading the model.

The source checkpoint's safetensors shards are read one tensor group at a time; each tensor is written
unchanged, expert-sliced, merged, or as the sliced or mapped router (``core.export_tensors``), into new shards
of bounded size whose headers are planned in advance (``core.checkpoint_writer``). Which tensors are routers
or experts of which layer comes from the family adapter applied to the model built on the meta device (no
memory, no initialisation), and checkpoint names follow transformers' own conversion both ways
(``core.checkpoint_conversion``), so the output holds, tensor for tensor, what the in-memory export writes.
Memory: the tensors of one conversion group (one layer's experts at most), whatever the model's size.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .atomic import atomic_directory
from .checkpoint_conversion import ModelView
from .checkpoint_files import SafetensorsCheckpoint, has_safetensors
from .checkpoint_writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardedWriter,
    TensorSpec,
    parse_size,
)
from .errors import MoEScopeError
from .export_tensors import PrunedTensorStream
from .outputs import check_output, output_lock
from .plan import Plan, validate_plan

_READ_FROM_SOURCE: Any = object()  # export_checkpoint's default: read the tokenizer from the source folder


def meta_model(config: Any, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of ``config`` on the meta device: every module and tensor name and shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def _read_config(source: Path) -> Any:
    from transformers import AutoConfig

    from .model_checks import adapter_for, check_routing, first_line, read_config_json

    raw = read_config_json(source)
    check_routing(raw, adapter_for(SimpleNamespace(model_type=raw.get("model_type")), str(source)),
                  str(source / "config.json"))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MoEScopeError(f"Could not read a model config from {source}: {first_line(exc)}") from None
    check_routing(config, adapter_for(config, str(source)), str(source / "config.json"))
    return config


def _dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, tensor in model.state_dict().items()}


def _auto_dtype(config: Any, checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` loads in: the config's, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    floating = (checkpoint.header(key)[1] for key in checkpoint.file_of)
    return next((d for d in floating if d.is_floating_point), torch.float32)


def _loaded_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype ``from_pretrained(dtype=dtype)`` holds each tensor of ``model`` in: the ``from_config`` model's, with
    transformers' keep-in-fp32 plan on top (applied by from_pretrained only)."""
    from transformers.core_model_loading import build_glob_alternation

    held = _dtypes(model)
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if plan:
        alternation, by_group, _ = build_glob_alternation(list(plan))
        for name in held:
            match = alternation.search(name)
            if match is not None:
                held[name] = plan[by_group[match.lastgroup]]
    return held


class StreamingExport:
    """A plan applied to the checkpoint in ``source``: checked, planned tensor by tensor, then written by :meth:`write`.

    Tensors are read in the dtypes a loaded model holds them in (``loaded``'s, else what ``from_pretrained`` with
    ``dtype``, default its "auto", would hold) and written in the pruned model's, as the in-memory export does.
    ``fitted``: routers fitted to a 'probs'-mapped plan (``core.router_fit``; only a loaded model can fit them).
    """

    def __init__(self, source: str | Path, plan: Plan, dtype: torch.dtype | None = None,
                 loaded: torch.nn.Module | None = None, fitted: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
        from .export import pruned_config
        from .model import MoEModel

        self.source, self.source_name = Path(source), str(source)  # the name as given is what the plan records
        if not has_safetensors(self.source):
            raise MoEScopeError(f"{source} is not a local folder of safetensors weights; streaming export reads "
                                f"safetensors shards (load the model and export it in memory instead).")
        config = _read_config(self.source)
        self.checkpoint = SafetensorsCheckpoint(self.source)
        main = next(loaded.parameters()).dtype if loaded is not None else dtype or _auto_dtype(config, self.checkpoint)
        self.dtype = main  # what config.json records, as save_pretrained of the pruned model would
        self.original = MoEModel(meta_model(config, main), source=self.source_name)
        validate_plan(plan, self.original.routing_spec(), for_export=True)
        self.plan = plan
        self.pruned = meta_model(pruned_config(self.original, plan), main)
        held = _dtypes(loaded) if loaded is not None else _loaded_dtypes(self.original.model, main)
        self.view = ModelView(self.original.model, self.checkpoint)
        self.stream = PrunedTensorStream(self.view, self.original.adapter, self.original.layers,
                                         self.original.n_experts, self.pruned, plan, held, _dtypes(self.pruned),
                                         fitted)
        self.specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in self.stream.tensors(meta=True)]
        self._check_layout()

    def _check_layout(self) -> None:
        planned = {spec.name: torch.Size(spec.shape) for spec in self.specs}
        expected = self.stream.expected()
        if len(planned) != len(self.specs):
            duplicate = next(n for n, c in collections.Counter(s.name for s in self.specs).items() if c > 1)
            raise MoEScopeError(f"Streaming export would write {duplicate} twice; export this model in memory.")
        missing = sorted(set(expected) - set(planned))
        if missing:
            raise MoEScopeError(f"{self.source} lacks tensors the pruned model needs ({len(missing)}, e.g. "
                                f"{missing[0]}); re-save the checkpoint with save_pretrained.")
        extra = sorted(set(planned) - set(expected))
        wrong = sorted(name for name in planned if name in expected and planned[name] != expected[name])
        if extra or wrong:
            name = (extra or wrong)[0]
            raise MoEScopeError(f"Streaming export would write {name} {tuple(planned[name])}, which the pruned "
                                f"model does not hold; export this model in memory.")

    def matches(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (loaded from the source) holds the checkpoint's tensors under the same names and shapes."""
        held = {name: t.shape for name, t in model.state_dict().items()}
        for group in self.view.groups.values():
            for name, tensor in self.view.realize(group, meta=True).items():
                if held.get(name) != tensor.shape:
                    return False
        return True

    def write(self, out_dir: str | Path, overwrite: bool = False, progress: Callable[[str], None] | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, tokenizer: Any = _READ_FROM_SOURCE,
              sources: tuple[str | Path, ...] = ()) -> Path:
        """Write the pruned checkpoint to ``out_dir`` atomically (``core.export.export_pruned``'s rules for the target)."""
        from .export import save_export_plan

        say = progress or (lambda _msg: None)
        shard_bytes = parse_size(max_shard_size)
        if tokenizer is _READ_FROM_SOURCE:  # read before anything is written: a damaged one fails first
            tokenizer = _source_tokenizer(self.source)
        sources = (self.source_name, *sources)
        out_dir = check_output(out_dir, "export", overwrite, sources=sources)
        with output_lock(out_dir), atomic_directory(check_output(out_dir, "export", overwrite, sources=sources)) as tmp:
            self._write_config(tmp)
            writer = ShardedWriter(tmp, self.specs, shard_bytes, _shard_progress(say))
            say(f"writing {writer.total_tensors} tensors ({_size(writer.total_bytes)}) in {len(writer.files)} "
                f"shard{'s' if len(writer.files) > 1 else ''}")
            try:
                for name, tensor in self.stream.tensors():
                    writer.add(name, tensor)
            finally:
                writer.close()
                self.checkpoint.close()
            writer.finish(sum(torch.Size(s.shape).numel() for s in self.specs))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            save_export_plan(self.plan, self.source_name, tmp)
        say(f"wrote {out_dir}")
        return out_dir

    def _write_config(self, folder: Path) -> None:
        from transformers import GenerationConfig

        config = self.pruned.config
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.architectures = [type(self.pruned).__name__]
        config.save_pretrained(folder)
        try:
            generation = GenerationConfig.from_pretrained(self.source)
        except OSError:  # no generation_config.json: what save_pretrained derives from the config
            generation = GenerationConfig.from_model_config(config)
        generation.save_pretrained(folder)


def _source_tokenizer(source: Path) -> Any:
    """The source's tokenizer as ``load_model`` reads it: None without tokenizer files, one sentence if damaged."""
    from transformers import AutoTokenizer

    from .model_checks import tokenizer_error

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise tokenizer_error(exc, str(source)) from None
        return None  # no tokenizer files: the export has none either
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file (KeyError, tokenizers' own exception)
        raise tokenizer_error(exc, str(source)) from None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _shard_progress(say: Callable[[str], None]) -> Callable[[int, int, int, int, int, int], None]:
    def report(shard: int, shards: int, tensors: int, total_tensors: int, written: int, total: int) -> None:
        say(f"shard {shard} of {shards} written: {tensors} of {total_tensors} tensors, {_size(written)} of "
            f"{_size(total)}")
    return report


def export_checkpoint(source: str | Path, plan: Plan, out_dir: str | Path, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None) -> Path:
    """Write ``plan`` applied to the safetensors checkpoint in ``source`` to ``out_dir``, shard by shard, without
    loading the model. ``dtype`` casts tensors as ``from_pretrained(dtype=...)`` would; None keeps their dtype."""
    if progress is not None:
        progress("reading the checkpoint's headers and planning the shards")
    job = StreamingExport(source, plan, dtype=dtype)
    return job.write(out_dir, overwrite=overwrite, progress=progress, max_shard_size=max_shard_size)

