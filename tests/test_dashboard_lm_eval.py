"""The Prune page's lm-eval panel under AppTest on the sample model: a run shows the plan's and the full
model's values, a second run comes from the cache, Stop interrupts, and without the extra it says what to install."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (make test installs it)")

SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_data" / "model")


def _script():
    import os

    import streamlit as st

    from core.model import load_model
    from core.plan import Plan
    from dashboard.views.lm_eval_panel import render_lm_eval_panel

    if "mm" not in st.session_state:
        st.session_state.mm = load_model(os.environ["MOESCOPE_TEST_MODEL"])
    mm = st.session_state.mm
    plan = Plan(layers={i: sorted({(i + j) % mm.n_experts for j in range(mm.n_experts // 2)})
                        for i in mm.layer_indices})
    render_lm_eval_panel(mm, plan)


@pytest.fixture
def at(monkeypatch):
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("MOESCOPE_TEST_MODEL", SAMPLE)
    app = AppTest.from_function(_script, default_timeout=300)
    app.run()
    assert not app.exception
    app.multiselect(key="lm_eval_tasks").set_value(["moescope_qa_choice"])
    app.number_input(key="lm_eval_limit").set_value(8).run()
    return app


def _run_to_end(app: AppTest) -> AppTest:
    app.button(key="lm_eval_run").click().run()
    job = app.session_state["lm_eval_job"]
    job.thread.join(timeout=300)
    app.run()
    assert not app.exception
    return app


def test_run_shows_pruned_and_full_then_comes_from_the_cache(at, monkeypatch):
    from core.evaluation import lm_eval_bridge

    calls = []
    real = lm_eval_bridge.LmEvalRunner.evaluate

    def spy(self, name, plan=None, **kw):
        calls.append(plan is not None)
        return real(self, name, plan=plan, **kw)

    monkeypatch.setattr(lm_eval_bridge.LmEvalRunner, "evaluate", spy)
    import lm_eval

    evaluated = []
    real_simple = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: evaluated.append(1) or real_simple(*a, **k))
    _run_to_end(at)
    table = at.dataframe[0].value
    acc = table[(table.task == "lm_eval:moescope_qa_choice") & (table.metric == "acc")].iloc[0]
    assert 0 <= acc.pruned <= 1 and 0 <= acc.full <= 1
    assert acc.delta == pytest.approx(acc.pruned - acc.full)
    assert calls == [True, False] and len(evaluated) == 2  # the plan's model, then the full model
    start = time.perf_counter()
    _run_to_end(at)
    assert len(evaluated) == 2 and time.perf_counter() - start < 10  # no new lm-eval call: cached by digest
    assert at.dataframe[0].value.equals(table)


def test_stop_interrupts_at_the_next_batch(at):
    at.button(key="lm_eval_run").click()
    at.run()
    job = at.session_state["lm_eval_job"]
    job.stop()  # what the Stop button does
    job.thread.join(timeout=300)
    at.run()
    assert job.stage == "stopped" and "Stopped" in at.warning[0].value
    assert not job.pruned or not job.full  # it did not run both models to the end


def test_without_the_extra_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setenv("MOESCOPE_TEST_MODEL", SAMPLE)
    app = AppTest.from_function(_script, default_timeout=300).run()
    assert not app.exception
    assert "pip install 'moescope[lm-eval]'" in app.info[0].value
