"""Dashboard latency in headless Chromium (CPU), as a user feels it.

* **first paint** of each page on a cold server (the first visit imports PyTorch, loads the model and records
  the sample tasks' profile): seconds from the click until the page shows something (its title, a spinner or
  a progress bar), and until it is complete; the same on a second, warm visit;
* **slider moves** on the Prune page: a user drags "experts kept" back and forth across the range one or two
  steps at a time and reads each result for ``--think`` seconds (while the dashboard scores the neighbouring
  settings in the background). Seconds from releasing the mouse until the page shows the new setting's
  scores and has finished running; the median over every move, over settings the page had not shown before,
  and over returns to settings it had.

    python -m benchmarks.dashboard_latency [--model PATH] [--think 1.5] [--out FILE.json]

``--model`` takes a saved model (default: the sample model); ``--model 24x128`` builds the tiny random 24-layer
x 128-expert top-8 model of the browser tests. Run it from the repository root (it uses the tests' browser
helpers, ``tests.browser``) with MoEScope installed (``make setup``) and /usr/bin/chromium.
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
         "Tokens": "Chance level", "Prune": "Parameters", "Plans": "Plans", "Compare profiles": "Compare profiles",
         "Export": "Write the pruned checkpoint"}
TIMEOUT = 600_000
PAINTED = ("() => document.querySelectorAll('[data-testid=\"stMain\"] [data-testid=\"stElementContainer\"]')"
           ".length > 0")


def visit(page, title: str) -> tuple[float, float]:
    """(first paint, complete) seconds after clicking ``title`` in the sidebar."""
    start = time.perf_counter()
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.wait_for_function(PAINTED, timeout=TIMEOUT, polling=20)
    painted = time.perf_counter() - start
    page.get_by_text(PAGES[title]).first.wait_for(timeout=TIMEOUT)
    wait_for_app(page, TIMEOUT)
    return painted, time.perf_counter() - start


ESTIMATE = ("[...document.querySelectorAll('[data-testid=\"stMarkdownContainer\"]')]"
            ".some(e => e.innerText.startsWith('First estimate'))")
NAME = ("() => ([...document.querySelectorAll('[data-testid=\"stMarkdownContainer\"]')]"
        ".map(e => e.innerText).find(t => /^frequency: \\d+ of \\d+ experts kept/.test(t)) || '')")


def step(page, option: int, options: int) -> tuple[int, float, float, float]:
    """Drag the "experts kept" thumb to ``option`` (of ``options``), as a user does: (the number kept it landed
    on, and seconds from releasing the mouse until the page shows a first estimate of the new setting's scores
    or its final scores, until it shows the final scores under the new plan's name — the name and the score
    table come in one update — and until the page has also redrawn its charts and finished)."""
    track = page.get_by_test_id("stSlider").first
    rail = track.locator('[role="group"] > div').first.bounding_box()
    knob = track.locator('[role="group"] > div > div').nth(1).bounding_box()
    y = knob["y"] + knob["height"] / 2
    before = page.evaluate(NAME)
    page.mouse.move(knob["x"] + knob["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(rail["x"] + rail["width"] * option / (options - 1), y, steps=5)
    start = time.perf_counter()
    page.mouse.up()
    page.wait_for_function(f"b => ({NAME})() !== b || {ESTIMATE}", arg=before, timeout=TIMEOUT, polling=10)
    first = time.perf_counter() - start
    page.wait_for_function(f"b => ({NAME})() !== b", arg=before, timeout=TIMEOUT, polling=10)
    metrics = time.perf_counter() - start
    page.wait_for_function("() => document.querySelector('[data-testid=\"stApp\"]').dataset.testScriptState "
                           "=== 'notRunning'", timeout=TIMEOUT, polling=10)
    return int(page.evaluate(NAME).split()[1]), first, metrics, time.perf_counter() - start


def model_path(spec: str | None, folder: Path) -> str:
    if spec is None:
        return str(ROOT / "sample_data" / "model")
    if spec in ("24x128", "8x256"):
        from tests.large_shapes import save_shape
        return str(save_shape(spec, folder))
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a saved model, or 24x128 / 8x256 (tiny random models); default: the sample")
    ap.add_argument("--think", type=float, default=1.5, help="seconds a user reads each result before moving on")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_dashboard_latency.json"))
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    model = model_path(a.model, home)
    env = {"MOESCOPE_HOME": str(home), "MOESCOPE_MODEL": model}
    with browser_page(1400, 1000) as page, streamlit_server(ROOT / "dashboard" / "app.py", env) as url:
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function(PAINTED, timeout=TIMEOUT, polling=20)
        cold = {"Model & data": (time.perf_counter() - start, None)}
        page.get_by_text(PAGES["Model & data"]).first.wait_for(timeout=TIMEOUT)
        wait_for_app(page, TIMEOUT)
        cold["Model & data"] = (cold["Model & data"][0], time.perf_counter() - start)
        cold.update({title: visit(page, title) for title in list(PAGES)[1:]})
        warm = {title: visit(page, title) for title in PAGES}
        visit(page, "Prune")
        from core.model import load_model
        from core.workbench import Workbench
        keeps = Workbench(load_model(model), look_ahead=False).feasible_keeps()  # the slider's options
        n = keeps[-1]
        at = keeps.index(min(keeps, key=lambda e: abs(e - n / 2)))
        # back and forth across the range, one or two settings at a time, as a user explores it
        path, i, direction = [], at, -1
        for stride in (1, 1, 1, 2, 1, 2, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1):
            if not 0 <= i + direction * stride < len(keeps):
                direction = -direction
            i += direction * stride
            path.append(i)
        seen, moves = {keeps[at]}, []
        for i in path:
            time.sleep(a.think)
            keep, first, seconds, complete = step(page, i, len(keeps))
            moves.append({"keep": keep, "seen_before": keep in seen, "first_estimate_s": first, "seconds": seconds,
                          "complete_s": complete})
            seen.add(keep)
    new = [m["seconds"] for m in moves if not m["seen_before"]]
    old = [m["seconds"] for m in moves if m["seen_before"]]
    result = {"model": model, "experts": n,
              "first_paint_cold_s": {t: v[0] for t, v in cold.items()},
              "complete_cold_s": {t: v[1] for t, v in cold.items()},
              "first_paint_warm_s": {t: v[0] for t, v in warm.items()},
              "complete_warm_s": {t: v[1] for t, v in warm.items()},
              "moves": moves, "median_move_s": statistics.median(m["seconds"] for m in moves),
              "median_new_s": statistics.median(new) if new else None,
              "median_seen_s": statistics.median(old) if old else None,
              "median_move_complete_s": statistics.median(m["complete_s"] for m in moves),
              "median_first_estimate_s": statistics.median(m["first_estimate_s"] for m in moves),
              "max_first_estimate_s": max(m["first_estimate_s"] for m in moves),
              "think_s": a.think,
              "setup": "CPU, Prune page defaults (frequency, calibration qa, evaluate qa on 50 test examples, "
                       "agreement off); headless Chromium 1400x1000"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "moves"}, indent=2))


if __name__ == "__main__":
    main()
