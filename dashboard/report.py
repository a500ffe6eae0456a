"""The shareable HTML report: :class:`core.report.ReportData` laid out with the dashboard's Plotly figures.

It lives in ``dashboard`` (not ``core``) because the figures come from ``dashboard.charts`` and core never
imports the dashboard; ``moescope report`` imports this module lazily. The file is self-contained: Plotly's
JavaScript is inlined once (with the first figure), and nothing is loaded by URL (no CDN, font or image), so
it opens offline and can be mailed."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from core.outputs import REPORT_MARKER
from core.report import SECTIONS, PlanSummary, ReportData
from dashboard import charts

STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left}th{background:#f5f5f5}code,pre{background:#f5f5f5;padding:.2em .4em;border-radius:3px}
pre{padding:.8em;overflow-x:auto}.note{color:#555}"""


class _Figures:
    """Figures as HTML divs; the first carries Plotly's JavaScript inline, the others none."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig: go.Figure) -> str:
        self.count += 1
        fig.update_layout(font={"family": "system-ui, sans-serif"})  # no web font to fetch
        return pio.to_html(fig, full_html=False, include_plotlyjs=self.count == 1,
                           config={"displaylogo": False, "responsive": True}, div_id=f"figure-{self.count}")


def _table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    formats = formats or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format(v, formats.get(c, '')) if c in formats else str(v))}</td>"
                                    for c, v in row.items()) + "</tr>" for _, row in df.iterrows())
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(SECTIONS[key])}</h2>{body}</section>'


def _divergence_figure(divergence: pd.DataFrame) -> go.Figure:
    pairs = divergence.assign(task=divergence["task_a"] + " vs " + divergence["task_b"])
    return charts.layer_lines(pairs, "jsd_bits", "Jensen–Shannon divergence between tasks' expert usage",
                              "JS divergence (bits)")


def _change(relative: float) -> str:
    """-0.25 -> "25.0% smaller"; 0 -> "unchanged"."""
    if abs(relative) < 5e-4:
        return "unchanged"
    return f"{abs(relative):.1%} {'smaller' if relative < 0 else 'larger'}"


def _plan_block(plan: PlanSummary, figure: _Figures, data: ReportData) -> str:
    parts = [f"<h3>{html.escape(plan.name)}</h3>",
             f"<p>Plan digest <code>{plan.digest}</code>; {plan.kept} experts kept per layer "
             f"({plan.removed_fraction:.0%} of experts removed).</p>"]
    if plan.savings:
        words = {"total_params": "parameters", "active_params": "active parameters per token",
                 "weight_bytes": "weight memory"}
        parts.append("<ul>" + "".join(f"<li>{words[k]}: {_change(v)}</li>" for k, v in plan.savings.items())
                     + "</ul>")
    if plan.scores.empty:
        parts.append('<p class="note">No evaluated rows of this plan in the results table; pass '
                     "<code>--results</code> with a table that evaluated it to compare it with the full model.</p>")
    else:
        parts.append(_table(plan.scores, {"full": ".4g", "pruned": ".4g", "delta": "+.4g"}))
    usage = data.usage.groupby(["layer", "expert"], as_index=False)["share"].mean()
    parts.append(figure(charts.expert_grid(usage, "share", "Kept and dropped experts (dropped dimmed), mean share "
                                           "over tasks", "share", dropped=plan.dropped)))
    return "".join(parts)


def report_html(data: ReportData, title: str = "MoEScope report") -> str:
    """The whole report as one HTML document."""
    figure = _Figures()
    card = pd.DataFrame({"": list(data.model_card), "value": [str(v) for v in data.model_card.values()]})
    sections = [_section("model", _table(card))]
    tasks = sorted(set(data.usage["task"]))
    sections.append(_section("usage", "".join(
        figure(charts.expert_grid(data.usage[data.usage["task"] == t], "share", f"Expert usage on {t}", "share"))
        for t in tasks)))
    sections.append(_section("coverage", "".join(
        figure(charts.coverage_lines(data.coverage[data.coverage["task"] == t], f"Coverage curves on {t}"))
        for t in tasks)))
    if data.divergence.empty:
        body = '<p class="note">The profile holds one task; divergence compares two or more.</p>'
    else:
        body = figure(_divergence_figure(data.divergence))
    sections.append(_section("divergence", body))
    if data.tradeoffs:
        body = "".join(figure(charts.tradeoff(full, points, metric, task))
                       for task, (metric, full, points) in data.tradeoffs.items())
    else:
        body = '<p class="note">No results table given (<code>--results</code>, a sweep CSV or Parquet).</p>'
    sections.append(_section("tradeoff", body))
    body = "".join(_plan_block(p, figure, data) for p in data.plans) or '<p class="note">No plan given.</p>'
    sections.append(_section("plans", body))
    digests = pd.DataFrame({"what": list(data.digests), "digest": list(data.digests.values())})
    sections.append(_section("reproduce", "<pre>" + html.escape("\n".join(data.reproduce)) + "</pre>"
                             + _table(digests)))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}'
            f"<title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="note">{html.escape(str(data.model_card.get("model", "")))}</p>'
            + "".join(sections) + "</body></html>\n")
