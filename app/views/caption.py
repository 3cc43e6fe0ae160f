"""Caption page: the photo, its best caption (large), the n-best list, references and
per-image scores for a Flickr8k photo, and each word's attention map and Grad-CAM overlay."""
from __future__ import annotations

import html

import streamlit as st

from app import services as sv
from app import ui


@st.cache_data(show_spinner=False, max_entries=64)
def _recognition(model_key, digest, _model, _image):
    """(ImageNet top-3 with caption words, FamiliarityScore or None) for one photo and model."""
    with sv.COMPUTE_LOCK:
        _, pooled = _model.encode(_model.pixels([_image]))
    fam = _model.familiarity.score(pooled)[0] if getattr(_model, "familiarity", None) is not None else None
    return _model.recognise(pooled, k=3)[0], fam


cur = ui.current()
st.title("Caption")

if not ui.require_image(cur):
    st.stop()

left, right = st.columns([5, 6], gap="large")
left.image(cur.image, caption=f"{cur.label} · {cur.note}", width="stretch")

with right:
    model, out = ui.current_caption(cur)
    if out is None:
        st.stop()
    st.markdown(f'<p class="best-caption" style="font-size:2.1rem;line-height:1.25;font-weight:600;margin:0.2rem 0 0.6rem">'
                f"{html.escape(out.text)}</p>", unsafe_allow_html=True)
    rerank = (f", its {cur.model.rerank_candidates(cur.beam)} best finished captions re-ranked by the "
              f"photo-caption matcher (weight {cur.rerank:g})"
              if cur.rerank else "")
    st.caption(f"{cur.model.title} · beam {cur.beam}, length penalty {cur.length_penalty:g}{rerank} · "
               f"log-probability {out.best['logprob']:.2f} · {out.seconds * 1000:.0f} ms")

    # What the encoder's ImageNet head recognises and how familiar the photo is (issue 24).
    rec, fam = _recognition(cur.model.key, cur.digest, model, cur.image)
    if rec:
        st.caption("recognised: " + "; ".join(
            f"{html.escape(r.label)} {r.prob:.2f}" + (f" → {html.escape(r.words[0])}" if r.words else "")
            for r in rec if r.prob >= 0.05 or r is rec[0]))
    if fam is not None:
        badge = {"familiar": st.success, "less familiar": st.warning, "unfamiliar": st.error}[fam.level]
        badge(f"{fam.message} (familiarity: percentile {fam.percentile:.0f} of the Flickr8k dev photos)")

    if cur.flickr_name:
        refs = sv.flickr_references(cur.flickr_name)
        if refs:
            st.markdown("**Reference captions** (Flickr8k)")
            st.markdown("\n".join(f"{i + 1}. {html.escape(r)}" for i, r in enumerate(refs)))
            s = ui.scores(out.text, tuple(refs))
            c1, c2 = st.columns(2)
            c1.metric("BLEU-4 (this photo)", f"{s['BLEU-4']:.3f}")
            if "CIDEr" in s:
                c2.metric("CIDEr-D (this photo)", f"{s['CIDEr']:.3f}",
                          help="Document frequencies from the Flickr8k training captions")

st.markdown("**N-best captions**")
# Full width, below the photo and the caption: the whole caption and its scores stay in view.
st.dataframe([{"#": i + 1, "caption": c["text"], "log-prob": c["logprob"], "score": c["score"],
               "ended": "yes" if c["finished"] else "no (max length)"} for i, c in enumerate(out.captions)],
             hide_index=True, width="stretch",
             column_config={"#": st.column_config.NumberColumn("#", width=30),
                            "caption": st.column_config.TextColumn("caption", width="large"),
                            "log-prob": st.column_config.NumberColumn("log-prob", format="%.3f"),
                            "score": st.column_config.NumberColumn("score", format="%.3f",
                                                                   help="log-probability / length^penalty, "
                                                                        "what the beam ranks by"),
                            "ended": st.column_config.TextColumn("ended")})

st.divider()
words = out.words
if not words:
    st.info("The caption is empty: there is no word to explain.")
    st.stop()

st.subheader("Where did each word come from?")
labels = sv.word_labels(words)
try:
    methods = sv.explanation_methods(model)
except sv.NotAvailable:
    methods = []
c1, c2 = st.columns([3, 1])
with c1:
    t = st.pills("Click a word", list(range(len(words))), format_func=lambda i: labels[i], default=0,
                 key=f"word-{cur.model.key}-{cur.digest}-{'-'.join(map(str, out.tokens))}")
t = 0 if t is None else int(t)
choices = methods or ["grad_cam"]
method = c2.selectbox("Attribution method", choices, index=choices.index("grad_cam") if "grad_cam" in choices else 0,
                      format_func=lambda m: sv.METHOD_TITLES.get(m, m), key="caption_method",
                      help="Grad-CAM is instant; the others take one to a few seconds per word on a CPU")

cols = st.columns(3)
cols[0].image(cur.image, caption="photo", width="stretch")
att = sv.attention_overlay(cur.image, out.attention, t)
if att is not None:
    cols[1].image(att, caption=f"decoder attention for “{words[t]}” (its weights, not an explanation)",
                  width="stretch", clamp=True)
else:
    cols[1].info(f"{cur.model.title} has no attention: only the attribution map is shown.")
name = sv.METHOD_TITLES.get(method, method)
try:
    with st.spinner(f"{name} for “{words[t]}”..."):
        if method == "grad_cam":
            m = ui.grad_cam_all(cur.model.key, cur.digest, tuple(out.tokens), model, cur.full)[t]
        else:
            m = ui.attribution(cur.model.key, cur.digest, tuple(out.tokens), t, method, model, cur.full)[0]
    cols[2].image(sv.overlay(cur.image, m), caption=f"{name} for “{words[t]}”", width="stretch", clamp=True)
except (sv.NotAvailable, ValueError) as e:
    cols[2].info(str(e))
g = model.grid_side
note = f"{sv.ATTENTION_NOTE} Its grid is {g}×{g}. " if att is not None else ""
st.caption(f"{note}The attribution map explains the word's log-probability given the photo and the words before it. "
           "More methods and a faithfulness check are on the Explain page.")
