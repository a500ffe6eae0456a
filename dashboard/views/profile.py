"""Profile: record every routing decision on chosen tasks, or load a saved profile; download it."""

import time
from pathlib import Path

import streamlit as st

from core import aggregate
from core.errors import MoEScopeError
from core.routing_profile import Profile, sidecar_path
from dashboard import state

st.title("Routing profile")
mm = state.current_model()
if mm is None:
    st.stop()

record, load = st.tabs(["Record", "Load a saved profile"])
with record:
    tasks = st.multiselect("Tasks", state.task_choices(), default=state.task_choices(), format_func=state.task_label)
    c1, c2 = st.columns(2)
    split = c1.selectbox("Split", ["validation", "calibration", "test"],
                         help="Profile on data the pruning methods do not score on (validation by default).")
    limit = c2.number_input("Examples per task (0 = all)", min_value=0, value=100, step=50)
    if st.button("Record profile", type="primary", disabled=not tasks):
        out = state.home() / "profiles" / f"{mm.weights_digest()[:16]}-{time.strftime('%Y%m%d-%H%M%S')}.parquet"
        bar = st.progress(0.0, text="Starting…")
        with state.shown_errors("Profiling"):
            state.record_profile(mm, tasks, split, int(limit) or None, out,
                                 lambda done, total, rate: bar.progress(
                                     done / total, text=f"Profiling: {done:,}/{total:,} tokens · {rate:,.0f} tokens/s"))
            bar.empty()
            st.success(f"Recorded {out.name}.")

with load:
    path = st.text_input("Path to a profile (.parquet with its .json sidecar beside it)")
    uploads = st.file_uploader("…or upload both files", type=["parquet", "json"], accept_multiple_files=True)
    if st.button("Load profile"):
        shown_names: dict[str, str] = {}
        try:
            if uploads:
                parquet = [u for u in uploads if u.name.endswith(".parquet")]
                sidecar = [u for u in uploads if u.name.endswith(".json")]
                if len(parquet) != 1 or len(sidecar) != 1:
                    raise MoEScopeError("Upload exactly one .parquet profile and its .json sidecar.")
                folder = state.new_upload_folder()
                target = folder / Path(parquet[0].name).name  # the user's own file name, shown on the page
                target.write_bytes(parquet[0].getvalue())
                sidecar_path(target).write_bytes(sidecar[0].getvalue())
                shown_names = {str(target): f"the uploaded {parquet[0].name}",
                               str(sidecar_path(target)): f"the uploaded {sidecar[0].name}"}
                path = str(target)
            if not path:
                raise MoEScopeError("Give a path or upload a profile first.")
            profile = Profile(path.strip())
            profile.meta.require_model(mm.weights_digest(), mm.source)
        except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
            state.show_error("Could not load the profile", exc, uploads=shown_names)
            if uploads:
                state.drop_upload_folder(folder)
        else:
            if uploads:
                state.keep_upload_folder(folder)  # and remove this session's previous upload
            st.session_state["profile_path"] = str(profile.path)
            st.success(f"Loaded {profile.path.name}.")

st.divider()
profile = state.active_profile(mm)
if profile is not None:
    meta = profile.meta
    st.subheader("Active profile")
    cols = st.columns(3)
    cols[0].metric("Tasks", len(meta.tasks))
    cols[1].metric("Tokens", f"{meta.tokens:,}")
    cols[2].metric("Routing rows", f"{meta.rows:,}")
    st.markdown(state.plain(f"Recorded {meta.created[:16].replace('T', ' ')} on tasks: {', '.join(meta.tasks)}."))
    with st.expander("Details"):
        st.markdown(f"File {state.code(profile.path)} · model {state.code(meta.model)}")
    d1, d2 = st.columns(2)
    d1.download_button("Download profile (.parquet)", profile.path.read_bytes(), file_name=profile.path.name,
                       mime="application/octet-stream")
    d2.download_button("Download sidecar (.json)", sidecar_path(profile.path).read_bytes(),
                       file_name=sidecar_path(profile.path).name, mime="application/json")
    st.dataframe(state.aggregated(profile, aggregate.examples_per_task), hide_index=True)
