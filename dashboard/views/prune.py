"""Prune: choose a method, how many experts stay, top-k and tasks; the pruned model's scores update beside
the full model's as soon as a control moves. Searches (EEP, NAEE) run on request with progress."""

import math
from contextlib import nullcontext

import streamlit as st

from core import aggregate, coverage
from core.methods import catalog, quick_methods
from core.plan_book import PlanBook
from core.results import (
    dropped_experts,
    experts_kept,
    headline_metric,
    load_table,
    measured_tradeoff,
    plan_name,
    removed_fraction,
)
from core.workbench import PlanRequest
from dashboard import charts, state
from dashboard.views.lm_eval_panel import render_lm_eval_panel

METHODS = catalog()  # name -> what the method says about itself (label, kind, parameters)
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
    info = METHODS[method]
    if not info.is_search:
        if "seed" in info.parameters:  # random
            return (("seed", st.number_input("seed", 0, 10_000, 0, key="random_seed")),), None
        return (), None
    with st.expander("Search settings"):
        c = st.columns(4)
        limit = c[0].number_input("calibration examples", 1, 10_000, 64, key="search_limit")
        if "population" not in info.parameters:  # only the evolutionary search has these settings
            return (), int(limit)
        return (("population", c[1].number_input("population", 2, 64, 6, key="eep_population")),
                ("offspring", c[1].number_input("offspring", 2, 64, 6, key="eep_offspring")),
                ("generations", c[2].number_input("pruning generations", 1, 100, 5, key="eep_generations")),
                ("merge_generations", c[2].number_input("merging generations (0 = prune only)", 0, 100, 0,
                                                        key="eep_merge_generations")),
                ("seed", c[3].number_input("seed", 0, 10_000, 0, key="eep_seed"))), int(limit)


@st.fragment(run_every=1.0)
def search_progress(request: PlanRequest) -> None:
    """Polls the background search once a second; the whole page reruns when it ends."""
    job = bench.job(request)
    if job is None or not job.running:
        st.rerun()
    st.progress(job.fraction, text=f"{METHODS[request.method].label}: {job.message}")
    st.button("Stop", key="stop_search", on_click=job.stop.set,
              help="EEP stops after the candidate it is scoring and keeps its best plan so far; run it again to "
                   "resume from its saved population. NAEE and dynamic skipping cannot be interrupted: they run "
                   "to the end.")


def searched_plan(request: PlanRequest):
    """The plan of a search method: start it on request, show its progress, then its result."""
    job = bench.job(request)
    if job is not None and job.running:
        search_progress(request)
        return None
    if job is not None and job.error:
        st.error(state.plain(f"The search failed: {job.error}"))
    elif job is not None and job.plan is not None:
        if not job.plan.extra.get("cancelled"):
            return job.plan
        st.warning("Stopped: these are the scores of the best plan found so far. Run again to resume the search.")
    else:
        st.info(f"{METHODS[request.method].label} searches with forward passes on the "
                f"{state.task_label(request.calibration_task)} calibration split; it can take a while on large models.")
    if st.button(f"Run {METHODS[request.method].label}", type="primary", key="run_search"):
        bench.search(request)
        st.rerun(scope="fragment")
    return job.plan if job is not None else None


@st.fragment
def bench_panel() -> None:
    with bench.serving_user():  # the look-ahead waits until the page has answered the user's move
        shown = plan_and_score()
    if shown is not None:  # while the user reads the result, score the settings next to it (Workbench.prefetch)
        request, evaluate, limit, agreement = shown
        bench.prefetch(bench.neighbours(request), evaluate, "test", limit or None, agreement)


def plan_and_score() -> tuple | None:
    """The controls, the plan and its scores; the setting shown (for the look-ahead), or None if nothing was."""
    c1, c2, c3 = st.columns([3, 3, 2])
    method = c1.selectbox("Method", list(METHODS), index=list(METHODS).index("frequency"),
                          format_func=lambda m: METHODS[m].label, key="prune_method", persist_state="session")
    top_k_only = METHODS[method].keeps_all_experts  # top-k reduction keeps every expert and routes to fewer
    keeps = bench.feasible_keeps()
    keep = c2.select_slider("Experts kept per layer", options=keeps, value=min(keeps, key=lambda e: abs(e - n / 2)),
                            format_func=lambda e: f"{e} of {n} ({removed_fraction(e, n):.0%} removed)",
                            key="prune_keep", disabled=top_k_only, persist_state="session")
    if top_k_only:
        top_k = c3.selectbox("Top-k", list(range(1, k)) or [k], index=max(0, k - 2), key="prune_top_k_reduced",
                             persist_state="session")
    else:
        top_k = c3.selectbox("Top-k", [None, *range(1, k + 1)], key="prune_top_k", persist_state="session",
                             format_func=lambda t: f"model's ({k})" if t is None else str(t))
    c4, c5, c6 = st.columns([2, 4, 2])
    calibration = c4.selectbox("Calibration task", tasks, index=tasks.index("qa") if "qa" in tasks else 0,
                               format_func=state.task_label, key="prune_calibration", persist_state="session")
    evaluate = c5.multiselect("Evaluation tasks", tasks, default=[calibration], format_func=state.task_label,
                              key="prune_tasks", persist_state="session")
    limit = c6.select_slider("Test examples per task", LIMITS, value=50, key="prune_limit", persist_state="session",
                             format_func=lambda v: "all" if v == 0 else str(v))
    agreement = st.toggle("Agreement with the full model (top-1, KL)", key="prune_agreement",
                          persist_state="session", help="Computes the full model's reference once per task and "
                                                        "next-token log-probs at every position of each example; "
                                                        "off keeps updates quickest.")
    params, calibration_limit = search_settings(method)
    request = PlanRequest(method, calibration, keep=None if top_k_only else keep,
                          ratio=0.0 if top_k_only else None, top_k=top_k,
                          calibration_limit=calibration_limit, params=params)

    plan = None
    with state.shown_errors("Making the plan"):
        if METHODS[method].is_search and not bench.has_plan(request):
            plan = searched_plan(request)
        else:
            plan = calibrated_plan(request)
    if plan is None:
        return None
    if st.session_state.get("prune_last_made") is not plan:  # a plan chosen on the Plans page stays chosen
        st.session_state["prune_last_made"] = plan  # the workbench hands out one object per setting
        state.remember_plan(mm, plan)  # kept on disk too: a reload of the browser finds it again
    render_lm_eval_panel(mm, plan)  # standard benchmarks on request, in the background (collapsed)
    if not evaluate:
        st.warning("Choose at least one evaluation task.")
        return None
    scored = bench.is_scored(plan, evaluate, "test", limit or None, agreement)
    key = f"scoring_{plan.digest()}_{'_'.join(evaluate)}_{limit}_{agreement}"
    if not scored and state.stopped(key):
        st.warning("Scoring was stopped; the scores of the tasks it finished are kept.")
        st.button("Score again", key="rescore", on_click=state.clear_stopped, args=(key,))
        return None
    with state.shown_errors("Evaluation"), state.Progress() as bar:
        early = st.empty()  # the first batch's estimate, while the rest of the examples are scored
        with state.stoppable(key, "Stop scoring") if not scored else nullcontext():
            result = bench.compare(plan, evaluate, "test", limit or None, agreement=agreement,
                                   progress=lambda what, done, total: bar.steps(f"Scoring: {what}", done, total),
                                   estimate=lambda partial: show_estimate(early, partial))
        early.empty()
        show_result(plan, result)
        show_tradeoff(plan, result, evaluate, calibration, top_k)
    return request, evaluate, limit, agreement


def calibrated_plan(request: PlanRequest):
    """The plan of a score-based method: instant once its calibration pass (once per method and task) is done;
    that pass shows progress and can be stopped."""
    label, task = METHODS[request.method].label, state.task_label(request.calibration_task)
    if bench.is_calibrated(request):
        return bench.plan(request)
    key = f"calibration_{request.key()}"
    if state.stopped(key):
        st.warning(f"Calibration of {label} on {task} was stopped.")
        st.button("Calibrate again", key="recalibrate", on_click=state.clear_stopped, args=(key,))
        return None
    with state.Progress() as bar, state.stoppable(key, "Stop calibration"):
        return bench.plan(request, progress=lambda what, f: bar.fraction(f"Calibrating {label} on {task}: {what}", f))


def scores_table(heads):
    """Task, metric, both models' scores and the change, each with its 95% interval where it has one."""
    def with_interval(value, low, high, sign=""):
        text = f"{value:{sign}.2f}"
        return text if math.isnan(low) else f"{text} ({low:{sign}.1f} to {high:{sign}.1f})"
    return (heads.assign(pruned=[with_interval(*r) for r in heads[["pruned", "pruned_low", "pruned_high"]].values],
                         full=heads["full"].map("{:.2f}".format),
                         delta=[with_interval(*r, sign="+") for r in heads[["delta", "delta_low", "delta_high"]].values])
            [["task", "metric", "pruned", "full", "delta", "better", "examples"]]
            .rename(columns={"task": "Task", "metric": "Metric", "pruned": "Pruned model", "full": "Full model",
                             "delta": "Change", "better": "Better when", "examples": "Examples"}).set_index("Task"))


def show_estimate(slot, partial) -> None:
    """The comparison so far: tasks scored in full, and the current one on its first batch of examples."""
    with slot.container():
        st.markdown("**First estimate** (refining on the remaining examples…)")
        st.table(scores_table(partial.headlines()))


def show_result(plan, result) -> None:
    heads = result.headlines()
    c1, c2 = st.columns([5, 1])
    c1.markdown(f"**{state.plain(plan_name(plan, n, k))}**")
    if c2.button("Pin this plan", key="pin_plan", help="Pinned plans are compared side by side on the Plans page."):
        with state.shown_errors("Could not pin the plan"):
            PlanBook(state.plans_folder(mm), mm.weights_digest()).pin(plan.digest())
            st.toast("Pinned: compare it on the Plans page.")
    # A table, not metric cards: task, metric and both scores stay readable in full at any number of tasks.
    st.table(scores_table(heads))
    st.caption("In brackets: the 95% interval over the test examples. The change's interval is paired (both models "
               "scored the same examples), so it is narrower than the two scores' intervals suggest.")
    cost = result.cost
    cols = st.columns(3)
    cols[0].metric("Parameters", f"{cost['total_params'] / 1e6:.2f} M", f"{result.change('total_params'):+.0%}",
                   delta_color="inverse")
    active = result.change("active_params")
    cols[1].metric("Active per token", f"{cost['active_params'] / 1e6:.2f} M", f"{active:+.0%}" if active else None,
                   delta_color="inverse")
    cols[2].metric("Weights", f"{cost['weight_bytes'] / 2**20:.1f} MiB")
    st.caption(f"Scored in {result.seconds:.2f} s. Here the removed experts are switched off, not deleted, so "
               f"scoring is not faster yet; the checkpoint written on the Export page has the size shown above.")
    with st.expander("Details"):
        st.markdown(state.plain(
            f"Plan {plan.digest()[:12]}, made in {plan.extra.get('wall_time_s', 0):.2f} s with "
            f"{plan.extra.get('forward_passes', 0)} calibration sequences. Scoring speed with experts masked: "
            f"{cost['tokens_per_s']:,.0f} tokens/s (full model {cost['tokens_per_s_full']:,.0f}); a masked model "
            f"still runs every expert's weights, and benchmarks/pruned_speed.py measures the exported checkpoint."))
    with st.expander("All metrics" + (" and agreement with the full model" if not result.agreement.empty else "")):
        st.dataframe(result.table.drop(columns=["headline"]), hide_index=True)
        if not result.agreement.empty:
            st.dataframe(result.agreement, hide_index=True)
    profile = state.active_profile(mm)
    if profile is not None and plan.layers:
        task = (plan.extra.get("calibration") or {}).get("task")
        usage, own = aggregate.usage_for_plan(state.aggregated(profile, aggregate.expert_usage), task)
        over = f"share of {task}'s routing" if own else "mean share over the tasks"
        dropped = dropped_experts(plan, n)
        kept = coverage.kept_share(usage, dropped)
        notes = {int(r.layer): f"{r.kept_share:.0%} kept" for r in kept.itertuples()}
        st.plotly_chart(charts.expert_grid(usage, "share", "Kept experts (dropped ones dimmed)", over, dropped=dropped,
                                           row_notes=notes),
                        width="content", config=charts.download_config("kept-experts"))
        low = kept.loc[kept["kept_share"].idxmin()]
        st.caption(f"Beside each layer: the {over} its kept experts carry. Dropped experts are dimmed. Over all "
                   f"layers the kept experts carry {kept['kept_share'].mean():.0%} on average (lowest "
                   f"{low['kept_share']:.0%}, layer {int(low['layer'])}).")


def show_tradeoff(plan, result, evaluate: list[str], calibration: str, top_k: int | None) -> None:
    st.subheader("Trade-off")
    c1, c2 = st.columns([3, 2])
    names = {state.task_label(t): t for t in evaluate}
    shown = c2.radio("Task", ["Each task", *names], horizontal=True, key="tradeoff_task",
                     help="One small chart per evaluation task, or one task large.")
    chosen = list(names) if shown == "Each task" or shown not in names else [shown]
    sweeping = c2.button("Sweep the fast methods over every keep", key="sweep",
                         help="Plans and scores " + ", ".join(METHODS[m].label for m in quick_methods())
                              + " at every number of experts kept, on the chosen tasks.")
    if state.stopped("sweep"):
        done, total = st.session_state.get("sweep_done", (0, 0))
        c2.warning(f"Sweep stopped after {done} of {total} settings; the settings it scored are on the charts.")
        state.clear_stopped("sweep")
    if sweeping:
        def progress(what: str, done: int, total: int) -> None:
            st.session_state["sweep_done"] = (done, total)
            bar.steps(f"Sweep: {what}, setting {done + 1} of {total}", done, total)

        with state.shown_errors("Sweep"), state.Progress(c2) as bar, state.stoppable("sweep", "Stop the sweep", c2):
            bench.sweep(quick_methods(), bench.feasible_keeps(top_k), calibration, [names[c] for c in chosen],
                        top_k=top_k, limit=result.examples(chosen[0]), progress=progress)
    upload = c2.file_uploader("Add a table from `moescope sweep` (CSV or Parquet)", type=["csv", "parquet"])
    if upload is not None and upload.file_id != st.session_state.get("sweep_upload"):
        try:
            st.session_state.setdefault("sweep_tables", []).append(load_table(upload, upload.name))
            st.session_state["sweep_upload"] = upload.file_id
        except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
            with c2:
                state.show_error("Could not add the table", exc)
    c2.caption("Points: every setting scored so far on the same test examples (by any session on this model) "
               "plus added tables. Lines join only settings actually scored; a hollow marker is a search stopped "
               "early; the star is the current plan.")
    tables = [bench.sweep_table(), *st.session_state.get("sweep_tables", [])]
    grid = c1.columns(2) if len(chosen) > 1 else [c1]
    for i, name in enumerate(chosen):
        metric = headline_metric(names[name])
        examples = result.examples(name)
        full, points = measured_tradeoff(tables, name, metric, split="test", examples=examples)
        current = (removed_fraction(experts_kept(plan, n), n), result.pruned(name, metric))
        fig = charts.tradeoff(full, points, metric, name, current, height=420 if len(chosen) == 1 else 470)
        grid[i % len(grid)].plotly_chart(fig, key=f"tradeoff_{name}",
                                         config=charts.download_config(f"tradeoff-{name}"))


bench_panel()
