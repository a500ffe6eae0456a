"""Task specifications and loading: one place that says how an example becomes a prompt and answers.

The evaluation harness and the sample model's own evaluation both render examples through
:func:`render_example`, so their numbers agree. Local tasks are JSON-lines files read through
``datasets.load_dataset("json", ...)``; hub tasks go through ``load_dataset(id, config, split=...)``.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from core.errors import MoEScopeError

MetricKind = Literal["squad", "exact_match", "lm_loss", "multiple_choice"]
METRIC_KINDS: tuple[str, ...] = ("squad", "exact_match", "lm_loss", "multiple_choice")
SAMPLE_TASKS_DIR = Path(__file__).resolve().parents[1] / "sample_data" / "tasks"


class TaskError(MoEScopeError):
    """A task cannot be loaded or rendered; the message says what to fix."""


@dataclass
class TaskSpec:
    """How to load a task and turn one example into model inputs and references.

    Either ``data_files`` (split -> path, relative paths resolved against ``base_dir``) or
    ``hf_dataset`` (+ ``hf_config`` and ``hf_split`` mapping our split names to the hub's) is set.
    ``prompt_template`` is a ``str.format`` template over the example's columns; the model's
    continuation starts with ``target_prefix`` (e.g. the space after "Answer:").
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
        if self.metric not in METRIC_KINDS:
            raise TaskError(f"task {self.name!r}: metric {self.metric!r} is not one of {', '.join(METRIC_KINDS)}")
        if not self.data_files and not self.hf_dataset:
            raise TaskError(f"task {self.name!r}: give either data_files or hf_dataset in its spec")
        if self.metric == "lm_loss" and not self.text_field:
            raise TaskError(f"task {self.name!r}: an lm_loss task needs text_field")
        if self.metric in ("squad", "exact_match") and not (self.prompt_template and self.answer_field):
            raise TaskError(f"task {self.name!r}: a {self.metric} task needs prompt_template and answer_field")
        if self.metric in ("squad", "exact_match") and self.max_new_tokens < 1:
            raise TaskError(f"task {self.name!r}: max_new_tokens must be at least 1 (it is {self.max_new_tokens})")
        if self.metric == "multiple_choice" and not (self.prompt_template and self.options_field and self.answer_field):
            raise TaskError(f"task {self.name!r}: a multiple_choice task needs prompt_template, options_field and answer_field (the label)")

    @property
    def splits(self) -> list[str]:
        return list(self.data_files or self.hf_split)

    def required_columns(self) -> list[str]:
        """Columns an example must have: the template's fields plus answer/options/text fields."""
        cols = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f]
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
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix the file") from None
        known = {f for f in cls.__dataclass_fields__ if f not in ("base_dir", "extra")}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        if "name" not in kwargs or "metric" not in kwargs:
            raise TaskError(f"{path} must give at least 'name' and 'metric'")
        return cls(**kwargs, base_dir=path.parent, extra=extra)


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


def render_example(spec: TaskSpec, example: dict[str, Any]) -> Rendered:
    """Turn an example into model inputs. Options are returned with ``target_prefix`` already
    prepended (they are continuations of the prompt); references are bare answer strings."""
    try:
        if spec.metric == "lm_loss":
            return Rendered(text=str(example[spec.text_field]))
        prompt = spec.prompt_template.format(**example)
        if spec.metric == "multiple_choice":
            options = [spec.target_prefix + str(o) for o in example[spec.options_field]]
            label = int(example[spec.answer_field])
            if not 0 <= label < len(options):
                raise TaskError(f"task {spec.name!r}: label {label} is out of range for {len(options)} options")
            return Rendered(prompt=prompt, options=options, label=label)
        ans = example[spec.answer_field]
        if isinstance(ans, dict):  # SQuAD schema: {"text": [...], "answer_start": [...]}
            refs = [str(a) for a in ans.get("text", [])]
        elif isinstance(ans, (list, tuple)):
            refs = [str(a) for a in ans]
        else:
            refs = [str(ans)]
        return Rendered(prompt=prompt, references=refs)
    except KeyError as e:
        raise TaskError(f"task {spec.name!r}: example lacks field {e.args[0]!r} needed by the spec") from None


def training_text(spec: TaskSpec, example: dict[str, Any]) -> tuple[str, str]:
    """(prompt, target) as the sample model saw it in training: target = prefix + answer + stop."""
    r = render_example(spec, example)
    if spec.metric == "lm_loss":
        return r.text, ""
    if spec.metric == "multiple_choice":
        return r.prompt, r.options[r.label] + spec.stop
    return r.prompt, spec.target_prefix + r.references[0] + spec.stop


def task_texts(spec_or_path: Union[TaskSpec, str, Path], split: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` examples of a split as the model reads them whole (prompt then reference answer):
    what profiling records routing on."""
    spec = get_task_spec(spec_or_path)
    data = load_task(spec, split)
    if limit:
        data = data.select(range(min(limit, len(data))))
    return ["".join(training_text(spec, row)) for row in data]
