"""Concepts page: the visual concepts the tagger finds in the photo, independently of the caption,
with their probabilities; a map of each (the noisy-OR region probabilities, Grad-CAM or Integrated
Gradients of the tagger's output); the concepts the caption leaves out; and, given the caption,
the joint network's view."""
from __future__ import annotations

import html

import streamlit as st

from app.services import NotAvailable, concepts, figures
from app import ui


cur = ui.current()
st.title("Concepts")
st.caption("What the photo shows, by a concept tagger that does not read the caption: a few hundred concepts mined "
           "from the Flickr8k training captions, each scored by a small network over the encoder's 7×7 grid of "
           "features (multiple-instance learning, noisy-OR over the cells: Fang et al. 2015). Concepts marked "
           "**not in the caption** are ones the caption left out.")
if not ui.require_image(cur):
    st.stop()
path = concepts.tagger_path()
if path is None:
    st.info("No concept tagger found (assets/models/tagger); train one with `python -m captioning train-tagger` "
            "and `python -m captioning ship-tagger`.")
    st.stop()
model = ui.require_captioner(cur)
caption_text = ""
if model is not None:
    _, out = ui.current_caption(cur, model)
    caption_text = out.text if out is not None else ""
try:
    tagger = ui.concept_tagger(str(path), cur.model.encoder if cur.model else "", model)
except Exception as e:  # noqa: BLE001 - BundleError and whatever a damaged folder raises: shown, not a crash
    st.error(f"The concept tagger cannot be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    st.stop()

res = ui.concept_tags(str(path), cur.digest, caption_text, tagger, cur.full)
left, right = st.columns([5, 6], gap="large")
left.image(cur.image, caption=cur.label, width="stretch")
with right:
    if caption_text:
        st.markdown(f"**Caption:** {html.escape(caption_text)}")
    if res.tags:
        st.markdown("**Tagged:** " + ", ".join(
            (f"**{html.escape(t.concept)}** (not in the caption)" if t.in_caption is False else html.escape(t.concept))
            + f" {t.probability:.2f}" for t in res.tags))
    else:
        st.markdown("**Tagged:** nothing above its threshold.")
    if res.missing:
        st.warning("Not in the caption: " + ", ".join(res.missing))
    rows = concepts.rows(res, tagger)
    cfg = {"probability": st.column_config.ProgressColumn("probability", min_value=0.0, max_value=1.0, format="%.3f")}
    if res.joint_probabilities is not None:
        cfg["with the caption (joint)"] = st.column_config.ProgressColumn(
            "with the caption (joint)", min_value=0.0, max_value=1.0, format="%.3f",
            help="The joint network reads the photo and the caption together")
    st.dataframe(rows, hide_index=True, width="stretch", column_config=cfg)
    if res.joint_tags is not None:
        st.caption("Joint network (photo + caption): " + (", ".join(t.concept for t in res.joint_tags) or "nothing"))

st.divider()
st.subheader("Where is each concept?")
names = [r["concept"] for r in rows]
c1, c2 = st.columns([2, 3])
concept = c1.selectbox("Concept", names, key="concept_pick")
method = c2.radio("Map", list(concepts.METHOD_TITLES), key="concept_method", horizontal=True,
                  format_func=lambda m: concepts.METHOD_TITLES[m],
                  help="Region probabilities: the tagger's own per-cell probabilities, which its output is made of. "
                       "Grad-CAM and Integrated Gradients attribute the concept's score to the encoder's feature map "
                       "and to the pixels, as the Explain page does for caption words.")
try:
    with st.spinner("Computing the map..."):
        m = ui.concept_map(str(path), cur.digest, concept, method, tagger, cur.full)
    st.image(figures.to_uint8(figures.map_overlay(cur.image, m, method)), width=360,
             caption=f"{concept} · {concepts.METHOD_TITLES[method]}")
    st.markdown(figures.colour_scale_html(figures.map_normalisation(method)), unsafe_allow_html=True)
except NotAvailable as e:
    st.info(str(e))
