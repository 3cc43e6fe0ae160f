"""The Streamlit side shared by every page: cached wrappers around ``services`` and the sidebar
(model, photo and decoding settings), whose choices every page reads through ``current()``.

Caching: models with ``st.cache_resource`` (one copy per server process); per-image results
with ``st.cache_data`` keyed by the image's sha256 and the model's path and weights' mtime.
Arguments whose names start with ``_`` are not hashed (the bytes and the models), so keys stay
cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import streamlit as st

from app.services import captions, concepts, embeddings, explanations, photos, registry
from captioning.images import ImageError

# --------------------------------------------------------------------------- cached wrappers


# Every cache has a limit: a public demo must not grow with the number of photos, words or
# models people try (docs/reliability.md: server memory over 100 uploads).
@st.cache_resource(show_spinner="Loading the image encoder...", max_entries=4)
def encoder(name: str):
    return registry.load_encoder(name)


@st.cache_resource(show_spinner="Loading the model...", max_entries=8)
def captioner(model_key: str, path: str, encoder_name: str):
    """One Captioner per bundle (and weights' mtime); bundles with one encoder share it."""
    return registry.load_captioner(path, encoder=encoder(encoder_name) if encoder_name else None)



@st.cache_resource(show_spinner="Loading the concept tagger...", max_entries=2)
def concept_tagger(path: str, encoder_name: str, _captioner):
    """The tagger bundle at ``path``, sharing the captioner's encoder when it has one."""
    return concepts.load_tagger(path, _captioner.encoder if _captioner is not None else None, encoder_name)


@st.cache_data(show_spinner=False, max_entries=24)
def concept_tags(path: str, digest: str, caption: str, _tagger, _image):
    return concepts.tag(_tagger, _image, caption or None)


@st.cache_data(show_spinner=False, max_entries=48)
def concept_map(path: str, digest: str, concept: str, method: str, _tagger, _image):
    return concepts.concept_map(_tagger, _image, concept, method)

# Per-photo caches hold megabytes an entry (pixels, full-size maps): a few dozen photos are
# plenty for going back and forth, and 100 uploads in a row must not pile up (bench/bench_memory.py).
@st.cache_data(show_spinner=False, max_entries=12)
def decoded(digest: str, _data: bytes):
    """(display image, model input image, note) for the image with this hash. Raises ImageError.

    The model input is the photo at most MODEL_SIDE pixels on its long side: the model sees
    it stretched to its input square anyway, and a 50-megapixel photo should not sit in the cache."""
    im = photos.decode_image(_data)
    return photos.display_copy(im), photos.display_copy(im, photos.MODEL_SIDE), photos.image_note(im, _data)


@st.cache_data(show_spinner=False, max_entries=256)
def caption(model_key: str, digest: str, beam: int, lp: float, nbest: int, _model, _image,
            rerank: float = 0.0, guide: bool | None = None) -> captions.TimedCaption:
    return captions.caption(_model, _image, beam, lp, nbest, rerank=rerank, guide=guide)


@st.cache_data(show_spinner=False, max_entries=24)
def grad_cam_all(model_key: str, digest: str, tokens: tuple, _model, _image) -> list[np.ndarray]:
    return explanations.grad_cam_all(_model, _image, tokens)


@st.cache_data(show_spinner=False, max_entries=64)
def attribution(model_key: str, digest: str, tokens: tuple, t: int, method: str, _model, _image):
    return explanations.attribution_map(_model, _image, tokens, t, method)


@st.cache_data(show_spinner=False, max_entries=64)
def faithfulness(model_key: str, digest: str, tokens: tuple, t: int, methods: tuple, _model, _image, _maps):
    return explanations.faithfulness(_model, _image, tokens, t, _maps)


@st.cache_data(show_spinner=False, max_entries=128)
def scores(candidate: str, refs: tuple) -> dict:
    return captions.per_image_scores(candidate, list(refs))


@st.cache_data(show_spinner=False, max_entries=64)
def top5(model_key: str, digest: str, _model, _image):
    return explanations.imagenet_top5(_model, _image)


@st.cache_data(show_spinner=False, max_entries=8)
def channel_maps(model_key: str, digest: str, layer: str, k: int, _model, _image):
    return explanations.top_channel_maps(_model, _image, layer, k)


@st.cache_data(show_spinner=False, max_entries=8)
def layers(model_key: str, _model):
    return explanations.encoder_layers(_model)


@st.cache_data(show_spinner=False, max_entries=256)
def feature_vis(encoder_name: str, layer: str, channel: int, steps: int, model_key: str, _model):
    return explanations.feature_vis(_model, layer, channel, steps=steps)


@st.cache_data(show_spinner=False, max_entries=8)
def spaces(model_key: str, path: str, _model) -> tuple[list[str], str]:
    return embeddings.embedding_spaces(_model, path)


@st.cache_data(show_spinner=False, max_entries=16)
def projection(model_key: str, path: str, space: str, umap: bool, _model):
    return embeddings.embedding_projection(_model, path, space, umap)


@st.cache_data(show_spinner=False, max_entries=16)
def clusters(model_key: str, path: str, space: str, _model) -> dict:
    return embeddings.word_clusters(_model, space, path)


@st.cache_data(show_spinner=False, max_entries=256)
def word_search(model_key: str, query: str, _model, space: str | None = None, path: str | None = None) -> list[str]:
    return embeddings.search_words(_model, query, space=space, model_path=path)


@st.cache_data(show_spinner=False, max_entries=256)
def neighbours(model_key: str, word: str, k: int, _model, space: str | None = None, path: str | None = None):
    return embeddings.nearest_words(_model, word, k, space=space, model_path=path)


@st.cache_data(show_spinner=False, ttl=60, max_entries=4)
def model_list(root: str):
    return registry.list_models(Path(root))


@st.cache_data(show_spinner=False, max_entries=1)
def flickr_photos() -> list[str]:
    return photos.flickr_test_photos()


@st.cache_data(show_spinner=False, max_entries=64)
def word_probs(model_key: str, digest: str, tokens: tuple, _model, _image) -> list[float]:
    return explanations.word_probs(_model, _image, tokens)


@st.cache_data(show_spinner=False, max_entries=64)
def randomisation(model_key: str, digest: str, tokens: tuple, t: int, method: str, _model, _image) -> dict:
    return explanations.randomisation_check(_model, _image, tokens, t, method)


@st.cache_data(show_spinner=False, max_entries=16)
def thumbnail(source: str, name: str):
    """A small square-ish copy of an example photo, for the row of examples."""
    from PIL import ImageOps

    data = photos.sample_bytes(name) if source == "Sample photo" else photos.flickr_bytes(name)
    return ImageOps.fit(photos.decode_image(data), (160, 160))  # square: the row stays one even height


# --------------------------------------------------------------------------- shared widgets

#: Let the word buttons wrap onto more lines and never cut a word short ("forma…").
WORD_CSS = ("<style>[data-testid='stButtonGroup'] div{flex-wrap:wrap !important;overflow:visible !important;}"
            "[data-testid='stButtonGroup'] button{max-width:none;flex-shrink:0;}"
            "[data-testid='stButtonGroup'] button *{white-space:nowrap;overflow:visible;"
            "text-overflow:clip;max-width:none;}</style>")


#: Let st.metric labels wrap instead of ending in "…" in a narrow column (800 px wide windows).
METRIC_CSS = ("<style>[data-testid='stMetricLabel'], [data-testid='stMetricLabel'] *{white-space:normal !important;"
              "overflow:visible !important;text-overflow:clip !important;max-width:none !important;}</style>")


def word_picker(words, probs, key: str, label: str = "Word") -> int:
    """One word control for every page: the caption's words as buttons that wrap, each with the
    model's probability for it; the first content word ("dog", not "a") is selected at first."""
    labels = captions.word_option_labels(words, probs)
    st.markdown(WORD_CSS, unsafe_allow_html=True)
    t = st.pills(label, list(range(len(words))), format_func=lambda i: labels[i],
                 default=captions.first_content_word(words), key=key,
                 help="Each word with p(word | photo, the words before it)" if probs else None)
    return captions.first_content_word(words) if t is None else int(t)


def use_example(source: str, name: str) -> None:
    """Button callback: show this example photo (runs before the sidebar is drawn again)."""
    st.session_state["source"] = source
    st.session_state["sample" if source == "Sample photo" else "flickr"] = name


#: A few Flickr8k test photos for the row of examples: people and dogs, what the model knows best.
EXAMPLE_FLICKR = 3


@st.cache_data(show_spinner=False, max_entries=1)
def examples() -> list[tuple[str, str]]:
    """(source, name) of the example photos: the package samples, then a few Flickr8k test photos
    (when the data is there) whose references all mention a dog or a person."""
    out = [("Sample photo", n) for n in photos.sample_names()]
    flickr = flickr_photos()
    if flickr:
        picks = []
        for word in ("dog", "man", "girl"):
            found = [n for n in photos.find_photos_mentioning(word, "test", min_refs=5) if n not in picks]
            picks += found[:1]
        out += [("Flickr8k test photo", n) for n in picks[:EXAMPLE_FLICKR]]
    return out


def example_row(key: str = "ex") -> None:
    """A row of example thumbnails, each with a button that shows it."""
    ex = examples()
    # Names wrap under their picture instead of being cut short ("motorc…").
    st.markdown("<style>div[class*='st-key-ex'] button *{white-space:normal;overflow:visible;text-overflow:clip;}"
                "</style>", unsafe_allow_html=True)
    cols = st.columns(len(ex))
    for i, (col, (source, name)) in enumerate(zip(cols, ex)):
        try:
            col.image(thumbnail(source, name), width="stretch")
        except Exception:  # noqa: BLE001 - a missing example only loses its picture
            pass
        label = name if source == "Sample photo" else f"Flickr8k {i - len(photos.sample_names()) + 1}"
        col.button(label, key=f"{key}-{i}", on_click=use_example, args=(source, name), width="stretch",
                   help=name if source != "Sample photo" else None)


def random_flickr() -> None:
    """Button callback: a random Flickr8k test photo."""
    import random

    flickr = flickr_photos()
    if flickr:
        st.session_state["source"] = "Flickr8k test photo"
        st.session_state["flickr"] = random.choice(flickr)


# --------------------------------------------------------------------------- shared state


@dataclass
class Current:
    """What the sidebar selected. ``image`` is None when there is no usable image (error shown)."""

    model: Optional[registry.ModelInfo]
    models: list
    data: Optional[bytes]
    digest: Optional[str]
    label: str
    flickr_name: Optional[str]
    image: object = None  # display-size RGB PIL image
    full: object = None  # the image given to the model
    note: str = ""
    error: Optional[str] = None
    beam: int = 3
    length_penalty: float = 0.0
    nbest: int = 3
    rerank: float = 0.0  # matcher weight for re-ranking the beams (0: plain beam search)
    guide: Optional[bool] = None  # guided decoding on/off (None: the model's default)

    def get_captioner(self):
        """The selected model's Captioner, or None after showing why it cannot be loaded."""
        if self.model is None:
            return None
        return load_model(self.model)


def load_model(m: registry.ModelInfo):
    if m.error:
        st.error(f"Model {m.name} cannot be loaded: {m.error}")
        return None
    try:
        return captioner(m.key, m.path, m.encoder)
    except Exception as e:  # noqa: BLE001 - BundleError, EncoderUnavailable, torch errors: all shown
        st.error(f"Model {m.name} cannot be loaded: "
                 f"{str(e).splitlines()[0] if str(e) else 'its files could not be read (damaged or incomplete)'}")
        return None


SOURCES = ("Sample photo", "Upload", "Flickr8k test photo")


def sidebar() -> Current:
    """Draw the sidebar and return the selection (stored in st.session_state['current'])."""
    sb = st.sidebar
    models = model_list(str(registry.models_dir()))
    model = None
    if not models:
        sb.error(registry.no_models_message())
    else:
        names = [m.name for m in models]
        name = sb.selectbox("Model", names, key="model_name", format_func=lambda n: next(m.title for m in models if m.name == n),
                            help=f"Every model bundle found in {registry.models_dir()}")
        model = next(m for m in models if m.name == name)
        if model.error:
            sb.error(f"{model.name}: {model.error}")

    sources = list(SOURCES) if flickr_photos() else list(SOURCES[:2])
    source = sb.radio("Photo", sources, key="source", horizontal=False)
    data, label, fname, err = None, "", None, None
    if source == "Upload":
        up = sb.file_uploader("Upload a photo", type=None, key="upload",
                              help=f"JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF, up to {photos.MAX_UPLOAD_MB} MB")
        if up is not None:
            data, label = up.getvalue(), up.name
            if not data:
                err = photos.image_error_message(up.name, ImageError("the file is empty"))
    elif source == "Sample photo":
        name = sb.selectbox("Sample", photos.sample_names(), key="sample")
        data, label = photos.sample_bytes(name), f"sample: {name}"
    else:
        fname = sb.selectbox("Flickr8k test photo", flickr_photos(), key="flickr", help="Shown with its five reference captions")
        sb.button("Random photo", key="flickr_random", on_click=random_flickr, icon=":material/shuffle:")
        try:
            data, label = photos.flickr_bytes(fname), fname
        except ImageError as e:
            err = str(e)

    with sb.expander("Decoding", expanded=False):
        beam = st.slider("Beam size", 1, 10, 3, key="beam")
        lp = st.slider("Length penalty", 0.0, 2.0, model.length_penalty if model else 0.0, 0.1, key="length_penalty",
                       help="Beams are ranked by log-probability / length^penalty (0: plain log-probability); "
                            "the default is the model's, chosen on the dev split")
        nbest = st.slider("N-best", 1, 10, 3, key="nbest", help="How many captions to list (at most the beam size)")
        rerank = 0.0
        if model and model.rerank:
            on = st.toggle("Re-rank with the matcher", True, key="rerank",
                           help=f"Re-rank the best {model.rerank_candidates(beam)} finished captions by score + "
                                f"{model.rerank:g} × how well a photo-caption "
                                "matcher says each caption fits the photo (chosen on the dev split); off: plain beam search")
            rerank = model.rerank if on else 0.0
    cur = Current(model, models, data, None, label, fname, beam=int(beam), length_penalty=float(lp),
                  nbest=int(min(nbest, beam)), rerank=rerank, guide=guide_choice(model.key) if model else None)
    if data is not None and err is None:
        cur.digest = photos.digest(data)
        try:
            cur.image, cur.full, cur.note = decoded(cur.digest, data)
        except Exception as e:  # noqa: BLE001 - ImageError, or anything else a file can provoke: never a crash
            err = photos.image_error_message(label, e)
    cur.error = err
    st.session_state["current"] = cur
    return cur


def current() -> Current:
    cur = st.session_state.get("current")
    return cur if cur is not None else sidebar()


def require_image(cur: Current, show_examples: bool = False) -> bool:
    """Show the image problem (or the prompt to choose one); True when there is an image.
    show_examples: under the prompt, the row of example photos (never a blank page)."""
    if cur.error:
        st.error(f"Cannot use this file — {cur.error}. Choose another photo.")
        return False
    if cur.image is None:
        st.info("Upload a photo or choose one in the sidebar" + (", or start from an example:" if show_examples else "."))
        if show_examples:
            example_row("ex-empty")
        return False
    return True


def require_captioner(cur: Current):
    """The sidebar's model loaded, or None after telling the user why (no model, or it failed to load)."""
    if cur.model is None:
        st.warning(registry.no_models_message())
        return None
    return cur.get_captioner()


#: session_state key of {model key: guidance on?}. Kept apart from the toggle's own state, which
#: Streamlit drops on pages that do not draw it: the Explain page must explain the caption the
#: Caption page showed, guided or not.
GUIDE_CHOICES = "guide_choices"


def guide_choice(model_key: str) -> Optional[bool]:
    """The user's guidance choice for this model, or None (the model's default) before any."""
    return st.session_state.get(GUIDE_CHOICES, {}).get(model_key)


def guide_toggle(cur: Current, model) -> bool:
    """The guided-decoding toggle, starting at the model's default; sets ``cur.guide``."""
    choice = guide_choice(cur.model.key)
    on = st.toggle("Name what the encoder recognises", value=model.default_guide if choice is None else choice,
                   key=f"guide-{cur.model.key}",
                   help="Guided decoding: when the encoder's ImageNet head is confident about something the "
                        "vocabulary can name (a cat, a cup of coffee), beam search must put one of those words in "
                        "the caption, and words that recognition or the concept tagger rule out are penalised. "
                        "Off: plain beam search. "
                        "The default is the model's, chosen on dev data.")
    st.session_state.setdefault(GUIDE_CHOICES, {})[cur.model.key] = on
    cur.guide = on
    return on


def current_caption(cur: Current, model=None):
    """(Captioner, TimedCaption) for the sidebar's model, photo and settings, or (None, None)."""
    model = model or require_captioner(cur)
    if model is None or cur.image is None:
        return None, None
    import time

    t0 = time.perf_counter()
    try:
        out = caption(cur.model.key, cur.digest, cur.beam, cur.length_penalty, cur.nbest, model, cur.full, cur.rerank,
                      cur.guide)
    except ImageError as e:
        st.error(str(e))
        return None, None
    # out.seconds is the time of the computation when it happened; a cache hit returns it again,
    # so a result that came back much faster than it took is marked as cached (each hit is a copy).
    out.cached = time.perf_counter() - t0 < 0.5 * out.seconds
    return model, out
