"""Steps that run in the page's own script run (a method's calibration pass, a sweep, the first profile) show a
Stop button while they run; a stopped step says so in the rerun instead of starting again. The interruption
itself (Streamlit stops the run at the step's next progress update) is checked in Chromium; AppTest runs a
script to its end, so here the rerun after a press is checked, and the scores show their 95% intervals."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.workbench import PlanRequest

from .browser import browser_page, require_chromium, streamlit_server, wait_for_app
from .test_dashboard import APP, app, goto, scores  # noqa: F401 - ``app`` is a fixture

pytestmark = pytest.mark.slow


def test_scores_show_their_95_percent_interval(app):
    goto(app, "prune")
    table = scores(app)
    pruned, change = str(table["Pruned model"].iloc[0]), str(table["Change"].iloc[0])
    value, low, high = (float(x) for x in pruned.replace("(", " ").replace(")", " ").replace(" to ", " ").split())
    assert low <= value <= high and low < high
    assert " to " in change and "Examples" in table.columns
    assert any("95% interval" in c.value for c in app.caption)


def test_a_stopped_calibration_waits_for_the_user_instead_of_starting_again(app):
    goto(app, "prune")
    request = PlanRequest("reap", "qa", keep=4)  # the page's defaults with REAP chosen
    app.session_state[f"stopped_calibration_{request.key()}"] = True  # what pressing Stop leaves
    app.selectbox(key="prune_method").set_value("reap").run()
    assert not app.exception
    assert any("Calibration of REAP saliency on qa was stopped" in w.value for w in app.warning)
    assert not any(t for t in app.table if "Pruned model" in t.value.columns)  # nothing calibrated or scored
    next(b for b in app.button if b.label == "Calibrate again").click().run()
    assert not app.exception
    assert "Pruned model" in scores(app).columns and not any("was stopped" in w.value for w in app.warning)


def test_a_stopped_sweep_says_how_far_it_got(app):
    goto(app, "prune")
    app.session_state["stopped_sweep"] = True
    app.session_state["sweep_done"] = (3, 28)
    app.select_slider(key="prune_keep").set_value(3).run()
    assert any("Sweep stopped after 3 of 28 settings" in w.value for w in app.warning)
    app.select_slider(key="prune_keep").set_value(4).run()
    assert not any("Sweep stopped" in w.value for w in app.warning)  # said once


@pytest.mark.browser
def test_stop_interrupts_a_running_sweep_in_chromium(dashboard_home_copy):
    require_chromium()
    env = {"MOESCOPE_HOME": str(dashboard_home_copy)}
    with browser_page(1400, 1000) as page, streamlit_server(APP, env) as url:
        page.goto(url)
        wait_for_app(page, 300_000)
        page.get_by_test_id("stSidebarNav").get_by_text("Prune", exact=True).click()
        page.get_by_text("Parameters").first.wait_for(timeout=300_000)
        wait_for_app(page, 300_000)
        page.get_by_role("button", name="Sweep the fast methods over every keep").click()
        stop = page.get_by_role("button", name="Stop the sweep")
        stop.wait_for(timeout=120_000)
        stop.click()  # at once: the whole sweep takes about 10 s on the sample model
        page.get_by_text("Sweep stopped after").first.wait_for(timeout=120_000)
        wait_for_app(page, 120_000)
        text = page.get_by_text("Sweep stopped after").first.inner_text()
        done, total = (int(x) for x in text.split("after ")[1].split(" settings")[0].split(" of "))
        assert 0 <= done < total == 28  # stopped part-way (4 fast methods x 7 keeps): the rest never ran
        assert page.get_by_role("button", name="Stop the sweep").count() == 0


def test_a_stopped_first_profile_is_not_recorded_again_until_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_HOME", str(tmp_path))  # a fresh home: no profile yet
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["stopped_auto_profile"] = True  # what pressing "Stop recording" leaves
    at.switch_page("views/utilization.py").run()
    assert not at.exception
    assert any("was stopped" in i.value for i in at.info)
    assert any(b.label == "Record the sample tasks now" for b in at.button)
    assert not list(tmp_path.glob("dashboard/profiles/*.parquet"))  # nothing recorded


def test_stopped_scoring_waits_for_the_user_and_keeps_what_it_finished(app):
    goto(app, "prune")
    app.multiselect(key="prune_tasks").set_value(["qa", "prose"]).run()  # scored: nothing to stop
    assert not any(b.label == "Stop scoring" for b in app.button)
    app.select_slider(key="prune_limit").set_value(25).run()
    plan = app.session_state["plan"]
    app.session_state[f"stopped_scoring_{plan.digest()}_qa_prose_100_False"] = True  # a setting not scored yet
    app.select_slider(key="prune_limit").set_value(100).run()
    assert any("Scoring was stopped" in w.value for w in app.warning)
    assert not any("Pruned model" in t.value.columns for t in app.table)
    next(b for b in app.button if b.label == "Score again").click().run()
    assert not app.exception and not any("Scoring was stopped" in w.value for w in app.warning)
    assert scores(app)["Examples"].tolist() == [100, 100]
