"""Embeddings page: the decoder's word embeddings in 2-D (t-SNE or PCA) with hover labels, a
search box that zooms to a word, its nearest neighbours by cosine similarity, and the current
caption's words highlighted."""
from __future__ import annotations

import streamlit as st

from app import services as sv
from app import ui

cur = ui.current()
st.title("Embeddings")
model = ui.require_captioner(cur)
if model is None:
    st.stop()

caption_words: list[str] = []
if cur.image is not None and not cur.error:
    _, out = ui.current_caption(cur, model)
    if out is not None:
        caption_words = out.words
        st.markdown(f"**Current caption** (highlighted in red): {out.text}")

c1, c2 = st.columns([1, 2])
method = c1.radio("Projection", ["tsne", "pca"], format_func=lambda m: {"tsne": "t-SNE", "pca": "PCA"}[m],
                  horizontal=True, key="emb_method")
query = c2.text_input("Search a word", key="emb_query", placeholder="e.g. dog")

try:
    with st.spinner("Projecting the vocabulary (t-SNE takes up to a minute the first time)..."):
        projs = ui.projections(cur.model.key, cur.model.path, model)
except sv.NotAvailable as e:
    st.info(str(e))
    st.stop()
proj = projs[method]

focus = None
q = query.strip().lower()
if q:
    try:
        matches = ui.word_search(cur.model.key, q, model)
    except sv.NotAvailable as e:
        matches = [q] if q in proj.words else []
        st.info(str(e))
    if not matches:
        st.warning(f"“{query.strip()}” is not in the vocabulary and nothing is spelled like it.")
    elif matches[0] == q:
        focus = q
    else:
        focus = st.selectbox(f"“{query.strip()}” is not in the vocabulary; closest words", matches, key="emb_pick")

target = focus or (caption_words[0] if caption_words else None)
k = st.slider("Neighbours", 5, 30, 10, key="emb_k")
nn, nn_error = [], None
if target:
    try:
        nn = ui.neighbours(cur.model.key, target, k, model)
    except sv.NotAvailable as e:
        nn_error = str(e)
    except KeyError as e:
        nn_error = str(e).strip("'\"")

st.plotly_chart(sv.embedding_figure(proj, caption_words, focus, [w for w, _ in nn] if focus else ()),
                key=f"emb-{method}-{focus}-{k}")
st.caption(f"{len(proj.words)} words. {proj.note}. Hover a point to see its word; t-SNE keeps neighbourhoods, not "
           "distances between clusters.")

if target:
    st.subheader(f"Nearest neighbours of “{target}”")
    if nn_error:
        st.info(nn_error)
    else:
        st.dataframe([{"rank": i + 1, "word": w, "cosine similarity": round(s, 4)} for i, (w, s) in enumerate(nn)],
                     hide_index=True, width="stretch")
