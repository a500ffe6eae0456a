"""Model & data: which model is loaded (the bundled sample by default) and which tasks there are."""

import pandas as pd
import streamlit as st

from core.model import DEVICES, DTYPES
from core.tasks import get_task_spec
from dashboard import state

st.title("Model & data")
settings = state.model_settings()

with st.form("model_form"):
    source = st.text_input("Model: a local directory or a Hugging Face hub id", value=settings["source"],
                           help="The bundled sample model is sample_data/model. Hub ids need network access.")
    c1, c2, c3 = st.columns(3)
    dtype = c1.selectbox("dtype", list(DTYPES), index=list(DTYPES).index(settings["dtype"]))
    device = c2.selectbox("device", list(DEVICES), index=list(DEVICES).index(settings["device"]))
    trust = c3.checkbox("trust remote code", value=settings["trust_remote_code"],
                        help="Runs Python shipped with the checkpoint. Only for models you trust.")
    load_clicked = st.form_submit_button("Load model", type="primary")

if load_clicked:
    wanted = {"source": source.strip(), "dtype": dtype, "device": device, "trust_remote_code": trust}
    try:
        state.load(wanted)
    except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
        state.show_error(f"Could not load {wanted['source']} (the previous model stays loaded)", exc)
    else:
        st.session_state["model_settings"] = wanted
        st.session_state.pop("profile_path", None)  # a profile belongs to the model that recorded it
        st.session_state.pop("plan", None)
        st.rerun()

mm = state.current_model()
if mm is not None:
    info = mm.info()
    st.subheader(f"{info.family} · {info.model_type}")
    st.caption(info.source)
    cols = st.columns(4)
    cols[0].metric("Layers", info.n_layers)
    cols[1].metric("MoE layers", len(info.moe_layers))
    cols[2].metric("Experts per layer", info.n_experts)
    cols[3].metric("Top-k", info.top_k)
    cols = st.columns(4)
    cols[0].metric("Total parameters", f"{info.total_params / 1e6:,.2f} M")
    cols[1].metric("Active per token", f"{info.active_params / 1e6:,.2f} M")
    cols[2].metric("Weights", f"{info.weight_bytes / 2**20:,.1f} MiB")
    cols[3].metric("dtype · device", f"{info.dtype} · {info.device}")
    st.markdown(f"**MoE layers:** {', '.join(map(str, info.moe_layers))}  \n"
                f"**Shared experts:** {', '.join(info.shared_experts) or 'none'}  \n"
                f"**Routing groups:** {info.n_groups}")

st.divider()
st.subheader("Tasks")
st.caption("Profiling, calibration and evaluation use these. The sample tasks ship in sample_data/tasks; add "
           "your own with a task spec (a task.json naming data files or a hub dataset).")
rows = []
for task in state.task_choices():
    with state.shown_errors(f"Task {task}"):
        spec = get_task_spec(task)
        rows.append({"task": spec.name, "metric": spec.metric, "description": spec.description,
                     "splits": ", ".join(spec.splits)})
st.table(pd.DataFrame(rows).set_index("task") if rows else pd.DataFrame())  # descriptions wrap, never cut off

with st.form("task_form", clear_on_submit=True):
    path = st.text_input("Add a task spec (path to task.json or its folder)")
    if st.form_submit_button("Add task") and path.strip():
        try:
            spec = get_task_spec(path.strip())
        except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
            state.show_error(f"Could not add {path}", exc)
        else:
            extra = st.session_state.setdefault("extra_tasks", [])
            if path.strip() not in extra:
                extra.append(path.strip())
            st.success(f"Added task {spec.name}.")
            st.rerun()
