"""``moescope export`` streams a local safetensors checkpoint shard by shard without loading the model, bounds
its shards by ``--max-shard-size``, and loads the model only where it must (a 'probs'-mapped merging plan, whose
routers are fitted on it; ``--min-router-agreement`` sets that fit's threshold)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.cli import main
from core.plan import Plan

from .test_streaming_export import KEEP, assert_same_tensors, one_hot, stored


@pytest.fixture()
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    Plan(layers={0: KEEP, 1: KEEP}, top_k=2).save(path)
    return path


def test_cli_export_never_loads_the_model_and_bounds_its_shards(tmp_path, tiny_models, plan_file, monkeypatch,
                                                                capsys):
    """With loading disabled the CLI still exports; the shards respect --max-shard-size, and the tensors equal
    those the in-memory export writes (the same slicing, so exact by construction)."""
    src = tiny_models.checkpoint("mixtral")
    assert main(["export", str(src), "--plan", str(plan_file), "--out", str(tmp_path / "memory")]) == 0  # loads

    def no_loading(*args, **kwargs):
        raise AssertionError("the streaming export loaded the model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr("core.model.load_model", no_loading)
    capsys.readouterr()
    out = tmp_path / "streamed"
    assert main(["export", str(src), "--plan", str(plan_file), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    said = capsys.readouterr().out
    assert "shard" in said and "tensors" in said  # progress in tensors and bytes
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    largest_tensor = max(t.numel() * t.element_size() for t in stored(out).values())
    assert all(s.stat().st_size <= max(100_000, largest_tensor) + 10_000 for s in shards)  # + header
    monkeypatch.undo()
    assert_same_tensors(out, tmp_path / "memory")  # the same stored tensors sliced alike: exact by construction
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == len(KEEP)


def test_cli_export_refuses_a_bad_shard_size_in_one_line(tmp_path, tiny_models, plan_file, capsys):
    src = tiny_models.checkpoint("mixtral")
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(src), "--plan", str(plan_file), "--out", str(tmp_path / "x"), "--max-shard-size", "5 apples"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard size" in err
    assert not (tmp_path / "x").exists()


def test_cli_export_of_a_probs_plan_fits_routers_and_honours_the_threshold(tmp_path, tiny_models, capsys):
    """A 'probs'-mapped merge needs the loaded model (the fit): the CLI loads it; a threshold above what the fit
    reaches (a noisy R) refuses in one line and writes nothing; one-hot R fits exactly and exports."""
    src = tiny_models.checkpoint("mixtral")
    texts = tmp_path / "calib"
    texts.mkdir()
    generator = torch.Generator().manual_seed(0)
    noisy = (torch.tensor(one_hot(KEEP)) + 0.6 * torch.rand(len(KEEP), 8, generator=generator)).tolist()
    for name, router in (("exact", one_hot(KEEP)), ("noisy", noisy)):
        merge = {str(i): {"router": router, "experts": one_hot(KEEP)} for i in (0, 1)}
        Plan(layers={0: KEEP, 1: KEEP}, top_k=2,
             extra={"merge": merge, "router_mapping": "probs",
                    "calibration": {"task": "prose", "split": "calibration", "limit": 8}}).save(texts / f"{name}.json")
    capsys.readouterr()
    code = main(["export", str(src), "--plan", str(texts / "noisy.json"), "--out", str(tmp_path / "noisy"),
                 "--min-router-agreement", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 0:  # the fit happened to be perfect: then the threshold cannot refuse, nothing to check
        pytest.skip("the noisy mapping was fitted exactly")
    assert code == 2 and len(errors) == 1 and "agree" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "noisy").exists()
    assert main(["export", str(src), "--plan", str(texts / "exact.json"), "--out", str(tmp_path / "exact"),
                 "--min-router-agreement", "1"]) == 0
    assert "fitted routers agree" in capsys.readouterr().out
