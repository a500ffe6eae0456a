"""The dashboard in a real headless Chromium: start it, visit every page, click a square of the heatmap,
move the pruning ratio and see the scores change, export. Saves a screenshot per page (to
$MOESCOPE_SCREENSHOTS when set: that is how the README's images are made)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.browser import ROOT, browser_page, streamlit_server, wait_for_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGES = ["Model & data", "Profile", "Utilization", "Tokens", "Prune", "Export"]
SLOW = 180_000  # ms: first visits load the model and record a profile


def shoot(page, folder: Path, name: str) -> None:
    page.wait_for_timeout(800)  # let Plotly finish drawing
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def open_page(page, title: str, shows: str) -> None:
    """Click a page in the sidebar and wait until it shows the text ``shows`` and has finished running."""
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_text(shows).first.wait_for(timeout=SLOW)
    wait_for_app(page, SLOW)


def centre(locator) -> tuple[float, float]:
    box = locator.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def headline(page) -> str:
    """The first metric on the Prune page (the calibration task's headline score) and its delta."""
    return page.get_by_test_id("stMetric").first.inner_text()


def test_every_page_in_chromium(tmp_path, dashboard_home_copy):
    shots = Path(os.environ.get("MOESCOPE_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    env = {"MOESCOPE_HOME": str(dashboard_home_copy)}  # the sample profile is already recorded
    with browser_page(width=1400, height=1500) as page, streamlit_server(ROOT / "dashboard" / "app.py", env) as url:
        page.goto(url)
        page.get_by_text("Experts per layer").wait_for(timeout=SLOW)
        wait_for_app(page, SLOW)
        shoot(page, shots, "model")

        open_page(page, "Profile", "Active profile")
        shoot(page, shots, "profile")

        open_page(page, "Utilization", "Selected expert")
        points = page.locator(".js-plotly-plot .scatterlayer .trace").first.locator("path.point")
        points.first.wait_for(timeout=SLOW)
        assert points.count() == 4 * 8  # one square per (MoE layer, expert)
        cell = points.nth(2 * 8 + 5)  # row 2, column 5
        cell.evaluate("el => el.scrollIntoView({block: 'center'})")  # clear of Streamlit's sticky header
        page.mouse.click(*centre(cell))  # as a user clicks: Plotly reads the pointer position
        page.get_by_text("(layer 2, expert 5)").wait_for(timeout=SLOW)
        wait_for_app(page, SLOW)
        shoot(page, shots, "utilization")

        open_page(page, "Tokens", "Chance level")
        shoot(page, shots, "tokens")

        open_page(page, "Prune", "qa · exact_match")
        before = headline(page)
        track = page.get_by_test_id("stSlider").first  # "Experts kept per layer"
        x, y = centre(track.get_by_role("slider"))
        page.mouse.move(x, y)
        page.mouse.down()  # drag the thumb to the left end: fewest experts kept
        page.mouse.move(track.bounding_box()["x"] + 2, y, steps=8)
        page.mouse.up()
        page.wait_for_function("b => document.querySelector('[data-testid=\"stMetric\"]').innerText !== b",
                               arg=before, timeout=SLOW)
        wait_for_app(page, SLOW)
        after = headline(page)
        assert after != before
        assert re.search(r"2 of 8", page.get_by_test_id("stSlider").first.inner_text())
        shoot(page, shots, "prune")

        open_page(page, "Export", "Write the pruned checkpoint")
        page.get_by_role("button", name="Export checkpoint").click()
        page.get_by_test_id("stAlertContentSuccess").get_by_text("Wrote ").wait_for(timeout=SLOW)
        shoot(page, shots, "export")
    assert sorted(p.stem for p in shots.glob("*.png")) == sorted(["model", "profile", "utilization", "tokens",
                                                                   "prune", "export"])
