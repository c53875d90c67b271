"""slimserve dashboard: chat with any variant, compare them, see the catalogue and benchmarks.

Run it with `make dashboard` (or `streamlit run dashboard/app.py`). It talks to the ingress only
over HTTP (`SLIMSERVE_URL`, default http://127.0.0.1:8000; `SLIMSERVE_API_KEY` if the ingress
needs one) and reads benchmark reports from `SLIMSERVE_REPORTS_DIR` (default `reports/`).
Each page is a small script under `views/`; this file only sets up navigation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboard/app.py` puts dashboard/ (not the repo root) on sys.path; make the
# `dashboard` and `slimserve` packages importable from a plain checkout too.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from dashboard import ui  # noqa: E402

st.set_page_config(page_title="slimserve", page_icon=":material/compress:", layout="wide")

page = st.navigation(
    [
        st.Page("views/chat.py", title="Chat", icon=":material/chat:", default=True),
        st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("views/models.py", title="Models", icon=":material/account_tree:"),
        st.Page("views/benchmarks.py", title="Benchmarks", icon=":material/bar_chart:"),
    ]
)
ui.sidebar()
page.run()
