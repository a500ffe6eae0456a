"""The dashboard's charts say only what was measured, in fixed colours: the trade-off chart joins settings
actually scored, marks a stopped search, gives each method one colour whatever else is shown, and every chart
can be saved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import results
from core.plan import Plan
from dashboard import charts

from .test_results import fake_result


def sweep(rows: list[tuple[str, int, float, dict]]) -> pd.DataFrame:
    table = [results.plan_row(fake_result(metrics={"nll": 2.0}), None, 8, 2)]
    for method, keep, nll, extra in rows:
        plan = Plan(layers={0: list(range(keep))}, extra={"method": method, **extra})
        table.append(results.plan_row(fake_result(metrics={"nll": nll}), plan, 8, 2))
    return pd.DataFrame(table)


def traces(fig) -> dict[str, dict]:
    return {t.name: t.to_plotly_json() for t in fig.data}


def test_measured_tradeoff_draws_only_what_was_scored():
    table = sweep([("frequency", 6, 2.2, {}), ("frequency", 4, 3.0, {}), ("eep", 4, 2.6, {}),
                   ("eep", 2, 4.0, {"cancelled": True, "evaluations": 3})])
    full, points = results.measured_tradeoff([table], "t", "nll", split="test", examples=3)
    assert full == 2.0
    assert 0.0 not in points["removed"].tolist()  # no line is made to start at the full model
    stopped = points[points["stopped"]]
    assert stopped["method"].tolist() == ["eep"] and stopped["evaluations"].tolist() == [3]
    assert results.measured_tradeoff([pd.DataFrame()], "t", "nll") [0] is None


def test_tradeoff_chart_joins_only_measured_settings_and_marks_stopped_searches():
    table = sweep([("frequency", 6, 2.2, {}), ("frequency", 4, 3.0, {}), ("reap", 4, 2.6, {}),
                   ("eep", 2, 4.0, {"cancelled": True, "evaluations": 3})])
    fig = charts.tradeoff(*results.measured_tradeoff([table], "t", "nll"), "nll", "t", current=(0.5, 3.0))
    shown = traces(fig)
    assert shown["frequency (top-2)"]["mode"] == "lines+markers"
    assert list(shown["frequency (top-2)"]["x"]) == [0.25, 0.5]  # not from the full model at 0
    assert shown["reap (top-2)"]["mode"] == "markers"  # one ratio tried: a point, not a line
    assert "eep (top-2)" not in shown  # a stopped search is no line
    stopped = shown["eep (top-2), stopped"]
    assert stopped["marker"]["symbol"].endswith("-open") and list(stopped["text"]) == ["stopped after 3 evaluations"]
    assert shown["full model"]["mode"] == "markers"


def test_a_method_keeps_its_colour_whatever_else_is_shown():
    alone = sweep([("frequency", 6, 2.2, {}), ("frequency", 4, 3.0, {})])
    more = sweep([("frequency", 6, 2.2, {}), ("frequency", 4, 3.0, {}), ("eep", 4, 2.6, {}),
                  ("random", 4, 5.0, {}), ("soft_activation", 4, 2.9, {})])
    colour = {}
    for name, table in (("alone", alone), ("more", more)):
        fig = charts.tradeoff(*results.measured_tradeoff([table], "t", "nll"), "nll", "t")
        colour[name] = traces(fig)["frequency (top-2)"]["marker"]["color"]
    assert colour["alone"] == colour["more"] == charts.method_colour("frequency")
    named = [charts.method_colour(m) for m in charts.METHOD_STYLE]
    assert len(set(named)) == len(named)  # every known method its own colour
    assert charts.method_colour("from-a-table") == charts.method_colour("from-a-table")


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_expert_colours_are_distinguishable():
    """No two of the first 16 experts' colours are close (the old palette put near-black beside dark purple)."""
    colours = [charts.expert_colour(e) for e in range(16)]
    assert len(set(colours)) == 16
    for i, a in enumerate(colours):
        for b in colours[i + 1:]:
            assert sum((x - y) ** 2 for x, y in zip(_rgb(a), _rgb(b))) ** 0.5 > 60, (a, b)
    assert all(sum(_rgb(c)) > 120 for c in colours)  # none near-black
    first = colours[:8]  # a small model's experts differ more still (the Tokens page shows them as pale tints)
    assert min(sum((x - y) ** 2 for x, y in zip(_rgb(a), _rgb(b))) ** 0.5
               for i, a in enumerate(first) for b in first[i + 1:]) > 75


@pytest.mark.parametrize("name", ["tradeoff-qa", "usage"])
def test_charts_can_be_saved(name):
    config = charts.download_config(name)
    assert config["displayModeBar"] and config["toImageButtonOptions"]["format"] in ("png", "svg")
    assert "toImage" not in config["modeBarButtonsToRemove"]


def _usage_grid(n_layers: int, n_experts: int) -> pd.DataFrame:
    layers, experts = np.meshgrid(np.arange(n_layers), np.arange(n_experts), indexing="ij")
    return pd.DataFrame({"layer": layers.ravel(), "expert": experts.ravel(),
                         "share": np.random.default_rng(0).random(n_layers * n_experts)})


@pytest.mark.parametrize("n_layers, n_experts", [(4, 8), (24, 128), (8, 256), (61, 256)])
def test_expert_grid_sizes_itself_to_the_model(n_layers, n_experts):
    fig = charts.expert_grid(_usage_grid(n_layers, n_experts), "share", "t", "share",
                             dropped=[(0, 1)], row_notes={i: "50% kept" for i in range(n_layers)})
    margin = fig.layout.margin
    plot_h, plot_w = fig.layout.height - margin.t - margin.b, fig.layout.width - margin.l - margin.r
    row, col = plot_h / n_layers, plot_w / n_experts
    assert fig.layout.height <= 1100 and fig.layout.width <= 1700  # height follows the layers
    # 8 x 256 was a 4-pixel strip with overlapping colour-bar ticks: rows now stay tall enough to read and click
    assert row >= (22 if n_layers <= 40 else 14) and plot_h >= 88
    clicks, cells = fig.data[0], next(t for t in fig.data if t.type == "heatmap" and t.name == "cells")
    # cells are drawn in data units (a heatmap), so they stay under their click points however wide Streamlit
    # makes the figure; they touch at density
    assert cells.z.shape == (n_layers, n_experts) and list(cells.x) == list(range(n_experts))
    assert (cells.xgap, cells.ygap) == ((0, 0) if n_experts >= 128 else (2, 2))
    # curve 0 (the pages read clicks from it) has one invisible point per cell, naming its layer and expert
    assert clicks.type == "scatter" and clicks.marker.opacity == 0 and len(clicks.customdata) == n_layers * n_experts
    layer, expert = clicks.customdata[n_experts + 5][:2]
    assert (layer, expert) == (1, 5) and cells.z[1][5] == clicks.customdata[n_experts + 5][2]
    labels = fig.layout.yaxis.ticktext
    assert len(labels) * 16 <= n_layers * row + 16  # at least 16 px per label: they never overlap
    assert labels[0] == "0 · 50% kept"
    x_labels = (n_experts - 1) // fig.layout.xaxis.dtick + 1
    narrowest = charts.NARROWEST_GRID / n_experts  # the column width once Streamlit fits the grid to a laptop page
    assert x_labels * 36 <= n_experts * min(col, narrowest) + 36 and fig.layout.xaxis.tickangle == 0
    veil = next(t for t in fig.data if t.name == "dropped")
    assert all(c.startswith("rgba(255,255,255") for _, c in veil.colorscale)  # dimmed, the same shape as the cell
    assert np.argwhere(~np.isnan(np.array(veil.z, float))).tolist() == [[0, 1]]


def test_ranked_colours_skip_grey_and_differ():
    colours = [charts.ranked_colour(i) for i in range(12)]
    assert len(set(colours)) == 12 and charts.OTHER_EXPERTS not in colours and "#7F7F7F" not in colours
