"""The Plans page under Streamlit's AppTest on the sample model: plans made on the Prune page are listed in
words, can be renamed, pinned and chosen for export, and two pinned plans are compared side by side (kept experts
per layer, scores per task); names and pins survive a reload."""

from __future__ import annotations

import re

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.test_dashboard import APP, app, goto  # noqa: F401 - ``app`` is a fixture

pytestmark = pytest.mark.slow  # the app runs in process: about 20 s here

SCORE = re.compile(r"^-?\d+\.\d\d \([+-]\d+\.\d\d\)$")  # "31.20 (-4.00)": a plan's score and its change


def table_with(at: AppTest, column: str):
    return next(t.value for t in at.table if column in t.value.columns)


def test_plans_are_named_pinned_chosen_and_compared(app):
    st.cache_resource.clear()  # a fresh workbench: the scores shown at once are only those made in this test
    goto(app, "prune")  # the default plan: frequency, 4 of 8, scored on qa (50 test examples)
    half = app.session_state["plan"]
    app.select_slider(key="prune_keep").set_value(2).run()  # a second plan, scored the same way
    quarter = app.session_state["plan"]
    assert half.digest() != quarter.digest()

    goto(app, "plans")
    names = {t.key: t for t in app.text_input if t.key.startswith("plan_name_")}
    assert set(names) == {f"plan_name_{half.digest()}", f"plan_name_{quarter.digest()}"}
    assert names[f"plan_name_{half.digest()}"].placeholder.startswith("frequency: 4 of 8 experts kept per layer")
    shown = " ".join(m.value for m in app.main.markdown if m not in app.expander[0].markdown)
    assert half.digest()[:8] not in shown and quarter.digest()[:8] not in shown  # digests only in "Details"
    assert any("Pin two" in i.value for i in app.info)  # nothing pinned yet: no comparison

    app.text_input(key=f"plan_name_{half.digest()}").input("Half the experts").run()
    assert not app.error, [e.value for e in app.error]
    app.text_input(key=f"plan_name_{quarter.digest()}").input("Half the experts").run()  # taken: one sentence
    assert any("already named" in e.value.replace("\\", "") for e in app.error) and not app.exception
    app.text_input(key=f"plan_name_{quarter.digest()}").input("").run()  # empty: called by its words again
    app.button(key=f"plan_pin_{half.digest()}").click().run()
    app.button(key=f"plan_pin_{quarter.digest()}").click().run()
    assert not app.exception and not app.error
    assert app.button(key=f"plan_pin_{half.digest()}").label == "Unpin"

    kept = table_with(app, "Kept by every plan")  # experts kept per layer, both plans by name
    other = "frequency: 2 of 8 experts kept per layer, top-2"
    assert {"Half the experts", other} <= set(kept.columns)
    assert list(kept.index) == ["0", "1", "2", "3"]  # the sample model's four MoE layers, each named
    assert kept["Half the experts"].str.startswith("4: ").all() and kept[other].str.startswith("2: ").all()
    overlap = next(t.value for t in app.table if "Half the experts" in t.value.index)  # plan by plan
    assert overlap.loc["Half the experts", "Half the experts"] == "100%"

    # qa was scored on the Prune page: its scores show at once; arithmetic waits for a click
    app.multiselect(key="plans_tasks").set_value(["qa", "arithmetic"]).run()
    scores = table_with(app, "Best plan")
    assert SCORE.match(scores.loc["qa", "Half the experts"]) and SCORE.match(scores.loc["qa", other])
    assert scores.loc["arithmetic", "Half the experts"] == "not scored"
    app.button(key="plans_score").click().run()
    assert not app.exception and not app.error
    scores = table_with(app, "Best plan")
    assert list(scores.index) == ["qa", "arithmetic"]
    assert all(SCORE.match(scores.loc[t, p]) for t in scores.index for p in ("Half the experts", other))
    assert scores.loc["arithmetic", "Examples"] == "50"

    assert app.session_state["plan"].digest() == quarter.digest()  # the Prune page's latest plan is current
    app.button(key=f"plan_use_{half.digest()}").click().run()
    assert app.session_state["plan"].digest() == half.digest()  # Export now writes the renamed plan

    reloaded = AppTest.from_file(APP, default_timeout=300)  # a browser reload: a new session, same home
    reloaded.run()
    goto(reloaded, "plans")
    assert reloaded.text_input(key=f"plan_name_{half.digest()}").value == "Half the experts"
    assert {"Half the experts", other} <= set(table_with(reloaded, "Kept by every plan").columns)
    goto(reloaded, "export")
    assert reloaded.session_state["plan"].digest() == half.digest()  # the plan chosen before the reload


def test_the_prune_page_pins_its_plan_and_leaves_a_plan_chosen_elsewhere_chosen(app, dashboard_home_copy):
    from core.plan_book import PlanBook

    goto(app, "prune")
    half = app.session_state["plan"]
    next(b for b in app.button if b.label == "Pin this plan").click().run()
    assert not app.exception
    folder = next(dashboard_home_copy.glob("dashboard/plans/*/"))  # the sample model's plans
    assert PlanBook(folder).pinned() == [half.digest()]
    app.select_slider(key="prune_keep").set_value(2).run()
    quarter = app.session_state["plan"]
    goto(app, "plans")
    next(b for b in app.button if b.key == f"plan_use_{half.digest()}").click().run()
    goto(app, "prune")  # the Prune page shows its own setting again; the plan chosen for export stays
    assert app.session_state["plan"].digest() == half.digest() != quarter.digest()


def test_stopped_scoring_of_pinned_plans_says_so_once(app):
    goto(app, "prune")
    app.select_slider(key="prune_keep").set_value(2).run()
    for _ in range(2):  # pin the two plans made above
        goto(app, "plans")
        next(b for b in app.button if b.label == "Pin").click().run()
    app.session_state["stopped_plans_scoring"] = True  # what pressing "Stop scoring" leaves
    goto(app, "plans")
    assert any("Scoring was stopped" in w.value for w in app.warning)
    goto(app, "plans")
    assert not any("Scoring was stopped" in w.value for w in app.warning)
