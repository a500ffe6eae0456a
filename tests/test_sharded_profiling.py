"""Sharded profiling: a 2-process torchrun job (gloo, CPU), a Slurm-array style split and a resumed run each
produce exactly the single-process profile, row for row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.cli import main
from core.model import load_model
from core.profiling import Sharding, parts_dir, profile_texts, read_task_texts
from core.routing_profile import Profile

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun and Slurm-style runs start several Python processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("shard")
    model = tiny_models.checkpoint()
    words = "the cat sat on a mat and then it ran off to see the world".split()
    (tmp / "a.txt").write_text("\n".join(" ".join(words[: 3 + i % 11]) for i in range(23)) + "\n")
    (tmp / "b.txt").write_text("\n".join(f"{i} + {i * 7} = {i * 8}" for i in range(9)) + "\n")
    single = tmp / "single.parquet"
    assert main(["profile", str(model), "--task", str(tmp / "a.txt"), "--task", str(tmp / "b.txt"),
                 "--out", str(single), "--batch-size", "3"]) == 0
    return tmp, model, Profile(single)


def rows(path) -> pd.DataFrame:
    return Profile(path).to_pandas()


def env_without_dist() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_torchrun_two_processes_equal_single_process(setup):
    tmp, model, single = setup
    out = tmp / "dist.parquet"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "core.cli",
           "profile", str(model), "--task", str(tmp / "a.txt"), "--task", str(tmp / "b.txt"), "--out", str(out),
           "--batch-size", "3", "--batches-per-shard", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env_without_dist(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pd.testing.assert_frame_equal(rows(out), single.to_pandas())
    merged = Profile(out).meta
    assert merged.tokens == single.meta.tokens and merged.tasks == single.meta.tasks
    assert len(merged.shards) == 6  # 11 batches of 3 texts, 2 batches per shard


def test_slurm_array_split_then_merge(setup):
    tmp, model, single = setup
    out = tmp / "slurm.parquet"
    for task_id in (0, 1):
        env = {**env_without_dist(), "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": "2",
               "SLURM_ARRAY_TASK_MIN": "0"}
        cmd = [sys.executable, "-m", "core.cli", "profile", str(model), "--task", str(tmp / "a.txt"), "--task",
               str(tmp / "b.txt"), "--out", str(out), "--batch-size", "3", "--batches-per-shard", "4"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "merge-profiles" in done.stdout
    shards = sorted(parts_dir(out).glob("shard-*.parquet"))
    assert len(shards) == 3
    assert main(["merge-profiles", *map(str, shards), "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(rows(out), single.to_pandas())


def test_interrupted_run_resumes_from_finished_shards(setup):
    tmp, model, single = setup
    mm = load_model(model)
    tasks = dict(read_task_texts(str(tmp / n)) for n in ("a.txt", "b.txt"))
    out = tmp / "resume.parquet"
    sharding = Sharding(0, 1, batches_per_shard=4)
    profile_texts(mm, tasks, out, batch_size=3, progress=False, sharding=sharding, keep_shards=True)
    pd.testing.assert_frame_equal(rows(out), single.to_pandas())
    lost = parts_dir(out) / "shard-00001.parquet"
    lost_tokens = Profile(lost).meta.tokens
    lost.unlink()  # as if the run had died in its second shard
    out.unlink()
    seen = []
    profile_texts(mm, tasks, out, batch_size=3, progress=lambda done, total, rate: seen.append(total),
                  sharding=sharding)
    assert seen and seen[-1] == lost_tokens < single.meta.tokens  # only the missing shard was recorded again
    pd.testing.assert_frame_equal(rows(out), single.to_pandas())
