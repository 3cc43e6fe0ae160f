"""Model page: the model card, test metrics beside published Flickr8k numbers, training curves,
and every available decoder captioning the same photo side by side (its test metrics, this
photo's scores, a word diff against the sidebar's model, and its maps)."""
from __future__ import annotations

import html
import time

import streamlit as st

from app.services import NotAvailable
from app.services import captions, figures, photos, registry
from app import ui

cur = ui.current()
st.title("Model")
if not cur.models:
    st.warning(registry.no_models_message())
    st.stop()
m = cur.model
st.subheader(m.title)
if m.error:
    st.error(f"This model cannot be loaded: {m.error}")

tab_card, tab_metrics, tab_curves, tab_compare = st.tabs(["Model card", "Test metrics", "Training curves",
                                                           "Compare decoders"])

with tab_card:
    card = registry.model_card(m.path)
    if card:
        st.markdown(card)
    else:
        st.info(f"No MODEL_CARD.md in {m.path}.")
    cfg = registry.model_config(m.path)
    if cfg:
        with st.expander("config.json"):
            st.json(cfg, expanded=False)

with tab_metrics:
    ours = {x.name: registry.test_metrics(x.path) for x in cur.models}
    if not any(ours.values()):
        st.info("No metrics.json in any model folder yet: only the published numbers are shown.")
    rows = registry.metrics_table(ours)
    shown = [{k: ("—" if r.get(k) is None else f"{r[k]:.3f}") if k in registry.METRIC_KEYS else r[k] for k in r}
             for r in rows]
    st.dataframe(shown, hide_index=True, width="stretch",
                 column_config={"source": st.column_config.TextColumn("source", width="large")})
    st.caption("Published numbers are on the Flickr8k test split with the authors' own encoders (VGG/GoogLeNet) and "
               "tokenisation; METEOR needs Java. Scores are fractions (papers print them ×100). Blank cells: not "
               "reported.")

with tab_curves:
    rows = registry.training_curves(m.path)
    if not rows:
        st.info(f"No metrics.csv (training curve) in {m.path}.")
    else:
        st.plotly_chart(figures.curves_figure(rows), key=f"curves-{m.key}")
        st.dataframe(registry.curve_table(rows), hide_index=True, width="stretch")

with tab_compare:
    if ui.require_image(cur):
        usable = [x for x in cur.models if not x.error]
        refs = photos.flickr_references(cur.flickr_name) if cur.flickr_name else []
        results = {}
        for x in usable:
            cap = ui.load_model(x)
            if cap is None:
                continue
            # Each model re-ranks as its bundle says, unless the sidebar turned re-ranking off.
            rerank = x.rerank if cur.rerank or not (cur.model and cur.model.rerank) else 0.0
            t0 = time.perf_counter()
            out = ui.caption(x.key, cur.digest, cur.beam, cur.length_penalty, 1, cap, cur.full, rerank,
                             ui.guide_choice(x.key))
            # A cache hit returns the first computation's time: say "cached" rather than a stale figure.
            took = "cached" if time.perf_counter() - t0 < 0.5 * out.seconds else f"{out.seconds * 1000:.0f} ms"
            results[x.name] = (x, cap, out, took)
        # Words are compared with the sidebar's model (or the first one shown).
        base = results.get(m.name) or next(iter(results.values()), None)
        cols = st.columns(max(1, min(len(results), 3)))
        for i, (x, cap, out, took) in enumerate(results.values()):
            with cols[i % len(cols)]:
                st.markdown(f"**{registry.DECODER_TITLES.get(x.decoder, x.name)}**  \n`{x.name}`")
                st.markdown(f'<p class="compare-caption" style="font-size:1.3rem;font-weight:600">'
                            f"{html.escape(out.text)}</p>", unsafe_allow_html=True)
                if base is not None and x is not base[0]:
                    st.markdown(f'<p class="word-diff">{figures.word_diff_html(captions.word_diff(base[2].words, out.words))}'
                                f"</p>", unsafe_allow_html=True,
                                help=f"Word by word against {base[0].title}'s caption: green words only this model says, "
                                     "struck-through words only the other says")
                st.caption(f"log-probability {out.best.logprob:.2f} · {took}")
                test = registry.metrics_line(registry.test_metrics(x.path))
                st.caption(f"Flickr8k test (1,000 photos): {test}" if test else "No test metrics (metrics.json) in "
                           "this model's folder.")
                if refs:
                    s = ui.scores(out.text, tuple(refs))
                    st.caption("This photo against its references: "
                               + " · ".join(f"{k} {s[k]:.3f}" for k in ("CIDEr", "BLEU-4") if k in s))
                if out.words:
                    w0 = captions.first_content_word(out.words)
                    try:
                        cam = ui.grad_cam_all(x.key, cur.digest, tuple(out.tokens), cap, cur.full)[w0]
                    except (NotAvailable, ValueError) as e:
                        st.info(str(e))
                    else:
                        st.image(figures.map_overlay(cur.image, cam, "grad_cam"), clamp=True, width="stretch",
                                 caption=f"Grad-CAM for “{out.words[w0]}”")
                    if out.attention is not None:
                        st.image(figures.attention_overlay(cur.image, out.attention, w0), clamp=True, width="stretch",
                                 caption=f"attention for “{out.words[w0]}”")
        if results:
            st.markdown(figures.colour_scale_html(f"each map on its own: {figures.map_normalisation('grad_cam')}"),
                        unsafe_allow_html=True)
        if refs:
            st.markdown("**References:** " + " · ".join(html.escape(r) for r in refs))
