"""Everything the app draws: heat-map overlays in one colour map with their scale and stated
normalisation, and every Plotly figure (faithfulness curves, the beam tree, the embedding map,
training curves). Display only: scores and checks always use the raw maps."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image

from explain.attribution import overlay
from explain.beam import beam_tree
from explain.embeddings import Projection

from app.services import NotAvailable

if TYPE_CHECKING:
    from app.services.explanations import Faithfulness

#: One colour map for every heat map in the app (attributions, attention, encoder channels):
#: perceptually uniform, so equal steps in value look like equal steps in colour.
CMAP = "inferno"
#: Methods whose maps are per-pixel gradients: speckled and signed, so for display they are shown
#: as |value|, lightly smoothed and clipped at a high percentile (Smilkov et al. 2017; Sundararajan
#: et al. 2017 show them this way). Scores and faithfulness checks always use the raw maps.
PIXEL_METHODS = frozenset({"integrated_gradients", "gradient_shap", "smoothgrad", "saliency", "input_x_gradient"})
DISPLAY_PERCENTILE = 99.0
SMOOTH_SIGMA = 0.015  # Gaussian sigma as a fraction of the map's side (about 3 px at 224)


def display_map(m: np.ndarray, method: str = "") -> np.ndarray:
    """A map scaled to [0, 1] for display only (never for scores).

    Pixel methods: |map|, Gaussian-smoothed, then divided by its 99th percentile and clipped.
    Other maps (Grad-CAM, attention, occlusion, channels): negative values set to 0, then divided
    by the 99th percentile and clipped. So 1 means "among the map's strongest 1%" on every map."""
    a = np.asarray(m, dtype=np.float32)
    if method in PIXEL_METHODS:
        from scipy.ndimage import gaussian_filter

        a = gaussian_filter(np.abs(a), sigma=max(0.5, SMOOTH_SIGMA * max(a.shape)))
    else:
        a = np.clip(a, 0, None)
    top = float(np.percentile(a, DISPLAY_PERCENTILE)) if a.size else 0.0
    if top <= 0:
        top = float(a.max()) if a.size else 0.0
    return np.zeros_like(a) if top <= 0 else np.clip(a / top, 0.0, 1.0).astype(np.float32)


def map_normalisation(method: str = "") -> str:
    """The sentence that states how a method's map was scaled for display."""
    if method in PIXEL_METHODS:
        return (f"|attribution|, smoothed (Gaussian, σ = {SMOOTH_SIGMA * 100:g}% of the side), divided by its own "
                f"{DISPLAY_PERCENTILE:g}th percentile and clipped to 1 — for display; the checks use the raw map")
    return (f"negative values set to 0, divided by the map's own {DISPLAY_PERCENTILE:g}th percentile and clipped "
            "to 1")


def colour_scale_html(note: str = "", cmap: str = CMAP, width: int = 220) -> str:
    """A small horizontal colour bar (HTML, no image) with its 0 and 1 ends and what they mean."""
    from matplotlib import colormaps

    cm = colormaps[cmap]
    stops = ", ".join("#%02x%02x%02x" % tuple(int(255 * c) for c in cm(i / 8)[:3]) for i in range(9))
    return (f'<div class="colour-scale" style="display:flex;align-items:center;gap:0.4rem;font-size:0.8rem;'
            f'opacity:0.85;flex-wrap:wrap"><span>0</span><span style="display:inline-block;width:{width}px;'
            f'height:10px;border-radius:2px;background:linear-gradient(to right, {stops})"></span><span>1</span>'
            + (f"<span>{note}</span>" if note else "") + "</div>")


def word_diff_html(ops: Sequence[tuple[str, str]]) -> str:
    """A word diff (``captions.word_diff``) as inline HTML: added words on green, removed words
    struck through in red, shared words plain."""
    import html

    style = {"added": '<span class="diff-added" style="background:#c8f0c8;border-radius:3px;padding:0 2px">{}</span>',
             "removed": '<del class="diff-removed" style="color:#b3261e">{}</del>', "same": "{}"}
    return " ".join(style[op].format(html.escape(w)) for op, w in ops)


def map_overlay(image: Image.Image, m: np.ndarray, method: str = "") -> np.ndarray:
    """The map as the app shows it: ``display_map`` in the app's colour map over the photo."""
    return overlay(image, display_map(m, method), cmap=CMAP)



def to_uint8(a: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] -> uint8 (four times smaller in a cache)."""
    return (np.clip(np.asarray(a, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def attention_overlay(image: Image.Image, attention: Optional[np.ndarray], t: int) -> Optional[np.ndarray]:
    """The decoder's attention at word t over the image, or None for a decoder without attention."""
    if attention is None or not 0 <= t < len(attention):
        return None
    return map_overlay(image, np.asarray(attention[t], dtype=np.float32), "attention")



def faithfulness_figure(results: Sequence["Faithfulness"], titles: Optional[dict[str, str]] = None):
    """Deletion and insertion curves of every method (named by ``titles``), the random baselines
    dashed with their band."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Deletion (lower is better)", "Insertion (higher is better)"))
    for col, kind in ((1, "deletion"), (2, "insertion")):
        if results:
            c = results[0].curves
            if f"random {kind} low" in c:  # the spread of the seeded random orders, as a band
                (x, lo), (_, hi) = c[f"random {kind} low"], c[f"random {kind} high"]
                fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", fillcolor="rgba(128,128,128,0.25)",
                                         line=dict(width=0), hoverinfo="skip", legendgroup="random",
                                         name=f"random orders ({results[0].seeds}): mean ± 1 SD",
                                         showlegend=col == 1), 1, col)
            x, y = c[f"random {kind}"]
            fig.add_trace(go.Scatter(x=x, y=y, name="random orders (mean)", line=dict(dash="dash", color="grey"),
                                     showlegend=col == 1, legendgroup="random"), 1, col)
        for i, r in enumerate(results):
            x, y = r.curves[kind]
            fig.add_trace(go.Scatter(x=x, y=y, name=(titles or {}).get(r.method, r.method), legendgroup=r.method,
                                     showlegend=col == 1, line=dict(color=_COLORS[i % len(_COLORS)])), 1, col)
        fig.update_xaxes(title_text="fraction of the image", range=[0, 1], row=1, col=col)
        fig.update_yaxes(title_text="p(word)", row=1, col=col)
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=40, b=10))
    return fig


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


# --------------------------------------------------------------------------- beam tree

#: What the beam tree's label placement assumes: the narrowest plot area the app draws it in
#: (an 800 px window less the sidebar and margins: about 410 px, measured in the browser tour's
#: screenshots) and the width of one character of its 10 px labels.
TREE_PLOT_WIDTH = 400
TREE_ROW_PX = 34
TREE_CHAR_PX = 6.2
TREE_LABEL_PX = 13


def place_labels(words: dict[int, str], pos: dict[int, tuple[float, float]], order: Sequence[int],
                 width_px: float = TREE_PLOT_WIDTH, row_px: float = TREE_ROW_PX) -> dict[int, str]:
    """Where each node's word is written: taken in ``order`` (most important first), a word goes
    just above its marker, else just below it, wherever its box overlaps no word already written;
    a word that fits in neither place is left to the hover. Boxes are estimated in pixels for a
    plot ``width_px`` wide whose rows are ``row_px`` apart.

    Returns:
        node id -> Plotly textposition ("top center" or "bottom center") for the written words.
    """
    xs = [x for x, _ in pos.values()]
    lo, span = min(xs), max(max(xs) - min(xs), 1.0)
    px_per_step = width_px / (span + 1)  # half a step of margin each side
    boxes: list[tuple[float, float, float, float]] = []
    out: dict[int, str] = {}
    for i in order:
        if i not in pos or not words.get(i):
            continue
        x, y = pos[i]
        cx, half = (x - lo + 0.5) * px_per_step, len(words[i]) * TREE_CHAR_PX / 2 + 2
        for where, top in (("top center", y * row_px - TREE_LABEL_PX - 4), ("bottom center", y * row_px + 4)):
            box = (cx - half, cx + half, top, top + TREE_LABEL_PX)
            if all(box[1] <= b[0] or box[0] >= b[1] or box[3] <= b[2] or box[2] >= b[3] for b in boxes):
                boxes.append(box)
                out[i] = where
                break
    return out


def beam_tree_figure(lattice: Optional[list[dict]], vocab, best_tokens: Optional[Sequence[int]] = None,
                     best_finished: bool = True, show_pruned: bool = True,
                     beam_best: Optional[tuple[Sequence[int], bool]] = None):
    """The beam-search tree (explain.beam links the lattice) drawn with Plotly.

    x = step, y = rank among the candidates drawn in that step; kept beams blue, pruned candidates
    grey (``show_pruned=False`` collapses them), finished captions as squares, the returned
    caption's path red. ``beam_best``: (tokens, finished) of the caption beam search itself ranked
    first, drawn dashed when re-ranking chose another. Words are written where they fit without
    overlapping (the returned caption's first, then the beam's own best, finished captions, kept
    beams, pruned candidates); every node's word is in its hover."""
    import plotly.graph_objects as go

    if not lattice:
        raise NotAvailable("no beam lattice for this caption (greedy decoding keeps none)")
    tree = beam_tree(lattice, vocab, best_tokens=list(best_tokens) if best_tokens is not None else None,
                     best_finished=best_finished)
    beam_path: set[int] = set()
    if beam_best is not None and list(beam_best[0]) != list(best_tokens or []):
        other = beam_tree(lattice, vocab, best_tokens=list(beam_best[0]), best_finished=beam_best[1])
        beam_path = {n.id for n in other.nodes if n.on_best and n.parent is not None}
    pos = tree.positions(collapse_pruned=not show_pruned)
    fig = go.Figure()
    for style, color, width, dash, pick in (
            ("pruned", "#cccccc", 1, None, lambda c: not c.kept and not c.finished),
            ("kept", "#6fa8dc", 1.5, None, lambda c: (c.kept or c.finished) and not c.on_best),
            ("beam's own best", "#2ca02c", 2.5, "dash", lambda c: c.id in beam_path and not c.on_best),
            ("best", "#d62728", 3, None, lambda c: c.on_best)):
        xs, ys = [], []
        for parent, child in tree.edges():
            c = tree.nodes[child]
            if pick(c) and child in pos and parent in pos:
                (x0, y0), (x1, y1) = pos[parent], pos[child]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=width, dash=dash),
                                     hoverinfo="skip", name=f"{style} edges", showlegend=False))
    drawn = [n for n in tree.nodes if n.id in pos]
    importance = lambda n: (0 if n.on_best else 1 if n.id in beam_path else 2 if n.finished else 3 if n.kept else 4,
                            n.step, -n.logprob)
    labelled = place_labels({n.id: n.word for n in drawn}, pos, [n.id for n in sorted(drawn, key=importance)])
    groups = (("returned caption", lambda n: n.on_best, "#d62728"),
              ("beam's own best", lambda n: n.id in beam_path and not n.on_best, "#2ca02c"),
              ("kept beam", lambda n: n.kept and not n.on_best and n.id not in beam_path, "#1f77b4"),
              ("finished caption", lambda n: n.finished and not n.on_best and n.id not in beam_path, "#2ca02c"),
              ("pruned", lambda n: not (n.kept or n.finished or n.on_best or n.id in beam_path), "#aaaaaa"))
    for name, pick, color in groups:
        ns = [n for n in drawn if pick(n)]
        if not ns:
            continue
        fig.add_trace(go.Scatter(
            x=[pos[n.id][0] for n in ns], y=[pos[n.id][1] for n in ns], mode="markers+text", name=name,
            text=[n.word if n.id in labelled else "" for n in ns],
            textposition=[labelled.get(n.id, "top center") for n in ns],
            textfont=dict(size=10, color=color),
            marker=dict(color=color, size=9, symbol=["square" if n.finished else "circle" for n in ns]),
            customdata=[[n.word, n.step + 1, n.logprob, n.step_logprob, "yes" if n.kept else "no",
                         "yes" if n.finished else "no"] for n in ns],
            hovertemplate="<b>%{customdata[0]}</b><br>step %{customdata[1]}<br>cumulative log-prob "
                          "%{customdata[2]:.3f}<br>word log-prob %{customdata[3]:.3f}<br>kept %{customdata[4]}, "
                          "finished %{customdata[5]}<extra></extra>"))
    rows = 1 + max(int(y) for _, y in pos.values())
    hidden = len(tree.nodes) - len(drawn)
    fig.update_yaxes(autorange="reversed", title_text="rank in step", zeroline=False, showticklabels=False)
    fig.update_xaxes(title_text="step", dtick=1, zeroline=False)
    # The legend goes below the plot: above it, it runs into the title in a narrow window.
    fig.update_layout(height=max(320, TREE_ROW_PX * (rows + 1) + 150), margin=dict(l=10, r=10, t=30, b=60),
                      legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="left", x=0),
                      title=f"{len(tree.nodes) - 1} candidates over {tree.steps} steps"
                            + (f" ({hidden} pruned ones collapsed)" if hidden else ""))
    return fig


PROJECTION_NAMES = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}


def embedding_figure(proj: Projection, method: str, highlight: Sequence[str] = (), focus: Optional[str] = None,
                     neighbours: Sequence[str] = (), colour: Optional[dict[str, Any]] = None, top_n: int = 0,
                     labels: int = 40):
    """Scatter of the projected words: hover shows the word; ``colour`` (word -> category or
    cluster) colours the points; the ``labels`` most frequent words are written on the map;
    ``top_n`` keeps only the most frequent words (0: all); the caption's words red and labelled;
    with ``focus`` the view zooms to that word and labels its ``neighbours``. Every point carries
    its word as customdata, so a click can select it."""
    import plotly.graph_objects as go

    hl, nb = set(highlight), set(neighbours) - set(highlight) - {focus}
    keep = len(proj.words) if top_n <= 0 else min(top_n, len(proj.words))
    shown = set(proj.words[:keep]) | hl | nb | ({focus} if focus else set())
    xy = np.asarray(proj.coords(method), dtype=np.float32)
    index = {w: i for i, w in enumerate(proj.words)}
    base = [i for i, w in enumerate(proj.words) if w in shown and w not in hl and w not in nb]
    fig = go.Figure()
    groups: dict[str, list[int]] = {}
    for i in base:
        g = (colour or {}).get(proj.words[i])
        groups.setdefault("other" if g is None else str(g), []).append(i)
    palette = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79",
               "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
               "#9c9ede", "#cedb9c", "#e7969c"]
    names = sorted(g for g in groups if g != "other") + (["other"] if "other" in groups else [])
    for j, g in enumerate(names):
        idx = groups[g]
        grey = g == "other" or colour is None
        fig.add_trace(go.Scattergl(
            x=xy[idx, 0], y=xy[idx, 1], mode="markers",
            name=("vocabulary" if colour is None else ("not in a word list" if g == "other" else g.replace("_", " "))),
            text=[proj.words[i] for i in idx], customdata=[proj.words[i] for i in idx],
            hovertemplate="%{text}<extra>" + ("" if grey else g.replace("_", " ")) + "</extra>",
            marker=dict(size=5 if grey else 7, color="#a8b8c8" if grey else palette[j % len(palette)],
                        opacity=0.45 if grey else 0.85)))
    top = [i for i in range(min(labels, keep)) if proj.words[i] not in hl and proj.words[i] not in nb]
    if top:
        fig.add_trace(go.Scatter(x=xy[top, 0], y=xy[top, 1], mode="text", name="most frequent words",
                                 text=[proj.words[i] for i in top], textfont=dict(size=10, color="#333"),
                                 hoverinfo="skip", showlegend=False))
    for name, words, color, size in (("nearest neighbours", nb, "#2ca02c", 9), ("caption words", hl, "#d62728", 11)):
        idx = [index[w] for w in words if w in index]
        if idx:
            fig.add_trace(go.Scatter(x=xy[idx, 0], y=xy[idx, 1], mode="markers+text", name=name,
                                     text=[proj.words[i] for i in idx], customdata=[proj.words[i] for i in idx],
                                     textposition="top center", hovertemplate="%{text}<extra></extra>",
                                     marker=dict(size=size, color=color)))
    if focus is not None and focus in index:
        i = index[focus]
        x, y = float(xy[i, 0]), float(xy[i, 1])
        pts = [xy[index[w]] for w in nb if w in index]
        reach = max([abs(float(p[0]) - x) for p in pts] + [abs(float(p[1]) - y) for p in pts] + [0.0])
        span = max(1.15 * reach, 0.05 * float(max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1]), 1e-6)))
        fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers+text", name=f"selected: {focus}", text=[focus],
                                 customdata=[focus], textposition="bottom center", hovertemplate="%{text}<extra></extra>",
                                 textfont=dict(size=14), marker=dict(size=18, color="rgba(0,0,0,0)",
                                                                      line=dict(color="black", width=2))))
        fig.update_xaxes(range=[x - span, x + span])
        fig.update_yaxes(range=[y - span, y + span])
    title = PROJECTION_NAMES.get(method, method)
    fig.update_layout(height=600, margin=dict(l=10, r=10, t=30, b=10), title=f"{title} of the word embeddings",
                      legend=dict(orientation="h"), clickmode="event+select", dragmode="pan")
    return fig



def _is_scst(r: dict) -> bool:
    return r.get("stage") == "scst" or r.get("train_reward") is not None


def curves_figure(rows: list[dict[str, Optional[float]]]):
    """Loss and validation-score curves over epochs. A self-critical (SCST) epoch's training loss
    is a policy-gradient loss (it can be negative), not a cross-entropy: it gets its own panel
    with the mean reward, instead of diving off the cross-entropy line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x = [r.get("epoch") for r in rows]
    scst = [_is_scst(r) for r in rows]
    ncol = 3 if any(scst) else 2
    titles = ("Cross-entropy loss", "Self-critical epochs", "Validation scores") if ncol == 3 else \
        ("Loss", "Validation scores")
    fig = make_subplots(rows=1, cols=ncol, subplot_titles=titles)
    for key, name in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        # The cross-entropy panel leaves out the SCST epochs' training loss (another quantity).
        ys = [None if (key == "train_loss" and s) else r.get(key) for r, s in zip(rows, scst)]
        if any(y is not None for y in ys):
            fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=name), 1, 1)
    if ncol == 3:
        for key, name in (("train_loss", "SCST policy loss"), ("train_reward", "mean SCST reward (CIDEr-D)")):
            ys = [r.get(key) if s else None for r, s in zip(rows, scst)]
            if any(y is not None for y in ys):
                fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=name), 1, 2)
    for key, name in (("val_bleu4", "BLEU-4"), ("val_cider", "CIDEr")):
        if any(r.get(key) is not None for r in rows):
            fig.add_trace(go.Scatter(x=x, y=[r.get(key) for r in rows], mode="lines+markers", name=name), 1, ncol)
    # A fine-tuned model's curve joins two runs: mark where each later stage starts.
    for prev, r in zip(rows, rows[1:]):
        if r.get("stage") and prev.get("stage") and r["stage"] != prev["stage"] and r.get("epoch") is not None:
            for col in range(1, ncol + 1):
                fig.add_vline(x=r["epoch"] - 0.5, line_dash="dot", line_color="grey", row=1, col=col)
            fig.add_annotation(x=r["epoch"] - 0.5, y=1.0, yref="paper", text=f"{r['stage']} from here",
                               showarrow=False, xanchor="left", font=dict(size=11, color="grey"))
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10))
    return fig


