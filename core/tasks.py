"""Task specifications and loading: one place that says how an example becomes a prompt and answers.

The evaluation harness and the sample model's own evaluation both render examples through
:func:`render_example`, so their numbers agree. Local tasks are JSON-lines files read through
``datasets.load_dataset("json", ...)``; hub tasks go through ``load_dataset(id, config, split=...)``.
"""

from __future__ import annotations

import _string
import codecs
import json
import re
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from core.errors import MoEScopeError

MetricKind = Literal["squad", "exact_match", "lm_loss", "multiple_choice"]
METRIC_KINDS: tuple[str, ...] = ("squad", "exact_match", "lm_loss", "multiple_choice")
SAMPLE_TASKS_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "tasks"


class TaskError(MoEScopeError):
    """A task cannot be loaded or rendered; the message says what to fix."""


class TaskWarning(UserWarning):
    """Task data that evaluation works around (an empty text skipped, an over-long example truncated)."""


MAX_SPEC_BYTES = 2**20  # a task.json names its data; one larger than this is not a spec


def _short(value: Any, width: int = 40) -> str:
    """``repr(value)`` on one line, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _describe(value: Any) -> str:
    """A JSON value as a message shows it, short and on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, (int, float)):
        return f"the number {_short(value)}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def template_fields(template: str) -> list[str]:
    """The example columns a ``str.format`` prompt template reads, in order. Raises ValueError saying what
    is wrong for a template that cannot be filled by column name: unmatched braces, positional fields
    (``{}``, ``{0}``), attribute access (``{x.y}``; index with ``{x[key]}`` instead), bad conversions,
    fields inside a format spec (``{x:{w}}``), or a width or precision above 9999 (``{x:>999999999}`` would
    build a gigabyte prompt)."""
    out: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):  # ValueError on unmatched braces
        if name is None:
            continue
        first, rest = _string.formatter_field_name_split(name)
        if first == "" or isinstance(first, int):
            raise ValueError(f"{{{name}}} is a positional field; name the example's column, as in {{question}}")
        for is_attribute, _key in rest:  # ValueError on a malformed [index]
            if is_attribute:
                raise ValueError(f"{{{name}}} uses attribute access; index a column with [key] instead")
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"{{{name}!{conversion}}} has an unknown conversion; use !s, !r or !a")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"the format spec of {{{name}}} holds a field; give a fixed spec such as :>8")
        if re.search(r"\d{5}", spec or ""):
            raise ValueError(f"the format spec of {{{name}}} asks for a width or precision above 9999")
        out.append(first)
    return list(dict.fromkeys(out))


@dataclass
class TaskSpec:
    """How to load a task and turn one example into model inputs and references.

    Either ``data_files`` (split -> path, relative paths resolved against ``base_dir``) or
    ``hf_dataset`` (+ ``hf_config`` and ``hf_split`` mapping our split names to the hub's) is set.
    ``prompt_template`` is a ``str.format`` template over the example's columns; the model's
    continuation starts with ``target_prefix`` (e.g. the space after "Answer:"). ``stop`` is one stop
    string ("" for none: generation then ends at end of sequence or ``max_new_tokens``).

    Every field is checked for its type and range when a spec is made (``__post_init__``), so a bad value
    is refused where it enters, as a TaskError of one sentence. This is a dataclass with validators rather
    than a pydantic model: the checks are few, pydantic would coerce ``"4"`` to 4 and ``true`` to 1 unless
    every field were declared strict, and its multi-line error reports would need rewriting into one
    sentence anyway.
    """

    name: str
    metric: MetricKind
    data_files: dict[str, str] = field(default_factory=dict)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: dict[str, str] = field(default_factory=dict)
    prompt_template: str = ""
    answer_field: str | None = None
    options_field: str | None = None
    text_field: str | None = None
    target_prefix: str = " "
    stop: str = "\n"
    max_new_tokens: int = 16
    description: str = ""
    base_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (not isinstance(self.name, str) or not self.name.strip() or not self.name.isprintable()
                or len(self.name) > 200):
            raise TaskError(f"a task's name must be a non-empty string of at most 200 characters on one line, not "
                            f"{_describe(self.name)}: give the task a short name")
        who = f"task {self.name!r}"
        if not isinstance(self.metric, str) or self.metric not in METRIC_KINDS:
            raise TaskError(f"{who}: metric {_short(self.metric)} is not one of {', '.join(METRIC_KINDS)}")
        for name in ("data_files", "hf_split"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                      for k, v in value.items()):
                raise TaskError(f"{who}: {name} must map split names to non-empty strings, as in "
                                f'{{"test": "test.jsonl"}}, not {_describe(value)}')
        for name in ("hf_dataset", "hf_config", "answer_field", "options_field", "text_field"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise TaskError(f"{who}: {name} must be a non-empty string or left out, not {_describe(value)}")
        for name in ("prompt_template", "target_prefix", "stop", "description"):
            value = getattr(self, name)
            if not isinstance(value, str):
                hint = " (one stop string; \"\" for none)" if name == "stop" else ""
                raise TaskError(f"{who}: {name} must be a string{hint}, not {_describe(value)}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TaskError(f"{who}: max_new_tokens must be a whole number of at least 1, not "
                            f"{_describe(self.max_new_tokens)}: write a number such as 16, without quotes")
        if self.max_new_tokens < 1:
            raise TaskError(f"{who}: max_new_tokens must be at least 1 (it is {self.max_new_tokens}): give the "
                            "most tokens an answer may take")
        if isinstance(self.base_dir, str):
            self.base_dir = Path(self.base_dir)
        if self.base_dir is not None and not isinstance(self.base_dir, Path):
            raise TaskError(f"{who}: base_dir must be a folder path, not {_describe(self.base_dir)}")
        if not isinstance(self.extra, dict):
            raise TaskError(f"{who}: extra must be a dict of the spec's other keys, not {_describe(self.extra)}")
        try:
            template_fields(self.prompt_template)
        except ValueError as e:
            raise TaskError(f"{who}: prompt_template {_short(self.prompt_template, 60)} cannot be filled ({e}); "
                            "write literal braces as {{ and }}") from None
        if not self.data_files and not self.hf_dataset:
            raise TaskError(f"{who}: give either data_files or hf_dataset in its spec")
        if self.metric == "lm_loss" and not self.text_field:
            raise TaskError(f"{who}: an lm_loss task needs text_field")
        if self.metric in ("squad", "exact_match") and not (self.prompt_template and self.answer_field):
            raise TaskError(f"{who}: a {self.metric} task needs prompt_template and answer_field")
        if self.metric == "multiple_choice" and not (self.prompt_template and self.options_field and self.answer_field):
            raise TaskError(f"{who}: a multiple_choice task needs prompt_template, options_field and answer_field (the label)")

    @property
    def splits(self) -> list[str]:
        return list(self.data_files or self.hf_split)

    def required_columns(self) -> list[str]:
        """Columns an example must have: the template's fields plus answer/options/text fields."""
        cols = template_fields(self.prompt_template)
        for c in (self.answer_field, self.options_field, self.text_field):
            if c:
                cols.append(c)
        return list(dict.fromkeys(cols))

    @classmethod
    def from_json(cls, path: str | Path) -> "TaskSpec":
        """Read a task.json; relative data file paths are taken relative to its folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "task.json"
        if not path.exists():
            raise TaskError(f"no task spec at {path}: pass a task.json or a folder that holds one")
        try:
            if path.stat().st_size > MAX_SPEC_BYTES:
                raise TaskError(f"{path} is {path.stat().st_size} bytes, too large for a task spec (at most "
                                f"{MAX_SPEC_BYTES}): put the examples in data files and name them in data_files")
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise TaskError(f"could not read the task spec {path} ({e.strerror or type(e).__name__}): "
                            "pass a readable task.json") from None
        except UnicodeDecodeError as e:
            raise TaskError(f"{path} is not UTF-8 text (byte {e.start} is not valid UTF-8): save it as UTF-8") from None
        except json.JSONDecodeError as e:
            raise TaskError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix the file") from None
        except RecursionError:
            raise TaskError(f"{path} nests JSON too deeply to read: a task spec is one flat object") from None
        if not isinstance(raw, dict):
            raise TaskError(f"{path} holds {_describe(raw)} where a task spec must be a JSON object: write it as "
                            '{"name": ..., "metric": ..., ...}')
        known = {f for f in cls.__dataclass_fields__ if f not in ("base_dir", "extra")}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        if "name" not in kwargs or "metric" not in kwargs:
            raise TaskError(f"{path} must give at least 'name' and 'metric'")
        try:
            return cls(**kwargs, base_dir=path.parent, extra=extra)
        except TaskError as e:
            raise TaskError(f"{path}: {e}") from None


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


def list_sample_tasks(tasks_dir: str | Path = SAMPLE_TASKS_DIR) -> list[str]:
    """Names of the bundled sample tasks (folders with a task.json), sorted."""
    d = Path(tasks_dir)
    return sorted(p.parent.name for p in d.glob("*/task.json"))


def get_task_spec(spec_or_path: Union[TaskSpec, str, Path]) -> TaskSpec:
    """Accept a TaskSpec, a sample task name ('qa'), a task folder, or a task.json path."""
    if isinstance(spec_or_path, TaskSpec):
        return spec_or_path
    p = Path(spec_or_path)
    if not p.exists() and (SAMPLE_TASKS_DIR / str(spec_or_path)).is_dir():
        p = SAMPLE_TASKS_DIR / str(spec_or_path)
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
                raise TaskError(f"{where} has {_describe(value)} in {spec.text_field!r} where text belongs: fix the data")
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
                raise TaskError(f"{where} has {_describe(raw)} in {spec.options_field!r} where a list of option texts "
                                "belongs: fix the data")
            options = [spec.target_prefix + o for o in texts]  # type: ignore[operator]
            value = example[spec.answer_field]
            label = value if isinstance(value, int) and not isinstance(value, bool) else None
            if isinstance(value, str) and value.strip().isdigit():
                label = int(value)
            if label is None:
                raise TaskError(f"{where} has {_describe(value)} in {spec.answer_field!r} where the right option's "
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
            raise TaskError(f"{where} has {_describe(ans)} in {spec.answer_field!r} where reference answer text "
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
