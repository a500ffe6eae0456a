"""Every dashboard page under Streamlit's AppTest on the sample model: controls exist, moving them changes
what is shown, and bad input becomes a message on the page (never an exception)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from transformers import AutoConfig, AutoModelForCausalLM

from core.model import load_model
from core.profiling import profile_texts
from tests.plotly_spec import grid_cells, plotly_values
from tests.tiny_models import write_lm_task

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
SAMPLE = str(Path(__file__).resolve().parents[1] / "sample_data" / "model")


pytestmark = pytest.mark.slow  # each test runs the app in process for 10 s or more


@pytest.fixture()
def app(dashboard_home_copy, monkeypatch) -> AppTest:
    """The app on the sample model, with the sample profile already recorded (once per session)."""
    monkeypatch.setenv("MOESCOPE_HOME", str(dashboard_home_copy))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def until(at: AppTest, condition, timeout: float = 240) -> None:
    """Rerun the app until ``condition()`` holds (a background search is running)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (KeyError, StopIteration, AttributeError):
            pass
        assert time.monotonic() < deadline, "the page never reached the expected state"
        time.sleep(0.5)
        at.run()
        assert not at.exception, at.exception


def scores(at: AppTest):
    """The Prune page's score table: a row per task (index), its metric, both models' scores and the change."""
    return next(t.value for t in at.table if {"Pruned model", "Full model", "Change"} <= set(t.value.columns))


def score(at: AppTest, task: str) -> tuple[float, float]:
    """(pruned, full) headline score of ``task`` in the Prune page's score table."""
    row = scores(at).loc[task]  # "34.00 (21.1 to 48.2)": the score, then its 95% interval
    return float(str(row["Pruned model"]).split()[0]), float(row["Full model"])


def metric(at: AppTest, label_start: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(label_start))


def test_model_page_summarises_the_sample_model_and_survives_bad_paths(app, tmp_path, tiny_models):
    assert metric(app, "Experts per layer") == "8"
    assert metric(app, "Top-k") == "2"
    assert metric(app, "MoE layers") == "4"
    tasks = app.table[0].value  # a static table: descriptions wrap instead of being cut off
    assert {"qa", "arithmetic", "code", "prose", "qa_choice"} <= set(tasks.index)
    assert tasks["description"].str.len().min() > 0

    app.text_input[0].input(str(tmp_path / "nowhere"))  # a form: submitted with its button
    app.button[0].click().run()
    assert not app.exception
    assert any("No model directory" in e.value for e in app.error)
    assert metric(app, "Experts per layer") == "8"  # the sample model stays loaded

    llama = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "dense")
    app.text_input[0].input(str(tmp_path / "dense"))
    app.button[0].click().run()
    assert any("not a supported MoE family" in e.value for e in app.error)

    app.text_input[0].input(str(tiny_models.checkpoint()))  # another MoE model loads and replaces the summary
    app.button[0].click().run()
    assert not app.exception and not app.error
    assert metric(app, "MoE layers") == "2"

    app.text_input[1].input(str(tmp_path / "no-task"))
    app.button[1].click().run()
    assert any("unknown task" in e.value for e in app.error)


def test_profile_page_records_loads_and_refuses_foreign_profiles(app, tmp_path, tiny_models):
    goto(app, "profile")
    assert metric(app, "Tasks") == "5"  # the sample tasks' profile (recorded by the session's first visit)
    assert not any(m.label == "Recorded" for m in app.metric)  # a date cut off in a card: now a sentence
    assert any(m.value.replace("\\", "").startswith("Recorded 20") for m in app.markdown)
    app.multiselect[0].set_value(["qa"]).run()
    app.number_input[0].set_value(3).run()
    app.button[0].click().run()
    assert not app.error
    assert metric(app, "Tasks") == "1"

    (tmp_path / "not-a-profile.parquet").write_text("hello")
    app.text_input[0].input(str(tmp_path / "not-a-profile.parquet")).run()
    app.button[1].click().run()
    assert any("no sidecar" in e.value for e in app.error)

    tiny = load_model(tiny_models.checkpoint())
    foreign = profile_texts(tiny, {"t": ["some text", "more text"]}, tmp_path / "foreign.parquet", progress=False)
    app.text_input[0].input(str(foreign)).run()
    app.button[1].click().run()
    assert any("not from the loaded model" in e.value for e in app.error)
    assert metric(app, "Tasks") == "1"  # the active profile is unchanged


def test_utilization_controls_change_the_views(app):
    goto(app, "utilization")

    def grid() -> list[float]:
        return grid_cells(json.loads(app.get("plotly_chart")[0].proto.spec))["values"]

    share = grid()
    app.radio(key="util_value").set_value("count").run()
    counts = grid()
    assert counts != share and max(counts) > 1 >= max(share)
    app.radio[0].set_value("Difference between two tasks").run()
    assert min(grid()) < 0 < max(grid())  # shares of two tasks differ both ways
    assert "Jensen" in app.dataframe[0].value.columns[1]
    # token counts do not compare between tasks of different sizes: not offered here, rather than ignored
    assert not {"count", "Token count"} & set(app.radio(key="util_diff_value").options)
    spec = json.loads(app.get("plotly_chart")[0].proto.spec)
    assert "percentage points" in grid_cells(spec)["colorbar"]["title"]["text"]
    assert "%" not in grid_cells(spec)["colorbar"]["tickformat"]
    assert 1 < max(abs(v) for v in grid()) <= 100  # in points, not fractions shown as "+40.0%"
    assert all("JSD" in t for t in spec["layout"]["yaxis"]["ticktext"])  # each layer's divergence beside its row
    assert json.loads(app.get("plotly_chart")[0].proto.config)["displayModeBar"]  # the chart can be saved

    def top_tokens() -> list[str]:
        return list(next(d for d in app.dataframe if "token" in d.value.columns).value["token"])

    # ranked: each layer's squares sorted by usage, most used first; a click still names the expert's id
    app.radio[0].set_value("One task, experts ranked").run()
    app.radio(key="util_value").set_value("share").run()
    cells = grid_cells(json.loads(app.get("plotly_chart")[0].proto.spec))
    trace, values, rows = cells["trace"], cells["values"], cells["rows"]
    for row in set(rows):
        in_row = [v for v, r in zip(values, rows) if r == row]
        assert in_row == sorted(in_row, reverse=True) and len(in_row) == 8
    assert plotly_values(trace["x"])[:8] == list(range(8)) and "rank" in trace["hovertemplate"]
    # zoom: a band of layers and experts
    app.select_slider(key="util_zoom_layers").set_value((1, 2)).run()
    app.slider(key="util_zoom_experts").set_value((2, 5)).run()
    assert len(grid()) == 2 * 4
    app.select_slider(key="util_zoom_layers").set_value((0, 3)).run()
    app.slider(key="util_zoom_experts").set_value((0, 7)).run()
    # the coverage curve: one line per layer rising to 100 %, and the experts needed per layer
    cover = next(json.loads(c.proto.spec) for c in app.get("plotly_chart")
                 if "top n experts" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    lines = [t for t in cover["data"] if t["name"].startswith("layer")]
    assert len(lines) == 4 and all(plotly_values(t["y"])[-1] == pytest.approx(1.0) for t in lines)
    assert any("Experts needed for 90%" in c.value for c in app.caption)

    app.radio[0].set_value("One task").run()
    before = top_tokens()
    app.selectbox(key="focus_expert").set_value(5).run()
    app.selectbox(key="focus_layer").set_value(2).run()
    assert top_tokens() != before
    assert any("layer 2, expert 5" in m.value for m in app.markdown)


def test_tokens_page_colours_tokens_and_reports_consecutive_rate(app):
    goto(app, "tokens")
    html = [h.proto.body for h in app.get("html")]
    assert any("expert" in body and "border-bottom" in body for body in html)
    label = "Same first-choice expert"
    last = metric(app, label)
    app.select_slider(key="tok_layer").set_value(0).run()
    assert metric(app, label) != last
    assert metric(app, "Chance level") == "12.5%"


def test_prune_page_updates_when_the_ratio_moves_and_reports_failures(app, tmp_path):
    goto(app, "prune")
    app.selectbox(key="prune_calibration").set_value("qa").run()
    app.multiselect(key="prune_tasks").set_value(["qa", "arithmetic", "code", "prose"]).run()
    app.select_slider(key="prune_limit").set_value(25).run()
    # four tasks: one table row each with the task, metric, pruned score, full score and change, nothing cut off
    table = scores(app)
    assert table.index.tolist() == ["qa", "arithmetic", "code", "prose"]
    assert {"Metric", "Pruned model", "Full model", "Change"} <= set(table.columns)
    assert all(float(v) == float(v) for v in table["Full model"])  # the full model's score, in full
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in app.get("plotly_chart")]
    assert {f"Trade-off on {t}" for t in ("qa", "arithmetic", "code", "prose")} <= set(titles)  # a chart per task
    app.radio(key="tradeoff_task").set_value("arithmetic").run()
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in app.get("plotly_chart")]
    assert "Trade-off on arithmetic" in titles and "Trade-off on qa" not in titles  # or the one chosen
    app.radio(key="tradeoff_task").set_value("Each task").run()
    app.multiselect(key="prune_tasks").set_value(["qa", "arithmetic"]).run()
    assert not any("benchmarks/" in c.value or ".py" in c.value for c in app.caption)  # no developer wording
    assert any("frequency: 4 of 8 experts kept per layer" in m.value.replace("\\", "") for m in app.markdown)
    at_half = score(app, "qa"), metric(app, "Parameters")
    app.select_slider(key="prune_keep").set_value(2).run()
    at_quarter = score(app, "qa"), metric(app, "Parameters")
    assert at_quarter[1] != at_half[1] and at_quarter != at_half
    assert app.session_state["plan"].layers[0].__len__() == 2
    grid = next(json.loads(c.proto.spec) for c in app.get("plotly_chart")
                if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Kept experts"))
    cells = grid_cells(grid)
    assert all("rgba(255,255,255" in c for c in cells["veil"])  # dimmed, not crossed
    assert cells["dropped"] == 4 * 6  # 6 of 8 dropped in each of 4 layers
    ticks = grid["layout"]["yaxis"]["ticktext"]
    assert len(ticks) == 4 and all(t.endswith("% kept") for t in ticks)  # each layer's kept share as a number
    assert not any("top1_agreement" in d.value.columns for d in app.dataframe)  # off by default: quicker
    app.toggle(key="prune_agreement").set_value(True).run()
    agreement = next(d.value for d in app.dataframe if "top1_agreement" in d.value.columns)
    assert set(agreement["task"]) == {"qa", "arithmetic"} and (agreement["top1_agreement"] < 1).all()

    app.selectbox(key="prune_method").set_value("eep").run()
    assert not app.get("plotly_chart") and not any(m.label == "Parameters" for m in app.metric)
    assert any(b.label.startswith("Run EEP") for b in app.button)  # searches wait for a click
    settings = {"search_limit": 8, "eep_population": 2, "eep_offspring": 2, "eep_generations": 1}
    for key, value in settings.items():
        app.number_input(key=key).set_value(value)
    app.button(key="run_search").click().run()
    until(app, lambda: app.session_state["plan"].extra["method"] == "eep")
    plan = app.session_state["plan"]
    assert plan.extra["calibration"]["limit"] == 8 and not plan.extra["cancelled"]
    assert len(plan.layers[0]) == 2 and metric(app, "Parameters") == at_quarter[1]

    app.number_input(key="eep_generations").set_value(100).run()  # a long search, stopped from the page
    app.button(key="run_search").click().run()
    until(app, lambda: app.get("progress") and app.button(key="stop_search"))
    app.button(key="stop_search").click().run()
    until(app, lambda: any(w.value.startswith("Stopped") for w in app.warning))
    stopped = app.session_state["plan"]
    assert stopped.extra["cancelled"] and stopped.extra["generations_done"] < 100
    tradeoff = next(json.loads(c.proto.spec) for c in app.get("plotly_chart")
                    if json.loads(c.proto.spec)["layout"]["title"]["text"] == "Trade-off on qa")
    traces = {t.get("name"): t for t in tradeoff["data"]}
    hollow = traces["eep (top-2), stopped"]  # the stopped search: a hollow marker, labelled, never a line
    assert hollow["marker"]["symbol"].endswith("-open") and hollow["mode"] == "markers+text"
    assert f"stopped after {stopped.extra['evaluations']} evaluations" in hollow["text"]
    assert "lines" not in traces.get("eep (top-2)", {"mode": ""})["mode"]  # one setting: a point, not a line
    assert 0.0 not in plotly_values(traces["frequency (top-2)"]["x"])  # lines never start at the full model
    assert any(b.label.startswith("Run EEP") for b in app.button)  # and it can be resumed:
    app.button(key="run_search").click().run()  # the search continues (before, it returned the same plan at once)
    until(app, lambda: app.get("progress") and app.button(key="stop_search"), timeout=60)
    time.sleep(2)
    app.button(key="stop_search").click().run()
    until(app, lambda: any(w.value.startswith("Stopped") for w in app.warning)
          and app.session_state["plan"] is not stopped)
    resumed = app.session_state["plan"]
    assert resumed.extra["evaluations"] > stopped.extra["evaluations"]

    broken = write_lm_task(tmp_path / "broken", ["x"], splits=("calibration",))  # no test split
    app.session_state["extra_tasks"] = [str(broken)]
    app.selectbox(key="prune_method").set_value("frequency").run()
    app.multiselect(key="prune_tasks").set_value(["qa", str(broken)]).run()
    assert not app.exception
    assert any("Evaluation" in e.value for e in app.error)


def export_button(app):
    return next(b for b in app.button if b.label == "Export checkpoint")


def test_export_page_writes_the_checkpoint_and_refuses_an_existing_directory(app, tmp_path):
    goto(app, "export")
    assert any("No plan yet" in i.value for i in app.info)
    goto(app, "prune")  # makes the default plan (frequency, 4 of 8)
    goto(app, "export")
    assert app.subheader[0].value.startswith("frequency: 4 of 8 experts kept per layer")  # words, not a hash
    out = tmp_path / "pruned"
    app.text_input[0].input(str(out)).run()
    export_button(app).click().run()
    assert any(f"Wrote {out}" in s.value for s in app.success)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
    export_button(app).click().run()
    assert not app.exception
    errors = [e.value.replace("\\", "") for e in app.error]
    assert any("exists" in e and 'tick "Replace an earlier export at this path"' in e for e in errors), errors
    assert not any("--overwrite" in e for e in errors)  # the page's checkbox, not the CLI's flag
    boxes = [b for b in app.main if type(b).__name__ in ("Status", "Expander")]
    assert not any(b.error for b in boxes)  # the message is shown expanded, not in the collapsed status box
    app.checkbox(key="export_overwrite").check().run()
    export_button(app).click().run()
    assert any(f"Wrote {out}" in s.value for s in app.success)


def test_the_plan_survives_a_reload(app, dashboard_home_copy):
    goto(app, "prune")  # makes the default plan (frequency, 4 of 8)
    made = app.session_state["plan"]
    reloaded = AppTest.from_file(APP, default_timeout=300)  # a browser reload: a new session, same server home
    reloaded.run()
    goto(reloaded, "export")
    assert not any("No plan yet" in i.value for i in reloaded.info)
    assert any("Restored the latest plan" in i.value for i in reloaded.info)
    assert reloaded.session_state["plan"].digest() == made.digest()
    assert reloaded.subheader[0].value.startswith("frequency: 4 of 8 experts kept per layer")
