"""Every bad input to the command line gives one ``error:`` line and exit status 2, and writes nothing.

The cases are the hostile-input run's failures (issue: one clear line for every bad input): argument values,
unreadable task files, damaged profiles and shards, plans with broken extras, unwritable outputs. Library-level
validation of plans, task specs and models has its own test files; here each family is driven through
``moescope`` as a user would.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.cli import main

from .tiny_models import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("errors") / "tiny")


@pytest.fixture(scope="module")
def shard(model_dir, tmp_path_factory):
    """A real profile of the tiny model, to damage in copies."""
    folder = tmp_path_factory.mktemp("shard")
    (folder / "prose.txt").write_text("the cat sat on the mat\nhello world\n")
    out = folder / "s.parquet"
    assert main(["profile", str(model_dir), "--task", str(folder / "prose.txt"), "--out", str(out)]) == 0
    return out


def fails_in_one_line(capsys, argv, *fragments) -> str:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----- argument values: refused by argparse before anything loads ------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["profile", "M", "--task", "t.txt", "--out", "p.parquet", "--max-length", "0"], "--max-length"),
    (["profile", "M", "--task", "t.txt", "--out", "p.parquet", "--max-length", "-5"], "--max-length"),
    (["profile", "M", "--task", "t.txt", "--out", "p.parquet", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["profile", "M", "--task", "t.txt", "--out", "p.parquet", "--batch-size", "0"], "--batch-size"),
    (["profile", "M", "--task", "t.txt", "--out", "p.parquet", "--batches-per-shard", "0"], "--batches-per-shard"),
    (["sweep", "M", "--tasks", "qa", "--ratios", "abc", "--out", "s.csv"], "--ratios"),
    (["sweep", "M", "--tasks", "qa", "--ratios", "0.5,1.5", "--out", "s.csv"], "--ratios"),
    (["sweep", "M", "--tasks", "qa", "--seeds", "x", "--out", "s.csv"], "--seeds"),
    (["evaluate", "M", "--task", "qa", "--limit", "-1"], "--limit"),
    (["prune", "M", "--method", "top_k", "--top-k", "0", "--task", "qa", "--out", "p.json"], "--top-k"),
    (["prune", "M", "--method", "frequency", "--ratio", "2", "--task", "qa", "--out", "p.json"], "--ratio"),
    (["dashboard", "--port", "0"], "--port"),
])
def test_bad_argument_values_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_in_one_line(capsys, argv, fragment)
    assert files_in(tmp_path) == []


def test_a_method_parameter_of_the_wrong_type_is_refused(model_dir, tmp_path, capsys):
    from .tiny_models import write_lm_task

    task = write_lm_task(tmp_path / "lm", ["hello world", "abc def"])
    out = tmp_path / "plan.json"
    fails_in_one_line(capsys, ["prune", str(model_dir), "--method", "eep", "--task", str(task), "--out", str(out),
                               "--param", "generations=abc"], "generations")
    fails_in_one_line(capsys, ["prune", str(model_dir), "--method", "eep", "--task", str(task), "--out", str(out),
                               "--param", "population=-3"], "population")
    assert not out.exists()


# ----- task files given to profile ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, data", [("t.txt", b"caf\xe9 au lait\n"), ("t.jsonl", b'{"text": "caf\xe9"}\n'),
                                        ("t.jsonl", b'{"text": 5}\n'), ("t.jsonl", b"[" * 200_000 + b"\n")])
def test_unreadable_task_files_are_one_line(model_dir, tmp_path, capsys, name, data):
    (tmp_path / name).write_bytes(data)
    fails_in_one_line(capsys, ["profile", str(model_dir), "--task", str(tmp_path / name),
                               "--out", str(tmp_path / "out" / "p.parquet")], name)
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == []


# ----- outputs that cannot be written --------------------------------------------------------------------------------
def test_an_output_under_a_file_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world\n")
    (tmp_path / "a-file").write_text("x")
    fails_in_one_line(capsys, ["profile", str(model_dir), "--task", str(tmp_path / "t.txt"),
                               "--out", str(tmp_path / "a-file" / "p.parquet")], "is a file, not a folder")


def test_a_read_only_output_folder_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "t.txt").write_text("hello world\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse new files as it would for a user
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if str(path).startswith(str(locked)) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    else:
        locked.chmod(0o555)
    try:
        fails_in_one_line(capsys, ["profile", str(model_dir), "--task", str(tmp_path / "t.txt"),
                                   "--out", str(locked / "p.parquet")], "Permission denied")
    finally:
        locked.chmod(0o755)
    assert files_in(locked) == []


# ----- profiles and merge-profiles -------------------------------------------------------------------------------
def damaged_copy(shard, folder, name, table=None, sidecar=None):
    folder.mkdir(exist_ok=True)
    out = folder / f"{name}.parquet"
    if table is None:
        shutil.copy(shard, out)
    else:
        pq.write_table(table, out)
    meta = json.loads(shard.with_suffix(".json").read_text())
    if table is not None:
        meta["rows"] = table.num_rows
    out.with_suffix(".json").write_text(json.dumps(meta if sidecar is None else sidecar))
    return out


def replaced(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def damaged_profiles(shard, folder):
    """Each way a profile on disk can be damaged, as (case, path)."""
    table = pq.read_table(shard)
    experts = table.column("experts").to_pylist()
    cases = {
        "sidecar is a list": damaged_copy(shard, folder, "list", sidecar=[1, 2, 3]),
        "string experts": damaged_copy(shard, folder, "str_experts", table=replaced(
            table, "experts", pa.array([json.dumps(e) for e in experts]))),
        "string layer": damaged_copy(shard, folder, "str_layer", table=replaced(
            table, "layer", pa.array([str(v) for v in table.column("layer").to_pylist()]))),
        "expert id 99": damaged_copy(shard, folder, "id99", table=replaced(
            table, "experts", pa.array([[99] + e[1:] for e in experts], pa.list_(pa.int16())))),
        "expert id -3": damaged_copy(shard, folder, "id-3", table=replaced(
            table, "experts", pa.array([[-3] + e[1:] for e in experts], pa.list_(pa.int16())))),
        "ragged lists": damaged_copy(shard, folder, "ragged", table=replaced(
            table, "experts", pa.array([e[:1] if i % 2 else e for i, e in enumerate(experts)], pa.list_(pa.int16())))),
    }
    return cases


def test_damaged_profiles_are_refused_by_merge_and_by_the_aggregations(shard, tmp_path, capsys):
    from core import aggregate
    from core.errors import MoEScopeError
    from core.routing_profile import Profile

    for case, path in damaged_profiles(shard, tmp_path / "bad").items():
        out = tmp_path / "merged" / f"{path.stem}.parquet"
        fails_in_one_line(capsys, ["merge-profiles", str(shard), str(path), "--out", str(out)])
        assert not out.exists(), case
        with pytest.raises(MoEScopeError):
            aggregate.expert_usage(Profile(path))


def test_the_same_shard_twice_is_refused(shard, tmp_path, capsys):
    twin = tmp_path / "twin.parquet"
    shutil.copy(shard, twin)
    shutil.copy(shard.with_suffix(".json"), twin.with_suffix(".json"))
    for inputs in ([shard, shard], [shard, twin]):
        fails_in_one_line(capsys, ["merge-profiles", *map(str, inputs), "--out", str(tmp_path / "m.parquet")])
        assert not (tmp_path / "m.parquet").exists()


# ----- plans given to export --------------------------------------------------------------------------------------
PLAN = {"format": "moescope-plan", "version": 1, "model": None, "top_k": None,
        "layers": {"0": {"keep": [0, 1, 2, 3]}, "1": {"keep": [0, 1, 2, 3]}}}


@pytest.mark.parametrize("extra", [
    {"merge": {"0": {"router": [[1, 0], [0]], "experts": [[1]]}}},
    {"merge": {"0": {"router": [["a"] * 8] * 4, "experts": [["a"] * 8] * 4}}},
    {"merge": {"0": {"router": [[0.0] * 8] * 4}}},
    {"merge": [[1, 2]]},
    {"dynamic_skip": {"0": "abc"}},
    {"dynamic_skip": {"0": None}},
    {"dynamic_skip": [0.1]},
])
def test_plans_with_broken_extras_are_one_line(model_dir, tmp_path, capsys, extra):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**PLAN, **extra}))
    fails_in_one_line(capsys, ["export", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_plan_and_a_folder_as_plan_are_one_line(model_dir, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    fails_in_one_line(capsys, ["export", str(model_dir), "--plan", str(deep), "--out", str(tmp_path / "out")])
    fails_in_one_line(capsys, ["export", str(model_dir), "--plan", str(tmp_path), "--out", str(tmp_path / "out")])


def test_a_plan_made_on_another_model_warns_and_the_export_records_the_real_source(model_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**PLAN, "model": "someone/other-model"}))
    out = tmp_path / "out"
    assert main(["export", str(model_dir), "--plan", str(plan), "--out", str(out)]) == 0
    assert "someone/other-model" in capsys.readouterr().err
    exported = json.loads((out / "moescope-plan.json").read_text())
    assert exported["model"] == str(model_dir) and exported["planned_on"] == "someone/other-model"


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(model_dir, capsys, monkeypatch):
    import core.commands

    def broken(args):
        raise RuntimeError("something no one expected\nsecond line")

    monkeypatch.setattr(core.commands, "_load", broken)
    capsys.readouterr()
    assert main(["info", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["info", str(model_dir), "--debug"])
