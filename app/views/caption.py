"""Caption page: the photo, its best caption (large), the n-best list, references and
per-image scores for a Flickr8k photo, and each word's attention map and Grad-CAM overlay."""
from __future__ import annotations

import html

import streamlit as st

from app.services import NotAvailable
from app.services import captions, explanations, figures, photos
from app import ui


INTRO = ("**Describe a photo in one sentence, and see where each word came from.** A frozen ImageNet CNN reads the "
         "photo and a small recurrent decoder writes the caption, word by word.  \n"
         "The model learned from **Flickr8k**: 6,000 photos, mostly of people and dogs outdoors. On other photos its "
         "captions are guesses; the familiarity badge under each caption says how close a photo is to what it learned "
         "from.  \n"
         "Start from an example below, upload your own photo, or pick one in the sidebar; the Explain, Encoder, "
         "Embeddings and Model pages go deeper.")

cur = ui.current()
st.title("Caption")
st.markdown(f'<div class="intro">\n\n{INTRO}\n\n</div>', unsafe_allow_html=True)

if cur.image is not None:
    with st.expander("Example photos", expanded=True):
        ui.example_row("ex")
if not ui.require_image(cur, show_examples=True):
    st.stop()

model = ui.require_captioner(cur)
if model is None:
    st.stop()
ui.guide_toggle(cur, model)  # full width: its label stays whole in an 800 px window

left, right = st.columns([5, 6], gap="large")
left.image(cur.image, caption=f"{cur.label} · {cur.note}", width="stretch")

with right:
    model, out = ui.current_caption(cur, model)
    if out is None:
        st.stop()
    st.markdown(f'<p class="best-caption" style="font-size:2.1rem;line-height:1.25;font-weight:600;margin:0.2rem 0 0.6rem">'
                f"{html.escape(out.text)}</p>", unsafe_allow_html=True)
    rerank = (f", its {cur.model.rerank_candidates(cur.beam)} best finished captions re-ranked by the "
              f"photo-caption matcher (weight {cur.rerank:g})"
              if cur.rerank else "")
    took = "cached" if getattr(out, "cached", False) else f"{out.seconds * 1000:.0f} ms"
    st.caption(f"{cur.model.title} · beam {cur.beam}, length penalty {cur.length_penalty:g}{rerank} · "
               f"log-probability {out.best.logprob:.2f} · {took}")

    st.caption(captions.guided_note(out, captions.tagger_penalty(model)))
    # What the encoder's ImageNet head recognised and how familiar the photo is (issue 24).
    rec, fam = (out.recognised or [])[:3], out.familiarity
    if rec:
        st.caption("recognised: " + "; ".join(
            f"{html.escape(r.label)} {r.prob:.2f}" + (f" → {html.escape(r.words[0])}" if r.words else "")
            for r in rec if r.prob >= 0.05 or r is rec[0]))
    if fam is not None:
        badge = {"familiar": st.success, "less familiar": st.warning, "unfamiliar": st.error}[fam.level]
        badge(f"{fam.message} (familiarity: percentile {fam.percentile:.0f} of the Flickr8k dev photos)")

    if cur.flickr_name:
        refs = photos.flickr_references(cur.flickr_name)
        if refs:
            st.markdown("**Reference captions** (Flickr8k)")
            st.markdown("\n".join(f"{i + 1}. {html.escape(r)}" for i, r in enumerate(refs)))
            s = ui.scores(out.text, tuple(refs))
            # CIDEr-D leads: it rewards the content words a caption shares with the references and
            # is meaningful on one photo; BLEU-4 needs a shared 4-word run and is often 0 on one photo.
            st.markdown(ui.METRIC_CSS, unsafe_allow_html=True)
            c1, c2 = st.columns(2)
            if "CIDEr" in s:
                c1.metric("CIDEr-D (this photo)", f"{s['CIDEr']:.3f}",
                          help="Consensus with the five references, weighted towards rare, informative words "
                               "(document frequencies from the Flickr8k training captions). The default model "
                               "averages 0.553 over the 1,000 test photos.")
            c2.metric("BLEU-4 (this photo)", f"{s['BLEU-4']:.3f}",
                      help="Geometric mean of 1- to 4-word overlaps: a caption sharing no four-word run with any "
                           "reference scores 0 however good it is. Meaningful over a whole test set, not one photo.")
            if s["BLEU-4"] == 0:
                st.caption("BLEU-4 is 0 because no run of four words matches a reference exactly; on one photo "
                           "that is common even for good captions. Read CIDEr-D instead.")

st.markdown("**N-best captions**")
# The score column's help states the score actually used for the order shown.
score_help = (f"log-probability / length^{cur.length_penalty:g} + {cur.rerank:g} × the photo-caption matcher's cosine "
              f"(how well it says the caption fits the photo, −1 to 1): the order after re-ranking the best "
              f"{cur.model.rerank_candidates(cur.beam)} finished captions"
              if cur.rerank else f"log-probability / length^{cur.length_penalty:g}, what beam search ranks by")
# Full width, below the photo and the caption: the whole caption and its scores stay in view.
st.dataframe([{"#": i + 1, "caption": c.text, "log-prob": c.logprob, "score": c.score,
               "ended": "yes" if c.finished else "no (max length)"} for i, c in enumerate(out.captions)],
             hide_index=True, width="stretch",
             column_config={"#": st.column_config.NumberColumn("#", width=30),
                            "caption": st.column_config.TextColumn("caption", width="large"),
                            "log-prob": st.column_config.NumberColumn("log-prob", format="%.3f"),
                            "score": st.column_config.NumberColumn("score", format="%.3f", help=score_help),
                            "ended": st.column_config.TextColumn("ended")})

st.divider()
words = out.words
if not words:
    st.info("The caption is empty: there is no word to explain.")
    st.stop()

st.subheader("Where did each word come from?")
try:
    methods = explanations.explanation_methods(model)
except NotAvailable:
    methods = []
try:
    probs = ui.word_probs(cur.model.key, cur.digest, tuple(out.tokens), model, cur.full)
except (NotAvailable, ValueError):
    probs = None
c1, c2 = st.columns([3, 1])
with c1:
    t = ui.word_picker(words, probs, key=f"word-{cur.model.key}-{cur.digest}-{'-'.join(map(str, out.tokens))}",
                       label="Click a word (with its probability)")
choices = methods or ["grad_cam"]
method = c2.selectbox("Attribution method", choices, index=choices.index("grad_cam") if "grad_cam" in choices else 0,
                      format_func=lambda m: explanations.METHOD_TITLES.get(m, m), key="caption_method",
                      help="Grad-CAM is instant; the others take one to a few seconds per word on a CPU")

cols = st.columns(3)
cols[0].image(cur.image, caption="photo", width="stretch")
att = figures.attention_overlay(cur.image, out.attention, t)
if att is not None:
    cols[1].image(att, caption=f"decoder attention for “{words[t]}” (its weights, not an explanation)",
                  width="stretch", clamp=True)
else:
    cols[1].info(f"{cur.model.title} has no attention: only the attribution map is shown.")
name = explanations.METHOD_TITLES.get(method, method)
m = None
try:
    with st.spinner(f"{name} for “{words[t]}”..."):
        if method == "grad_cam":
            m = ui.grad_cam_all(cur.model.key, cur.digest, tuple(out.tokens), model, cur.full)[t]
        else:
            m = ui.attribution(cur.model.key, cur.digest, tuple(out.tokens), t, method, model, cur.full)
    cols[2].image(figures.map_overlay(cur.image, m, method), caption=f"{name} for “{words[t]}”", width="stretch",
                  clamp=True)
except (NotAvailable, ValueError) as e:
    cols[2].info(str(e))
st.markdown(figures.colour_scale_html(f"{name}: {figures.map_normalisation(method)}"
                                 + ("; attention: " + figures.map_normalisation("attention") if att is not None else "")),
            unsafe_allow_html=True)

# Trust beside the map: the deletion/insertion check, on demand (a few seconds) and cached.
if m is not None:
    fkey = (cur.model.key, cur.digest, tuple(out.tokens), t, method)
    done = st.session_state.setdefault("faith_done", set())
    with cols[2]:
        # One button per photo, caption, word and method: its click belongs to that map only.
        bkey = "faith_check-" + photos.digest(repr(fkey).encode())[:12]
        # The click is recorded by a callback, which Streamlit runs before the next script run: a
        # click that lands while a run is still going (a cached page redraws fast) interrupts that
        # run, and the button's own True can then be lost; the callback's mark is not.
        if fkey not in done:
            st.button("Check this map's faithfulness", key=bkey, icon=":material/fact_check:", on_click=done.add,
                      args=(fkey,), help=f"Delete and reveal the map's pixels in its order, against "
                                         f"{explanations.RANDOM_SEEDS} random orders (a few seconds)")
        if fkey in done:
            try:
                with st.spinner("Deleting and inserting pixels..."):
                    r = ui.faithfulness(cur.model.key, cur.digest, tuple(out.tokens), t, (method,), model, cur.full,
                                        {method: m})[0]
            except NotAvailable as e:
                st.info(str(e))
            else:
                st.badge(f"faithfulness: {r.verdict}", color=explanations.VERDICT_COLOUR[r.verdict],
                         icon=":material/verified:" if r.beats_random else ":material/help:")
                st.caption(f"Deletion area {r.deletion_auc:.3f} (random {r.random_deletion_band[0]:.3f}–"
                           f"{r.random_deletion_band[1]:.3f}), insertion {r.insertion_auc:.3f} (random "
                           f"{r.random_insertion_band[0]:.3f}–{r.random_insertion_band[1]:.3f}: mean ± 1 SD of "
                           f"{r.seeds} random orders). " + explanations.FAITHFUL_IS_NOT_CORRECT)

g = model.grid_side
note = f"{explanations.ATTENTION_NOTE} Its grid is {g}×{g}. " if att is not None else ""
st.caption(f"{note}The attribution map explains the word's log-probability given the photo and the words before it. "
           "More methods, the random-order band and the model-randomisation check are on the Explain page.")
