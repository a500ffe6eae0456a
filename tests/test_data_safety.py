"""MoEScope never deletes, overwrites or mixes a user's data (issue: data safety).

Each test reproduces one way the tool used to destroy or corrupt data, or one guarantee of the "Your data is
safe" section of the README: what is refused even with --overwrite, one writer per output, shards trusted only
from the same run, nothing left behind by a killed or failing writer, the dashboard bound to this machine.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.cli import main
from core.errors import MoEScopeError
from core.routing_profile import Profile

from .tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
PLAN = {"format": "moescope-plan", "version": 1, "model": None, "top_k": None,
        "layers": {"0": {"keep": [0, 1, 2, 3]}, "1": {"keep": [0, 1, 2, 3]}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("safety") / "tiny")


@pytest.fixture()
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    return path


def texts(tmp_path, name, lines):
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders and lock files MoEScope may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".moescope-" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- defect 1: export --overwrite into a folder holding the source ---------------------------------------
def test_export_overwrite_into_an_ancestor_of_the_source_is_refused(model_dir, plan_file, tmp_path, capsys):
    models = tmp_path / "anc" / "models"
    source = models / "tiny"
    shutil.copytree(model_dir, source)
    (models / "other_work.txt").write_text("x")
    before = snapshot(models)
    assert main(["export", str(source), "--plan", str(plan_file), "--out", str(models), "--overwrite"]) == 2
    assert "contains the source model" in one_error_line(capsys)
    assert snapshot(models) == before
    # the same through `..`, a symlink, and the current directory
    assert main(["export", str(source), "--plan", str(plan_file), "--out", str(source / ".." / ".."),
                 "--overwrite"]) == 2
    link = tmp_path / "link"
    link.symlink_to(models)
    assert main(["export", str(source), "--plan", str(plan_file), "--out", str(link), "--overwrite"]) == 2
    capsys.readouterr()
    os.chdir(models)
    try:
        assert main(["export", "tiny", "--plan", str(plan_file), "--out", ".", "--overwrite"]) == 2
    finally:
        os.chdir(REPO)
    assert "contains the source model" in one_error_line(capsys)
    assert snapshot(models) == before and leftovers(models.parent) == [] and leftovers(models) == []


def test_overwrite_replaces_only_an_earlier_moescope_output(model_dir, plan_file, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(folder), "--overwrite"]) == 2
    assert "replaces only an earlier MoEScope export" in one_error_line(capsys)
    assert (folder / "notes.txt").read_text() == "mine"

    out = tmp_path / "pruned"
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(out)]) == 0
    (out / "my-eval-results.csv").write_text("a,b\n")  # the user put their own file into the export
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(out), "--overwrite"]) == 2
    assert "my-eval-results.csv" in one_error_line(capsys)
    (out / "my-eval-results.csv").unlink()
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(out), "--overwrite"]) == 0

    # the home directory and the current directory are never replaced, even when they look like an export
    home = tmp_path / "home"
    shutil.copytree(out, home)
    monkeypatch.setenv("HOME", str(home))
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(home), "--overwrite"]) == 2
    assert "home directory" in one_error_line(capsys)
    monkeypatch.chdir(out)
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", ".", "--overwrite"]) == 2
    assert "current directory" in one_error_line(capsys)


def test_plan_and_table_outputs_replace_only_their_own_kind(tmp_path):
    from core.outputs import check_output

    foreign = tmp_path / "settings.json"
    foreign.write_text('{"theme": "dark"}')
    with pytest.raises(MoEScopeError, match="not a MoEScope plan"):
        check_output(foreign, "plan", overwrite=True)
    table = tmp_path / "results.csv"
    table.write_text("name,score\nme,1\n")
    with pytest.raises(MoEScopeError, match="not a MoEScope sweep table"):
        check_output(table, "table", overwrite=True)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    assert check_output(plan, "plan", overwrite=True) == plan
    with pytest.raises(MoEScopeError, match="is a file, not a folder"):
        check_output(plan / "sub" / "out.json", "plan")


# ----- defect 2: a profile's sidecar replacing a foreign .json ------------------------------------------------
def test_profile_never_replaces_a_foreign_json_or_an_existing_profile(model_dir, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = (copy / "config.json").read_bytes()
    prose = texts(tmp_path, "prose", ["the cat sat", "on the mat"])
    assert main(["profile", str(copy), "--task", str(prose), "--out", str(copy / "config.parquet")]) == 2
    one_error_line(capsys)
    assert (copy / "config.json").read_bytes() == config and not (copy / "config.parquet").exists()

    data = tmp_path / "data"
    data.mkdir()
    (data / "results.json").write_text('{"mine": true}')
    for flags in ([], ["--overwrite"]):
        assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(data / "results.parquet"),
                     *flags]) == 2
        assert "not a MoEScope profile sidecar" in one_error_line(capsys)
    assert (data / "results.json").read_text() == '{"mine": true}'

    out = tmp_path / "p.parquet"
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out)]) == 0
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out), "--overwrite"]) == 0


# ----- defect 3: a rerun reusing another run's shards ----------------------------------------------------------
def test_a_rerun_with_other_texts_never_reuses_old_shards(model_dir, tmp_path, capsys):
    out = tmp_path / "kp" / "p.parquet"
    prose = texts(tmp_path, "prose", [f"prose text number {i}" for i in range(6)])
    code = texts(tmp_path, "code", [f"def f{i}(x): return x + {i}" for i in range(6)])
    qa = texts(tmp_path, "qa", [f"question {i}? answer {i}." for i in range(5)])
    common = ["--batch-size", "2", "--batches-per-shard", "1"]
    assert main(["profile", str(model_dir), "--task", f"prose={prose}", "--task", f"code={code}", *common,
                 "--out", str(out), "--keep-shards"]) == 0
    parts = out.with_name("p.parts")
    assert len(list(parts.glob("shard-*.parquet"))) == 6  # kept on request
    capsys.readouterr()
    assert main(["profile", str(model_dir), "--task", f"qa={qa}", *common, "--out", str(out), "--overwrite"]) == 0
    assert "removing" in capsys.readouterr().err  # the stale shards were removed with a note
    prof = Profile(out)
    assert prof.meta.tasks == ["qa"]
    assert set(prof.to_pandas().task) == {"qa"} and prof.to_pandas().example.nunique() == 5
    assert not parts.exists()  # merged shards are deleted unless --keep-shards


def test_shards_of_an_interrupted_run_with_the_same_inputs_are_reused(model_dir, tmp_path, capsys):
    from core.model import load_model
    from core.profiling import Sharding, parts_dir, profile_texts

    mm = load_model(model_dir)
    tasks = {"a": [f"text {i} " * (i + 1) for i in range(8)]}
    out = tmp_path / "p.parquet"
    sharding = Sharding(0, 1, batches_per_shard=1)
    profile_texts(mm, tasks, out, batch_size=2, progress=False, sharding=sharding, keep_shards=True)
    whole = Profile(out).to_pandas()
    out.unlink()
    out.with_suffix(".json").unlink()
    (parts_dir(out) / "shard-00002.parquet").unlink()  # as if the run had died in its third shard
    seen = []
    profile_texts(mm, tasks, out, batch_size=2, progress=lambda done, total, rate: seen.append(total),
                  sharding=sharding)
    assert seen[-1] < sum(len(t) for t in tasks["a"])  # only the missing shard was recorded again
    assert Profile(out).to_pandas().equals(whole)
    # another max_length changes the fingerprint: nothing is reused
    profile_texts(mm, tasks, tmp_path / "q.parquet", batch_size=2, progress=False, sharding=sharding,
                  keep_shards=True)
    seen.clear()
    (tmp_path / "q.parquet").unlink()
    (tmp_path / "q.json").unlink()
    profile_texts(mm, tasks, tmp_path / "q.parquet", batch_size=2, max_length=6,
                  progress=lambda done, total, rate: seen.append(total), sharding=sharding)
    assert seen[-1] == sum(min(len(mm.tokenizer(t)["input_ids"]), 6) for t in tasks["a"])


# ----- defect 4: concurrent writers ------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from core.outputs import output_lock
    with output_lock(sys.argv[1], job=sys.argv[2] or None):
        print("locked", flush=True)
        time.sleep(60)
""")


def hold_lock(target: Path, job: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), job], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_killed_one_does_not_block(model_dir, tmp_path, capsys):
    from core.outputs import lock_path

    out = tmp_path / "p.parquet"
    prose = texts(tmp_path, "prose", ["the cat sat", "on the mat"])
    holder = hold_lock(out)
    try:
        assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"process {holder.pid} on {socket.gethostname()}" in line and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # the killed holder's lock file stays, but no longer blocks
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out)]) == 0
    assert Profile(out).meta.tasks == ["prose"] and leftovers(tmp_path) == []


def test_ranks_of_one_job_share_the_lock_and_other_jobs_are_refused(tmp_path):
    from core.outputs import output_lock

    out = tmp_path / "p.parquet"
    holder = hold_lock(out, job="job-a")
    try:
        with output_lock(out, job="job-a"):  # another rank of the same job
            pass
        for job in ("job-b", None):
            with pytest.raises(MoEScopeError, match=f"process {holder.pid}"):
                with output_lock(out, job=job):
                    pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):
        pass
    assert leftovers(tmp_path) == []


# ----- nothing left behind on failure -----------------------------------------------------------------------
KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from transformers import PreTrainedModel
    from core.checkpoint_writer import ShardedWriter
    from core.cli import main

    def dies(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)

    PreTrainedModel.save_pretrained = dies  # the in-memory export
    ShardedWriter.add = lambda self, name, tensor: dies(self, self.folder)  # the streaming one
    main(sys.argv[1:])
""")

KILLED_PROFILE = textwrap.dedent("""
    import os, signal, sys
    from core.cli import main
    from core.profile_writer import ProfileWriter

    def dies(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    ProfileWriter._write_chunks = dies
    main(sys.argv[1:])
""")


def test_kill_9_mid_export_or_profile_then_a_rerun_leaves_nothing(model_dir, plan_file, tmp_path):
    out = tmp_path / "out" / "pruned"
    args = ["export", str(model_dir), "--plan", str(plan_file), "--out", str(out)]
    died = subprocess.run([sys.executable, "-c", KILLED_EXPORT, *args], cwd=REPO, capture_output=True)
    assert died.returncode == -signal.SIGKILL
    assert any(name.endswith(".tmp") for name in leftovers(out.parent))  # what kill -9 leaves
    assert main(args) == 0
    assert leftovers(out.parent) == [] and (out / "model.safetensors").stat().st_size > 100

    prose = texts(tmp_path, "prose", ["the cat sat", "on the mat"])
    profile = tmp_path / "profiles" / "p.parquet"
    args = ["profile", str(model_dir), "--task", str(prose), "--out", str(profile)]
    died = subprocess.run([sys.executable, "-c", KILLED_PROFILE, *args], cwd=REPO, capture_output=True)
    assert died.returncode == -signal.SIGKILL
    assert any(name.endswith(".tmp") for name in leftovers(profile.parent))
    assert main(args) == 0
    assert sorted(p.name for p in profile.parent.iterdir()) == ["p.json", "p.parquet"]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_nothing_and_says_so_in_one_line(model_dir, plan_file, tmp_path, capsys, monkeypatch):
    prose = texts(tmp_path, "prose", ["the cat sat", "on the mat"])
    out_dir = tmp_path / "out"
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out_dir / "p.parquet")]) == 2
    assert "No space left" in one_error_line(capsys)
    assert list(out_dir.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setattr("core.profile_writer.atomic_write_text", full_disk)  # the sidecar fails after the rows
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out_dir / "p.parquet")]) == 2
    assert list(out_dir.iterdir()) == []
    monkeypatch.undo()

    def opening_fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "ParquetWriter", opening_fails)  # a failure inside ProfileWriter.__init__
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(out_dir / "p.parquet")]) == 2
    assert list(out_dir.iterdir()) == []
    monkeypatch.undo()

    from transformers import PreTrainedModel

    def partial_then_full(self, folder, *args, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        full_disk()

    from core.checkpoint_writer import ShardedWriter

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", partial_then_full)  # the in-memory export
    monkeypatch.setattr(ShardedWriter, "add", lambda self, name, tensor: partial_then_full(self, self.folder))
    capsys.readouterr()
    assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(out_dir / "pruned")]) == 2
    assert "No space left" in one_error_line(capsys)
    assert list(out_dir.iterdir()) == []


def test_outputs_get_ordinary_permissions(model_dir, plan_file, tmp_path):
    old = os.umask(0o022)
    try:
        prose = texts(tmp_path, "prose", ["the cat sat", "on the mat"])
        assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(tmp_path / "p.parquet")]) == 0
        assert main(["export", str(model_dir), "--plan", str(plan_file), "--out", str(tmp_path / "pruned")]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "p.parquet", tmp_path / "p.json", tmp_path / "pruned" / "config.json",
                 tmp_path / "pruned" / "moescope-plan.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "pruned").stat().st_mode) == 0o755


def test_merge_profiles_never_writes_over_an_input(model_dir, tmp_path, capsys):
    prose = texts(tmp_path, "prose", ["the cat sat", "on the mat"])
    shard = tmp_path / "s.parquet"
    assert main(["profile", str(model_dir), "--task", str(prose), "--out", str(shard)]) == 0
    before = shard.read_bytes()
    assert main(["merge-profiles", str(shard), "--out", str(shard), "--overwrite"]) == 2
    assert "input profile" in one_error_line(capsys) and shard.read_bytes() == before


# ----- the dashboard listens on this machine only -------------------------------------------------------------
def _listening(port: int) -> list[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6, hex as the kernel writes them)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads listening sockets from /proc (Linux)")
def test_dashboard_binds_to_localhost_from_any_folder(tmp_path):
    (tmp_path / ".streamlit").mkdir()  # a config in the current folder that would open it to the network
    (tmp_path / ".streamlit" / "config.toml").write_text('[server]\naddress = "0.0.0.0"\n')
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MOESCOPE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "dashboard", "--port", str(port)], cwd=tmp_path,
                            env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not _listening(port) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
        addresses = _listening(port)
        assert addresses, proc.stdout.read1().decode() if proc.poll() is not None else "never listened"
        assert set(addresses) == {"0100007F"}  # 127.0.0.1, and nothing else (no 0.0.0.0, no IPv6 any)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + 15
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _listening(port), "a terminated `moescope dashboard` left its server running"


def test_prune_and_sweep_refuse_an_output_another_run_is_writing(model_dir, tmp_path, capsys):
    from .tiny_models import write_lm_task

    task = write_lm_task(tmp_path / "lm", ["hello world", "abc def"])
    plan, table = tmp_path / "plan.json", tmp_path / "sweep.csv"
    holders = [hold_lock(plan), hold_lock(table)]
    try:
        assert main(["prune", str(model_dir), "--method", "frequency", "--task", str(task), "--out", str(plan)]) == 2
        assert f"process {holders[0].pid}" in one_error_line(capsys)
        assert main(["sweep", str(model_dir), "--methods", "frequency", "--ratios", "0.5", "--tasks", str(task),
                     "--out", str(table)]) == 2
        assert f"process {holders[1].pid}" in one_error_line(capsys)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    assert not plan.exists() and not table.exists()


def test_dashboard_uploads_are_removed_when_replaced_or_left_by_a_stopped_server(tmp_path, monkeypatch):
    from dashboard import state

    monkeypatch.setenv("MOESCOPE_HOME", str(tmp_path))
    uploads = tmp_path / "dashboard" / "uploads"
    uploads.mkdir(parents=True)
    stopped = uploads / ".profile.moescope-999999999-0123abcd@" f"{socket.gethostname()}.tmp"
    stopped.mkdir()  # the upload of a dashboard process that no longer exists
    session: dict = {}
    monkeypatch.setattr(state.st, "session_state", session)
    first = state.new_upload_folder()
    assert not stopped.exists() and first.is_dir()
    state.keep_upload_folder(first)
    second = state.new_upload_folder()
    state.keep_upload_folder(second)
    assert not first.exists() and second.is_dir()  # the session's previous upload is gone
    failed = state.new_upload_folder()
    state.drop_upload_folder(failed)
    assert sorted(p.name for p in uploads.iterdir()) == [second.name]
