"""Plans: every plan made on this model (kept across reloads), named in words or by the user, pinned, chosen
for export, and pinned plans compared side by side: experts kept per layer and scores per task."""

import time

import pandas as pd
import streamlit as st

from core.plan_book import MAX_NAME, MAX_PINNED, PlanBook, distinct_labels, kept_experts_table, overlap_table, \
    plan_summary, task_scores
from dashboard import state

LIMITS = [25, 50, 100, 200, 0]  # as on the Prune page, so scores made there show here at once
LISTED = 30  # the most recent plans listed; older ones stay on disk (and pinned ones are still compared)

st.title("Plans")
mm = state.current_model()
if mm is None:
    st.stop()
n, k = mm.n_experts, mm.top_k
bench = state.workbench()
book = PlanBook(state.plans_folder(mm), mm.weights_digest())
current = state.current_plan(mm)  # after a reload: the latest plan, restored from disk

try:
    saved = book.plans(mm.routing_spec())
except Exception as exc:  # noqa: BLE001 - a damaged plan book: one sentence, the page stops here
    state.show_error("Could not read the plan names and pins", exc)
    st.stop()
if not saved:
    st.info("No plans yet: make one on the **Prune** page (or load a plan JSON on **Export**); every plan made on "
            "this model is kept here, across reloads.")
    st.stop()

error = st.session_state.pop("plans_error", None)
if error:
    st.error(state.plain(error))


def rename(digest: str, key: str) -> None:
    """Runs when the user edits a name (never on a plain rerun, so another session's rename is not undone)."""
    try:
        book.rename(digest, st.session_state[key])
    except Exception as exc:  # noqa: BLE001 - shown at the top of the page as one sentence
        st.session_state["plans_error"] = state.error_text("Could not rename the plan", exc)


st.caption(f"Plans made on this model, most recent first. Name a plan to call it that on this page; pin two to "
           f"{MAX_PINNED} plans to compare them below; “Use this plan” makes it the plan the Export page writes.")
widths = [6, 1.5, 2.5, 2.2, 1.3, 2.1]
for column, title in zip(st.columns(widths), ["Name", "Method", "Experts kept", "Last saved", "", ""]):
    column.markdown(f"**{title}**" if title else "")
for item in saved[:LISTED]:
    row = plan_summary(item, n, k)
    c = st.columns(widths, vertical_alignment="center")
    key = f"plan_name_{item.digest}"
    c[0].text_input("Name", value=item.name or "", placeholder=row["name"], key=key, max_chars=MAX_NAME,
                    label_visibility="collapsed", on_change=rename, args=(item.digest, key),
                    help="Empty: the plan is called by its method and experts kept.")
    c[1].markdown(state.plain(row["method"]))
    c[2].markdown(state.plain(f"{row['experts_kept']} of {row['n_experts']} per layer, top-{row['top_k']}"))
    c[3].markdown(state.plain(time.strftime("%Y-%m-%d %H:%M", time.localtime(row["saved_at"]))))
    if c[4].button("Unpin" if item.pinned else "Pin", key=f"plan_pin_{item.digest}"):
        try:
            book.pin(item.digest, not item.pinned)
        except Exception as exc:  # noqa: BLE001 - shown in place as one sentence
            st.session_state["plans_error"] = state.error_text("Could not pin the plan", exc)
        st.rerun()
    if current is not None and current.digest() == item.digest:
        c[5].markdown(":material/check: **Current plan**")
    elif c[5].button("Use this plan", key=f"plan_use_{item.digest}"):
        state.remember_plan(mm, item.plan)
        st.rerun()
if len(saved) > LISTED:
    st.caption(f"{len(saved) - LISTED} older plans are not listed (they stay saved).")
with st.expander("Details"):
    st.markdown(state.plain("Plan digests (what plan files and caches are keyed by): "
                            + "; ".join(f"{item.label(n, k)}: {item.digest}" for item in saved[:LISTED])))
    st.markdown(state.plain(f"Names and pins are kept in {book.path}."))

# ----- pinned plans side by side -----------------------------------------------------------------------
st.subheader("Compare pinned plans")
by_digest = {item.digest: item for item in saved}
pinned = [by_digest[d] for d in book.pinned() if d in by_digest]
if len(pinned) < 2:
    st.info(f"Pin two to {MAX_PINNED} plans above to compare them side by side "
            f"({len(pinned)} pinned now).")
    st.stop()
labels = distinct_labels([item.label(n, k) for item in pinned])
plans = dict(zip(labels, (item.plan for item in pinned)))

st.markdown("**Experts kept per layer**")
kept = kept_experts_table(plans, n, mm.layer_indices)
st.table(kept.assign(Layer=kept["Layer"].astype(str)).set_index("Layer"))  # a text index: always shown
st.caption("Each cell: how many experts the plan keeps in that layer, then which.")
st.markdown("**How alike the plans are**")
overlap = overlap_table(plans, n, mm.layer_indices)
st.caption("The experts both plans keep, as a share of the experts either keeps, averaged over layers (100%: the "
           "same experts).")
st.table(overlap.map("{:.0%}".format))

st.markdown("**Scores per task**")
tasks = state.task_choices()
c1, c2, c3 = st.columns([5, 3, 2], vertical_alignment="bottom")
chosen = c1.multiselect("Evaluation tasks", tasks, default=tasks, format_func=state.task_label, key="plans_tasks")
limit = c2.select_slider("Test examples per task", LIMITS, value=50, key="plans_limit",
                         format_func=lambda v: "all" if v == 0 else str(v))
if c3.button("Score the pinned plans", type="primary", key="plans_score", disabled=not chosen,
             help="Scores each pinned plan and the full model on the chosen tasks; settings scored before (here or "
                  "on the Prune page) are instant."):
    with state.shown_errors("Scoring"), state.Progress() as bar, state.stoppable("plans_scoring", "Stop scoring", c3):
        for i, (label, plan) in enumerate(plans.items(), 1):
            bench.compare(plan, chosen, "test", limit or None, agreement=False,
                          progress=lambda what, done, total, label=label, i=i: bar.steps(
                              f"Scoring {label} (plan {i} of {len(plans)}): {what}", done, total))
if state.stopped("plans_scoring"):
    st.warning("Scoring was stopped; the plans and tasks it finished are shown below.")
    state.clear_stopped("plans_scoring")
if not chosen:
    st.warning("Choose at least one evaluation task.")
    st.stop()
scores = task_scores(bench.sweep_table(), {label: item.digest for label, item in zip(labels, pinned)}, chosen,
                     "test", limit or None)
rows = []
for task, group in scores.groupby("task", sort=False):
    first = group.iloc[0]
    row = {"Task": task, "Metric": first["metric"], "Better when": first["better"],
           "Examples": "—" if pd.isna(first["examples"]) else str(int(first["examples"])),
           "Full model": "not scored" if pd.isna(first["full"]) else f"{first['full']:.2f}"}
    for r in group.itertuples():
        row[r.plan] = "not scored" if pd.isna(r.score) else f"{r.score:.2f} ({r.change:+.2f})"
    row["Best plan"] = ", ".join(group.loc[group["best"], "plan"]) or "—"
    rows.append(row)
st.table(pd.DataFrame(rows).set_index("Task"))
if scores["score"].isna().any():
    st.info("Some plans are not scored on these tasks yet: press **Score the pinned plans**.")
st.caption("Each plan's score on the task's headline metric, with its change against the full model in brackets; "
           "all scored on the same test examples. Scores already computed on this model (here or on the Prune "
           "page, by any session) show at once.")

