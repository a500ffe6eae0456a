"""Every dashboard page in headless Chromium at three model shapes: the sample model (4 MoE layers × 8 experts,
top-2), a Qwen3-30B-A3B-like 24 × 128 top-8, and a DeepSeek-V3-like 8 × 256 top-8 with grouped routing (tiny
random weights, real shapes: tests/large_shapes.py). Each page must render without an exception or an error
box, and a square of the Utilization heatmap must select its expert when clicked. Pages are found in the
sidebar, so a page added later is covered too. With $MOESCOPE_SCREENSHOTS set, every page of the large shapes
is saved there as ``<page>-<shape>.png`` (and the sample's Plans and Compare pages), which is how the images in
docs/screenshots are made."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.browser import ROOT, browser_page, streamlit_server, wait_for_app
from tests.large_shapes import dashboard_home_for, save_shape

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SLOW = 300_000  # ms: a first visit loads the model, aggregates its profile or calibrates


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def settle(page) -> None:
    """Wait until the run a click started has finished (it may not have started yet when we look)."""
    try:
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="running"]', timeout=1500)
    except Exception:  # noqa: BLE001 - a quick run can finish before we look: then it is not running
        pass
    wait_for_app(page, SLOW)
    page.wait_for_timeout(300)


def problems(page) -> list[str]:
    """Exceptions and error boxes on the page, as text."""
    return page.evaluate("""() => [...document.querySelectorAll(
        '[data-testid="stException"], [data-testid="stAlertContentError"]')].map(e => e.innerText.slice(0, 300))""")


@pytest.mark.parametrize("shape", ["4x8", "24x128", "8x256"])
def test_every_page_renders_and_a_square_clicks(shape, tmp_path, dashboard_home_copy):
    if shape == "4x8":
        model, home = ROOT / "sample_data" / "model", dashboard_home_copy
    else:
        model = save_shape(shape, tmp_path)
        home = dashboard_home_for(model, tmp_path / "home")
    shots = Path(os.environ.get("MOESCOPE_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    env = {"MOESCOPE_HOME": str(home), "MOESCOPE_MODEL": str(model)}
    with browser_page(width=1400, height=1400) as page, streamlit_server(ROOT / "dashboard" / "app.py", env) as url:
        page.goto(url)
        page.get_by_test_id("stSidebarNav").wait_for(timeout=SLOW)
        settle(page)
        titles = [t.strip().splitlines()[-1].strip() for t in  # each link reads "icon name\n\ntitle"
                  page.get_by_test_id("stSidebarNav").locator("a").all_inner_texts()]
        assert {"Model & data", "Utilization", "Prune", "Export"} <= set(titles), titles
        for title in titles:
            page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
            page.get_by_role("heading", name=title if title != "Model & data" else re.compile("Model")).first \
                .wait_for(timeout=SLOW)
            settle(page)
            assert not problems(page), (shape, title, problems(page))
            if title == "Utilization":
                click_a_square(page, shape)
            if shape != "4x8" or title in ("Plans", "Compare profiles"):
                page.wait_for_timeout(500)  # let Plotly finish drawing
                name = slug(title) if shape == "4x8" else f"{slug(title)}-{shape}"
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def click_a_square(page, shape: str) -> None:
    """Click a cell of the usage heatmap, as a user does, and check the page selects that cell's expert."""
    grid = page.locator(".js-plotly-plot").first
    grid.wait_for(timeout=SLOW)
    before = chosen(page)
    n_experts = {"4x8": 8, "24x128": 128, "8x256": 256}[shape]
    point = grid.locator(".scatterlayer .trace").first.locator("path.point").nth(n_experts + 5)  # row 1, column 5
    want = point.evaluate("el => Array.from(el.closest('.js-plotly-plot')._fullData[0].customdata[el.__data__.i])")
    layer, expert = int(want[0]), int(want[1])
    point.evaluate("el => el.scrollIntoView({block: 'center'})")  # clear of Streamlit's sticky header
    assert before != (layer, expert)
    box = point.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    # at 128 and 256 experts Streamlit narrows the grid to the page's column: when cells were pixel-sized markers
    # they overlapped, and this click picked the neighbouring expert (seen at 24 x 128)
    page.wait_for_function(
        """([layer, expert]) => ['Layer', 'Expert'].map(label =>
             document.querySelector(`input[role="combobox"][aria-label="${label}"]`)?.value).join()
             === `${layer},${expert}`""",
        arg=[layer, expert], timeout=60_000)
    settle(page)
    assert chosen(page) == (layer, expert)


def chosen(page) -> tuple[int, int]:
    """The (layer, expert) in the Selected expert boxes under the heatmap."""
    def value(label: str) -> int:  # a select box shows its choice as the value of its combobox input
        return int(page.locator(f'input[role="combobox"][aria-label="{label}"]').first.input_value())
    return value("Layer"), value("Expert")
