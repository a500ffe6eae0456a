"""Reading the Plotly figures the dashboard sends to the browser (their JSON specs), for the page tests."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def plotly_values(value: Any) -> list:
    """Plotly sends numpy arrays as {"dtype", "bdata": base64[, "shape"]}; lists stay lists."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return flat.reshape([int(n) for n in str(shape).split(",")]).tolist() if shape else flat.tolist()
    return list(value)


def grid_cells(spec: dict) -> dict[str, Any]:
    """The cells of a ``dashboard.charts.expert_grid`` figure: ``values`` and ``rows`` in the order of its
    clickable points (``trace``, curve 0, whose customdata is (layer, expert, value)), ``colorbar`` the colour
    bar of the heatmap that draws them, ``dropped`` the number of dimmed cells and ``veil`` the colours that dim
    them."""
    points, cells = spec["data"][0], next(t for t in spec["data"] if t.get("name") == "cells")
    data = np.asarray(plotly_values(points["customdata"]), dtype=float).reshape(-1, 3)
    veil = next((t for t in spec["data"] if t.get("name") == "dropped"), None)
    dropped = 0 if veil is None else int(np.sum(~np.isnan(np.asarray(plotly_values(veil["z"]), dtype=float))))
    return {"values": data[:, 2].tolist(), "rows": plotly_values(points["y"]), "colorbar": cells["colorbar"],
            "dropped": dropped, "veil": [] if veil is None else [c for _, c in veil["colorscale"]], "trace": points}
