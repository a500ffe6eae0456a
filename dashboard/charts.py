"""Plotly figures from precomputed tables (as bertviz does: the chart never runs a model).

The layer × expert grids are scatters of square markers, not ``go.Heatmap``: Streamlit returns no points
for clicks on a heatmap, and clicking a cell is how users pick an expert to inspect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

FONT = {"family": "Inter, system-ui, sans-serif", "size": 13}


def expert_colour(expert: int) -> str:
    """A stable colour per expert id (Plotly's Dark24, then Alphabet, cycling)."""
    palette = qualitative.Dark24 + qualitative.Alphabet
    return palette[expert % len(palette)]


def _grid_size(n_experts: int, n_layers: int) -> tuple[int, int, int]:
    """Cell, width and height in pixels so that squares tile the grid on screen at any model size."""
    cell = int(np.clip(min(760 / n_experts, 640 / n_layers), 9, 56))
    return cell, n_experts * cell + 190, n_layers * cell + 120


def expert_grid(df: pd.DataFrame, value: str, title: str, colorbar: str, diverging: bool = False,
                dropped: Sequence[tuple[int, int]] = (), selected: tuple[int, int] | None = None,
                value_format: str = ".1%") -> go.Figure:
    """Layer × expert squares coloured by ``df[value]`` (columns layer, expert, value, hover extras).

    ``dropped`` (layer, expert) cells are crossed out; ``selected`` gets a dark outline.
    """
    layers = sorted(df["layer"].unique())
    n_experts = int(df["expert"].max()) + 1
    cell, width, height = _grid_size(n_experts, len(layers))
    row = {layer: i for i, layer in enumerate(layers)}
    y = df["layer"].map(row)
    values = df[value].to_numpy(float)
    if diverging:
        bound = float(np.abs(values).max()) or 1.0
        colour = {"colorscale": "RdBu_r", "cmin": -bound, "cmax": bound}
    else:
        colour = {"colorscale": "Viridis", "cmin": 0.0, "cmax": float(values.max()) or 1.0}
    fig = go.Figure(go.Scatter(
        x=df["expert"], y=y, mode="markers", name="",
        marker={"symbol": "square", "size": cell - 2, "color": values, "line": {"width": 0},
                "colorbar": {"title": {"text": colorbar, "side": "right"}, "tickformat": value_format}, **colour},
        customdata=np.stack([df["layer"], df["expert"], values], axis=1),
        hovertemplate=f"layer %{{customdata[0]:d}} · expert %{{customdata[1]:d}}<br>{colorbar}: "
                      f"%{{customdata[2]:{value_format}}}<extra></extra>"))
    if len(dropped):
        d = pd.DataFrame(list(dropped), columns=["layer", "expert"])
        fig.add_trace(go.Scatter(x=d["expert"], y=d["layer"].map(row), mode="markers", name="dropped",
                                 hoverinfo="skip", marker={"symbol": "x-thin", "size": cell * 0.7,
                                                           "line": {"width": 3, "color": "#d62728"}}))
    if selected is not None and selected[0] in row:
        fig.add_trace(go.Scatter(x=[selected[1]], y=[row[selected[0]]], mode="markers", name="selected",
                                 hoverinfo="skip", marker={"symbol": "square-open", "size": cell + 2,
                                                           "line": {"width": 3, "color": "#111"}}))
    fig.update_layout(title={"text": title, "x": 0}, width=width, height=height, font=FONT, showlegend=False,
                      margin={"l": 70, "r": 20, "t": 50, "b": 50}, plot_bgcolor="white", clickmode="event+select",
                      dragmode=False)
    fig.update_xaxes(title="expert", tickmode="linear", dtick=max(1, n_experts // 16), range=[-0.5, n_experts - 0.5],
                     showgrid=False, zeroline=False, fixedrange=True)
    fig.update_yaxes(title="MoE layer", tickmode="array", tickvals=list(range(len(layers))), ticktext=layers,
                     range=[len(layers) - 0.5, -0.5], showgrid=False, zeroline=False, fixedrange=True)
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


def tradeoff(points: pd.DataFrame, metric: str, task: str, current: tuple[float, float] | None = None) -> go.Figure:
    """Fraction of experts removed vs a task metric, one line per method (and top-k)."""
    fig = go.Figure()
    for (method, top_k), rows in points.groupby(["method", "top_k"]):
        fig.add_trace(go.Scatter(x=rows["removed"], y=rows["value"], mode="lines+markers",
                                 name=f"{method} (top-{top_k})", customdata=rows["keep"],
                                 hovertemplate="%{customdata} experts kept: %{y:.3g}<extra>%{fullData.name}</extra>"))
    if current is not None:
        fig.add_trace(go.Scatter(x=[current[0]], y=[current[1]], mode="markers", name="current plan",
                                 marker={"symbol": "star", "size": 16, "color": "#d62728"}))
    fig.update_layout(title={"text": f"Trade-off on {task}", "x": 0}, height=380, font=FONT,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"orientation": "h", "y": -0.3})
    fig.update_xaxes(title="experts removed", tickformat=".0%", range=[-0.03, 1])
    fig.update_yaxes(title=metric)
    return fig
