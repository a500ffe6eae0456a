"""Profiling a long stream keeps memory bounded: rows stream to disk instead of accumulating."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
from tests.tiny_models import build  # run with the repository as its folder (cwd), which python -c imports from
from core.model import MoEModel
from core.routing_profile import ProfileMeta, Profile
from core.profile_writer import ProfileWriter
from core.recorder import RouterRecorder

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

torch.set_num_threads(1)
mm = MoEModel(build("mixtral"))
meta = ProfileMeta(model="tiny", weights_digest="", family="Mixtral", layers=mm.layer_indices, n_experts=8, top_k=2)
gen = torch.Generator().manual_seed(0)
batch, length, tokens = 16, 512, 0
path = sys.argv[1]
samples = []
with ProfileWriter(path, meta) as writer, RouterRecorder(mm, writer) as rec, torch.inference_mode():
    step = 0
    while tokens < 1_000_000:
        ids = torch.randint(3, 128, (batch, length), generator=gen)
        with rec.batch("stream", range(step * batch, (step + 1) * batch)):
            mm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        tokens += ids.numel()
        step += 1
        if step == 8:
            baseline = rss_mb()  # after warm-up: allocator pools and the first row groups exist
        samples.append(rss_mb())
print(json.dumps({"tokens": tokens, "rows": Profile(path).num_rows, "baseline_mb": baseline,
                  "peak_after_baseline_mb": max(samples[8:]), "end_mb": samples[-1]}))
"""


@pytest.mark.slow
def test_a_million_tokens_keep_resident_memory_growth_under_200mb(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "long.parquet")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] >= 1_000_000 and result["rows"] == 2 * result["tokens"]
    growth = result["peak_after_baseline_mb"] - result["baseline_mb"]
    assert growth < 200, result
