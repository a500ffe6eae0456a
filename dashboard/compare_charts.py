"""Plotly figures for the Compare profiles page, drawn from the tables of ``core.profile_compare`` (the figures
compute nothing; the difference grid itself is ``dashboard.charts.expert_grid`` with ``diverging=True``)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from core.profile_compare import NO_REPLACEMENT
from dashboard.charts import FONT, OKABE_ITO


_BANDS = [c for name, c in OKABE_ITO.items() if name not in ("black", "yellow")] + ["#332288", "#882255", "#117733"]


def _rgba(colour: str, alpha: float) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def divergence_bars(js: pd.DataFrame, title: str) -> go.Figure:
    """Per layer, the Jensen–Shannon divergence of :func:`core.profile_compare.js_divergence_per_layer` as
    horizontal bars, first layer on top; the height follows the layer count so 61 layers stay readable."""
    layers = [str(layer) for layer in js["layer"]]
    fig = go.Figure(go.Bar(x=js["jsd_bits"], y=layers, orientation="h", marker={"color": OKABE_ITO["blue"]},
                           customdata=js["moved_share"],
                           hovertemplate="layer %{y}: JS %{x:.3f} bits<br>routing moved: %{customdata:.1%}"
                                         "<extra></extra>"))
    fig.update_layout(title={"text": title, "x": 0}, height=max(260, 120 + 14 * len(layers)), font=FONT,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, plot_bgcolor="white", showlegend=False)
    fig.update_xaxes(title="JS divergence (bits; 1 = no expert in common)",
                     range=[0, max(0.05, float(js["jsd_bits"].max() or 0) * 1.1)], showgrid=True, gridcolor="#eee")
    fig.update_yaxes(title="MoE layer", type="category", autorange="reversed")
    return fig


def flow_sankey(flows: pd.DataFrame, layer: int) -> go.Figure:
    """One layer's re-routing flows (rows of :func:`core.profile_compare.reroute_flows`): dropped experts on the
    left, the experts that took their tokens on the right, band widths in top-k slots."""
    sources = sorted(flows["from_expert"].unique())
    targets = sorted(flows["to_expert"].unique(), key=lambda e: (e == NO_REPLACEMENT, e))
    labels = [f"expert {e} (dropped)" for e in sources] + [
        "no expert (lower top-k)" if e == NO_REPLACEMENT else f"expert {e}" for e in targets]
    index = ({("from", e): i for i, e in enumerate(sources)}
             | {("to", e): len(sources) + i for i, e in enumerate(targets)})
    colours = ["#d62728"] * len(sources) + ["#999999" if e == NO_REPLACEMENT else OKABE_ITO["blue"] for e in targets]
    band = {e: _rgba(_BANDS[i % len(_BANDS)], 0.45) for i, e in enumerate(sources)}  # one hue per dropped expert
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": labels, "color": colours, "pad": 8, "thickness": 14},
        link={"source": [index[("from", e)] for e in flows["from_expert"]],
              "target": [index[("to", e)] for e in flows["to_expert"]], "value": flows["tokens"].tolist(),
              "color": [band[e] for e in flows["from_expert"]],
              "hovertemplate": "%{source.label} → %{target.label}: %{value:,} token slots<extra></extra>"}))
    fig.update_layout(title={"text": f"Layer {layer}: where the dropped experts' tokens went", "x": 0}, font=FONT,
                      height=max(320, 40 + 22 * max(len(sources), len(targets))),
                      margin={"l": 20, "r": 20, "t": 50, "b": 20})
    return fig
