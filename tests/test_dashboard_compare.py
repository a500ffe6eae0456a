"""The Compare profiles page under Streamlit's AppTest on the sample model: with only the default profile it asks
for a second; its button records the sample tasks under the session's plan, and the page then shows the
per-layer Jensen–Shannon divergence, the difference grid in percentage points and the re-routing flows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.plan import Plan
from core.profile_compare import NO_REPLACEMENT, js_divergence_per_layer, reroute_flows
from core.routing_profile import Profile
from dashboard import compare_charts
from tests.plotly_spec import grid_cells

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PLAN = Plan(layers={layer: [0, 2, 4, 6] for layer in range(4)})  # the sample model: 4 MoE layers x 8 experts


def chart(at: AppTest, key: str) -> dict:
    """The Plotly figure of the chart with widget key ``key`` (its JSON spec)."""
    import json
    return json.loads(next(c for c in at.get("plotly_chart") if key in c.proto.id).proto.spec)




def test_flow_sankey_names_dropped_experts_and_missing_replacements():
    flows = pd.DataFrame({"layer": [2, 2, 2], "from_expert": [5, 5, 1], "to_expert": [4, NO_REPLACEMENT, 4],
                          "tokens": [7, 2, 3], "share_of_from": [7 / 9, 2 / 9, 1.0]})
    sankey = compare_charts.flow_sankey(flows, 2).data[0]
    assert list(sankey.node.label) == ["expert 1 (dropped)", "expert 5 (dropped)", "expert 4",
                                       "no expert (lower top-k)"]
    assert list(zip(sankey.link.source, sankey.link.target, sankey.link.value)) == [(1, 2, 7), (1, 3, 2), (0, 2, 3)]
    assert sankey.link.color[0] == sankey.link.color[1] != sankey.link.color[2]  # one hue per dropped expert
    bars = compare_charts.divergence_bars(pd.DataFrame({"layer": [0, 1], "jsd_bits": [0.2, 0.5],
                                                        "moved_share": [0.1, 0.3]}), "t").data[0]
    assert list(bars.y) == ["0", "1"] and list(bars.x) == [0.2, 0.5]


@pytest.mark.slow  # the app runs in process, and the button records a profile
def test_compare_page_records_under_the_plan_and_shows_divergence_difference_and_flows(dashboard_home_copy,
                                                                                       monkeypatch):
    monkeypatch.setenv("MOESCOPE_HOME", str(dashboard_home_copy))
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["plan"] = PLAN
    at.run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    assert any("needs two profiles" in i.value for i in at.info)  # only the default profile so far
    assert not at.get("plotly_chart")

    at.button(key="cmp_record").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    profiles = dashboard_home_copy / "dashboard" / "profiles"
    full = Profile(next(profiles.glob("*-sample-tasks.parquet")))
    pruned = Profile(next(profiles.glob(f"*-sample-tasks-plan-{PLAN.digest()}.parquet")))
    assert pruned.meta.plan_digest == PLAN.digest()
    assert at.selectbox(key="cmp_a").value == str(full.path.resolve())
    assert at.selectbox(key="cmp_b").value == str(pruned.path.resolve())

    # The JS divergence per layer, as core computes it, in the table, the metric and beside the grid's rows.
    js = js_divergence_per_layer(full, pruned)
    table = next(d.value for d in at.dataframe if "JS divergence (bits)" in d.value.columns)
    assert table["JS divergence (bits)"].to_numpy() == pytest.approx(js["jsd_bits"].to_numpy(), abs=1e-12)
    assert (js["jsd_bits"] > 0).all()  # a plan that drops half the experts changes every layer
    assert next(m.value for m in at.metric if m.label.startswith("Mean JS")) == f"{js['jsd_bits'].mean():.3f} bits"
    grid = chart(at, "cmp_grid")
    assert grid_cells(grid)["colorbar"]["title"]["text"] == "B − A (pp)"
    diffs = grid_cells(grid)["values"]
    assert len(diffs) == 4 * 8 and min(diffs) < 0 < max(diffs)  # dropped experts lose, kept ones gain
    assert sum(diffs) == pytest.approx(0.0, abs=1e-6)  # each layer's shares sum to 100 % in both
    assert f"JS {js['jsd_bits'].iloc[0]:.3f}" in " ".join(grid["layout"]["yaxis"]["ticktext"])

    # The flows of the layer shown: from dropped experts to kept ones, as core counts them.
    layer = at.selectbox(key="cmp_layer").value
    flows = reroute_flows(full, pruned, PLAN)
    shown = next(d.value for d in at.dataframe if "From (dropped)" in d.value.columns)
    expected = flows[flows["layer"] == layer].head(20)
    assert shown["Token slots"].tolist() == expected["tokens"].tolist()
    assert set(shown["From (dropped)"]) <= {1, 3, 5, 7} and set(shown["To"]) <= {0, 2, 4, 6}
    assert any("Sankey" in str(c.proto.spec)[:200] or '"sankey"' in c.proto.spec for c in at.get("plotly_chart"))

    at.selectbox(key="cmp_layer").set_value(3).run()  # another layer: its own flows
    assert not at.exception
    shown = next(d.value for d in at.dataframe if "From (dropped)" in d.value.columns)
    assert shown["Token slots"].tolist() == flows[flows["layer"] == 3].head(20)["tokens"].tolist()

    at.selectbox(key="cmp_task").set_value("qa").run()  # one task: its own divergence
    assert not at.exception
    table = next(d.value for d in at.dataframe if "JS divergence (bits)" in d.value.columns)
    one_task = js_divergence_per_layer(full, pruned, task="qa")["jsd_bits"].to_numpy()
    assert table["JS divergence (bits)"].to_numpy() == pytest.approx(one_task, abs=1e-12)
    assert not np.allclose(one_task, js["jsd_bits"].to_numpy())

    at.selectbox(key="cmp_a").set_value(str(pruned.path.resolve()))  # swapped: B is no longer a plan profile
    at.selectbox(key="cmp_b").set_value(str(full.path.resolve())).run()
    assert not at.exception and not at.error
    assert not any("From (dropped)" in d.value.columns for d in at.dataframe)  # no flows without a plan on B
    table = next(d.value for d in at.dataframe if "JS divergence (bits)" in d.value.columns)
    assert table["JS divergence (bits)"].to_numpy() == pytest.approx(one_task, abs=1e-12)  # JS is symmetric
