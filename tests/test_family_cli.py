"""The CLI flow on a saved tiny checkpoint of every MoE family of the installed transformers (issue 13 acceptance).

Families come from core.families' discovery, never from a list here. Each supported family (explicit adapter or
discovered) runs ``moescope info``, ``profile`` on a tiny task, ``prune --method frequency --ratio 0.5``,
``evaluate`` with the plan and ``export`` (which streams); the export reloads with plain ``AutoModelForCausalLM``
and has the pruned expert count. Each refused family's ``moescope info`` exits 2 with one ``error:`` line naming
the reason (core.families.REFUSED).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.adapters import _BY_MODEL_TYPE
from core.cli import main
from core.families import REFUSED, UNVERIFIED, moe_model_types
from core.model import MoEModel

from .family_models import build_family
from .test_streaming_export import save_checkpoint
from .tiny_models import build, write_lm_task

TEXTS = ["the cat sat on the mat", "hello world", "abc def ghi"]


def _supported():
    moe, _ = moe_model_types()
    return [pytest.param(mt, marks=pytest.mark.xfail(strict=True, reason=UNVERIFIED[mt])) if mt in UNVERIFIED
            else mt for mt in sorted(moe) if mt not in REFUSED]


def _tiny_checkpoint(model_type, folder):
    model = build(model_type) if model_type in _BY_MODEL_TYPE else build_family(model_type)
    return save_checkpoint(model, folder)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return write_lm_task(folder / "lm", TEXTS, splits=("calibration", "test")), folder / "texts.txt"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _supported())
def test_cli_flow_on_every_supported_family(model_type, task, tmp_path, capsys):
    lm_task, texts = task
    model_dir = _tiny_checkpoint(model_type, tmp_path / "model")
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n_experts, moe_layers = info["n_experts"], info["moe_layers"]
    assert n_experts >= 4 and moe_layers, info
    assert main(["profile", str(model_dir), "--task", str(texts), "--out", str(tmp_path / "p.parquet")]) == 0
    assert (tmp_path / "p.parquet").stat().st_size > 0
    plan = tmp_path / "plan.json"
    assert main(["prune", str(model_dir), "--method", "frequency", "--ratio", "0.5", "--task", str(lm_task),
                 "--out", str(plan)]) == 0
    layers = json.loads(plan.read_text())["layers"]
    assert sorted(int(i) for i in layers) == moe_layers
    assert all(len(v["keep"]) == n_experts // 2 for v in layers.values())
    assert main(["evaluate", str(model_dir), "--task", str(lm_task), "--plan", str(plan), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(model_dir), "--plan", str(plan), "--out", str(tmp_path / "pruned")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").float().eval()
    assert MoEModel(reloaded).n_experts == n_experts // 2
    with torch.no_grad():
        assert reloaded(torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_info_refuses_each_refused_family_in_one_line(model_type, tmp_path, capsys):
    model_dir = save_checkpoint(build_family(model_type), tmp_path / "model")
    capsys.readouterr()  # the save's progress bar is not the CLI's output
    assert main(["info", str(model_dir)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert " ".join(REFUSED[model_type].split()) in lines[0]
