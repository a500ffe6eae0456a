"""The Prune page's "Standard benchmarks (lm-eval)" panel: bundled or named lm-eval tasks for the current plan
beside the full model, run in the background with progress and Stop, results cached by digest
(:class:`core.evaluation.lm_eval_bridge.LmEvalJob`). This view only lays out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.errors import MoEScopeError

BUNDLED = Path(__file__).resolve().parents[2] / "sample_data" / "lm_eval"
INSTALL = "lm-eval is not installed: `pip install 'moescope[lm-eval]'` to run standard benchmarks here."


def _runner(mm):
    from core.evaluation.lm_eval_bridge import LmEvalRunner

    key = f"lm_eval_runner:{mm.weights_digest()}"
    if key not in st.session_state:
        st.session_state[key] = LmEvalRunner(mm, include=[BUNDLED], batch_size="auto")
    return st.session_state[key]


def render_lm_eval_panel(mm, plan) -> None:
    """An expander that scores lm-eval tasks for ``plan`` and for the full model of ``mm``."""
    with st.expander("Standard benchmarks (lm-eval)"):
        try:
            from core.evaluation.lm_eval_bridge import LmEvalJob, comparison_rows, require_lm_eval

            require_lm_eval()
        except MoEScopeError:
            st.info(INSTALL)
            return
        bundled = sorted(p.stem for p in BUNDLED.glob("*.yaml"))
        default = [t for t in bundled if t.endswith("_choice")][:1]
        chosen = st.multiselect("Bundled tasks", bundled, default=default, key="lm_eval_tasks")
        other = st.text_input("Other lm-eval task names (comma-separated)", key="lm_eval_other")
        limit = st.number_input("Examples per task (0 = all)", min_value=0, value=24, step=8, key="lm_eval_limit")
        tasks = chosen + [t.strip() for t in other.split(",") if t.strip()]
        st.caption("Runs on the plan's masked model and on the full model; Stop takes effect at the next batch.")
        job = st.session_state.get("lm_eval_job")
        if st.button("Run lm-eval", key="lm_eval_run", disabled=not tasks or (job is not None and job.running)):
            try:
                runner = _runner(mm)
                runner.check_tasks(tasks)
            except MoEScopeError as exc:
                st.error(str(exc))
                return
            job = st.session_state["lm_eval_job"] = LmEvalJob(runner, tasks, plan, int(limit) or None).start()
            job.thread.join(timeout=0.5)  # cached results come back at once
        if job is not None and job.running:
            _live(job)
        elif job is not None:
            _results(job, comparison_rows)


@st.fragment(run_every=1.0)
def _live(job) -> None:
    """Progress and Stop, refreshed each second while the job runs (and only then)."""
    if not job.running:
        st.rerun()  # the whole page: the results replace this view and the refreshing stops
    st.progress(0.0, text=f"lm-eval: {job.stage}, {job.batches} batches")
    if st.button("Stop", key="lm_eval_stop"):
        job.stop()


def _results(job, comparison_rows) -> None:
    if job.error:
        (st.warning if job.stage == "stopped" else st.error)(job.error)
    rows = comparison_rows(job.pruned, job.full)
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True)
