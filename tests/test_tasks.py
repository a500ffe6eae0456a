"""Sample tasks: regeneration is byte-identical, every split loads offline with the right columns,
QA answers are real spans, and broken specs/files give the one-line TaskError."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from core.tasks import (SAMPLE_TASKS_DIR, TaskError, TaskSpec, get_task_spec, list_sample_tasks, load_task,
                        render_example, training_text)

GEN_PATH = Path(__file__).resolve().parents[1] / "sample_data" / "generate_tasks.py"
EXPECTED = {
    "qa": ["id", "title", "context", "question", "answers", "kind"],
    "qa_choice": ["id", "context", "question", "options", "label", "kind"],
    "arithmetic": ["id", "expression", "answer", "value"],
    "code": ["id", "text"],
    "prose": ["id", "text"],
}
SIZES = {"calibration": 128, "validation": 200, "test": 200}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_tasks_under_test", GEN_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    _generator().write_tasks(out)
    return out


def test_list_sample_tasks():
    assert list_sample_tasks() == sorted(EXPECTED)


def test_the_task_folder_is_a_setting(monkeypatch, tmp_path):
    """MOESCOPE_TASKS_DIR replaces the bundled folder for task names, read at each call."""
    shutil.copytree(SAMPLE_TASKS_DIR / "arithmetic", tmp_path / "sums")
    monkeypatch.setenv("MOESCOPE_TASKS_DIR", str(tmp_path))
    assert list_sample_tasks() == ["sums"]
    assert get_task_spec("sums").base_dir == tmp_path / "sums"
    with pytest.raises(TaskError, match="sums"):
        get_task_spec("qa")


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_regeneration_is_byte_identical(regenerated, task):
    spec = json.loads((SAMPLE_TASKS_DIR / task / "task.json").read_text())
    src = spec.get("source_python")
    here = ".".join(map(str, sys.version_info[:3]))
    if src and src != here:
        pytest.skip(f"{task} text comes from the Python {src} standard library; this is Python {here}")
    names = sorted(p.name for p in (SAMPLE_TASKS_DIR / task).iterdir())
    assert names == ["calibration.jsonl", "task.json", "test.jsonl", "validation.jsonl"]
    for name in names:
        assert (regenerated / task / name).read_bytes() == (SAMPLE_TASKS_DIR / task / name).read_bytes(), name


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_every_split_loads_with_expected_columns(task):
    ids = set()
    for split, n in SIZES.items():
        ds = load_task(task, split)
        assert ds.column_names == EXPECTED[task]
        assert len(ds) == n
        assert not ids & set(ds["id"])
        ids |= set(ds["id"])
    # splits are disjoint in content too, not just in ids
    key = {"qa": "context", "qa_choice": "context", "arithmetic": "expression", "code": "text", "prose": "text"}[task]
    seen = {}
    for split in SIZES:
        for v in load_task(task, split)[key]:
            assert seen.setdefault(v, split) == split, f"{task}: {v[:40]!r} is in {seen[v]} and {split}"


def test_qa_answers_are_spans():
    for split in SIZES:
        for ex in load_task("qa", split):
            a = ex["answers"]
            assert len(a["text"]) == len(a["answer_start"]) >= 1
            for text, start in zip(a["text"], a["answer_start"]):
                assert ex["context"][start:start + len(text)] == text
                assert ex["context"].count(text) == 1


def test_mc_labels_and_options():
    for ex in load_task("qa_choice", "test"):
        assert len(ex["options"]) == 4 and len(set(ex["options"])) == 4
        assert ex["options"][ex["label"]] in ex["context"]


def test_arithmetic_answers_are_reversed_values():
    for ex in load_task("arithmetic", "test"):
        a, op, b = ex["expression"].partition("+") if "+" in ex["expression"] else ex["expression"].partition("-")
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert value == ex["value"] >= 0
        assert ex["answer"] == str(value)[::-1]


def test_render_example_kinds():
    qa = get_task_spec("qa")
    ex = load_task(qa, "test")[0]
    r = render_example(qa, ex)
    assert r.prompt.startswith("Context: ") and r.prompt.endswith("\nAnswer:")
    assert r.references == ex["answers"]["text"]
    assert training_text(qa, ex) == (r.prompt, " " + ex["answers"]["text"][0] + "\n")
    mc = get_task_spec("qa_choice")
    r = render_example(mc, load_task(mc, "test")[0])
    assert len(r.options) == 4 and all(o.startswith(" ") for o in r.options) and 0 <= r.label < 4
    ar = get_task_spec("arithmetic")
    r = render_example(ar, {"expression": "345+78", "answer": "324"})
    assert (r.prompt, r.references) == ("Compute: 345+78=", ["324"])
    assert render_example(get_task_spec("code"), {"text": "x = 1\n"}).text == "x = 1\n"


ARITHMETIC = {"metric": "exact_match", "prompt_template": "Compute: {expression}=", "answer_field": "answer"}


def test_missing_column_gives_clear_error(write_task):
    d = write_task("t", [{"expression": "1+1"}], **ARITHMETIC)
    with pytest.raises(TaskError, match=r"lacks column\(s\) answer"):
        load_task(d, "test")


def test_generation_needs_at_least_one_new_token(write_task):
    d = write_task("t", [{"expression": "1+1", "answer": "2"}], **ARITHMETIC, max_new_tokens=0)
    with pytest.raises(TaskError, match="max_new_tokens must be at least 1"):
        TaskSpec.from_json(d)


def test_missing_file_and_split_give_clear_errors(write_task):
    d = write_task("t", [{"expression": "1+1", "answer": "2"}], **ARITHMETIC,
                   data_files={"test": "nope.jsonl", "validation": "v.jsonl"})
    with pytest.raises(TaskError, match="nope.jsonl is missing"):
        load_task(d, "test")
    with pytest.raises(TaskError, match="has no split 'train'"):
        load_task(d, "train")
    with pytest.raises(TaskError, match="unknown task"):
        get_task_spec("no_such_task")
    assert issubclass(TaskError, ValueError)


def test_bad_specs_rejected():
    with pytest.raises(TaskError, match="metric"):
        TaskSpec(name="x", metric="bleu", data_files={"test": "a"})
    with pytest.raises(TaskError, match="text_field"):
        TaskSpec(name="x", metric="lm_loss", data_files={"test": "a"})
    with pytest.raises(TaskError, match="data_files or hf_dataset"):
        TaskSpec(name="x", metric="lm_loss", text_field="text")


@pytest.mark.slow  # datasets gives up on the hub only after its own retries
def test_unreachable_hub_dataset_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = TaskSpec(name="squad", metric="squad", hf_dataset="moescope-nonexistent/squad-xyz", hf_split={"test": "validation"},
                    prompt_template="{context}", answer_field="answers")
    with pytest.raises(TaskError, match="could not load 'moescope-nonexistent/squad-xyz'"):
        load_task(spec, "test")
