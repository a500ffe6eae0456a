"""What a task is: :class:`TaskSpec`, the fields of a task.json, each checked for its type and range where it
enters, and :func:`template_fields`, the check of a prompt template. Loading and rendering examples is
``core.tasks``, which re-exports these names."""

from __future__ import annotations

import _string
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.errors import MoEScopeError

MetricKind = Literal["squad", "exact_match", "lm_loss", "multiple_choice"]
METRIC_KINDS: tuple[str, ...] = ("squad", "exact_match", "lm_loss", "multiple_choice")


class TaskError(MoEScopeError):
    """A task cannot be loaded or rendered; the message says what to fix."""


class TaskWarning(UserWarning):
    """Task data that evaluation works around (an empty text skipped, an over-long example truncated)."""


MAX_SPEC_BYTES = 2**20  # a task.json names its data; one larger than this is not a spec


def _short(value: Any, width: int = 40) -> str:
    """``repr(value)`` on one line, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_json(value: Any) -> str:
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
                            f"{describe_json(self.name)}: give the task a short name")
        who = f"task {self.name!r}"
        if not isinstance(self.metric, str) or self.metric not in METRIC_KINDS:
            raise TaskError(f"{who}: metric {_short(self.metric)} is not one of {', '.join(METRIC_KINDS)}")
        for name in ("data_files", "hf_split"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                      for k, v in value.items()):
                raise TaskError(f"{who}: {name} must map split names to non-empty strings, as in "
                                f'{{"test": "test.jsonl"}}, not {describe_json(value)}')
        for name in ("hf_dataset", "hf_config", "answer_field", "options_field", "text_field"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise TaskError(f"{who}: {name} must be a non-empty string or left out, not {describe_json(value)}")
        for name in ("prompt_template", "target_prefix", "stop", "description"):
            value = getattr(self, name)
            if not isinstance(value, str):
                hint = " (one stop string; \"\" for none)" if name == "stop" else ""
                raise TaskError(f"{who}: {name} must be a string{hint}, not {describe_json(value)}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TaskError(f"{who}: max_new_tokens must be a whole number of at least 1, not "
                            f"{describe_json(self.max_new_tokens)}: write a number such as 16, without quotes")
        if self.max_new_tokens < 1:
            raise TaskError(f"{who}: max_new_tokens must be at least 1 (it is {self.max_new_tokens}): give the "
                            "most tokens an answer may take")
        if isinstance(self.base_dir, str):
            self.base_dir = Path(self.base_dir)
        if self.base_dir is not None and not isinstance(self.base_dir, Path):
            raise TaskError(f"{who}: base_dir must be a folder path, not {describe_json(self.base_dir)}")
        if not isinstance(self.extra, dict):
            raise TaskError(f"{who}: extra must be a dict of the spec's other keys, not {describe_json(self.extra)}")
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
            raise TaskError(f"{path} holds {describe_json(raw)} where a task spec must be a JSON object: write it as "
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
