"""``moescope compare``: the divergence table on stdout, and with --out a folder of CSVs that hold exactly what
core.profile_compare computes (the command adds no numbers of its own); mismatched profiles, a foreign --out
folder and a plan B was not recorded under are refused in one line; --overwrite replaces an earlier compare."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from core.cli import main
from core.model import MoEModel
from core.plan import Plan
from core.profile_compare import compare_usage, js_divergence_per_layer, reroute_flows
from core.profiling import profile_texts
from tests.tiny_models import char_tokenizer

# The CSVs hold floats printed by pandas with full precision (repr round-trips), so they read back to within
# a float64's last bit; 1e-12 leaves room for that and nothing else.
TOL = 1e-12
TEXTS = {"prose": ["the cat sat on the mat", "a quick brown fox jumps"], "code": ["def f(x): return x + 1"]}


@pytest.fixture(scope="module")
def profiles(tiny_models, tmp_path_factory):
    """The tiny model profiled in full (A) and under a plan (B) on the same texts, the plan's file, and a profile
    of a model of another shape (more experts)."""
    folder = tmp_path_factory.mktemp("compare")
    mm = MoEModel(tiny_models.model("mixtral"), tokenizer=char_tokenizer(), source="tiny-mixtral")
    plan = Plan(layers={layer: [0, 2, 4, 6] for layer in mm.layer_indices})
    plan_path = folder / "plan.json"
    plan.save(plan_path)
    full = profile_texts(mm, TEXTS, folder / "full.parquet", progress=False)
    pruned = profile_texts(mm, TEXTS, folder / "pruned.parquet", progress=False, plan=plan)
    other = MoEModel(tiny_models.model("mixtral", num_local_experts=mm.n_experts * 2), tokenizer=char_tokenizer(),
                     source="tiny-wide")
    wide = profile_texts(other, TEXTS, folder / "wide.parquet", progress=False)
    return {"a": str(full), "b": str(pruned), "plan": str(plan_path), "plan_obj": plan, "wide": str(wide),
            "folder": folder}


def test_print_only_shows_the_divergence_table_and_writes_nothing(profiles, capsys):
    before = sorted(p.name for p in profiles["folder"].iterdir())
    assert main(["compare", profiles["a"], profiles["b"]]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["layer", "jsd_bits", "moved_share"]
    js = js_divergence_per_layer(profiles["a"], profiles["b"])
    assert len(lines) == 1 + len(js)
    for line, row in zip(lines[1:], js.itertuples()):
        layer, jsd, moved = line.split()
        assert int(layer) == row.layer
        assert float(jsd) == pytest.approx(row.jsd_bits, abs=1e-4)  # printed to 4 decimals
        assert float(moved) == pytest.approx(row.moved_share, abs=1e-4)
    assert (js["jsd_bits"] > 0).all()  # the plan changed routing, so the table is not trivially zeros
    assert sorted(p.name for p in profiles["folder"].iterdir()) == before


def test_out_writes_the_csvs_core_computes_and_flows_with_the_plan(profiles, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", profiles["a"], profiles["b"], "--task", "prose", "--plan", profiles["plan"],
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["divergence.csv", "flows.csv", "moescope-compare.json",
                                                     "usage_diff.csv"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "usage_diff.csv"),
                                  compare_usage(profiles["a"], profiles["b"], "prose"), check_dtype=False, atol=TOL)
    pd.testing.assert_frame_equal(pd.read_csv(out / "divergence.csv"),
                                  js_divergence_per_layer(profiles["a"], profiles["b"], "prose"), check_dtype=False,
                                  atol=TOL)
    flows = reroute_flows(profiles["a"], profiles["b"], profiles["plan_obj"], task="prose")
    assert not flows.empty
    pd.testing.assert_frame_equal(pd.read_csv(out / "flows.csv"), flows, check_dtype=False, atol=TOL)
    assert "wrote" in capsys.readouterr().out

    # Without --plan there are no flows; --overwrite replaces the earlier compare, old flows.csv included.
    assert main(["compare", profiles["a"], profiles["b"], "--out", str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    assert main(["compare", profiles["a"], profiles["b"], "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["divergence.csv", "moescope-compare.json", "usage_diff.csv"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "divergence.csv"),
                                  js_divergence_per_layer(profiles["a"], profiles["b"]), check_dtype=False, atol=TOL)
    assert json.loads((out / "moescope-compare.json").read_text())["format"] == "moescope-compare"


def one_line_error(capsys, argv, *fragments) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0]


def test_mismatched_profiles_and_a_wrong_plan_are_refused_in_one_line(profiles, tmp_path, capsys):
    one_line_error(capsys, ["compare", profiles["a"], profiles["wide"]], "different shapes")
    other_plan = tmp_path / "other.json"
    Plan(layers={0: [1, 3, 5, 7]}).save(other_plan)
    out = tmp_path / "never"
    one_line_error(capsys, ["compare", profiles["a"], profiles["b"], "--plan", str(other_plan), "--out", str(out)],
                   "not under the plan given")
    assert not out.exists()
    one_line_error(capsys, ["compare", profiles["a"], profiles["b"], "--task", "poetry"], "Task 'poetry' is not in")


def test_a_folder_moescope_did_not_write_is_never_replaced(profiles, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    one_line_error(capsys, ["compare", profiles["a"], profiles["b"], "--out", str(mine), "--overwrite"],
                   "replaces only an earlier MoEScope compare")
    assert (mine / "notes.txt").read_text() == "keep me"
    # Nor an input: the profiles' own folder.
    one_line_error(capsys, ["compare", profiles["a"], profiles["b"], "--out", str(profiles["folder"]),
                            "--overwrite"], "never writes over its inputs")
