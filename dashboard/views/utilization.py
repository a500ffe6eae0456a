"""Utilization: expert share per layer × expert for a task, the difference between two tasks, entropy and
imbalance per layer, co-activation; click a square to see what that expert reads."""

import html

import streamlit as st

from core import aggregate, coverage
from dashboard import charts, state

st.title("Expert utilization")
mm, profile = state.model_and_profile()
usage = state.aggregated(profile, aggregate.expert_usage)
tasks = sorted(usage["task"].unique())
layers = profile.meta.layers
VALUES = {"share": ("Share of top-k slots", ".1%"), "weight_share": ("Share of gate weight", ".1%"),
          "count": ("Token count", ",.0f")}
st.session_state.setdefault("focus_layer", layers[0])
st.session_state.setdefault("focus_expert", 0)


def select_cell() -> None:
    """A click on a square picks that layer and expert for the panels below."""
    cells = [p for p in st.session_state["usage_grid"].selection.points if p.get("curve_number") == 0]
    if cells:  # curve 0 is the grid; later curves are overlays (dimmed experts, the outline of the current choice)
        point = cells[0]
        data = point.get("customdata")
        if isinstance(data, dict):  # a typed array arrives as {"0": layer, "1": expert, "2": value}
            data = [data[k] for k in sorted(data, key=int)]
        if data:  # (layer, expert, value): right in every column order (expert ids or ranks) and zoom
            st.session_state["focus_layer"], st.session_state["focus_expert"] = int(data[0]), int(data[1])
        else:  # rows are the shown MoE layers in order, columns expert ids
            st.session_state["focus_layer"] = shown_layers[int(point["y"])]
            st.session_state["focus_expert"] = int(point["x"])


c1, c2, c3 = st.columns([2, 2, 3])
view = c1.radio("View", ["One task", "One task, experts ranked", "Difference between two tasks"], key="util_view",
                persist_state="session", help="Ranked: each layer's experts sorted by usage, most used on the left "
                                              "(expert ids mean nothing across layers). Hover or click for the id.")
task = c2.selectbox("Task", tasks, key="util_task", persist_state="session")
other = c2.selectbox("minus task", [t for t in tasks if t != task] or tasks, key="util_other",
                     disabled=view != "Difference between two tasks")
if view != "Difference between two tasks":
    value = c3.radio("Value", list(VALUES), format_func=lambda v: VALUES[v][0], horizontal=True, key="util_value",
                     persist_state="session")
else:  # token counts of tasks of different sizes do not compare: a difference is between shares
    value = c3.radio("Value", ["share", "weight_share"], format_func=lambda v: VALUES[v][0], horizontal=True,
                     key="util_diff_value", persist_state="session",
                     help="Token counts are not offered here: tasks of different sizes compare by shares.")

n_experts = profile.meta.n_experts
with st.expander("Zoom into a band of layers and experts", expanded=False):
    z1, z2 = st.columns(2)
    band_layers = z1.select_slider("Layers", layers, value=(layers[0], layers[-1]), key="util_zoom_layers")
    band_experts = z2.slider("Experts" if view != "One task, experts ranked" else "Ranks", 0, n_experts - 1,
                             (0, n_experts - 1), key="util_zoom_experts")
shown_layers = [layer for layer in layers if band_layers[0] <= layer <= band_layers[1]]

focus = (st.session_state["focus_layer"], st.session_state["focus_expert"])
if view == "One task":
    label, fmt = VALUES[value]
    cells = coverage.band(aggregate.task_usage(usage, task, value), band_layers, band_experts)
    fig = charts.expert_grid(cells, "v", f"{label} · {task}", label, selected=focus, value_format=fmt)
elif view == "One task, experts ranked":
    label, fmt = VALUES[value]
    ranked = coverage.ranked_usage(usage, task, "weight_share" if value == "weight_share" else "share")
    if value == "count":  # counts rank as shares do; show the counts
        ranked = ranked.merge(usage[usage["task"] == task][["layer", "expert", "count"]], on=["layer", "expert"])
        ranked["v"] = ranked["count"]
    ranked = ranked[ranked["layer"].between(*band_layers) & ranked["rank"].between(*band_experts)]
    fig = charts.expert_grid(ranked, "v", f"{label} · {task}, experts ranked within each layer", label,
                             selected=focus, value_format=fmt, x="rank",
                             x_title="rank within the layer (0 = most used)")
else:
    cells = coverage.band(aggregate.usage_difference_points(usage, task, other, value), band_layers, band_experts)
    jsd = aggregate.divergence_between(state.aggregated(profile, aggregate.task_divergence), task, other)
    notes = {int(r.layer): f"JSD {r.jsd_bits:.3f} bits" for r in jsd.itertuples()}
    fig = charts.expert_grid(cells, "v", f"{VALUES[value][0]}: {task} minus {other}",
                             "difference (percentage points)", diverging=True, selected=focus, value_format="+.1f",
                             row_notes=notes)
st.plotly_chart(fig, key="usage_grid", on_select=select_cell, selection_mode="points", width="content",
                config=charts.download_config("expert-usage"))
st.caption("Click a square to inspect that expert below."
           + ("" if view == "Difference between two tasks" else " Dead experts (no tokens) show as the darkest squares."))

if view == "Difference between two tasks":
    st.caption("Beside each layer: the Jensen–Shannon divergence between the two tasks' routing at that layer "
               "(0 = the same experts in the same proportions, 1 bit = no expert in common).")
    with st.expander("Divergence per layer as a table"):
        st.dataframe(jsd.rename(columns={"jsd_bits": "Jensen–Shannon divergence (bits)"}), hide_index=True)

st.subheader("Selected expert")
s1, s2, s3 = st.columns([1, 1, 2])
layer = s1.selectbox("Layer", layers, key="focus_layer", persist_state="session")
expert = s2.selectbox("Expert", list(range(profile.meta.n_experts)), key="focus_expert", persist_state="session")
scope = s3.radio("Tokens from", ["this task", "all tasks"], horizontal=True, key="focus_scope", persist_state="session")
scope_task = task if scope == "this task" else None
top = state.aggregated(profile, aggregate.expert_tokens, layer, expert, scope_task)
if top.empty:
    st.info(f"No token was routed to expert {expert} at layer {layer} here: a candidate for pruning.")
else:
    top = top.assign(token=[repr(mm.token_texts([t])[0]) for t in top["token_id"]])  # tokens out of context
    t1, t2 = st.columns([2, 3])
    t1.markdown(f"**Most frequent tokens** (layer {layer}, expert {expert})")
    t1.dataframe(top[["token", "count", "fraction_of_token"]], hide_index=True,
                 column_config={"fraction_of_token": st.column_config.ProgressColumn(
                     "share of that token's occurrences", format="percent", min_value=0.0, max_value=1.0)})
    t2.markdown("**Where it is the first choice** (token in bold)")
    for snip in state.aggregated(profile, aggregate.expert_snippets, layer, expert, scope_task):
        before, token, after = ("".join(mm.token_texts(ids)) for ids in (snip["before"], [snip["token"]], snip["after"]))
        t2.html(f"<div style='font-family:monospace;margin:4px 0;white-space:pre-wrap'>"
                f"<span style='color:#888'>{html.escape(snip['task'])} #{snip['example']}:</span> "
                f"…{html.escape(before)}<b style='background:#ffe08a'>{html.escape(token)}</b>"
                f"{html.escape(after)}…</div>")

st.subheader("Coverage: how much routing the top experts carry")
curves = state.aggregated(profile, coverage.coverage_curves, task)
st.plotly_chart(charts.coverage_lines(curves, f"Share of {task}'s routing carried by each layer's top n experts",
                                      highlight=[st.session_state["focus_layer"]]),
                config=charts.download_config("coverage"))
target = st.select_slider("Coverage target", [0.5, 0.8, 0.9, 0.95, 0.99], value=0.9, key="cov_target",
                          format_func=lambda t: f"{t:.0%}")
needed = coverage.experts_for_coverage(curves, target)
st.caption(f"A layer whose curve rises steeply is concentrated on few experts and prunes well; a layer near the "
           f"dotted diagonal uses all its experts evenly. The selected layer is red. Experts needed for "
           f"{target:.0%} of the routing, per layer: "
           + ", ".join(f"{int(r.layer)}: {int(r.experts)}" for r in needed.itertuples()) + f" (of {n_experts}).")

st.subheader("Per layer")
stats = state.aggregated(profile, aggregate.layer_stats)
l1, l2 = st.columns(2)
l1.plotly_chart(charts.layer_lines(stats, "entropy_norm", "Routing entropy (1 = uniform)", "entropy / log2 E"),
                config=charts.download_config("routing-entropy"))
l2.plotly_chart(charts.layer_lines(stats, "imbalance", "Load imbalance (max / mean tokens)", "max / mean"),
                config=charts.download_config("load-imbalance"))

st.subheader("Co-activation")
co_layer = st.selectbox("Layer", layers, key="co_layer", persist_state="session")
st.plotly_chart(charts.coactivation_matrix(state.aggregated(profile, aggregate.coactivation, co_layer, task), co_layer),
                width="content", config=charts.download_config(f"coactivation-layer-{co_layer}"))
