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
    """The Prune page's score table (each task's headline score beside the full model's)."""
    return page.get_by_test_id("stTable").first.inner_text()


def trace_colours(page, title: str) -> dict[str, str]:
    """Each trace's marker colour in the Plotly chart titled ``title``, as Plotly drew it."""
    return page.evaluate("""t => {
        const plot = [...document.querySelectorAll('.js-plotly-plot')]
            .find(p => p._fullLayout && p._fullLayout.title && p._fullLayout.title.text.replace(/<[^>]+>/g, '') === t);
        return plot ? Object.fromEntries(plot._fullData.map(d => [d.name, d.marker.color])) : {};
    }""", title)


def add_task(page, name: str) -> None:
    """Add ``name`` to the Prune page's "Evaluation tasks" as a user does: open the list, type, Enter."""
    box = page.get_by_test_id("stMultiSelect").first
    box.click()
    page.keyboard.type(name)
    page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")
    wait_for_app(page, SLOW)


def cut_off_cells(page) -> list[str]:
    """The score table's cells whose text does not fit (ellipsis or hidden overflow)."""
    return page.evaluate("""() => [...document.querySelectorAll('[data-testid="stTable"] th, [data-testid="stTable"] td')]
        .filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.innerText)""")


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
        points.first.wait_for(state="attached", timeout=SLOW)  # cells are bars: a path with no area of its own
        assert points.count() == 4 * 8  # one square per (MoE layer, expert)
        cell = points.nth(2 * 8 + 5)  # row 2, column 5
        cell.evaluate("el => el.scrollIntoView({block: 'center'})")  # clear of Streamlit's sticky header
        page.mouse.click(*centre(cell))  # as a user clicks: Plotly reads the pointer position
        page.get_by_text("(layer 2, expert 5)").wait_for(timeout=SLOW)
        wait_for_app(page, SLOW)
        shoot(page, shots, "utilization")

        open_page(page, "Tokens", "Chance level")
        shoot(page, shots, "tokens")

        open_page(page, "Prune", "Trade-off on qa")
        page.locator(".js-plotly-plot").last.wait_for(timeout=SLOW)
        blue = trace_colours(page, "Trade-off on qa")
        before = headline(page)
        track = page.get_by_test_id("stSlider").first  # "Experts kept per layer"
        x, y = centre(track.get_by_role("slider"))
        page.mouse.move(x, y)
        page.mouse.down()  # drag the thumb to the left end: fewest experts kept
        page.mouse.move(track.bounding_box()["x"] + 2, y, steps=8)
        page.mouse.up()
        page.wait_for_function("b => document.querySelector('[data-testid=\"stTable\"]').innerText !== b",
                               arg=before, timeout=SLOW)
        wait_for_app(page, SLOW)
        after = headline(page)
        assert after != before
        assert re.search(r"2 of 8", page.get_by_test_id("stSlider").first.inner_text())
        assert "Full model" in after and not cut_off_cells(page)
        page.set_viewport_size({"width": 1400, "height": 2400})  # the page scrolls inside Streamlit: show it all
        shoot(page, shots, "prune")
        # a second method joins the chart: the first keeps its colour (it used to move with the set shown)
        page.get_by_test_id("stSelectbox").first.click()
        page.get_by_role("option", name="Random").first.click()
        page.get_by_text("random: 2 of 8 experts kept").wait_for(timeout=SLOW)
        wait_for_app(page, SLOW)
        colours = trace_colours(page, "Trade-off on qa")
        assert colours.get("frequency (top-2)") == blue.get("frequency (top-2)") == "#0072B2", (colours, blue)
        assert colours["random (top-2)"] not in (colours["frequency (top-2)"], "#0072B2")
        # the heatmaps and the trade-off chart can be saved: Plotly's mode bar with its download button
        assert page.locator(".modebar-btn[data-title*='png' i]").count() >= 2
        for name in ("arithmetic", "code", "prose"):  # four evaluation tasks: nothing in the table is cut off
            add_task(page, name)
        page.get_by_text("Trade-off on prose").wait_for(timeout=SLOW)
        wait_for_app(page, SLOW)
        table = headline(page)
        assert all(t in table for t in ("qa", "arithmetic", "code", "prose", "Full model")), table
        assert not cut_off_cells(page)
        shoot(page, shots, "prune-4-tasks")
        page.set_viewport_size({"width": 1400, "height": 1500})

        open_page(page, "Export", "Write the pruned checkpoint")
        page.get_by_role("button", name="Export checkpoint").click()
        page.get_by_test_id("stAlertContentSuccess").get_by_text("Wrote ").wait_for(timeout=SLOW)
        shoot(page, shots, "export")
    assert {"model", "profile", "utilization", "tokens", "prune", "prune-4-tasks", "export"} <= \
        {p.stem for p in shots.glob("*.png")}  # the folder may hold other tests' images (docs/screenshots)
