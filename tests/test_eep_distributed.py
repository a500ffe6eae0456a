"""EEP under torchrun (issue 16): candidates split over 2 CPU processes give exactly the plan one process gives
with the same seed (``batched``: a generation's children proposed from one archive snapshot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.methods import Target, make_method
from core.methods.eep_operators import evolve

from .test_eep import overlap
from .test_methods import lm_task, with_dead_experts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_two_processes_give_the_single_process_plan(tmp_path):
    calibration = lm_task(tmp_path)
    out = tmp_path / "rank0.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "tests" / "eep_torchrun_worker.py"), str(out), str(tmp_path / "lm")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())

    one = evolve(overlap, 3, 8, 4, population=6, offspring=5, generations=4, seed=7, batched=True)
    assert got["archive"] == json.loads(json.dumps(one.archive)) and got["curve"] == one.curve
    assert got["evaluations"] == one.evaluations
    # every new candidate scored once, dealt round-robin: per batch (5 here) the ranks differ by at most one
    assert sum(got["per_rank"]) == one.evaluations and abs(got["per_rank"][0] - got["per_rank"][1]) <= 5

    plan = make_method("eep", population=4, offspring=4, generations=2, merge_generations=2, parent_threshold=0.02,
                       seed=3, batched=True).plan(with_dead_experts(), calibration, Target(keep=5))
    expected = json.loads(plan.to_json())
    for key in ("layers", "fitness", "evaluations", "steps", "validation", "merge", "router_mapping"):
        assert got["plan"].get(key) == expected.get(key), key
    assert got["plan"]["parameters"] == expected["parameters"] | {"processes": 2}
