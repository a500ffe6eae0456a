"""Tokens: an example's text with every token coloured by its first-choice expert at one layer (as in the
Mixtral paper), top-k ids and weights on hover, and how often consecutive tokens share an expert."""

import html

import streamlit as st

from core import aggregate, coverage
from dashboard import charts, state

st.title("Tokens by routed expert")
mm, profile = state.model_and_profile()
examples = state.aggregated(profile, aggregate.profile_examples)
layers = profile.meta.layers
n_experts = profile.meta.n_experts
c1, c2, c3 = st.columns([2, 2, 3])
names = sorted(examples["task"].unique())
task = c1.selectbox("Task", names, index=names.index("code") if "code" in names else 0, key="tok_task", persist_state="session")
example = c2.selectbox("Example", aggregate.task_example_ids(examples, task), key="tok_example",
                       format_func=lambda i: f"#{i}")
layer = c3.select_slider("Layer", layers, value=layers[-1], key="tok_layer", persist_state="session")

prompt = state.aggregated(profile, aggregate.prompt_routes, task, int(example), layer)
texts = mm.token_texts(prompt["token_id"].tolist())
first = [int(experts[0]) for experts in prompt["experts"]]
# Up to 12 experts get their own colour: all of a small model's, else the example's most chosen; the rest grey.
coloured = list(range(n_experts)) if n_experts <= 12 else coverage.most_chosen_experts(first, 12)
palette = {e: charts.expert_colour(e) if n_experts <= 12 else charts.ranked_colour(i) for i, e in enumerate(coloured)}
GREY = charts.OTHER_EXPERTS
spans = []
for text, experts, weights in zip(texts, prompt["experts"], prompt["weights"]):
    colour = palette.get(int(experts[0]), GREY)
    tip = f"first choice: expert {experts[0]} · top-k " + ", ".join(f"{e} ({w:.2f})" for e, w in zip(experts, weights))
    shown = html.escape(text).replace("\n", "↵<br>")
    spans.append(f"<span title='{html.escape(repr(text))} → {tip}' style='background:{colour}40;"
                 f"border-bottom:3px solid {colour};padding:1px 0;margin:0 1px'>{shown}</span>")
st.html("<div style='font-family:ui-monospace,monospace;font-size:15px;line-height:2.1;white-space:pre-wrap'>"
        + "".join(spans) + "</div>")
swatch = ("<span style='display:inline-block;margin:2px 10px 2px 0'><span style='display:inline-block;"
          "width:14px;height:14px;background:{};vertical-align:middle'></span> {}</span>")
legend = "".join(swatch.format(palette[e], f"expert {e}") for e in coloured)
others = sorted(set(first) - set(coloured))
if others:
    legend += swatch.format(GREY, f"{len(others)} other experts (hover a token for its id)")
st.html(f"<div style='font-size:13px'>{legend}</div>")
if n_experts > 12:
    st.caption(f"This example's {len(coloured)} most chosen first-choice experts at layer {layer} have colours; "
               f"the other {n_experts - len(coloured)} of {n_experts} are grey.")
st.caption("Colour = first-choice expert at this layer. Hover a token for its top-k experts and gate weights.")

st.subheader("Do consecutive tokens share an expert?")
rate = state.aggregated(profile, aggregate.consecutive_same_expert, task, layer)
chance = aggregate.chance_same_expert(n_experts)
m1, m2 = st.columns(2)
m1.metric(f"Same first-choice expert as the previous token (layer {layer}, {task})", f"{rate:.1%}",
          f"{rate - chance:+.1%} vs chance", delta_color="off")
m2.metric("Chance level (1 / experts)", f"{chance:.1%}")
st.dataframe([{"layer": lay, "same expert as previous token":
               f"{state.aggregated(profile, aggregate.consecutive_same_expert, task, lay):.1%}"}
              for lay in layers], hide_index=True)
