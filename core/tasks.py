"""Task loading and rendering: one place that says how an example becomes a prompt and answers.

The evaluation harness, profiling and the sample model's scripts all render examples through
:func:`render_example`, so their numbers agree. Local tasks are JSON-lines files read through
``datasets.load_dataset("json", ...)``; hub tasks go through ``load_dataset(id, config, split=...)``.
What a spec holds and how it is checked is ``core.task_spec``; its names are re-exported here.

Named tasks ("qa", "code", ...) are the folders of the task directory: ``$MOESCOPE_TASKS_DIR`` when set,
else the sample tasks bundled with the repository (:data:`SAMPLE_TASKS_DIR`, ``sample_data/tasks``).
It is read at each call (:func:`tasks_dir`), so setting the variable takes effect at once.
"""

from __future__ import annotations

import codecs
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from core.task_spec import (MAX_SPEC_BYTES, METRIC_KINDS, MetricKind, TaskError, TaskSpec, TaskWarning,
                            describe_json, template_fields)

__all__ = ["MAX_SPEC_BYTES", "METRIC_KINDS", "MetricKind", "Rendered", "SAMPLE_TASKS_DIR", "TaskError", "TaskSpec",
           "TaskWarning", "get_task_spec", "list_sample_tasks", "load_task", "render_example", "task_texts",
           "tasks_dir", "template_fields", "training_text", "warn_empty"]

SAMPLE_TASKS_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "tasks"  # the default, in a checkout


def tasks_dir() -> Path:
    """The folder whose task folders can be named: ``$MOESCOPE_TASKS_DIR``, else :data:`SAMPLE_TASKS_DIR`."""
    return Path(os.environ.get("MOESCOPE_TASKS_DIR") or SAMPLE_TASKS_DIR).expanduser()


def _check_utf8(path: Path, task: str) -> None:
    """Refuse a data file that is not UTF-8 before ``datasets`` reads it (Arrow keeps the bad bytes and the
    rows fail to decode later, one by one), naming its line."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    line, offset, newline = 1, 0, b"\n"
    try:
        with path.open("rb") as f:
            while chunk := f.read(2**20):
                pending = decoder.getstate()[0]  # the start of a character split across chunks
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    before = (pending + chunk)[:e.start]
                    where = f"byte {offset - len(pending) + e.start}, line {line + before.count(newline)}"
                    raise TaskError(f"task {task!r}: data file {path} is not UTF-8 ({where}): save it as UTF-8") from None
                line += chunk.count(newline)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise TaskError(f"task {task!r}: data file {path} ends inside a UTF-8 character: save it as UTF-8") from None
    except OSError as e:
        raise TaskError(f"task {task!r}: could not read data file {path} ({e.strerror or type(e).__name__}): "
                        "fix data_files or the file's permissions") from None


def list_sample_tasks(folder: str | Path | None = None) -> list[str]:
    """Names of the tasks in ``folder`` (default :func:`tasks_dir`): its folders with a task.json, sorted."""
    return sorted(p.parent.name for p in Path(folder or tasks_dir()).glob("*/task.json"))


def get_task_spec(spec_or_path: Union[TaskSpec, str, Path]) -> TaskSpec:
    """Accept a TaskSpec, a task name from :func:`tasks_dir` ('qa'), a task folder, or a task.json path."""
    if isinstance(spec_or_path, TaskSpec):
        return spec_or_path
    p = Path(spec_or_path)
    if not p.exists() and (tasks_dir() / str(spec_or_path)).is_dir():
        p = tasks_dir() / str(spec_or_path)
    if not p.exists():
        names = ", ".join(list_sample_tasks()) or "none found"
        raise TaskError(f"unknown task {spec_or_path!r}: give a task.json path or one of the sample tasks ({names})")
    return TaskSpec.from_json(p)


def load_task(spec_or_path: Union[TaskSpec, str, Path], split: str = "test"):
    """Load one split as a ``datasets.Dataset`` and check it has the columns the spec needs."""
    import datasets

    spec = get_task_spec(spec_or_path)
    if spec.data_files:
        if split not in spec.data_files:
            raise TaskError(f"task {spec.name!r} has no split {split!r}: choose one of {', '.join(spec.data_files)}")
        path = Path(spec.data_files[split])
        if not path.is_absolute() and spec.base_dir is not None:
            path = spec.base_dir / path
        if not path.exists():
            raise TaskError(f"task {spec.name!r}: data file {path} is missing; regenerate it (python sample_data/generate_tasks.py) or fix data_files")
        _check_utf8(path, spec.name)
        try:
            ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; show one line
            raise TaskError(f"task {spec.name!r}: could not read {path} as JSON lines ({type(e).__name__}): fix the file") from None
    else:
        hub_split = spec.hf_split.get(split, split)
        try:
            ds = datasets.load_dataset(spec.hf_dataset, spec.hf_config, split=hub_split)
        except Exception as e:  # noqa: BLE001
            raise TaskError(
                f"task {spec.name!r}: could not load {spec.hf_dataset!r} (config {spec.hf_config!r}, split {hub_split!r}) "
                f"from the Hugging Face hub or its cache ({type(e).__name__}); check the id and network access, "
                "or download it once and set HF_DATASETS_OFFLINE=1") from None
    missing = [c for c in spec.required_columns() if c not in ds.column_names]
    if missing:
        raise TaskError(f"task {spec.name!r} split {split!r} lacks column(s) {', '.join(missing)} "
                        f"(has {', '.join(ds.column_names)}): fix the data or the spec's fields")
    return ds


@dataclass
class Rendered:
    """One example ready for a model. Which fields are set depends on the metric kind:
    generation: prompt + references; lm_loss: text; multiple_choice: prompt + options + label."""

    prompt: str = ""
    references: list[str] = field(default_factory=list)
    text: str = ""
    options: list[str] = field(default_factory=list)
    label: int = -1


def _scalar_text(value: Any) -> str | None:
    """A column value as text: strings as they are, numbers written out; None for null, lists and objects."""
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return None
    return value if isinstance(value, str) else str(value)


def render_example(spec: TaskSpec, example: dict[str, Any], index: int | None = None) -> Rendered:
    """Turn an example into model inputs. Options are returned with ``target_prefix`` already
    prepended (they are continuations of the prompt); references are bare answer strings. ``index`` (the
    example's position in its split) is named in the TaskError a malformed example gives.

    An lm_loss example whose text is null renders as empty text; evaluation skips empty texts (see
    :meth:`core.evaluation.Evaluator.evaluate`)."""
    where = f"task {spec.name!r}: example {index}" if index is not None else f"task {spec.name!r}: an example"
    try:
        if spec.metric == "lm_loss":
            value = example[spec.text_field]
            text = "" if value is None else _scalar_text(value)
            if text is None:
                raise TaskError(f"{where} has {describe_json(value)} in {spec.text_field!r} where text belongs: fix the data")
            return Rendered(text=text)
        try:
            prompt = spec.prompt_template.format(**example)
        except (IndexError, TypeError, ValueError, AttributeError, OverflowError) as e:  # KeyError: below
            raise TaskError(f"{where} does not fit prompt_template ({type(e).__name__}: {e}): fix the data or "
                            "the template") from None
        if spec.metric == "multiple_choice":
            raw = example[spec.options_field]
            texts = [_scalar_text(o) for o in raw] if isinstance(raw, (list, tuple)) else [None]
            if not raw or None in texts:
                raise TaskError(f"{where} has {describe_json(raw)} in {spec.options_field!r} where a list of option texts "
                                "belongs: fix the data")
            options = [spec.target_prefix + o for o in texts]  # type: ignore[operator]
            value = example[spec.answer_field]
            label = value if isinstance(value, int) and not isinstance(value, bool) else None
            if isinstance(value, str) and value.strip().isdigit():
                label = int(value)
            if label is None:
                raise TaskError(f"{where} has {describe_json(value)} in {spec.answer_field!r} where the right option's "
                                "index (0, 1, ...) belongs: fix the data")
            if not 0 <= label < len(options):
                raise TaskError(f"{where}: label {label} is out of range for {len(options)} options")
            return Rendered(prompt=prompt, options=options, label=label)
        ans = example[spec.answer_field]
        if isinstance(ans, dict):  # SQuAD schema: {"text": [...], "answer_start": [...]}
            ans = ans.get("text", [])
        found = [_scalar_text(a) for a in ans] if isinstance(ans, (list, tuple)) else [_scalar_text(ans)]
        refs = [r for r in found if r is not None]
        if not refs or len(refs) < len(found):
            raise TaskError(f"{where} has {describe_json(ans)} in {spec.answer_field!r} where reference answer text "
                            "belongs: give each example at least one answer")
        return Rendered(prompt=prompt, references=refs)
    except KeyError as e:
        raise TaskError(f"{where} lacks field {e.args[0]!r} needed by the spec") from None


def training_text(spec: TaskSpec, example: dict[str, Any], index: int | None = None) -> tuple[str, str]:
    """(prompt, target) as the sample model saw it in training: target = prefix + answer + stop."""
    r = render_example(spec, example, index)
    if spec.metric == "lm_loss":
        return r.text, ""
    if spec.metric == "multiple_choice":
        return r.prompt, r.options[r.label] + spec.stop
    return r.prompt, spec.target_prefix + r.references[0] + spec.stop


def task_texts(spec_or_path: Union[TaskSpec, str, Path], split: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` examples of a split as the model reads them whole (prompt then reference answer):
    what profiling records routing on. Empty texts (an lm_loss example with no text) hold no tokens to
    record and are left out with a TaskWarning; a split with no text at all is a TaskError."""
    spec = get_task_spec(spec_or_path)
    data = load_task(spec, split)
    if limit:
        data = data.select(range(min(limit, len(data))))
    texts = ["".join(training_text(spec, row, i)) for i, row in enumerate(data)]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty and len(empty) == len(texts):
        raise TaskError(f"task {spec.name!r} split {split!r} has no text in any of its {len(texts)} example(s): "
                        f"fill {spec.text_field or 'its fields'!r} in the data")
    if empty:
        warn_empty(spec, split, empty)
    return [t for t in texts if t]


def warn_empty(spec: TaskSpec, split: str, empty: list[int]) -> None:
    """One TaskWarning line for examples left out because their text is empty."""
    shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
    warnings.warn(f"task {spec.name!r} split {split!r}: skipped {len(empty)} example(s) with empty text (index "
                  f"{shown}); they hold no tokens, so token-weighted scores are unchanged", TaskWarning, stacklevel=3)
