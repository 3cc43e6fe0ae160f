"""Embeddings page: a model's word-embedding spaces (softmax output layer, input embedding, a
tied matrix, word2vec) in 2-D (t-SNE, PCA or UMAP), coloured by word category or cluster, with
search and spelling suggestions, nearest neighbours by cosine similarity (click a point or search),
the same word's neighbours in every space side by side, the current caption's words highlighted,
and how well each space's neighbourhoods measure."""
from __future__ import annotations

import streamlit as st

from app.services import NotAvailable
from app.services import embeddings, figures
from app import ui

cur = ui.current()
st.title("Embeddings")
model = ui.require_captioner(cur)
if model is None:
    st.stop()

try:
    names, default = ui.spaces(cur.model.key, cur.model.path, model)
except NotAvailable as e:
    st.info(str(e))
    st.stop()

caption_words: list[str] = []
if cur.image is not None and not cur.error:
    _, out = ui.current_caption(cur, model)
    if out is not None:
        caption_words = out.words
        st.markdown(f"**Current caption** (highlighted in red): {out.text}")

c1, c2, c3 = st.columns([2, 2, 2])
space = c1.selectbox("Embedding space", names, index=names.index(default), key="emb_space",
                     format_func=lambda n: n + (" (default: best measured)" if n == default else ""))
methods = ["tsne", "pca", "umap"]
method = c2.radio("Projection", methods, format_func=lambda m: figures.PROJECTION_NAMES[m], horizontal=True,
                  key="emb_method")
colour_by = c3.radio("Colour by", ["category", "cluster", "none"], horizontal=True, key="emb_colour",
                     help="category: the project's word lists (colours, animals, clothing, ...); "
                          "cluster: k-means (12 clusters) on this space's unit vectors")
st.caption(f"**{space}**: {embeddings.space_about(space)}.")

c4, c5, c6 = st.columns([2, 2, 2])
query = c4.text_input("Search a word", key="emb_query", placeholder="e.g. dog")
top_n = c5.select_slider("Show the most frequent words", [100, 250, 500, 1000, 2000, 0], value=0, key="emb_top",
                         format_func=lambda n: "all" if n == 0 else f"top {n}")
k = c6.slider("Neighbours", 5, 30, 10, key="emb_k")

try:
    with st.spinner("Projecting the vocabulary (t-SNE and UMAP take up to a minute the first time)..."):
        proj = ui.projection(cur.model.key, cur.model.path, space, method == "umap", model)
except NotAvailable as e:
    st.info(str(e))
    st.stop()
except ValueError as e:  # e.g. word2vec files made for another vocabulary
    st.warning(str(e))
    st.stop()
if proj.coords(method) is None:
    st.info(f"{figures.PROJECTION_NAMES[method]} is not available here (install umap-learn); showing t-SNE.")
    method = "tsne"

focus = None
q = query.strip().lower()
if q:
    try:
        matches = ui.word_search(cur.model.key, q, model, space, cur.model.path)
    except NotAvailable as e:
        matches = [q] if q in proj.words else []
        st.info(str(e))
    if not matches:
        st.warning(f"“{query.strip()}” is not in the vocabulary and nothing is spelled like it.")
    elif matches[0] == q:
        focus = q
    else:
        focus = st.selectbox(f"“{query.strip()}” is not in the vocabulary; closest words", matches, key="emb_pick")

clicked = st.session_state.get("emb_clicked")
if focus is None and clicked in proj.words:
    focus = clicked
target = focus or (caption_words[0] if caption_words else None)


def neighbours_of(word: str, sp: str):
    try:
        return ui.neighbours(cur.model.key, word, k, model, sp, cur.model.path), None
    except NotAvailable as e:
        return [], str(e)
    except KeyError as e:
        return [], str(e).strip("'\"")
    except ValueError as e:
        return [], str(e)


nn, nn_error = neighbours_of(target, space) if target else ([], None)

colour = None
if colour_by == "category":
    colour = embeddings.word_categories()
elif colour_by == "cluster":
    colour = {w: f"cluster {c + 1}" for w, c in ui.clusters(cur.model.key, cur.model.path, space, model).items()}
fig = figures.embedding_figure(proj, method, caption_words, focus, [w for w, _ in nn] if focus else (), colour=colour,
                              top_n=top_n)
event = st.plotly_chart(fig, key=f"emb-{space}-{method}-{focus}-{k}-{colour_by}-{top_n}", on_select="rerun",
                        selection_mode="points")
points = (getattr(event, "selection", None) or {}).get("points", []) if event else []
picked = next((p.get("customdata") for p in points if isinstance(p.get("customdata"), str)), None)
if picked and picked != st.session_state.get("emb_clicked"):
    st.session_state["emb_clicked"] = picked
    st.rerun()
st.caption(f"{len(proj.words)} words. {embeddings.projection_note(proj, method)}. Hover a point to see its word, click it to see its neighbours; "
           "t-SNE and UMAP keep neighbourhoods, not distances between clusters.")

if target:
    st.subheader(f"Nearest neighbours of “{target}”")
    if nn_error:
        st.info(nn_error)
    else:
        cats = embeddings.word_categories()
        st.dataframe([{"rank": i + 1, "word": w, "cosine similarity": round(s, 4), "category": cats.get(w, "")}
                      for i, (w, s) in enumerate(nn)], hide_index=True, width="stretch")
    if len(names) > 1:
        st.markdown(f"**“{target}” in every space** (top {min(k, 10)})")
        cols = st.columns(len(names))
        for col, sp in zip(cols, names):
            col.markdown(f"*{sp}*" + (" (default)" if sp == default else ""))
            got, err = neighbours_of(target, sp)
            if err:
                col.caption(err)
            else:
                col.markdown("\n".join(f"{i + 1}. {w} ({s:.2f})" for i, (w, s) in enumerate(got[:10])))

rows = embeddings.embedding_quality(cur.model.path)
with st.expander("How well each space's neighbourhoods measure", expanded=not rows):
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch")
        st.caption("Category precision: the share of a word's 5 nearest neighbours that are in the same category "
                   "of the project's word lists (colours, numbers, animals, people, clothing, places, vehicles, "
                   "sports, verbs, ...). *Judged*: neighbours searched among the listed words; *whole vocabulary*: "
                   "unlisted neighbours count as wrong. Chance: the same for random neighbours. WordSim-353 and "
                   "SimLex-999: Spearman's ρ with human similarity ratings over the pairs this vocabulary holds. "
                   "The default space is the one with the highest judged precision.")
    else:
        st.info("This model has not been measured yet: `python -m explain embeddings --model DIR` trains word2vec, "
                "scores every space and records the best as the default.")
