"""MoEScope dashboard: ``streamlit run dashboard/app.py`` (or ``make run``). Binds to localhost unless told
otherwise (``--server.address``)."""

import streamlit as st

from dashboard import state

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
with st.sidebar:
    st.markdown("### MoEScope")
    st.caption(f"Model: `{state.model_settings()['source']}`")
page.run()
