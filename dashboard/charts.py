"""Plotly figures from precomputed tables (as bertviz does: the chart never runs a model).

The layer × expert grids are drawn by ``go.Heatmap`` (cells in data units, so they stay right when Streamlit
scales a figure to the page) under an invisible scatter, one point per cell: Streamlit returns no points for
clicks on a heatmap, and clicking a cell is how users pick an expert to inspect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

FONT = {"family": "Inter, system-ui, sans-serif", "size": 13}


# Okabe & Ito's colour-blind-safe qualitative palette.
OKABE_ITO = {"orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "black": "#000000"}
# Each method's fixed colour and marker, the same on every chart whichever methods are present. The methods a
# sweep compares (random, frequency, soft activation, REAP) get the four most distinct hues.
METHOD_STYLE = {
    "full": ("#000000", "diamond"),
    "random": ("#8C8C8C", "circle"),
    "frequency": (OKABE_ITO["blue"], "square"),
    "soft_activation": (OKABE_ITO["orange"], "triangle-up"),
    "reap": (OKABE_ITO["bluish green"], "diamond-wide"),
    "eep": (OKABE_ITO["vermillion"], "hexagon"),
    "naee": (OKABE_ITO["reddish purple"], "pentagon"),
    "dynamic_skip": (OKABE_ITO["sky blue"], "triangle-down"),
    "top_k": ("#B8A800", "cross"),  # Okabe-Ito yellow, darkened to show on white
}
# Paul Tol's muted palette: further fixed colours for methods from added tables.
_EXTRA = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499"]


def method_colour(method: str) -> str:
    """The fixed colour of ``method``; an unknown name gets a colour from its characters (stable across runs)."""
    if method in METHOD_STYLE:
        return METHOD_STYLE[method][0]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def method_symbol(method: str) -> str:
    return METHOD_STYLE.get(method, ("", "circle"))[1]


# Expert colours: Okabe-Ito (no black; vermillion held back, as a tint it looks like orange), then colours from
# Paul Tol's palettes chosen to be far (RGB distance > 60) from every other, so no two of the first 16 experts
# look alike, none is near-black, and the first 8 (a small model) differ even as the Tokens page's pale tints.
EXPERT_PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#CC79A7", "#663333", "#7F7F7F",
                  "#D55E00", "#332288", "#999933", "#AA3377", "#44AA99", "#117733", "#BBBBBB", "#17BECF"]


def expert_colour(expert: int) -> str:
    """A stable colour per expert id."""
    return EXPERT_PALETTE[expert % len(EXPERT_PALETTE)]


# For the most-used experts of a large model (the rest are grey): the palette without its two greys.
RANKED_PALETTE = [c for c in EXPERT_PALETTE if c not in ("#7F7F7F", "#BBBBBB")]
OTHER_EXPERTS = "#BDBDBD"


def ranked_colour(rank: int) -> str:
    """The colour of the ``rank``-th most used expert (rank < 14 all differ and none is grey)."""
    return RANKED_PALETTE[rank % len(RANKED_PALETTE)]


def _grid_size(n_experts: int, n_layers: int) -> tuple[float, float, int, int]:
    """Cell width and height, and the plot area's width and height, in pixels. Columns fill about 1100 pixels
    across (4 to 56 each); rows are square where the layers fit on one screen, never shorter than the columns
    are wide, and at least 22 pixels up to 40 layers (8 layers × 256 experts is a readable band, not a strip),
    14.75 pixels at 61 layers; so the colour bar always has room for its ticks."""
    width = float(np.clip(1100 / n_experts, 4, 56))
    height = float(np.clip(min(900 / n_layers, max(width, 22)), 12, 56))
    return width, height, round(n_experts * width), round(n_layers * height)


NARROWEST_GRID = 600  # px: the plot area of a grid narrowed to a laptop page's column, with the sidebar open


def _every(cell: float, room: float) -> int:
    """Label every n-th row or column so that labels ``room`` pixels apart do not overlap."""
    return max(1, int(np.ceil(room / cell)))


def expert_grid(df: pd.DataFrame, value: str, title: str, colorbar: str, diverging: bool = False,
                dropped: Sequence[tuple[int, int]] = (), selected: tuple[int, int] | None = None,
                value_format: str = ".1%", row_notes: dict[int, str] | None = None, x: str = "expert",
                x_title: str = "expert") -> go.Figure:
    """Layer × expert squares coloured by ``df[value]`` (columns layer, expert, value, and ``x`` when the
    columns are not expert ids, e.g. ``rank``).

    The grid sizes itself to the model: squares touch (no gaps) when they are small, row and column labels
    thin out so they never overlap. ``dropped`` (layer, expert) cells are dimmed; ``selected`` gets a dark
    outline; ``row_notes`` (layer -> text) are written beside each layer's row label. Every point carries
    (layer, expert, value) as customdata, so a click names the expert in any column order.
    """
    layers = sorted(df["layer"].unique())
    lo, hi = int(df[x].min()), int(df[x].max())
    n_cols = hi - lo + 1
    cell, row_height, width, height = _grid_size(n_cols, len(layers))
    gap = 0 if min(cell, row_height) < 14 else 2
    row = {layer: i for i, layer in enumerate(layers)}
    y = df["layer"].map(row)
    values = df[value].to_numpy(float)
    if diverging:
        bound = float(np.abs(values).max()) or 1.0
        colour = {"colorscale": "RdBu_r", "zmin": -bound, "zmax": bound}
    else:
        colour = {"colorscale": "Viridis", "zmin": 0.0, "zmax": float(values.max()) or 1.0}
    where = "rank %{x:d} · " if x != "expert" else ""
    cols = np.arange(lo, hi + 1)
    z = np.full((len(layers), n_cols), np.nan)
    z[y.to_numpy(), df[x].to_numpy(int) - lo] = values
    # Curve 0 takes the clicks and the hover: one invisible square per cell (the pages read a click's customdata).
    # The colours are a heatmap underneath: its cells are in data units, so they touch and stay under their
    # points whatever width Streamlit gives the figure (pixel-sized markers overlapped their neighbours when a
    # 128-expert grid was scaled to the page, and a click then picked the wrong expert or none).
    hidden = {"opacity": 0}
    fig = go.Figure(go.Scatter(
        x=df[x], y=y, mode="markers", name="",
        marker={"symbol": "square", "size": max(4.0, min(cell, row_height)), "opacity": 0, "color": "#000"},
        selected={"marker": hidden}, unselected={"marker": hidden},
        customdata=np.stack([df["layer"], df["expert"], values], axis=1),
        hovertemplate=f"layer %{{customdata[0]:d}} · {where}expert %{{customdata[1]:d}}<br>{colorbar}: "
                      f"%{{customdata[2]:{value_format}}}<extra></extra>"))
    fig.add_trace(go.Heatmap(
        x=cols, y=np.arange(len(layers)), z=z, name="cells", hoverinfo="skip", xgap=gap, ygap=gap, **colour,
        colorbar={"title": {"text": colorbar, "side": "right"}, "tickformat": value_format, "x": 1,
                  "xanchor": "left", "xpad": 10, "thickness": 18, "len": 1, "lenmode": "fraction"}))
    if len(dropped):  # dimmed under a pale veil, not crossed: readable at 256 experts
        d = pd.DataFrame(list(dropped), columns=["layer", "expert"])
        # the dropped experts' columns (expert ids, or ranks in the ranked view) among the cells shown
        d = d.merge(df[["layer", "expert"] + ([x] if x != "expert" else [])], on=["layer", "expert"])
        veil = np.full_like(z, np.nan)
        veil[d["layer"].map(row).to_numpy(int), d[x].to_numpy(int) - lo] = 1
        pale = "rgba(255,255,255,0.78)"
        fig.add_trace(go.Heatmap(x=cols, y=np.arange(len(layers)), z=veil, name="dropped", hoverinfo="skip",
                                 xgap=gap, ygap=gap, colorscale=[[0, pale], [1, pale]], showscale=False))
    if selected is not None and selected[0] in row:
        at = df[(df["layer"] == selected[0]) & (df["expert"] == selected[1])][x]
        if len(at):
            sx, sy = int(at.iloc[0]), row[selected[0]]  # outlined by a rectangle of the cell's own shape
            fig.add_shape(type="rect", x0=sx - 0.5, x1=sx + 0.5, y0=sy - 0.5, y1=sy + 0.5,
                          line={"width": 3, "color": "#d62728"}, layer="above")
    notes = row_notes or {}
    left = 70 + (8 * max((len(n) for n in notes.values()), default=0) if notes else 0)
    # margins fixed around a plot area of the cells' size; the colour bar sits in the right margin. Streamlit
    # narrows a figure wider than the page's column (the height stays), so the expert labels are spaced for a
    # plot area as narrow as NARROWEST_GRID pixels and kept level (Plotly would tilt crowded labels into the
    # axis title)
    fig.update_layout(title={"text": title, "x": 0}, width=width + left + 130, height=height + 100, font=FONT,
                      showlegend=False, margin={"l": left, "r": 130, "t": 50, "b": 50, "autoexpand": False},
                      plot_bgcolor="white",
                      clickmode="event+select", dragmode=False)
    dtick = _every(min(cell, NARROWEST_GRID / n_cols), 36) if n_cols > 16 else 1
    fig.update_xaxes(title=x_title, tickmode="linear", tick0=lo, dtick=dtick, tickangle=0,
                     range=[lo - 0.5, hi + 0.5], showgrid=False, zeroline=False, fixedrange=True)
    step = _every(row_height, 16)
    shown = [i for i in range(len(layers)) if i % step == 0]
    ticks = [f"{layers[i]} · {notes[layers[i]]}" if layers[i] in notes else str(layers[i]) for i in shown]
    fig.update_yaxes(title="MoE layer", tickmode="array", tickvals=shown, ticktext=ticks,
                     range=[len(layers) - 0.5, -0.5], showgrid=False, zeroline=False, fixedrange=True)
    return fig


def coverage_lines(curves: pd.DataFrame, title: str, highlight: Sequence[int] = ()) -> go.Figure:
    """Per layer, the share of routing carried by the top n experts (from :func:`core.coverage.coverage_curves`,
    one task). Layers are shaded from light (first) to dark (last); ``highlight`` layers are drawn in red."""
    fig = go.Figure()
    layers = sorted(curves["layer"].unique())
    n_experts = int(curves["n"].max())
    for i, layer in enumerate(layers):
        rows = curves[curves["layer"] == layer]
        shade = 0.25 + 0.75 * i / max(1, len(layers) - 1)
        colour = "#d62728" if layer in highlight else f"rgba(0,114,178,{shade:.2f})"
        fig.add_trace(go.Scatter(x=rows["n"], y=rows["coverage"], mode="lines", name=f"layer {layer}",
                                 line={"color": colour, "width": 3 if layer in highlight else 1.4},
                                 hovertemplate=f"layer {layer}: top %{{x}} experts carry %{{y:.1%}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, n_experts], y=[0, 1], mode="lines", name="uniform routing",
                             line={"color": "#888", "dash": "dot"}, hoverinfo="skip"))
    fig.update_layout(title={"text": title, "x": 0}, height=420, font=FONT, plot_bgcolor="white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, showlegend=len(layers) <= 12,
                      legend={"font": {"size": 11}})
    fig.update_xaxes(title="top n experts of the layer", range=[0, n_experts], showgrid=True, gridcolor="#eee")
    fig.update_yaxes(title="share of routing", tickformat=".0%", range=[0, 1.02], showgrid=True, gridcolor="#eee")
    return fig


def layer_lines(stats: pd.DataFrame, column: str, title: str, y_title: str) -> go.Figure:
    """One line per task of a per-layer statistic."""
    fig = go.Figure()
    for task, rows in stats.groupby("task"):
        fig.add_trace(go.Scatter(x=rows["layer"], y=rows[column], mode="lines+markers", name=str(task)))
    fig.update_layout(title={"text": title, "x": 0}, height=320, font=FONT, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(title="MoE layer", tickmode="linear", dtick=1)
    fig.update_yaxes(title=y_title)
    return fig


def coactivation_matrix(matrix: np.ndarray, layer: int) -> go.Figure:
    """How often two experts share a token's top-k (off-diagonal) at one layer."""
    shown = matrix.astype(float).copy()
    np.fill_diagonal(shown, np.nan)  # the diagonal (each expert's own count) would swamp the scale
    n = len(matrix)
    fig = go.Figure(go.Heatmap(z=shown, x=list(range(n)), y=list(range(n)), colorscale="Blues",
                               colorbar={"title": {"text": "tokens"}},
                               hovertemplate="experts %{y} & %{x}: %{z:,.0f} tokens<extra></extra>"))
    size = int(np.clip(36 * n, 320, 640))
    fig.update_layout(title={"text": f"Co-activation at layer {layer}", "x": 0}, width=size + 120, height=size + 60,
                      font=FONT, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    fig.update_xaxes(title="expert", dtick=max(1, n // 16))
    fig.update_yaxes(title="expert", dtick=max(1, n // 16), autorange="reversed")
    return fig


def tradeoff(full: float | None, points: pd.DataFrame, metric: str, task: str,
             current: tuple[float, float] | None = None, height: int = 420) -> go.Figure:
    """Fraction of experts removed vs a task metric: measured points only. A method's finished settings are
    joined by a line only where there are two or more of them; a search stopped early is a hollow marker
    labelled with how many candidates it scored; the unpruned model is its own black diamond. Each method
    keeps its colour and marker (:func:`method_colour`) whatever else is shown."""
    fig = go.Figure()
    if full is not None:
        fig.add_trace(go.Scatter(x=[0.0], y=[full], mode="markers", name="full model",
                                 marker={"symbol": "diamond", "size": 12, "color": METHOD_STYLE["full"][0]},
                                 hovertemplate="full model: %{y:.3g}<extra></extra>"))
    for (method, top_k), rows in points.groupby(["method", "top_k"], sort=True):
        colour, symbol = method_colour(str(method)), method_symbol(str(method))
        name = f"{method} (top-{top_k})"
        done = rows[~rows["stopped"].astype(bool)]
        if not done.empty:
            fig.add_trace(go.Scatter(
                x=done["removed"], y=done["value"], mode="lines+markers" if len(done) > 1 else "markers",
                name=name, legendgroup=name, customdata=done["keep"], line={"color": colour, "width": 2},
                marker={"color": colour, "symbol": symbol, "size": 10},
                hovertemplate="%{customdata} experts kept: %{y:.3g}<extra>%{fullData.name}</extra>"))
        stopped = rows[rows["stopped"].astype(bool)]
        if not stopped.empty:
            labels = [f"stopped after {int(e)} evaluations" if pd.notna(e) else "stopped early"
                      for e in stopped["evaluations"]]
            fig.add_trace(go.Scatter(
                x=stopped["removed"], y=stopped["value"], mode="markers+text", name=f"{name}, stopped",
                legendgroup=name, text=labels, textposition="top center", textfont={"color": colour, "size": 11},
                customdata=stopped["keep"],
                marker={"color": "white", "symbol": f"{symbol}-open", "size": 12, "line": {"color": colour, "width": 2}},
                hovertemplate="%{customdata} experts kept: %{y:.3g} (%{text})<extra>%{fullData.name}</extra>"))
    if current is not None:
        fig.add_trace(go.Scatter(x=[current[0]], y=[current[1]], mode="markers", name="current plan",
                                 marker={"symbol": "star", "size": 16, "color": "rgba(0,0,0,0)",
                                         "line": {"color": "#000000", "width": 2}}))
    fig.update_layout(title={"text": f"Trade-off on {task}", "x": 0}, height=height, font=FONT,
                      margin={"l": 60, "r": 20, "t": 50, "b": 40}, plot_bgcolor="white",
                      legend={"orientation": "h", "yanchor": "top", "y": -0.3, "x": 0, "font": {"size": 11}})
    fig.update_xaxes(title="experts removed", tickformat=".0%", range=[-0.05, 1], showgrid=True, gridcolor="#eee",
                     zeroline=False)
    fig.update_yaxes(title=metric, showgrid=True, gridcolor="#eee", zeroline=False)
    return fig


# The Plotly mode bar: only the camera, as PNG at twice the size (and SVG on the charts that offer it).
def download_config(name: str, svg: bool = False) -> dict:
    return {"displayModeBar": True, "displaylogo": False,
            "modeBarButtonsToRemove": ["zoom2d", "pan2d", "select2d", "lasso2d", "zoomIn2d", "zoomOut2d",
                                       "autoScale2d", "resetScale2d", "toggleSpikelines", "hoverClosestCartesian",
                                       "hoverCompareCartesian"],
            "toImageButtonOptions": {"format": "svg" if svg else "png", "filename": name, "scale": 2}}
