"""Prune: choose a method, how many experts stay, top-k and tasks; the pruned model's scores update beside
the full model's as soon as a control moves. Searches (EEP, NAEE) run on request with progress."""

import streamlit as st

from core.errors import MoEScopeError
from core.methods import METHODS
from core.sweep import load_table
from core.workbench import SEARCH_METHODS, PlanRequest, headline_metric, tradeoff_points
from dashboard import charts, state

LABELS = {"frequency": "Frequency", "soft_activation": "Soft activation (gate-weight mass)",
          "reap": "REAP saliency", "random": "Random", "top_k": "Top-k reduction (keep all experts)",
          "naee": "NAEE (reconstruction search)", "dynamic_skip": "NAEE + dynamic skipping",
          "eep": "EEP (evolutionary search)"}
FAST_METHODS = ["frequency", "soft_activation", "reap", "random"]
LIMITS = [25, 50, 100, 200, 0]

st.title("Prune")
mm = state.current_model()
if mm is None:
    st.stop()
bench = state.workbench()
n, k = mm.n_experts, mm.top_k
tasks = state.task_choices()


def search_settings(method: str) -> tuple[tuple, int | None]:
    """(method parameters, calibration examples) for the methods that have settings; defaults suit the
    sample model."""
    if method == "random":
        return (("seed", st.number_input("seed", 0, 10_000, 0, key="random_seed")),), None
    if method not in SEARCH_METHODS:
        return (), None
    with st.expander("Search settings"):
        c = st.columns(4)
        limit = c[0].number_input("calibration examples", 1, 10_000, 64, key="search_limit")
        if method != "eep":
            return (), int(limit)
        return (("population", c[1].number_input("population", 2, 64, 6, key="eep_population")),
                ("offspring", c[1].number_input("offspring", 2, 64, 6, key="eep_offspring")),
                ("generations", c[2].number_input("pruning generations", 1, 100, 5, key="eep_generations")),
                ("merge_generations", c[2].number_input("merging generations (0 = prune only)", 0, 100, 0,
                                                        key="eep_merge_generations")),
                ("seed", c[3].number_input("seed", 0, 10_000, 0, key="eep_seed"))), int(limit)


@st.fragment
def bench_panel() -> None:
    c1, c2, c3 = st.columns([3, 3, 2])
    method = c1.selectbox("Method", list(METHODS), index=list(METHODS).index("frequency"), format_func=LABELS.get,
                          key="prune_method")
    keep = c2.select_slider("Experts kept per layer", options=list(range(k, n + 1)), value=max(k, n // 2),
                            format_func=lambda e: f"{e} of {n} ({1 - e / n:.0%} removed)", key="prune_keep",
                            disabled=method == "top_k")
    top_k = c3.selectbox("Top-k", [None, *range(1, k + 1)], format_func=lambda t: f"model's ({k})" if t is None else str(t),
                         key="prune_top_k")
    c4, c5, c6 = st.columns([2, 4, 2])
    calibration = c4.selectbox("Calibration task", tasks, index=tasks.index("qa") if "qa" in tasks else 0,
                               format_func=state.task_label, key="prune_calibration")
    evaluate = c5.multiselect("Evaluation tasks", tasks, default=[calibration], format_func=state.task_label,
                              key="prune_tasks")
    limit = c6.select_slider("Test examples per task", LIMITS, value=100, key="prune_limit",
                             format_func=lambda v: "all" if v == 0 else str(v))
    params, calibration_limit = search_settings(method)
    request = PlanRequest(method, calibration, keep=None if method == "top_k" else keep,
                          ratio=0.0 if method == "top_k" else None, top_k=top_k,
                          calibration_limit=calibration_limit, params=params)

    plan = None
    with state.shown_errors("Making the plan"):
        if method in SEARCH_METHODS and not bench.has_plan(request):
            st.info(f"{LABELS[method]} searches with forward passes on the {state.task_label(calibration)} "
                    f"calibration split; it can take a while on large models.")
            if st.button(f"Run {LABELS[method]}", type="primary", key="run_search"):
                st.button("Stop", key="stop_search", help="Stops after the current candidate; EEP resumes from "
                                                          "its saved population when run again.")
                bar = st.progress(0.0, text="Starting the search…")
                plan = bench.plan(request, progress=lambda what, f: bar.progress(min(max(f, 0.0), 1.0), text=what))
                bar.empty()
        else:
            with st.spinner("Calibrating (once per method and task)…"):
                plan = bench.plan(request)
    if plan is None:
        return
    st.session_state["plan"] = plan
    if not evaluate:
        st.warning("Choose at least one evaluation task.")
        return
    with state.shown_errors("Evaluation"), st.spinner("Evaluating…"):
        result = bench.compare(plan, evaluate, "test", limit or None)
        show_result(plan, result)
        show_tradeoff(plan, result, evaluate[0], limit or None, calibration, top_k)


def show_result(plan, result) -> None:
    table = result.table
    heads = table[table["headline"]]
    cols = st.columns(max(1, len(heads)) + 3)
    for col, row in zip(cols, heads.itertuples()):
        col.metric(f"{row.task} · {row.metric}", f"{row.pruned:.2f}", f"{row.delta:+.2f} vs full {row.full:.2f}",
                   delta_color="inverse" if row.better == "lower" else "normal")
    cost = result.cost
    rest = cols[len(heads):]
    rest[0].metric("Parameters", f"{cost['total_params'] / 1e6:.2f} M",
                   f"{cost['total_params'] / cost['total_params_full'] - 1:+.0%}", delta_color="inverse")
    active = cost["active_params"] / cost["active_params_full"] - 1
    rest[1].metric("Active per token", f"{cost['active_params'] / 1e6:.2f} M", f"{active:+.0%}" if active else None,
                   delta_color="inverse")
    rest[2].metric("Weights", f"{cost['weight_bytes'] / 2**20:.1f} MiB")
    st.caption(f"Evaluated in {result.seconds:.2f} s · {cost['tokens_per_s']:,.0f} tokens/s masked "
               f"(full model {cost['tokens_per_s_full']:,.0f}); a masked model runs all experts' weights, so the "
               f"speed of the exported checkpoint is measured by benchmarks/pruned_speed.py. Plan "
               f"{plan.digest()[:12]} made in {plan.extra.get('wall_time_s', 0):.2f} s with "
               f"{plan.extra.get('forward_passes', 0)} calibration sequences.")
    with st.expander("All metrics and agreement with the full model"):
        st.dataframe(table.drop(columns=["headline"]), hide_index=True)
        if not result.agreement.empty:
            st.dataframe(result.agreement, hide_index=True)
    profile = state.active_profile(mm, auto=False) if "profile_path" in st.session_state else None
    if profile is not None and plan.layers:
        usage = state.aggregated(profile, "expert_usage")
        usage = usage.groupby(["layer", "expert"], as_index=False)["share"].mean()
        dropped = [(layer, e) for layer, kept in plan.layers.items() for e in range(n) if e not in kept]
        st.plotly_chart(charts.expert_grid(usage, "share", "Kept and dropped experts (× = dropped) over the "
                                           "profile's mean share", "share", dropped=dropped),
                        width="content", config={"displayModeBar": False})


def show_tradeoff(plan, result, task: str, limit: int | None, calibration: str, top_k: int | None) -> None:
    st.subheader("Trade-off")
    c1, c2 = st.columns([3, 2])
    if c2.button("Sweep the fast methods over every keep", key="sweep"):
        bar = c2.progress(0.0)
        with state.shown_errors("Sweep"):
            bench.sweep(FAST_METHODS, list(range(k, n + 1)), calibration, [task], top_k=top_k, limit=limit,
                        progress=lambda what, done, total: bar.progress(done / total, text=what))
    upload = c2.file_uploader("Add a table from `moescope sweep` (CSV or Parquet)", type=["csv", "parquet"])
    if upload is not None and upload.file_id != st.session_state.get("sweep_upload"):
        try:
            st.session_state.setdefault("sweep_tables", []).append(load_table(upload, upload.name))
            st.session_state["sweep_upload"] = upload.file_id
        except MoEScopeError as exc:
            c2.error(str(exc))
    name = state.task_label(task)
    metric = headline_metric(task)
    points = tradeoff_points([bench.sweep_table(), *st.session_state.get("sweep_tables", [])], name, metric)
    if points.empty:
        c1.info("Every setting you evaluate lands here; or sweep the fast methods.")
        return
    row = result.table[(result.table["task"] == name) & (result.table["metric"] == metric)].iloc[0]
    kept = len(next(iter(plan.layers.values()))) if plan.layers else n
    current = (1 - kept / n, row["pruned"])
    c1.plotly_chart(charts.tradeoff(points, metric, name, current), config={"displayModeBar": False})


bench_panel()
