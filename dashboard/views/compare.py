"""Compare profiles: two routing profiles of models of one shape side by side (a base model and its fine-tune,
or the full model and the same model recorded under a pruning plan): each expert's share of routing in B minus
A, the Jensen–Shannon divergence per layer, and, for a plan profile against the full model on the same texts,
where the dropped experts' tokens went. Every number comes from ``core.profile_compare``."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import profile_compare
from core.errors import MoEScopeError
from core.plan import Plan
from core.profiling import profile_texts
from core.routing_profile import Profile
from core.tasks import list_sample_tasks
from dashboard import charts, compare_charts, state

ALL_TASKS = "All tasks (pooled)"

st.title("Compare profiles")
st.caption("Profile A is the reference, B the one compared with it: B minus A. For a pruned model, record B under "
           "the plan on the same texts as A (the button at the bottom does it for the sample tasks).")


@st.cache_data(show_spinner="Comparing the profiles…", max_entries=64)
def _compared(name: str, _function, path_a: str, mtime_a: float, path_b: str, mtime_b: float, *args):
    return _function(Profile(path_a), Profile(path_b), *args)  # cached by ``name``: Streamlit does not hash functions


def compared(function, a: Profile, b: Profile, *args):
    """``function(a, b, *args)`` (a ``core.profile_compare`` function), cached by both files and their mtimes."""
    return _compared(f"{function.__module__}.{function.__qualname__}", function, str(a.path),
                     a.path.stat().st_mtime, str(b.path), b.path.stat().st_mtime, *args)


def label(profile: Profile) -> str:
    meta = profile.meta
    plan = f" · plan {meta.plan_digest[:8]}" if meta.plan_digest else ""
    return f"{profile.path.name} · {len(meta.tasks)} task(s), {meta.tokens:,} tokens{plan}"


def plan_of(digest: str, mm) -> Plan | None:
    """The plan a profile was recorded under: this session's plan, or one the dashboard saved, by digest."""
    plan = state.current_plan(mm) if mm is not None else None
    if plan is not None and plan.digest() == digest:
        return plan
    for path in sorted((state.home() / "plans").glob(f"*/{digest}.json")):
        try:
            return Plan.load(path)
        except MoEScopeError:
            continue
    return None


def record_under_plan(mm, plan: Plan) -> Path:
    """The sample tasks' texts of the dashboard's default profile, recorded again under ``plan``."""
    name = f"{mm.weights_digest()[:16]}-sample-tasks-plan-{plan.digest()}.parquet"
    out = state.default_profile_path(mm).with_name(name)
    if out.exists():
        return out
    texts = {state.task_label(t): state.texts_of(t, state.AUTO_PROFILE["split"], state.AUTO_PROFILE["limit"])
             for t in list_sample_tasks()}
    with state.Progress() as bar:
        return profile_texts(mm, texts, out, batch_size=16, plan=plan,
                             progress=lambda done, total, rate: bar.steps("Recording under the plan", done, total))


if pending := st.session_state.pop("cmp_pending", None):  # a recording chose A and B (before their widgets exist)
    st.session_state["cmp_a"], st.session_state["cmp_b"] = pending
mm = state.current_model()
if mm is not None:
    state.active_profile(mm)  # the default profile of the sample tasks exists from here on
paths = sorted((state.home() / "profiles").glob("*.parquet"), key=lambda p: p.stat().st_mtime, reverse=True)
extra = st.session_state.setdefault("cmp_extra_paths", [])
active = st.session_state.get("profile_path")
candidates = list(dict.fromkeys(str(Path(p).resolve()) for p in [*([active] if active else []), *paths, *extra]))
profiles: dict[str, Profile] = {}
other_shapes = 0
added = {str(Path(p).resolve()) for p in extra}
for path in candidates:
    try:
        profile = Profile(path)
    except MoEScopeError:
        continue  # a damaged or half-written file in the folder: not offered
    # the folder may hold profiles of other models: offer those of the loaded model's shape (its fine-tunes and
    # pruning plans); a profile added by path is always offered, and a mismatch is then said in one sentence
    if mm is not None and path not in added and (profile.meta.n_experts != mm.n_experts
                                                  or list(profile.meta.layers) != list(mm.layer_indices)):
        other_shapes += 1
        continue
    profiles[path] = profile
if other_shapes:
    st.caption(f"{other_shapes} profile(s) in the dashboard's folder are of models of another shape and are not "
               f"offered; add one by path to compare it anyway.")

with st.expander("Add a profile by path"):
    with st.form("cmp_add", border=False):
        typed = st.text_input("Path to a profile (.parquet with its .json sidecar beside it)", key="cmp_path")
        if st.form_submit_button("Add") and typed:
            try:
                Profile(typed)
                extra.append(typed)
                st.rerun()
            except Exception as exc:  # noqa: BLE001 - shown as one sentence
                state.show_error("Profile", exc)

plan_now = state.current_plan(mm) if mm is not None else None
if len(profiles) < 2:
    st.info("Comparing needs two profiles: record another on the **Profile** page, add one by path, or record the "
            "sample tasks under the current plan below.")
else:
    names = list(profiles)
    for key in ("cmp_a", "cmp_b"):  # a profile chosen earlier may have been removed since
        if st.session_state.get(key) not in names:
            st.session_state.pop(key, None)
    plain_first = [p for p in names if not profiles[p].meta.plan_digest] or names
    st.session_state.setdefault("cmp_a", plain_first[0])
    planned = [p for p in names if profiles[p].meta.plan_digest and p != st.session_state["cmp_a"]]
    st.session_state.setdefault("cmp_b", (planned or [p for p in names if p != st.session_state["cmp_a"]])[0])
    c1, c2, c3 = st.columns([3, 3, 2])
    path_a = c1.selectbox("Profile A (reference)", names, key="cmp_a", format_func=lambda p: label(profiles[p]))
    path_b = c2.selectbox("Profile B (compared)", names, key="cmp_b", format_func=lambda p: label(profiles[p]))
    a, b = profiles[path_a], profiles[path_b]
    common = [t for t in a.meta.tasks if t in b.meta.tasks]
    if st.session_state.get("cmp_task") not in [ALL_TASKS, *common]:  # a task of the profiles chosen before
        st.session_state.pop("cmp_task", None)
    choice = c3.selectbox("Task", [ALL_TASKS, *common], key="cmp_task",
                          help="One task the two profiles share, or each profile's tasks pooled.")
    task = None if choice == ALL_TASKS else choice
    if path_a == path_b:
        st.info("A and B are the same profile: choose two different ones.")
    with state.shown_errors("Compare"):
        cells = compared(profile_compare.compare_usage, a, b, task)
        js = profile_compare.divergence_of(cells)
        if a.meta.weights_digest != b.meta.weights_digest:
            st.caption(f"A and B come from different weights ({a.meta.model} and {b.meta.model}): expert ids "
                       f"correspond only if B is a fine-tune of A.")
        m1, m2, m3 = st.columns(3)
        top = js.loc[js["jsd_bits"].idxmax()]
        m1.metric("Mean JS divergence over layers", f"{js['jsd_bits'].mean():.3f} bits")
        m2.metric("Most changed layer", f"{int(top['layer'])} ({top['jsd_bits']:.3f} bits)")
        m3.metric("Routing moved, mean over layers", f"{js['moved_share'].mean():.1%}",
                  help="Half the summed absolute share differences: the share of a layer's top-k slots that B "
                       "gives to other experts than A.")
        notes = {int(r.layer): f"JS {r.jsd_bits:.3f}" for r in js.itertuples()}
        st.plotly_chart(charts.expert_grid(cells, "diff_pp", "Share of top-k slots: B minus A (percentage points)",
                                           "B − A (pp)", diverging=True, value_format="+.1f", row_notes=notes),
                        key="cmp_grid", width="content", config=charts.download_config("profile-difference"))
        st.caption("Red: B routes more of the layer to that expert than A; blue: less. Units are percentage points "
                   "of the layer's top-k slots. Beside each layer: its Jensen–Shannon divergence (bits).")
        d1, d2 = st.columns([3, 2])
        d1.plotly_chart(compare_charts.divergence_bars(js, "Jensen–Shannon divergence per layer"),
                        config=charts.download_config("js-divergence"))
        d2.dataframe(js.rename(columns={"layer": "Layer", "jsd_bits": "JS divergence (bits)",
                                        "moved_share": "Routing moved"}),
                     hide_index=True, column_config={"Routing moved": st.column_config.NumberColumn(format="percent"),
                                                     "JS divergence (bits)": st.column_config.NumberColumn(
                                                         format="%.4f")})

    if b.meta.plan_digest and not a.meta.plan_digest:
        st.subheader("Re-routing: where the dropped experts' tokens went")
        plan = plan_of(b.meta.plan_digest, mm)
        dropped = (tuple(sorted(profile_compare.dropped_experts(plan, a.meta.layers, a.meta.n_experts)))
                   if plan is not None else None)
        if plan is None:
            st.caption(f"Plan {b.meta.plan_digest[:12]} is not among the dashboard's saved plans: the flows below "
                       f"start at every expert A chose and B did not, dropped or not.")
        try:
            flows = compared(profile_compare.reroute_flows, a, b, dropped, task)
        except profile_compare.ProfileMismatch as exc:
            st.warning(state.plain(str(exc)))
        else:
            totals = profile_compare.flow_totals(flows, a.meta.layers)
            busiest = int(totals.loc[totals["tokens"].idxmax(), "layer"])
            layer = st.selectbox("Layer", a.meta.layers, index=a.meta.layers.index(busiest), key="cmp_layer")
            shown = profile_compare.top_flows(flows, layer, limit=20)
            if shown.empty:
                st.info(f"At layer {layer} no token of A went to an expert the plan dropped.")
            else:
                f1, f2 = st.columns([3, 2])
                f1.plotly_chart(compare_charts.flow_sankey(shown, layer),
                                config=charts.download_config("reroute-flows"))
                f2.dataframe(shown[["from_expert", "to_expert", "tokens", "share_of_from"]].rename(columns={
                    "from_expert": "From (dropped)", "to_expert": "To", "tokens": "Token slots",
                    "share_of_from": "Share of From"}), hide_index=True,
                    column_config={"Share of From": st.column_config.ProgressColumn(
                        format="percent", min_value=0.0, max_value=1.0,
                        help="Of all the top-k slots that left this dropped expert at this layer.")})
                f2.caption(f"The {len(shown)} largest flows of layer {layer}. Each top-k slot A gave a dropped expert "
                           f"is paired, in rank order, with a new expert B chose for that token"
                           + (" (To −1: none, the plan lowered top-k)." if (shown["to_expert"] < 0).any() else "."))
            with st.expander("Re-routed token slots per layer"):
                st.dataframe(totals.rename(columns={"layer": "Layer", "tokens": "Token slots re-routed",
                                                    "unreplaced": "Without a replacement"}), hide_index=True)

st.subheader("Record the sample tasks under the current plan")
if mm is None:
    st.caption("Load a model on the Model page to record a profile.")
elif plan_now is None:
    st.caption("No plan yet: make one on the **Prune** page, then come back to record the pruned model's routing.")
elif not state.default_profile_path(mm).exists():
    st.caption("This model has no default profile of the sample tasks to compare with; record profiles on the "
               "**Profile** page (with `moescope profile --plan` for the pruned model) and add them here by path.")
else:
    st.caption(f"Records the texts of this model's default profile (the sample tasks) again with plan "
               f"{plan_now.digest()[:12]} applied, and compares it as B with the default profile as A.")
    if st.button("Record a profile under the current plan", key="cmp_record"):
        with state.shown_errors("Recording"):
            out = record_under_plan(mm, plan_now)
            default = state.default_profile_path(mm)
            st.session_state["cmp_pending"] = (str(default.resolve()), str(Path(out).resolve()))
            st.rerun()
