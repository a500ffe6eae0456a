"""The results module: sweep rows from a plan's provenance, sweep tables on disk, comparisons, trade-off points,
and both sweep paths (``run_sweep`` and the workbench) writing rows of one format."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from core import results, sweep
from core.errors import MoEScopeError
from core.evaluation import EvalResult
from core.methods import Calibration, Target, make_method
from core.model import MoEModel
from core.plan import Plan
from core.workbench import Workbench

from .tiny_models import build, char_tokenizer, write_lm_task


def fake_result(task="t", metrics=None, tokens_per_s=100.0, agreement=None, **cost):
    return EvalResult(task=task, split="test", metric_kind="lm_loss", n_examples=3, seconds=0.5, plan_digest="d",
                      metrics=metrics or {"nll": 2.0, "perplexity": 7.4}, agreement=agreement or {},
                      cost={"tokens_per_s": tokens_per_s, **cost})


def test_headline_metric_and_direction():
    assert results.HEADLINE_METRIC["multiple_choice"] == "accuracy"
    assert results.better("nll") == "lower" and results.better("accuracy") == "higher"
    assert not results.higher_is_better("perplexity") and results.higher_is_better("f1")


def test_lm_eval_tasks_headline_the_metric_they_report():
    # An lm-eval task has no MoEScope spec: its headline comes from what it reported, stderr columns aside.
    assert results.headline_metric("lm_eval:arc_easy", ["acc_stderr", "acc_norm", "acc"]) == "acc"
    assert results.headline_metric("lm_eval:gsm8k", ["exact_match_stderr", "exact_match"]) == "exact_match"
    assert results.headline_metric("lm_eval:custom", ["bleu_stderr", "bleu"]) == "bleu"
    assert results.headline_metric("lm_eval:wikitext") == "acc"
    assert results.better(results.headline_metric("lm_eval:wikitext", ["word_perplexity"])) == "lower"


def test_experts_kept_is_the_plans_and_all_without_one():
    plan = Plan(layers={0: [0, 1, 2], 1: [0, 1, 2]}, top_k=1, extra={"method": "frequency", "seed": None})
    assert results.experts_kept(plan, 8) == 3 == plan.experts_kept(8)
    assert results.experts_kept(None, 8) == 8 and results.experts_kept(Plan(layers={}, top_k=1), 8) == 8
    assert results.removed_fraction(2, 8) == 0.75
    assert results.dropped_experts(Plan(layers={0: [0, 2]}), 4) == [(0, 1), (0, 3)]


def test_rows_read_the_plans_provenance_and_take_overrides():
    full = results.plan_row(fake_result(), None, 8, 2)
    assert {k: full[k] for k in ("method", "ratio", "keep", "top_k", "seed", "forward_passes")} == {
        "method": "full", "ratio": 0.0, "keep": 8, "top_k": 2, "seed": None, "forward_passes": 0}
    assert full["metric_nll"] == 2.0 and full["tokens_per_s"] == 100.0 and full["eval_task"] == "t"
    plan = Plan(layers={0: [1, 2, 3, 4, 5, 6]}, extra={"method": "eep", "seed": 3, "wall_time_s": 1.5,
                                                        "forward_passes": 9, "calibration": {"task": "qa"}})
    row = results.plan_row(fake_result(agreement={"top1_agreement": 0.9}), plan, 8, 2)
    assert (row["method"], row["keep"], row["ratio"], row["top_k"], row["seed"]) == ("eep", 6, 0.25, 2, 3)
    assert (row["calibration_task"], row["search_seconds"], row["agreement_top1_agreement"]) == ("qa", 1.5, 0.9)
    assert results.plan_row(fake_result(), plan, 8, 2, ratio=0.3, seed=None)["ratio"] == 0.3
    assert list(full)[:8] == list(row)[:8]  # one column order for every row


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_round_trip_and_foreign_files_are_refused(tmp_path, suffix):
    table = pd.DataFrame([results.plan_row(fake_result(), None, 8, 2)])
    out = results.save_table(table, tmp_path / f"sweep{suffix}")
    assert results.load_table(out)["metric_nll"].tolist() == [2.0]
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MoEScopeError, match="not a MoEScope sweep table"):
        results.load_table(tmp_path / "other.csv")
    with pytest.raises(MoEScopeError, match="must end in"):
        results.save_table(table, tmp_path / "sweep.txt")
    assert sweep.load_table is results.load_table and sweep.save_table is results.save_table  # old names work


def test_comparison_sets_each_metric_beside_the_full_models():
    spec = SimpleNamespace(name="lm", metric="lm_loss")
    full, pruned = fake_result(tokens_per_s=100.0), fake_result(metrics={"nll": 2.5, "perplexity": 12.2},
                                                                tokens_per_s=50.0, total_params=6.0,
                                                                total_params_full=8.0)
    comparison = results.Comparison.of([(spec, full, pruned)], seconds=1.0)
    head = comparison.headlines()
    assert head["metric"].tolist() == ["nll"] and head["better"].tolist() == ["lower"]
    assert head["delta"].iloc[0] == pytest.approx(0.5)
    assert comparison.examples("lm") == 3 and comparison.pruned("lm", "perplexity") == 12.2
    assert comparison.change("total_params") == pytest.approx(-0.25)
    assert comparison.cost["tokens_per_s"] == 50.0 and comparison.cost["tokens_per_s_full"] == 100.0
    assert comparison.agreement.empty


def test_tradeoff_points_start_at_the_full_model():
    rows = [results.plan_row(fake_result(metrics={"nll": 2.0}), None, 8, 2)]
    for keep, nll in [(6, 2.2), (4, 3.0)]:
        plan = Plan(layers={0: list(range(keep))}, extra={"method": "frequency"})
        rows.append(results.plan_row(fake_result(metrics={"nll": nll}), plan, 8, 2))
    points = results.tradeoff_points([pd.DataFrame(rows)], "t", "nll", split="test", examples=3)
    assert points["removed"].tolist() == [0.0, 0.25, 0.5] and points["value"].tolist() == [2.0, 2.2, 3.0]
    assert results.tradeoff_points([pd.DataFrame()], "t", "nll").empty


def test_both_sweep_paths_write_the_same_rows(tmp_path):
    mm = MoEModel(build("mixtral"), tokenizer=char_tokenizer(), source="tiny")
    task = str(write_lm_task(tmp_path / "lm", ["the cat sat", "hello world", "abc abc"],
                             splits=("calibration", "test")))
    table = sweep.run_sweep(mm, ["frequency"], [0.5], [task])
    bench = Workbench(mm)
    plan = make_method("frequency").plan(mm, Calibration.of(task), Target(ratio=0.5))
    bench.compare(plan, [task])
    mine = bench.sweep_table()
    assert list(mine.columns) == list(table.columns)
    keys = ["method", "ratio", "keep", "top_k", "calibration_task", "eval_task", "metric_nll", "plan_digest"]
    assert mine[keys].to_dict("records") == table[keys].to_dict("records")
