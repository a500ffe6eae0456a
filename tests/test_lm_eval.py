"""lm-evaluation-harness through MoEScope, offline: the bundled YAML tasks score the sample model, the masked
model in-process equals the lm_eval CLI on the exported checkpoint, and bad setups fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from core.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_data" / "model"
INCLUDE = ROOT / "sample_data" / "lm_eval"
LIMIT = 24
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (make test installs it)")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def sample_model():
    from core.model import load_model

    return load_model(str(MODEL))


@pytest.fixture(scope="module")
def runner(sample_model):
    from core.evaluation.lm_eval_bridge import LmEvalRunner

    return LmEvalRunner(sample_model, include=[INCLUDE], batch_size=8)


def _plan(mm) -> Plan:
    """Half the experts of every layer dropped (a different half per layer, so no layer is left whole)."""
    n = mm.n_experts
    return Plan(layers={i: sorted({(i + j) % n for j in range(n // 2)}) for i in mm.layer_indices})


def test_bundled_tasks_score_the_sample_model_as_moescope_does(runner, sample_model):
    from core.evaluation import Evaluator

    results = {r.task: r for t in ("moescope_qa_choice", "moescope_arithmetic")
               for r in runner.evaluate(t, limit=LIMIT)}
    choice, arithmetic = results["lm_eval:moescope_qa_choice"], results["lm_eval:moescope_arithmetic"]
    assert choice.n_examples == arithmetic.n_examples == LIMIT
    assert choice.metric_kind == "lm_eval" and choice.plan_digest is None
    assert set(choice.metrics) >= {"acc", "acc_stderr", "acc_norm"}
    assert 0 < arithmetic.metrics["exact_match"] <= 1  # the sample model learnt some arithmetic
    # Same prompts, options and log-likelihood scoring as MoEScope's own qa_choice task: the same accuracy.
    own = Evaluator(sample_model, batch_size=8).evaluate("qa_choice", limit=LIMIT)
    assert choice.metrics["acc"] == pytest.approx(own.metrics["accuracy"] / 100, abs=1 / LIMIT)
    # and results are cached by digest: the second call returns the same objects without running lm-eval
    assert runner.evaluate("moescope_qa_choice", limit=LIMIT)[0] is choice


def test_results_go_into_sweep_rows(runner, sample_model):
    from core.results import plan_row

    plan = _plan(sample_model)
    [result] = runner.evaluate("lm_eval:moescope_qa_choice", plan=plan, limit=8)
    row = plan_row(result, plan, sample_model.n_experts, sample_model.top_k)
    assert row["eval_task"] == "lm_eval:moescope_qa_choice" and row["plan_digest"] == plan.digest()
    assert row["keep"] == sample_model.n_experts // 2 and "metric_acc" in row and "metric_acc_stderr" in row
    assert row["weights_digest"] == sample_model.weights_digest()  # the row names the weights it scored


@pytest.mark.slow
def test_masked_in_process_equals_cli_on_the_export(runner, sample_model, tmp_path):
    """Masking is the only thing between lm-eval and the model. Compared per document: the log-likelihood of
    each option within 1e-3 nats (the masked model computes the dropped experts' router logits and masks them,
    the export drops those rows: the same float32 sums in another order, about 1e-6 apart on this model), and
    the accuracy exactly unless such a difference flips a near-tie (none does here; then at most one doc)."""
    from core.export import export_pruned

    plan = _plan(sample_model)
    export = export_pruned(sample_model, plan, tmp_path / "pruned")
    [masked] = runner.evaluate("moescope_qa_choice", plan=plan, limit=LIMIT)
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export}",
                    "--include_path", ".", "--tasks", "moescope_qa_choice", "--limit", str(LIMIT),
                    "--batch_size", "8", "--output_path", str(out), "--log_samples"],
                   cwd=INCLUDE, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True, timeout=300)
    [results_file] = out.rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"]["moescope_qa_choice"]
    assert masked.metrics["acc"] == pytest.approx(cli["acc,none"], abs=1e-9)
    assert masked.metrics["acc_norm"] == pytest.approx(cli["acc_norm,none"], abs=1e-9)
    # per document, against MoEScope's own harness on the masked model (the same log-likelihoods)
    [samples_file] = out.rglob("samples_moescope_qa_choice_*.jsonl")
    docs = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda d: d["doc_id"])
    cli_ll = [float(r[0]) for d in docs for r in d["filtered_resps"]]
    gap = max(abs(a - b) for a, b in zip(_loglikelihoods(runner, None), cli_ll))
    assert gap > 0.05  # the unpruned model is told apart: the comparison can fail
    assert _loglikelihoods(runner, plan) == pytest.approx(cli_ll, abs=1e-3)


def _loglikelihoods(runner, plan) -> list[float]:
    """Every document's option log-likelihoods, in document order, from lm-eval in-process on the (masked) model."""
    from lm_eval import simple_evaluate

    from core.masking import masked

    with masked(runner.mm, plan):
        output = simple_evaluate(model=runner.lm, tasks=[runner._spec("moescope_qa_choice")],
                                 task_manager=runner.tasks, limit=LIMIT, log_samples=True)
    samples = sorted(output["samples"]["moescope_qa_choice"], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def _error_line(stderr: str) -> str:
    """The one error line (model-loading progress bars may precede it)."""
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def test_missing_dataset_is_one_line(tmp_path, capsys):
    (tmp_path / "gone.yaml").write_text(
        (INCLUDE / "moescope_qa_choice.yaml").read_text()
        .replace("task: moescope_qa_choice", "task: moescope_gone")
        .replace("../tasks/qa_choice/", str(tmp_path / "nowhere") + "/"))
    code = main(["evaluate", str(MODEL), "--lm-eval", "moescope_gone", "--lm-eval-include", str(tmp_path),
                 "--limit", "2"])
    err = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "moescope_gone" in err and "'json'" in err and "--lm-eval-include DIR" in err


def test_unknown_task_is_one_line(capsys):
    code = main(["evaluate", str(MODEL), "--lm-eval", "no_such_task_xyz", "--lm-eval-include", str(INCLUDE)])
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and "'no_such_task_xyz'" in err


def test_without_the_extra_one_line(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code = main(["evaluate", str(MODEL), "--lm-eval", "moescope_qa_choice", "--lm-eval-include", str(INCLUDE)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'moescope[lm-eval]'" in err


def test_cli_evaluate_prints_lm_eval_rows(capsys):
    code = main(["evaluate", str(MODEL), "--lm-eval", "moescope_arithmetic", "--lm-eval-include", str(INCLUDE),
                 "--limit", "4", "--batch-size", "4", "--json"])
    out = capsys.readouterr().out
    [row] = json.loads(out[out.index("["):])
    assert code == 0 and row["task"] == "lm_eval:moescope_arithmetic" and row["n_examples"] == 4
    assert "exact_match" in row["metrics"]


def test_sweep_scores_lm_eval_tasks_beside_its_own(sample_model):
    from core.sweep import run_sweep

    table = run_sweep(sample_model, ["random"], [0.5], ["qa_choice", "lm_eval:moescope_qa_choice"], limit=4,
                      calibration_limit=4, lm_eval_include=[INCLUDE], lm_eval_batch_size=4)
    lm_rows = table[table["eval_task"] == "lm_eval:moescope_qa_choice"]
    assert list(lm_rows["method"]) == ["full", "random"] and lm_rows["metric_acc"].between(0, 1).all()
    assert lm_rows["plan_digest"].isna().iloc[0] and isinstance(lm_rows["plan_digest"].iloc[1], str)
    assert (table["eval_task"] == "qa_choice").sum() == 2
