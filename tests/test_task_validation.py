"""Task specs and task data are validated where they enter: every bad task.json, template, field value,
data file or example gives one TaskError sentence naming the file (or the task and example) and what to
change; evaluation fits over-long examples to the model's context and skips empty LM texts with a warning.
The property tests put arbitrary JSON into each field of a valid spec (and arbitrary bytes into task.json,
arbitrary values into example rows): the outcome is a valid TaskSpec (or Rendered example) or a
MoEScopeError, never another exception."""

from __future__ import annotations

import json
import math
import random
import string
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import MoEScopeError
from core.evaluation import Evaluator
from core.model import MoEModel, load_model
from core.plan import Plan
from core.tasks import (TaskError, TaskSpec, TaskWarning, load_task, render_example, task_texts,
                        template_fields)

from .tiny_models import save_tiny

CTX = 64  # the tiny model's context: long examples are cut to this many tokens
VALID = {"name": "t", "metric": "exact_match", "data_files": {"test": "test.jsonl"},
         "prompt_template": "Compute: {expression}=", "answer_field": "answer", "target_prefix": "",
         "stop": "\n", "max_new_tokens": 6}


def write_spec(folder: Path, raw: bytes | str | object, rows: list | None = None) -> Path:
    """A task folder whose task.json holds ``raw`` (bytes or text as is, anything else as JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(raw, str):
        raw = raw.encode()
    elif not isinstance(raw, bytes):
        raw = json.dumps(raw).encode()
    (folder / "task.json").write_bytes(raw)
    if rows is not None:
        (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def one_line_error(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ----- task.json ------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [[VALID], "\"qa\"", 5, None, True], ids=["list", "string", "number", "null", "bool"])
def test_spec_that_is_not_an_object_is_refused(tmp_path, raw):
    d = write_spec(tmp_path / "t", raw)
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"), "JSON object")


def test_non_utf8_spec_is_refused(tmp_path):
    d = write_spec(tmp_path / "t", json.dumps({**VALID, "description": "caf"}).encode().replace(b"caf", b"caf\xe9"))
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"), "UTF-8")


def test_invalid_json_and_deep_nesting_are_refused(tmp_path):
    d = write_spec(tmp_path / "a", '{"name": "t", ')
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"), "not valid JSON")
    d = write_spec(tmp_path / "b", '{"name": "t", "metric": "lm_loss", "extra": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"))


def test_oversized_spec_is_refused(tmp_path):
    d = write_spec(tmp_path / "t", {**VALID, "description": "x" * (2**20 + 10)})
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"), "too large")


@pytest.mark.parametrize("template, why", [
    ("Q: {question\nA:", "cannot be filled"),  # str.format's own reason follows
    ("Q: {question}}", "cannot be filled"),
    ("Q: {}", "positional"),
    ("Q: {0}", "positional"),
    ("Q: {question.upper}", "attribute"),
    ("Q: {question!z}", "conversion"),
    ("Q: {question[0}", "cannot be filled"),
    ("Q: {question:{width}}", "holds a field"),
    ("Q: {question:>1000000000}", "above 9999"),
])
def test_bad_template_is_refused_when_the_spec_loads(tmp_path, template, why):
    d = write_spec(tmp_path / "t", {**VALID, "prompt_template": template})
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"), "prompt_template", why, "{{")


def test_template_may_index_a_column(tmp_path):
    """``{answers[text][0]}`` reads the column ``answers``; loading checks for that column, not the whole field."""
    rows = [{"q": "one", "answers": {"text": ["1"], "answer_start": [0]}}]
    d = write_spec(tmp_path / "t", {**VALID, "metric": "squad", "prompt_template": "{q} ({answers[text][0]})",
                                    "answer_field": "answers"}, rows)
    spec = TaskSpec.from_json(d)
    assert spec.required_columns() == ["q", "answers"]
    assert render_example(spec, load_task(spec, "test")[0]).prompt == "one (1)"
    assert template_fields("{a:>8} {b!r} {{lit}} {a}") == ["a", "b"]


BAD_FIELDS = [
    ("max_new_tokens", "4", "the string '4'"),
    ("max_new_tokens", True, "boolean"),
    ("max_new_tokens", -3, "at least 1"),
    ("max_new_tokens", 4.0, "whole number"),
    ("max_new_tokens", None, "null"),
    ("stop", 5, "string"),
    ("stop", ["\n"], "a list"),
    ("stop", None, "null"),
    ("name", 5, "name"),
    ("name", "", "name"),
    ("name", "a\nb", "name"),
    ("name", "n" * 201, "short name"),
    ("metric", ["squad"], "metric"),
    ("data_files", "test.jsonl", "data_files"),
    ("data_files", {"test": 5}, "data_files"),
    ("data_files", {"test": ""}, "data_files"),
    ("hf_split", ["test"], "hf_split"),
    ("hf_dataset", 7, "hf_dataset"),
    ("hf_config", {}, "hf_config"),
    ("prompt_template", 5, "prompt_template"),
    ("answer_field", ["answer"], "answer_field"),
    ("answer_field", "", "answer_field"),
    ("options_field", 1, "options_field"),
    ("text_field", False, "text_field"),
    ("target_prefix", None, "target_prefix"),
    ("description", ["x"], "description"),
]


@pytest.mark.parametrize("field, value, needle", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_wrongly_typed_field_is_refused(tmp_path, field, value, needle):
    d = write_spec(tmp_path / "t", {**VALID, field: value})
    with pytest.raises(TaskError) as e:
        TaskSpec.from_json(d)
    one_line_error(e, str(d / "task.json"), needle)


def test_max_new_tokens_is_checked_for_every_metric():
    with pytest.raises(TaskError, match="max_new_tokens"):
        TaskSpec(name="x", metric="lm_loss", data_files={"test": "a"}, text_field="text", max_new_tokens=-1)


def test_sample_specs_stay_valid():
    for name in ("qa", "qa_choice", "arithmetic", "code", "prose"):
        spec = load_task(name, "test")  # loads the spec and checks the columns
        assert len(spec) == 200


# ----- task data ------------------------------------------------------------------------------------
def test_non_utf8_data_file_is_refused(tmp_path):
    d = write_spec(tmp_path / "t", VALID)
    (d / "test.jsonl").write_bytes(b'{"expression": "1+1", "answer": "2"}\n{"expression": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(TaskError) as e:
        load_task(d, "test")
    one_line_error(e, str(d / "test.jsonl"), "UTF-8", "line 2")


@pytest.mark.parametrize("spec, row, needle", [
    ({"metric": "multiple_choice", "options_field": "options", "answer_field": "label"},
     {"expression": "1", "options": ["a", "b"], "label": "first"}, "right option's index"),
    ({"metric": "multiple_choice", "options_field": "options", "answer_field": "label"},
     {"expression": "1", "options": "ab", "label": 0}, "list of option texts"),
    ({"metric": "multiple_choice", "options_field": "options", "answer_field": "label"},
     {"expression": "1", "options": ["a", "b"], "label": 2}, "out of range"),
    ({"metric": "squad", "answer_field": "answers"},
     {"expression": "1", "answers": {"text": [], "answer_start": []}}, "at least one answer"),
    ({"metric": "exact_match", "prompt_template": "{expression[5]}"}, {"expression": "1", "answer": "1"}, "IndexError"),
    ({"metric": "lm_loss", "text_field": "text"}, {"text": ["a", "b"]}, "where text belongs"),
])
def test_malformed_example_is_refused_with_its_index(spec, row, needle):
    spec = TaskSpec(**{**VALID, **spec})
    with pytest.raises(TaskError) as e:
        render_example(spec, row, 7)
    one_line_error(e, "task 't': example 7", needle)


# ----- evaluation: empty texts and over-long examples -----------------------------------------------
@pytest.fixture(scope="module")
def mm(tmp_path_factory) -> MoEModel:
    return load_model(save_tiny(tmp_path_factory.mktemp("m") / "tiny", max_position_embeddings=CTX))


def task(folder: Path, rows: list[dict], **spec) -> TaskSpec:
    return TaskSpec.from_json(write_spec(folder, {"name": folder.name, "data_files": {"test": "test.jsonl"}, **spec}, rows))


def lm(folder: Path, texts: list[str]) -> TaskSpec:
    return task(folder, [{"text": t} for t in texts], metric="lm_loss", text_field="text")


def test_empty_lm_text_is_skipped_with_a_warning(mm, tmp_path):
    """An empty text holds no tokens: skipping it leaves the token-weighted loss as it is without it."""
    with pytest.warns(TaskWarning, match=r"task 'gaps' split 'test': skipped 2 example\(s\) with empty text \(index 0, 2\)"):
        got = Evaluator(mm).evaluate(lm(tmp_path / "gaps", ["", "hello world", None, "the cat"]))
    want = Evaluator(mm).evaluate(lm(tmp_path / "full", ["hello world", "the cat"]))
    assert got.n_examples == 2
    assert got.metrics == pytest.approx(want.metrics, rel=1e-6)  # same sequences, same batches
    with pytest.warns(TaskWarning, match="skipped 1 example"):
        assert task_texts(tmp_path / "gaps", "test", limit=2) == ["hello world"]


def test_all_empty_lm_texts_are_refused(mm, tmp_path):
    spec = lm(tmp_path / "blank", ["", ""])
    with pytest.raises(TaskError) as e:
        Evaluator(mm).evaluate(spec)
    one_line_error(e, "task 'blank'", "no text in any of its 2 example(s)")
    with pytest.raises(TaskError):
        task_texts(spec, "test")


def test_empty_option_is_refused(mm, tmp_path):
    spec = task(tmp_path / "mc", [{"q": "x", "options": ["a", ""], "label": 0}], metric="multiple_choice",
                prompt_template="{q}", options_field="options", answer_field="label", target_prefix="")
    with pytest.raises(TaskError) as e:
        Evaluator(mm).evaluate(spec)
    one_line_error(e, "task 'mc': example 0 has an empty option (option 1)")


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def test_megabyte_lm_text_is_cut_to_the_context_keeping_its_start(mm, tmp_path):
    """A 1 MB single-line text is scored on its first CTX tokens (bos included): the char tokenizer makes
    one token per character, so that is the text's first CTX - 1 characters."""
    long = _text(2000, 0) * 500  # 1 MB, one line
    with pytest.warns(TaskWarning, match=f"1 example\\(s\\) were longer than the model's context of {CTX} tokens"):
        got = Evaluator(mm).evaluate(lm(tmp_path / "long", [long, "short text"]))
    want = Evaluator(mm).evaluate(lm(tmp_path / "cut", [long[:CTX - 1], "short text"]))
    assert got.n_examples == 2 and math.isfinite(got.metrics["nll"])
    assert got.metrics == pytest.approx(want.metrics, rel=1e-5)


def test_long_prompt_keeps_its_end_and_room_to_generate(mm, tmp_path):
    """Generation sees bos + the prompt's last CTX - 1 - max_new_tokens characters (the answer follows the
    prompt's end), also under a plan, whose agreement runs on the same cut sequences."""
    long, new = _text(100_000, 1), 5
    spec = dict(metric="exact_match", prompt_template="{q}", answer_field="answer", target_prefix="", stop="",
                max_new_tokens=new)
    rows = [{"q": long, "answer": "abc"}, {"q": "short", "answer": "x" * 200}]  # a long answer is cut too
    cut = [{"q": long[-(CTX - 1 - new):], "answer": "abc"}, {"q": "short", "answer": "x" * (CTX - 1 - len("short"))}]
    plan = Plan(layers={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]})
    with pytest.warns(TaskWarning, match="prompts keep their end"):
        got = Evaluator(mm).evaluate(task(tmp_path / "long", rows, **spec), plan=plan)
    want = Evaluator(mm).evaluate(task(tmp_path / "cut", cut, **spec), plan=plan)
    assert got.predictions == want.predictions and len(got.predictions) == 2
    assert got.agreement == pytest.approx(want.agreement, rel=1e-5, abs=1e-6)


def test_long_multiple_choice_prompt_keeps_its_end(mm, tmp_path):
    long = _text(100_000, 2)
    spec = dict(metric="multiple_choice", prompt_template="{q}", options_field="options", answer_field="label",
                target_prefix=" ")
    options = ["ab", "cd", "efgh"]  # the longest option is 5 tokens with its prefix
    rows = [{"q": long + str(i), "options": options, "label": i % 3} for i in range(3)]
    cut = [{"q": (long + str(i))[-(CTX - 1 - 5):], "options": options, "label": i % 3} for i in range(3)]
    with pytest.warns(TaskWarning, match="3 example"):
        got = Evaluator(mm).evaluate(task(tmp_path / "long", rows, **spec))
    want = Evaluator(mm).evaluate(task(tmp_path / "cut", cut, **spec))
    assert got.n_examples == 3 and got.metrics == want.metrics


def test_max_new_tokens_beyond_the_context_is_refused(mm, tmp_path):
    spec = task(tmp_path / "big", [{"q": "a", "answer": "b"}], metric="exact_match", prompt_template="{q}",
                answer_field="answer", max_new_tokens=CTX)
    with pytest.raises(TaskError) as e:
        Evaluator(mm).evaluate(spec)
    one_line_error(e, "task 'big'", f"context of {CTX} tokens", "lower max_new_tokens")


# ----- property tests -------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["name", "metric", "data_files", "hf_dataset", "hf_config", "hf_split", "prompt_template",
          "answer_field", "options_field", "text_field", "target_prefix", "stop", "max_new_tokens",
          "description", "source_python"]  # the last is an unknown key: kept in extra
BASES = {"exact_match": VALID,
         "lm_loss": {"name": "lm", "metric": "lm_loss", "data_files": {"test": "test.jsonl"}, "text_field": "text"},
         "multiple_choice": {"name": "mc", "metric": "multiple_choice", "hf_dataset": "x/y", "prompt_template": "{q}",
                             "options_field": "options", "answer_field": "label"}}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_raw(raw: bytes | object) -> TaskSpec | None:
    """from_json on ``raw``: the TaskSpec, or None where it raised MoEScopeError (anything else propagates)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_spec(Path(tmp) / "t", raw)
        try:
            spec = TaskSpec.from_json(folder)
        except MoEScopeError as e:
            assert "\n" not in str(e) and str(folder / "task.json") in str(e)
            return None
    check_valid(spec)
    return spec


def check_valid(spec: TaskSpec) -> None:
    """What a valid TaskSpec guarantees to the code that uses it."""
    assert isinstance(spec.name, str) and spec.name and spec.metric in ("squad", "exact_match", "lm_loss", "multiple_choice")
    assert isinstance(spec.max_new_tokens, int) and not isinstance(spec.max_new_tokens, bool) and spec.max_new_tokens >= 1
    for name in ("prompt_template", "target_prefix", "stop", "description"):
        assert isinstance(getattr(spec, name), str)
    for name in ("data_files", "hf_split"):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in getattr(spec, name).items())
    assert all(isinstance(c, str) and c for c in spec.required_columns())
    assert isinstance(spec.splits, list)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=60, **SETTINGS)
@given(value=JSON)
def test_any_json_in_any_field_gives_a_spec_or_one_error(base, field, value):
    load_raw({**BASES[base], field: value})


@settings(max_examples=200, **SETTINGS)
@given(raw=JSON)
def test_any_json_document_gives_a_spec_or_one_error(raw):
    load_raw(raw)


@settings(max_examples=200, **SETTINGS)
@given(raw=st.binary(max_size=200) | st.builds(lambda b, tail: json.dumps(VALID).encode()[:b] + tail,
                                               st.integers(0, 200), st.binary(max_size=8)))
def test_any_bytes_give_a_spec_or_one_error(raw):
    load_raw(raw)


@settings(max_examples=300, **SETTINGS)
@given(template=st.text(alphabet=st.sampled_from("{}[]!:.0123456789ar sq>"), max_size=16),
       row=st.dictionaries(st.sampled_from(["a", "q", "answer", "label", "options", "text"]), JSON, max_size=6))
def test_any_template_and_row_render_or_give_one_error(template, row):
    """Any template is refused at load or renders any row of JSON values (as ``datasets`` yields them) to
    a Rendered example or one TaskError."""
    for base in BASES.values():
        spec = load_raw({**base, "prompt_template": template})
        if spec is None:
            continue
        try:
            r = render_example(spec, row, 0)
        except MoEScopeError as e:
            assert "\n" not in str(e)
            continue
        assert isinstance(r.prompt, str) and all(isinstance(x, str) for x in r.references + r.options)
        if spec.metric == "multiple_choice":
            assert 0 <= r.label < len(r.options)
        if spec.metric in ("squad", "exact_match"):
            assert r.references
