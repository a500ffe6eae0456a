"""The shareable HTML report: every section, nothing fetched by URL, written by the CLI (refusing to replace a
file it did not write), and rendered offline in Chromium."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from core.cli import main
from core.plan import Plan
from core.report import SECTIONS, build_report_data
from core.routing_profile import Profile
from dashboard.report import report_html


@pytest.fixture()
def inputs(dashboard_home, tmp_path) -> dict[str, Path]:
    """The sample model's profile, a plan keeping half the experts, and a sweep table evaluating it."""
    source = next((dashboard_home / "dashboard" / "profiles").glob("*-sample-tasks.parquet"))
    profile = tmp_path / "profile.parquet"
    shutil.copy(source, profile)
    shutil.copy(source.with_suffix(".json"), profile.with_suffix(".json"))
    meta = Profile(profile).meta
    plan = Plan({layer: list(range(meta.n_experts // 2)) for layer in meta.layers}, extra={"method": "frequency"})
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    n, k = meta.n_experts, meta.top_k
    rows = [{"method": "full", "keep": n, "top_k": k, "eval_task": "qa", "split": "test", "examples": 10,
             "plan_digest": None, "metric_exact_match": 0.6, "total_params": 1000, "total_params_full": 1000,
             "active_params": 400, "active_params_full": 400, "weight_bytes": 4000},
            {"method": "frequency", "keep": n // 2, "top_k": k, "eval_task": "qa", "split": "test", "examples": 10,
             "plan_digest": plan.digest(), "metric_exact_match": 0.5, "total_params": 700,
             "total_params_full": 1000, "active_params": 400, "active_params_full": 400, "weight_bytes": 2800}]
    results = tmp_path / "sweep.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    return {"profile": profile, "plan": plan_path, "results": results}


def _outside_scripts(page: str) -> str:
    """The document without the bodies of inline scripts (Plotly's bundle quotes attribution links as strings)."""
    return re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", page, flags=re.S | re.I)


def test_report_has_every_section_and_no_external_url(inputs):
    data = build_report_data(inputs["profile"], [inputs["plan"]], inputs["results"], out="r.html")
    page = report_html(data)
    for key, heading in SECTIONS.items():
        assert f'<section id="{key}"><h2>{heading}</h2>' in page
    assert "Trade-off on qa" in page  # the sweep's task charted
    assert "parameters: 30.0% smaller" in page and "active parameters per token: unchanged" in page
    assert Plan.load(inputs["plan"]).digest() in page and data.digests["profile fingerprint"] in page
    assert page.count("<script") >= 1 and page.count("Plotly.newPlot") >= 6
    markup = _outside_scripts(page)
    assert not re.search(r"<script[^>]*\bsrc\s*=", markup, re.I)
    assert not re.search(r"\b(?:src|href|action)\s*=\s*[\"']?\s*(?:https?:)?//", markup, re.I)
    assert not re.search(r"url\(\s*[\"']?\s*(?:https?:)?//|@import", markup, re.I)
    assert "<link" not in markup.lower()


def test_cli_writes_report_and_refuses_existing_file(inputs, tmp_path, capsys):
    out = tmp_path / "report.html"
    args = ["report", "--profile", str(inputs["profile"]), "--plan", str(inputs["plan"]),
            "--results", str(inputs["results"]), "--out", str(out)]
    assert main(args) == 0
    assert out.stat().st_size > 1_000_000  # Plotly's JavaScript is inlined
    first = out.read_text()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and len(err.splitlines()) == 1
    assert main([*args, "--overwrite"]) == 0
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>mine</html>")
    assert main([*args[:-1], str(foreign), "--overwrite"]) == 2  # not a MoEScope report: kept
    assert foreign.read_text() == "<html>mine</html>" and out.read_text().startswith(first[:200])


def test_cli_report_bad_inputs_one_line(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--profile", str(tmp_path / "missing.parquet"), "--out", str(out)]) == 2
    assert main(["report", "--profile", str(inputs["profile"]), "--plan", str(tmp_path / "nope.json"),
                 "--out", str(out)]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", "--profile", str(inputs["profile"]), "--plan", str(bad), "--out", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error:") for e in errors)
    assert not out.exists()


@pytest.mark.browser
def test_report_renders_offline_in_chromium(inputs, tmp_path):
    from tests.browser import browser_page

    out = tmp_path / "report.html"
    assert main(["report", "--profile", str(inputs["profile"]), "--plan", str(inputs["plan"]),
                 "--results", str(inputs["results"]), "--out", str(out)]) == 0
    with browser_page() as page:
        requests, errors = [], []
        page.context.set_offline(True)

        def block(route):
            if not route.request.url.startswith("file://"):
                requests.append(route.request.url)
                route.abort()
            else:
                route.continue_()

        page.route("**/*", block)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(out.as_uri())
        page.wait_for_selector(".plotly .main-svg", timeout=30_000)
        rendered = page.locator(".js-plotly-plot").count()
        assert rendered == page.locator("div[id^=figure-]").count() >= 6
        assert page.locator(".js-plotly-plot .main-svg").count() >= rendered
        assert not errors and not requests, (errors, requests)
        if Path("docs/screenshots").is_dir():
            page.set_viewport_size({"width": 1300, "height": 900})
            page.screenshot(path=str(tmp_path / "report.png"), full_page=False)


@pytest.mark.slow  # runs the app in process
def test_export_page_builds_the_report(dashboard_home_copy, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOESCOPE_HOME", str(dashboard_home_copy))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("views/export.py").run()
    assert not at.exception, at.exception
    assert "report_html" not in at.session_state
    next(b for b in at.button if b.label == "Build report (HTML)").click().run()
    assert not at.exception, at.exception
    page = at.session_state["report_html"]
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    assert "Coverage curves on" in page


def test_reproduce_names_the_prune_command_from_the_plan_provenance():
    from core.report import prune_command

    plan = Plan({0: [0, 1], 1: [2, 3]}, top_k=1, extra={"method": "frequency", "seed": 3,
                                                      "calibration": {"task": "qa", "split": "calibration", "limit": 20}})
    assert prune_command(plan, "m", 8, "p.json") == ("moescope prune m --method frequency --keep 2 --top-k 1 "
                                                     "--task qa --split calibration --limit 20 --seed 3 --out p.json")
    assert prune_command(Plan({0: [0]}, extra={"method": "random"}), "m", 8, "p.json") is None  # no calibration
