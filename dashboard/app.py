"""MoEScope dashboard: ``streamlit run dashboard/app.py`` (or ``make run``). Binds to localhost unless told
otherwise (``--server.address``)."""

import streamlit as st

st.set_page_config(page_title="MoEScope", page_icon=":material/hub:", layout="wide")

PAGES = [
    st.Page("views/model.py", title="Model & data", icon=":material/memory:", default=True),
    st.Page("views/profile.py", title="Profile", icon=":material/radar:"),
    st.Page("views/utilization.py", title="Utilization", icon=":material/grid_on:"),
    st.Page("views/tokens.py", title="Tokens", icon=":material/text_fields:"),
    st.Page("views/prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("views/plans.py", title="Plans", icon=":material/bookmarks:"),
    st.Page("views/compare.py", title="Compare profiles", icon=":material/compare_arrows:"),
    st.Page("views/export.py", title="Export", icon=":material/download:"),
]

page = st.navigation(PAGES)
# The first visit to a fresh server imports PyTorch and transformers (seconds): the navigation above is already
# on screen, and this says what is happening instead of leaving the page blank.
with st.spinner("Starting MoEScope: loading PyTorch and transformers (once per server)…", show_time=True):
    from dashboard import state
with st.sidebar:
    st.markdown("### MoEScope")
    st.caption(f"Model: `{state.model_settings()['source']}`")
page.run()
