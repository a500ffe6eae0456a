"""Export: download the plan or a shareable HTML report, or write the pruned (and merged) checkpoint that plain
transformers loads."""


import pandas as pd
import streamlit as st

from core.export import directory_bytes, export_pruned
from core.plan import Plan, validate_plan
from core.results import experts_kept, plan_name
from dashboard import state



def report_section(mm, plan: Plan | None) -> None:
    """Build the HTML report of the active profile, this session's plan and every setting evaluated so far
    (``moescope report`` makes the same file), then offer it for download."""
    st.subheader("Report for the room")
    st.caption("One self-contained HTML file (Plotly inlined, opens offline): model card, usage and coverage per "
               "task, task divergence, trade-offs of every evaluated setting, the plan against the full model.")
    if st.button("Build report (HTML)"):
        profile = state.active_profile(mm, auto=False)
        if profile is not None:
            from core.report import build_report_data
            from dashboard.report import report_html

            tables = [t for t in [state.workbench().sweep_table(), *st.session_state.get("sweep_tables", [])]
                      if not t.empty]
            with state.shown_errors("Could not build the report"), st.spinner("Building the report…"):
                data = build_report_data(profile.path, plans=[plan] if plan is not None else [],
                                         table=pd.concat(tables, ignore_index=True) if tables else None)
                st.session_state["report_html"] = report_html(data)
    if "report_html" in st.session_state:
        st.download_button("Download report (HTML)", st.session_state["report_html"],
                           file_name="moescope-report.html", mime="text/html")


st.title("Export")
mm = state.current_model()
if mm is None:
    st.stop()

upload = st.file_uploader("Use a saved plan instead (plan JSON)", type=["json"])
if upload is not None and upload.file_id != st.session_state.get("plan_upload"):
    try:
        plan = Plan.loads(upload.getvalue(), name=upload.name)
        validate_plan(plan, mm.routing_spec())
    except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
        state.show_error(f"Could not use {upload.name}", exc)
    else:
        state.remember_plan(mm, plan)
        st.session_state["plan_upload"] = upload.file_id

plan = state.current_plan(mm)
if st.session_state.pop("plan_restored", False):
    st.info("Restored the latest plan made on this model (this page was reloaded).")
if plan is None:
    st.info("No plan yet: choose one on the **Prune** page, or upload a plan JSON above.")
    st.divider()
    report_section(mm, None)
    st.stop()

method = plan.extra.get("method", "custom")
kept = {layer: len(experts) for layer, experts in plan.layers.items()}
st.subheader(plan_name(plan, mm.n_experts, mm.top_k))
with st.expander("Details"):
    st.markdown(state.plain(f"Plan {plan.digest()} (method {method}); experts kept per layer: "
                            + "; ".join(f"layer {l}: {', '.join(map(str, e))}" for l, e in plan.layers.items())))
st.markdown(f"Experts kept per MoE layer: **{', '.join(f'{l}: {c}' for l, c in kept.items()) or f'all {mm.n_experts}'}**"
            f" of {mm.n_experts} · top-k **{plan.top_k or mm.top_k}**"
            f"{' · merged experts' if plan.merge else ''}{' · dynamic skipping' if plan.dynamic_skip else ''}")
st.download_button("Download plan JSON", plan.to_json(), file_name=f"plan-{method}-{plan.digest()[:8]}.json",
                   mime="application/json", type="primary")

st.divider()
report_section(mm, plan)

st.divider()
st.subheader("Write the pruned checkpoint")
default = state.home() / "exports" / f"{method}-keep{experts_kept(plan, mm.n_experts)}-{plan.digest()[:8]}"
out = st.text_input("Output directory (a new directory; the source model is never touched)", value=str(default))
REPLACE = "Replace an earlier export at this path"
overwrite = st.checkbox(REPLACE, key="export_overwrite",
                        help="Only a directory MoEScope exported (it holds moescope-plan.json and nothing else) is "
                             "replaced; any other folder is refused.")
if st.button("Export checkpoint"):
    path, failure = None, None
    with st.status("Exporting…", expanded=True) as status:
        try:
            path = export_pruned(mm, plan, out, overwrite=overwrite, progress=st.write)
        except Exception as exc:  # noqa: BLE001 - a full disk or a refused path: one sentence, nothing written
            status.update(label="Export failed", state="error", expanded=False)
            failure = exc
        else:
            status.update(label="Exported", state="complete", expanded=False)
    if failure is not None:  # outside the status box, so it is shown expanded
        state.show_error("Export failed", failure, controls={"--overwrite": REPLACE})
    if path is not None:
        st.success(f"Wrote {path} ({directory_bytes(path) / 2**20:.1f} MiB).")
        st.code(f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{path}")',
                language="python")
