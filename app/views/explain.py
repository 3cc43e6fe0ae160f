"""Explain page: a per-word overlay gallery for one method, every method side by side for one
word with a deletion/insertion check against a random order, and the beam-search tree. The
decoder's attention and SmoothGrad are offered beside the attribution methods for comparison,
but labelled as what they are, with their measured scores (``explanations.NOT_EXPLANATIONS``)."""
from __future__ import annotations

import streamlit as st

from app.services import NotAvailable
from app.services import explanations, figures
from app import ui

cur = ui.current()
st.title("Explain")
if not ui.require_image(cur):
    st.stop()
model, out = ui.current_caption(cur)
if out is None:
    st.stop()
st.markdown(f"**Caption:** {out.text}")
words = out.words
if not words:
    st.info("The caption is empty: there is no word to explain.")
    st.stop()
try:
    methods = explanations.methods_for(model)
except NotAvailable as e:
    st.info(str(e))
    st.stop()
tokens = tuple(out.tokens)
key = f"{cur.model.key}-{cur.digest}-{'-'.join(map(str, tokens))}"
title = explanations.METHOD_TITLES.get


def word_map(method: str, t: int):
    """(S, S) map of word t for a method (cached per image, caption and word)."""
    if method == "grad_cam":
        return ui.grad_cam_all(cur.model.key, cur.digest, tokens, model, cur.full)[t]
    return ui.attribution(cur.model.key, cur.digest, tokens, t, method, model, cur.full)


SECTIONS = ["Word gallery", "Methods side by side", "Beam-search tree"]
section = st.segmented_control("View", SECTIONS, default=SECTIONS[0], key="explain_section") or SECTIONS[0]

if section == SECTIONS[0]:
    method = st.selectbox("Method", methods, index=methods.index("grad_cam") if "grad_cam" in methods else 0,
                          format_func=lambda m: title(m, m), key="gallery_method",
                          help="Grad-CAM and attention are instant; the others take one to a few seconds per word "
                               "on a CPU")
    # Trust beside every map: the deletion/insertion check for every word, on demand (a few
    # seconds a word) and cached per word, so a badge once computed stays.
    gkey = (cur.model.key, cur.digest, tokens, method)
    checked = st.session_state.setdefault("gallery_faith_done", set())
    if gkey not in checked:  # a callback records the click (see the Caption page's faithfulness button)
        st.button(f"Check the faithfulness of all {len(words)} maps", key="gallery_faith-" + key + "-" + method,
                  icon=":material/fact_check:", on_click=checked.add, args=(gkey,),
                  help=f"For each word, delete and reveal the map's pixels in its order, against "
                       f"{explanations.RANDOM_SEEDS} random orders (a few seconds a word)")
    ncol = 4
    cols = st.columns(ncol)
    maps = {}
    with st.spinner(f"{title(method, method)} for {len(words)} words..."):
        for t, w in enumerate(words):
            try:
                maps[t] = word_map(method, t)
            except (NotAvailable, ValueError) as e:
                st.info(str(e))
                break
            cols[t % ncol].image(figures.map_overlay(cur.image, maps[t], method), caption=f"{t + 1}. {w}",
                                 width="stretch", clamp=True)
    if gkey in checked and maps:
        with st.spinner("Deleting and inserting pixels for every word..."):
            for t, m in maps.items():
                try:
                    r = ui.faithfulness(cur.model.key, cur.digest, tokens, t, (method,), model, cur.full, {method: m})[0]
                except NotAvailable as e:
                    st.info(str(e))
                    break
                with cols[t % ncol]:
                    st.badge(f"{words[t]}: {r.verdict}", color=explanations.VERDICT_COLOUR[r.verdict],
                             icon=":material/verified:" if r.beats_random else ":material/help:",
                             help=f"deletion area {r.deletion_auc:.3f} (random {r.random_deletion_band[0]:.3f}–"
                                  f"{r.random_deletion_band[1]:.3f}), insertion {r.insertion_auc:.3f} (random "
                                  f"{r.random_insertion_band[0]:.3f}–{r.random_insertion_band[1]:.3f})")
        st.caption(explanations.FAITHFUL_IS_NOT_CORRECT)
    st.markdown(figures.colour_scale_html(f"each map on its own: {figures.map_normalisation(method)}"), unsafe_allow_html=True)
    if method in explanations.NOT_EXPLANATIONS:
        st.caption(explanations.NOT_EXPLANATIONS[method])

elif section == SECTIONS[1]:
    try:
        probs = ui.word_probs(cur.model.key, cur.digest, tokens, model, cur.full)
    except (NotAvailable, ValueError):
        probs = None
    t = ui.word_picker(words, probs, key=f"cmp-word-{key}", label="Word (with its probability)")
    default = [m for m in ("grad_cam", "integrated_gradients") if m in methods]
    chosen = st.multiselect("Methods", methods, default=default, format_func=lambda m: title(m, m), key="cmp_methods")
    maps = {}
    if chosen:
        cols = st.columns(min(len(chosen), 3))
        with st.spinner("Computing maps..."):
            for i, m in enumerate(chosen):
                try:
                    maps[m] = word_map(m, t)
                except (NotAvailable, ValueError) as e:
                    cols[i % len(cols)].info(f"{title(m, m)}: {e}")
                    continue
                cols[i % len(cols)].image(figures.map_overlay(cur.image, maps[m], m), caption=title(m, m),
                                          width="stretch", clamp=True)
        if maps:
            st.markdown(figures.colour_scale_html("; ".join(f"{title(m, m)}: {figures.map_normalisation(m)}" for m in maps)),
                        unsafe_allow_html=True)
    st.markdown("#### Deletion / insertion against random orders")
    st.caption("Blocks of pixels are removed (deletion) or revealed (insertion) in the order a map ranks them, and the "
               "word's probability is tracked (Petsiuk et al. 2018). A faithful map has a lower deletion area and a "
               f"higher insertion area than {explanations.RANDOM_SEEDS} seeded random orders of the same blocks, outside their "
               "band (grey: mean ± 1 standard deviation); inside it, it is not evidence either way. "
               + explanations.FAITHFUL_IS_NOT_CORRECT)
    run = st.toggle("Run the check", value=True, key="run_faith")
    if run and maps:
        try:
            with st.spinner("Deleting and inserting pixels..."):
                res = ui.faithfulness(cur.model.key, cur.digest, tokens, t, tuple(maps), model, cur.full, maps)
        except NotAvailable as e:
            st.info(str(e))
        else:
            rows = [{"method": title(r.method, r.method), "deletion AUC ↓": round(r.deletion_auc, 4),
                     "random deletion": round(r.random_deletion_auc, 4),
                     "random deletion band": "{:.4f}–{:.4f}".format(*r.random_deletion_band),
                     "insertion AUC ↑": round(r.insertion_auc, 4),
                     "random insertion": round(r.random_insertion_auc, 4),
                     "random insertion band": "{:.4f}–{:.4f}".format(*r.random_insertion_band),
                     "beats random": "yes" if r.beats_random else "NO"} for r in res]
            st.dataframe(rows, hide_index=True, width="stretch")
            losers = [title(r.method, r.method) for r in res if not r.beats_random]
            if losers:
                st.warning(f"Not better than random for “{words[t]}”: {', '.join(losers)}. Treat these maps with "
                           "suspicion for this word (outside the random band on the wrong side, or inside it).")
            else:
                st.success(f"Every map beats the random order for “{words[t]}”.")
            st.plotly_chart(figures.faithfulness_figure(res, explanations.METHOD_TITLES), key=f"faith-{key}-{t}")
    st.markdown("#### Model-randomisation check")
    st.caption("The decoder's weights are re-initialised (in a copy) and each map recomputed (Adebayo et al. 2018). A "
               "map that barely changes does not depend on what the model learned: it passes when the rank "
               f"correlation of the two maps is below {explanations.RANDOMISATION_MAX_RHO:g}.")
    if maps and st.button("Run the randomisation check", key="run_random", icon=":material/shuffle:"):
        st.session_state.setdefault("random_done", set()).add((key, t, tuple(maps)))
    if maps and (key, t, tuple(maps)) in st.session_state.get("random_done", set()):
        try:
            with st.spinner("Recomputing the maps with a randomised decoder..."):
                checks = [ui.randomisation(cur.model.key, cur.digest, tokens, t, m, model, cur.full) for m in maps]
        except (NotAvailable, ValueError) as e:
            st.info(str(e))
        else:
            st.dataframe([{"method": title(c.method, c.method), "Spearman with randomised decoder ↓":
                           round(c.spearman, 3), "passes": "yes" if explanations.passes_randomisation(c) else "NO"}
                          for c in checks],
                         hide_index=True, width="stretch", key=f"random-table-{key}-{t}")
    for m in maps:
        if m in explanations.NOT_EXPLANATIONS:
            st.caption(explanations.NOT_EXPLANATIONS[m])

else:
    if out.lattice is None:
        st.info("No beam lattice: decoding kept none.")
        st.stop()
    show_pruned = st.toggle("Show the pruned candidates", False, key="tree_pruned",
                            help="Beam search looks at twice the beam's width of extensions each step and keeps "
                                 "the best; the rest are pruned. Off, only the kept beams and finished captions "
                                 "are drawn.")
    reranked = out.best.match is not None
    beam_best = None
    if reranked:
        # The same search without the matcher's vote: what beam search alone would have returned.
        plain = ui.caption(cur.model.key, cur.digest, cur.beam, cur.length_penalty, 1, model, cur.full, 0.0, cur.guide)
        beam_best = (plain.tokens, plain.best.finished)
    try:
        fig = figures.beam_tree_figure(out.lattice, model.vocab, out.tokens, out.best.finished,
                                       show_pruned=show_pruned, beam_best=beam_best)
    except NotAvailable as e:
        st.info(str(e))
        st.stop()
    st.plotly_chart(fig, key=f"tree-{key}")
    banks = (f"Guided decoding keeps two banks of {cur.beam} each step: the best partial captions that already name "
             f"{' or '.join(out.guided)} and the best that do not yet (blue)" if out.guided else
             f"Each step keeps the {cur.beam} best partial captions (blue)")
    st.caption(f"Beam size {cur.beam}. {banks}; a square is a caption that ended there. The red path is the caption "
               "shown. Words that do not fit are in the hover.")
    if reranked:
        st.markdown("#### Re-ranking")
        # As many re-ranked captions as the search may return (nbest <= beam), to rank the choice among.
        listed = ui.caption(cur.model.key, cur.digest, cur.beam, cur.length_penalty, cur.beam, model, cur.full,
                            cur.rerank, cur.guide).captions
        rows = [{"caption": c.text, "beam score": round(c.score - cur.rerank * c.match, 3),
                 "matcher cosine": round(c.match, 3), f"beam score + {cur.rerank:g} × cosine": round(c.score, 3)}
                for c in listed]
        mine = next((r for r, c in zip(rows, listed) if c.tokens == out.tokens), rows[0])
        rank = 1 + sorted((r["beam score"] for r in rows), reverse=True).index(mine["beam score"])
        if beam_best[0] == out.tokens:
            st.markdown(f"The matcher agreed with beam search: its best caption, “{out.text}”, is also the one "
                        "with the best beam score.")
        else:
            st.markdown(f"Beam search alone ranked “{plain.text}” first (the dashed green path). The matcher, "
                        "which scores how well a caption fits this photo, moved “" + out.text + "” up: its beam "
                        f"score is rank {rank} of the {len(rows)} below, but beam score + {cur.rerank:g} × cosine "
                        "is the highest.")
        st.dataframe(rows, hide_index=True, width="stretch", key=f"rerank-{key}")
        st.caption(f"Beam score: log-probability / length^{cur.length_penalty:g}. The search kept "
                   f"{cur.model.rerank_candidates(cur.beam)} finished captions for re-ranking; the table shows the "
                   f"{len(rows)} best after it.")
