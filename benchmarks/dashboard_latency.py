"""Dashboard latency in headless Chromium on the sample model (CPU), as a user feels it.

* time to first render of each page: cold (first visit in a fresh server: includes loading the model and
  recording the first profile) and warm (second visit);
* seconds from a change of "experts kept" on the Prune page (dragging the slider) to updated metrics (the
  page names the new plan and has finished running), median over settings not seen before and over returns
  to settings already seen (served from the plan and result caches).

    python -m benchmarks.dashboard_latency [--out benchmarks/results/cpu_dashboard_latency.json]

Run it from the repository root (it uses the tests' browser helpers, ``tests.browser``) with MoEScope installed (``pip install -e .``; ``make setup`` does it)
and the dev extras (playwright, /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tests.browser import ROOT, browser_page, streamlit_server, wait_for_app

PAGES = {"Model & data": "Experts per layer", "Profile": "Active profile", "Utilization": "Selected expert",
         "Tokens": "Chance level", "Prune": "Parameters", "Export": "Write the pruned checkpoint"}
TIMEOUT = 300_000


def visit(page, title: str) -> float:
    start = time.perf_counter()
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_text(PAGES[title]).first.wait_for(timeout=TIMEOUT)
    wait_for_app(page, TIMEOUT)
    return time.perf_counter() - start


CAPTION = "[...document.querySelectorAll('[data-testid=\"stCaptionContainer\"]')].map(e => e.innerText)" \
          ".find(t => t.startsWith('Evaluated in'))"


def evaluated(page) -> str:
    """The caption under the metrics: it names the plan's digest, so it changes with every setting."""
    return page.evaluate(f"() => {CAPTION}")


def step(page, option: int, options: int) -> float:
    """Drag the "experts kept" thumb to ``option`` (of ``options``), as a user does; seconds from releasing
    the mouse until the page shows the new plan's scores and has finished running."""
    track = page.get_by_test_id("stSlider").first
    rail = track.locator('[role="group"] > div').first.bounding_box()
    knob = track.locator('[role="group"] > div > div').nth(1).bounding_box()
    y = knob["y"] + knob["height"] / 2
    before = evaluated(page)
    page.mouse.move(knob["x"] + knob["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(rail["x"] + rail["width"] * option / (options - 1), y, steps=5)
    start = time.perf_counter()
    page.mouse.up()
    page.wait_for_function(f"b => {CAPTION} !== b && "
                           "document.querySelector('[data-testid=\"stApp\"]').dataset.testScriptState === 'notRunning'",
                           arg=before, timeout=TIMEOUT, polling=20)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_dashboard_latency.json"))
    a = ap.parse_args()
    home = tempfile.mkdtemp(prefix="moescope-bench-")
    with browser_page(1400, 1000) as page, streamlit_server(ROOT / "dashboard" / "app.py", {"MOESCOPE_HOME": home}) as url:
        start = time.perf_counter()
        page.goto(url)
        page.get_by_text(PAGES["Model & data"]).first.wait_for(timeout=TIMEOUT)
        wait_for_app(page, TIMEOUT)
        cold = {"Model & data": time.perf_counter() - start}
        cold.update({title: visit(page, title) for title in list(PAGES)[1:]})
        warm = {title: visit(page, title) for title in PAGES}
        visit(page, "Prune")
        # options are keep 2..8 (index 0..6); the page opens at keep 4 (index 2), already evaluated
        new = [step(page, i, 7) for i in (0, 1, 3, 4, 5, 6)]
        seen = [step(page, i, 7) for i in (2, 0, 4, 1, 5, 3)]
    result = {"first_render_cold_s": cold, "first_render_warm_s": warm,
              "ratio_change_new_setting_s": new, "ratio_change_seen_setting_s": seen,
              "median_new_s": statistics.median(new), "median_seen_s": statistics.median(seen),
              "median_all_s": statistics.median(new + seen),
              "setup": "sample model, CPU, Prune page defaults (frequency, calibration qa, evaluate qa on 50 test examples, agreement off; "
                       "headless Chromium 1400x1000"}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
