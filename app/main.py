"""Entry point: ``streamlit run app/main.py``.

Six pages (app/views/) share one sidebar (app/ui.py): the model, the photo and the decoding
settings chosen there apply on every page. All computation lives in app/services/ (one module per
concern); app/ui.py caches it.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="Image captioning lab", page_icon=":material/image:", layout="wide")

from app import ui  # noqa: E402

HERE = Path(__file__).resolve().parent
PAGES = [
    st.Page(HERE / "views" / "caption.py", title="Caption", icon=":material/subject:", url_path="caption", default=True),
    st.Page(HERE / "views" / "explain.py", title="Explain", icon=":material/center_focus_strong:", url_path="explain"),
    st.Page(HERE / "views" / "encoder.py", title="Encoder", icon=":material/layers:", url_path="encoder"),
    st.Page(HERE / "views" / "embeddings.py", title="Embeddings", icon=":material/scatter_plot:", url_path="embeddings"),
    st.Page(HERE / "views" / "model.py", title="Model", icon=":material/monitoring:", url_path="model"),
    st.Page(HERE / "views" / "concepts.py", title="Concepts", icon=":material/label:", url_path="concepts"),
]

page = st.navigation(PAGES)
ui.sidebar()
page.run()
