"""Tokens: an example's text with every token coloured by its first-choice expert at one layer (as in the
Mixtral paper), top-k ids and weights on hover, and how often consecutive tokens share an expert."""

import html

import streamlit as st

from core import aggregate
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
spans = []
for text, experts, weights in zip(texts, prompt["experts"], prompt["weights"]):
    colour = charts.expert_colour(experts[0])
    tip = "experts " + ", ".join(f"{e} ({w:.2f})" for e, w in zip(experts, weights))
    shown = html.escape(text).replace("\n", "↵<br>")
    spans.append(f"<span title='{html.escape(repr(text))} → {tip}' style='background:{colour}40;"
                 f"border-bottom:3px solid {colour};padding:1px 0;margin:0 1px'>{shown}</span>")
st.html("<div style='font-family:ui-monospace,monospace;font-size:15px;line-height:2.1;white-space:pre-wrap'>"
        + "".join(spans) + "</div>")
legend = "".join(f"<span style='display:inline-block;margin:2px 10px 2px 0'><span style='display:inline-block;"
                 f"width:14px;height:14px;background:{charts.expert_colour(e)};vertical-align:middle'></span>"
                 f" expert {e}</span>" for e in range(n_experts))
st.html(f"<div style='font-size:13px'>{legend}</div>")
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
