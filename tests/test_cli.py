"""The ``moescope`` command line end to end on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.aggregate import expert_usage
from core.cli import main
from core.routing_profile import Profile

from .tiny_models import write_lm_task


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models.checkpoint()


def test_info_json(model_dir, capsys):
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "Mixtral" and info["n_experts"] == 8 and info["top_k"] == 2
    assert info["moe_layers"] == [0, 1] and info["active_params"] < info["total_params"]


def test_profile_then_export(model_dir, tmp_path, capsys):
    (tmp_path / "prose.txt").write_text("the cat sat on the mat\nhello world, again\n\n")
    (tmp_path / "code.jsonl").write_text('{"text": "def f(x): return x"}\n{"text": "import os"}\n')
    out = tmp_path / "prof.parquet"
    assert main(["profile", str(model_dir), "--task", str(tmp_path / "prose.txt"),
                 "--task", f"py={tmp_path / 'code.jsonl'}", "--out", str(out), "--batch-size", "2"]) == 0
    prof = Profile(out)
    assert prof.meta.tasks == ["prose", "py"]
    assert prof.meta.tokens == len("the cat sat on the mat") + len("hello world, again") + len(
        "def f(x): return x") + len("import os")
    assert prof.num_rows == 2 * prof.meta.tokens
    assert set(expert_usage(prof).task) == {"prose", "py"}

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moescope-plan", "version": 1, "model": None, "top_k": 1,
                                "layers": {"0": {"keep": [0, 1, 2, 3]}, "1": {"keep": [1, 3, 5, 7]}}}))
    dest = tmp_path / "pruned"
    assert main(["export", str(model_dir), "--plan", str(plan), "--out", str(dest)]) == 0
    assert "exported to" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(dest)
    assert reloaded.config.num_local_experts == 4 and reloaded.config.num_experts_per_tok == 1
    assert (dest / "moescope-plan.json").exists() and (dest / "tokenizer.json").exists()
    assert reloaded(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 128)
    # a second export to the same place is refused with one line, exit code 2, before loading anything
    capsys.readouterr()
    assert main(["export", str(model_dir), "--plan", str(plan), "--out", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1


def test_profile_under_a_plan_and_generation(model_dir, tmp_path):
    (tmp_path / "t.txt").write_text("abc\nhello there\n")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moescope-plan", "version": 1, "top_k": None,
                                "layers": {"0": {"keep": [4, 5, 6, 7]}}}))
    out = tmp_path / "g.parquet"
    assert main(["profile", str(model_dir), "--task", str(tmp_path / "t.txt"), "--out", str(out), "--plan", str(plan),
                 "--max-new-tokens", "2", "--probs"]) == 0
    df = Profile(out).to_pandas()
    assert set(df.step) == {0, 1}
    assert all(e >= 4 for row in df[df.layer == 0].experts for e in row)
    layer0 = df[df.layer == 0]
    assert all(abs(sum(p) - 1) < 1e-5 and all(p[e] == 0 for e in range(4)) for p in layer0.probs)
    assert Profile(out).meta.plan_digest is not None


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "No model directory" in capsys.readouterr().err
    (tmp_path / "t.csv").write_text("x")
    assert main(["profile", str(tmp_path), "--task", str(tmp_path / "t.csv"), "--out", str(tmp_path / "p.parquet")]) == 2
    assert "neither .txt nor .jsonl" in capsys.readouterr().err
    (tmp_path / "t.jsonl").write_text('{"body": "x"}\n')
    assert main(["profile", str(tmp_path), "--task", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "p.parquet")]) == 2
    assert "no string field 'text' (fields: ['body'])" in capsys.readouterr().err


def test_evaluate_command(model_dir, tmp_path, capsys):
    folder = write_lm_task(tmp_path / "lm", ["hello world", "abc"], splits=("test",))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moescope-plan", "version": 1, "top_k": 1, "layers": {}}))
    assert main(["evaluate", str(model_dir), "--task", str(folder), "--plan", str(plan), "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["task"] == "lm" and result["n_examples"] == 2 and result["metrics"]["nll"] > 0
    assert 0 <= result["agreement"]["top1_agreement"] <= 1 and result["plan_digest"]
    assert main(["evaluate", str(model_dir), "--task", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err


def test_prune_command_writes_a_plan(model_dir, tmp_path, capsys):
    folder = write_lm_task(tmp_path / "lm", ["hello world", "abc def"])
    out = tmp_path / "plan.json"
    assert main(["prune", str(model_dir), "--method", "frequency", "--ratio", "0.5", "--top-k", "1",
                 "--task", str(folder), "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["format"] == "moescope-plan" and plan["method"] == "frequency" and plan["top_k"] == 1
    assert all(len(v["keep"]) == 4 for v in plan["layers"].values())
    assert "keeps [4] experts per layer" in capsys.readouterr().out
    out2 = tmp_path / "eep.json"
    assert main(["prune", str(model_dir), "--method", "eep", "--keep", "6", "--task", str(folder), "--out", str(out2),
                 "--param", "generations=1", "--param", "population=3", "--param", "offspring=2", "--seed", "4"]) == 0
    eep = json.loads(out2.read_text())
    assert eep["seed"] == 4 and eep["parameters"]["generations"] == 1
    assert main(["prune", str(model_dir), "--method", "eep", "--task", str(folder), "--out", str(out2)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prune", str(model_dir), "--method", "frequency", "--task", str(folder), "--out",
                 str(tmp_path / "x.json"), "--param", "nonsense=1"]) == 2
    assert "Bad --param for frequency" in capsys.readouterr().err


def test_sweep_command_writes_a_table(model_dir, tmp_path, capsys):
    import pandas as pd

    folder = write_lm_task(tmp_path / "lm", ["hello world", "abc def", "the cat sat"],
                           splits=("calibration", "test"))
    out = tmp_path / "sweep.csv"
    assert main(["sweep", str(model_dir), "--methods", "random,frequency", "--ratios", "0.25,0.5", "--tasks",
                 str(folder), "--seeds", "0,1", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 1 + 2 * 2 + 2  # full, random x 2 ratios x 2 seeds, frequency x 2 ratios
    assert set(table.method) == {"full", "random", "frequency"}
    assert sorted(table[table.method == "frequency"].keep) == [4, 6]
    full = table[table.method == "full"].iloc[0]
    assert full.total_params > table[table.ratio == 0.5].total_params.max()
    assert table[table.method != "full"].agreement_top1_agreement.between(0, 1).all()
    assert {"metric_nll", "tokens_per_s", "active_params", "weight_bytes", "search_seconds"} <= set(table.columns)


def test_train_sample_is_wired(monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    seen = []
    monkeypatch.setattr(subprocess, "call", lambda command: seen.append(command) or 0)
    assert main(["train-sample", "--minutes", "1", "--out", "/tmp/x", "--quiet"]) == 0
    script = Path(__file__).resolve().parents[1] / "sample_data" / "train_sample_model.py"
    assert seen == [[sys.executable, str(script), "--minutes", "1", "--out", "/tmp/x", "--quiet"]]
