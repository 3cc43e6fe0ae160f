"""Everything the app computes, with no Streamlit in it: the pages only lay out widgets.

Each function takes plain values (paths, bytes, PIL images, a Captioner) and returns plain
values (dataclasses, numpy arrays, Plotly figures), so it can be tested without a browser and
cached by the UI layer (``app/ui.py``). Interpretability comes from ``explain``; a part of it
that is not installed raises ``NotAvailable`` with a one-line reason the page shows.

All model work runs under one lock: a Streamlit server serves every browser session from
threads of one process, and attribution methods hook into the shared encoder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from captioning.bundle import MODELS_DIR, BundleError, read_config
from captioning.images import MAX_PIXELS, ImageError, load_image

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Largest upload accepted (also ``server.maxUploadSize`` in .streamlit/config.toml).
MAX_UPLOAD_MB = 20
UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: Images are shown (and overlays drawn) at most this many pixels on their long side.
DISPLAY_SIDE = 512
#: The model is given the photo at most this large (it is stretched to its input square anyway, and a
#: 50-megapixel photo should not sit in the per-image cache).
MODEL_SIDE = 1024
#: Preferred order of the shipped decoders; others follow alphabetically.
MODEL_ORDER = ("show_attend_tell", "show_tell", "merge")
DECODER_TITLES = {"show_attend_tell": "Show, Attend and Tell", "show_tell": "Show and Tell", "merge": "Merge"}

COMPUTE_LOCK = threading.RLock()


class NotAvailable(RuntimeError):
    """A feature whose code (an ``explain`` function) or data is not present; one line, for the user."""


# --------------------------------------------------------------------------- models

def models_dir() -> Path:
    """Where bundles are listed from: $CAPTIONING_MODELS_DIR, else assets/models."""
    env = os.environ.get("CAPTIONING_MODELS_DIR")
    return Path(env) if env else MODELS_DIR


@dataclass(frozen=True)
class ModelInfo:
    """One folder under the models directory. ``error`` is set when it cannot be loaded."""

    name: str
    path: str
    decoder: str = ""
    encoder: str = ""
    has_attention: bool = False
    error: Optional[str] = None
    stamp: float = 0.0  # weights' modification time: a retrained bundle gets a new cache key
    length_penalty: float = 0.0  # the bundle's recommended decoding (config.json "decoding")
    rerank: float = 0.0  # its matcher weight for re-ranking the beams (0: none)
    rerank_pool: int = 0  # how many finished captions re-ranking considers (0: the beam size)

    def rerank_candidates(self, beam: int) -> int:
        """How many finished captions the matcher re-ranks at this beam size."""
        from captioning.decoding import rerank_candidates

        return rerank_candidates(beam, self.rerank_pool)

    @property
    def key(self) -> str:
        return f"{self.path}@{self.stamp}"

    @property
    def title(self) -> str:
        """"Show, Attend and Tell" for the shipped folder of that decoder, else "name (decoder)"."""
        t = DECODER_TITLES.get(self.decoder)
        if not t:
            return self.name
        return t if self.name == self.decoder else f"{self.name} ({t})"


def list_models(root: Optional[Path] = None) -> list[ModelInfo]:
    """Every bundle folder in ``root`` (default ``models_dir()``), shipped decoders first.

    A folder without ``config.json`` is ignored; one with a broken config is listed with its error.
    """
    root = Path(root) if root is not None else models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (d / "config.json").is_file():
            continue
        try:
            cfg = read_config(d)
            kind = str(cfg["decoder"].get("type", ""))
            w = d / "model.safetensors"
            stamp = w.stat().st_mtime if w.is_file() else 0.0
            err = None if w.is_file() else f"{w}: missing"
            dec = cfg.get("decoding") or {}
            lp, rerank = float(dec.get("length_penalty", 0.0)), float(dec.get("rerank", 0.0))
            out.append(ModelInfo(d.name, str(d), kind, str(cfg["encoder"].get("name", "")),
                                 kind == "show_attend_tell", err, stamp, lp, rerank, int(dec.get("rerank_pool", 0))))
        except (BundleError, KeyError, TypeError, AttributeError, OSError) as e:
            out.append(ModelInfo(d.name, str(d), error=str(e).splitlines()[0]))
    rank = {n: i for i, n in enumerate(MODEL_ORDER)}
    out.sort(key=lambda m: (rank.get(m.name, len(rank)), m.name))
    return out


def no_models_message(root: Optional[Path] = None) -> str:
    root = Path(root) if root is not None else models_dir()
    return (f"No trained model found in {root}. Put a model bundle there (a folder with config.json, "
            f"vocab.json and model.safetensors, e.g. assets/models/show_attend_tell), or set "
            f"CAPTIONING_MODELS_DIR to a folder of bundles, then reload the page.")


def load_encoder(name: str):
    from captioning.encoders import build_encoder

    with COMPUTE_LOCK:
        return build_encoder(name)


def load_captioner(path: str, encoder=None):
    """A Captioner for one bundle. Raises BundleError / EncoderUnavailable with a readable message."""
    from captioning.api import Captioner

    with COMPUTE_LOCK:
        return Captioner.from_pretrained(path, encoder=encoder)


# --------------------------------------------------------------------------- images

def digest(data: bytes) -> str:
    """The cache key of an image: sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def check_upload(data: Optional[bytes], max_mb: float = MAX_UPLOAD_MB) -> None:
    """Refuse empty or oversized files before any decoding. Raises ImageError."""
    if not data:
        raise ImageError("the file is empty")
    if len(data) > max_mb * 1024 * 1024:
        raise ImageError(f"the file is {len(data) / 2 ** 20:.2f} MB, over the {max_mb:g} MB limit")


def image_error_message(label: str, e: Exception) -> str:
    """"name: what is wrong" for an image that cannot be used (one line)."""
    if not isinstance(e, ImageError):
        # Anything else a file provoked deep in a decoder ("IndexError: list index out of range")
        # says nothing to a user: say what is wrong with the file in words instead.
        msg = ("the file could not be read as an image: it may be damaged, cut short, or in a format the app "
               "cannot read (JPEG, PNG, WebP, BMP, GIF and TIFF work)")
    else:
        msg = (str(e).splitlines() or [""])[0] or "the file could not be read as an image"
        if msg.startswith("image: "):  # load_image's name for raw bytes
            msg = msg[len("image: "):]
    return f"{label}: {msg}" if label and not msg.startswith(label) else msg


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> upright 8-bit RGB (any mode, EXIF rotation, first frame). Raises ImageError."""
    check_upload(data)
    return load_image(bytes(data), max_pixels=max_pixels)


def display_copy(im: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """A copy no larger than ``side`` on its long side (for showing and for overlays)."""
    im = im.copy()
    if max(im.size) > side:
        im.thumbnail((side, side), Image.BICUBIC)
    return im


def image_note(im: Image.Image, data: bytes) -> str:
    """One line about the original file: format, mode, size (for the caption under the photo)."""
    try:
        with Image.open(io.BytesIO(data)) as raw:
            fmt, mode, (w, h) = raw.format or "?", raw.mode, raw.size
    except Exception:  # noqa: BLE001 - the note is cosmetic
        fmt, mode, (w, h) = "?", "?", im.size
    return f"{fmt} {mode} {w}x{h}" + (f" (shown upright, {im.size[0]}x{im.size[1]})" if (w, h) != im.size else "")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=16)
def sample_bytes(name: str) -> bytes:
    """A sample photo (captioning.samples) as PNG bytes, so it goes the same way as an upload."""
    from captioning.samples import load_sample

    return png_bytes(load_sample(name))


def sample_names() -> list[str]:
    from captioning.samples import sample_names as names

    return names()


# --------------------------------------------------------------------------- Flickr8k

@lru_cache(maxsize=2)
def _dataset(data_dir: str):
    import contextlib

    from captioning.lab.data import load_dataset

    with contextlib.redirect_stderr(io.StringIO()):  # the reader's skip report is not for app users
        return load_dataset(data_dir)


def flickr_dataset():
    """The Flickr8k dataset when its folder exists (never copied into the repo), else None."""
    from captioning.lab.data import DataError, default_data_dir

    d = default_data_dir()
    if d is None:
        return None
    try:
        return _dataset(str(d))
    except (DataError, OSError):
        return None


def flickr_test_photos() -> list[str]:
    ds = flickr_dataset()
    if ds is None:
        return []
    try:
        return list(ds.split("test"))
    except Exception:  # noqa: BLE001 - a dataset without a test split
        return []


def flickr_references(name: str) -> list[str]:
    ds = flickr_dataset()
    return list(ds.captions.get(name, [])) if ds is not None else []


def flickr_bytes(name: str) -> bytes:
    ds = flickr_dataset()
    if ds is None:
        raise ImageError("the Flickr8k data folder is not available")
    p = ds.path(name)
    if not p.is_file():
        raise ImageError(f"{name}: not found in the Flickr8k folder")
    return p.read_bytes()


def find_photos_mentioning(word: str, split: str = "test", min_refs: int = 5) -> list[str]:
    """Flickr8k photos whose references (at least ``min_refs`` of them) contain ``word``."""
    ds = flickr_dataset()
    if ds is None:
        return []
    w = word.lower()
    return [n for n in ds.split(split) if sum(w in c.lower().split() or w in c.lower() for c in ds.captions[n]) >= min_refs]


# --------------------------------------------------------------------------- captioning

@dataclass
class CaptionOut:
    """A captioning result in plain values (picklable for st.cache_data).

    captions: best first, each {"text", "words", "tokens", "logprob", "score", "finished"}.
    attention: the best caption's attention (len(words) + 1, h, w) or None. lattice: beam steps.
    """

    captions: list[dict]
    attention: Optional[np.ndarray] = None
    lattice: Optional[list[dict]] = None
    seconds: float = 0.0
    cached: bool = False  # set by the UI when this copy came from its cache

    @property
    def best(self) -> dict:
        return self.captions[0]

    @property
    def text(self) -> str:
        return self.captions[0]["text"]

    @property
    def words(self) -> list[str]:
        return list(self.captions[0]["words"])

    @property
    def tokens(self) -> list[int]:
        return list(self.captions[0]["tokens"])


def caption(captioner, image: Image.Image, beam_size: int = 3, length_penalty: float = 0.0, nbest: int = 1,
            method: str = "beam", lattice: bool = True, rerank: Optional[float] = None) -> CaptionOut:
    """Caption one RGB image. nbest is clipped to beam_size. rerank: the matcher weight (None: the
    model's default; 0: plain beam search)."""
    import time

    beam_size = max(1, int(beam_size))
    nbest = max(1, min(int(nbest), beam_size))
    t0 = time.perf_counter()
    with COMPUTE_LOCK:
        res = captioner.caption([image], beam_size=beam_size, nbest=nbest, length_penalty=float(length_penalty),
                                method=method, return_lattice=lattice and method == "beam", rerank=rerank)[0]
    caps = [{"text": c.text, "words": list(c.words), "tokens": [int(t) for t in c.tokens],
             "logprob": float(c.logprob), "score": float(c.score), "finished": bool(c.finished)}
            for c in res.captions]
    att = None if res.best.attention is None else np.asarray(res.best.attention, dtype=np.float32)
    return CaptionOut(caps, att, res.lattice, time.perf_counter() - t0)


def caption_many(captioners: dict[str, Any], image: Image.Image, beam_size: int = 3,
                 length_penalty: float = 0.0) -> dict[str, CaptionOut]:
    """The same photo through several models (name -> Captioner)."""
    return {name: caption(c, image, beam_size, length_penalty, 1, lattice=False) for name, c in captioners.items()}


def word_labels(words: Sequence[str]) -> list[str]:
    """Unique, readable labels for a caption's words (the same word can occur twice)."""
    return [f"{w}" if list(words).count(w) == 1 else f"{w} ({i + 1})" for i, w in enumerate(words)]


#: Words that carry no content of their own: a map for "a" or "is" explains grammar, not the photo,
#: so the app starts on the first word not in this list.
FUNCTION_WORDS = frozenset("""a an the and or of in on at to for with from by into onto over under near
    is are was were be been being it its his her their there this that these those some while as up down
    out off through next behind front top""".split())


def first_content_word(words: Sequence[str]) -> int:
    """Index of the first word that is not a function word (0 when every word is one)."""
    return next((i for i, w in enumerate(words) if w.lower() not in FUNCTION_WORDS), 0)


def word_probs(captioner, image: Image.Image, tokens: Sequence[int]) -> list[float]:
    """p(word | photo, words before it) for every word of a caption (teacher-forced, one forward pass)."""
    import torch

    scorer = _need("attribution", "word_scorer")(captioner, list(tokens), 0)
    with COMPUTE_LOCK, torch.no_grad():
        lp = scorer.all_logprobs(model_pixels(captioner, image)[None])[0]
    return [float(math.exp(v)) for v in lp[: len(tokens)].tolist()]


def word_option_labels(words: Sequence[str], probs: Optional[Sequence[float]] = None) -> list[str]:
    """Labels for the word control: the word and, when known, the model's probability for it."""
    labels = word_labels(words)
    if not probs:
        return labels
    return [f"{lab} · {p:.2f}" for lab, p in zip(labels, probs)]


# --------------------------------------------------------------------------- scores

def _tok(s: str) -> str:
    from captioning.metrics import py_tokenize

    return py_tokenize({"x": [s]})["x"][0]


def _ngrams(s: str, n: int = 4) -> Counter:
    w = s.split()
    return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))


@dataclass
class DocFreq:
    """CIDEr document frequencies: n-gram -> number of images whose references contain it."""

    df: dict[tuple, float]
    n_images: int
    source: str


@lru_cache(maxsize=2)
def _train_doc_freq(data_dir: str) -> DocFreq:
    ds = _dataset(data_dir)
    names = ds.split("train")
    df: Counter = Counter()
    for n in names:
        grams: set = set()
        for c in ds.captions[n]:
            grams.update(_ngrams(_tok(c)))
        df.update(grams)
    return DocFreq(dict(df), len(names), f"Flickr8k train split ({len(names)} images)")


def doc_freq_from_refs(refs: dict[str, list[str]]) -> DocFreq:
    """Document frequencies of a corpus of references (image -> captions)."""
    df: Counter = Counter()
    for caps in refs.values():
        grams: set = set()
        for c in caps:
            grams.update(_ngrams(_tok(c)))
        df.update(grams)
    return DocFreq(dict(df), len(refs), "given references")


def training_doc_freq() -> Optional[DocFreq]:
    """CIDEr document frequencies of the Flickr8k training references, computed once (about a second)."""
    from captioning.lab.data import default_data_dir

    d = default_data_dir()
    if d is None or flickr_dataset() is None:
        return None
    return _train_doc_freq(str(d))


def cider_d(candidate: str, refs: Sequence[str], docfreq: DocFreq, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr as pycocoevalcap computes it (Vedantam et al. 2015, with its clipping and length
    penalty), but with document frequencies from a fixed corpus: one photo's CIDEr then means
    the same as in a corpus evaluation instead of collapsing to zero idf."""
    ref_len = math.log(float(max(docfreq.n_images, 1)))

    def vec(cnts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in cnts.items():
            k = len(g) - 1
            df = math.log(max(1.0, docfreq.df.get(g, 0.0)))
            v[k][g] = float(tf) * (ref_len - df)
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    vh, nh, lh = vec(_ngrams(_tok(candidate), n))
    total = np.zeros(n)
    for r in refs:
        vr, nr, lr = vec(_ngrams(_tok(r), n))
        delta = float(lh - lr)
        val = np.zeros(n)
        for k in range(n):
            for g, x in vh[k].items():
                val[k] += min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0)
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        total += val
    return float(np.mean(total) / max(len(refs), 1) * 10.0)


def per_image_scores(candidate: str, refs: Sequence[str], docfreq: Optional[DocFreq] = None) -> dict[str, float]:
    """BLEU-4 (pycocoevalcap, sentence level) and CIDEr-D with training document frequencies."""
    from captioning.metrics import score_captions

    s = score_captions({"img": candidate}, {"img": list(refs)}, use_java=False, metrics=("bleu",), per_image=True)
    out = {"BLEU-4": float(s.per_image["img"]["BLEU-4"])}
    docfreq = docfreq or training_doc_freq()
    if docfreq is not None:
        out["CIDEr"] = cider_d(candidate, refs, docfreq)
    return out


# --------------------------------------------------------------------------- overlays and attributions

def _attr_module():
    try:
        from explain import attribution
    except ImportError as e:
        raise NotAvailable(f"attribution maps are not available (explain.attribution: {e})") from None
    return attribution


def _need(module: str, name: str):
    import importlib

    try:
        mod = importlib.import_module(f"explain.{module}")
    except ImportError as e:
        raise NotAvailable(f"not available yet: explain.{module} cannot be imported ({e})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise NotAvailable(f"not available yet: explain.{module}.{name} does not exist")
    return fn


def overlay(image: Image.Image, m: np.ndarray, alpha: float = 0.5, signed: bool = False,
            cmap: str = "jet") -> np.ndarray:
    """A heat map blended over the image: (H, W, 3) float in [0, 1]."""
    try:
        fn = _need("attribution", "overlay")
    except NotAvailable:
        fn = None
    if fn is not None:
        return fn(image, m, alpha=alpha, signed=signed, cmap=cmap)
    # Fallback: plain bilinear upsampling and a jet-like blend.
    from matplotlib import colormaps

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mm = np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize(image.size, Image.BILINEAR))
    mm = np.clip(mm, 0, None)
    mm = mm / mm.max() if mm.max() > 0 else mm
    return np.clip((1 - alpha) * img + alpha * colormaps[cmap](mm)[..., :3], 0, 1).astype(np.float32)


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


def map_overlay(image: Image.Image, m: np.ndarray, method: str = "") -> np.ndarray:
    """The map as the app shows it: ``display_map`` in the app's colour map over the photo."""
    return overlay(image, display_map(m, method), cmap=CMAP)


def model_pixels(captioner, image: Image.Image):
    """The normalised (3, S, S) tensor the model sees, with the bundle's own preprocessing."""
    from captioning.images import preprocess

    return preprocess(image, captioner.prep)


def to_uint8(a: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] -> uint8 (four times smaller in a cache)."""
    return (np.clip(np.asarray(a, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def attention_overlay(image: Image.Image, attention: Optional[np.ndarray], t: int) -> Optional[np.ndarray]:
    """The decoder's attention at word t over the image, or None for a decoder without attention."""
    if attention is None or not 0 <= t < len(attention):
        return None
    return map_overlay(image, np.asarray(attention[t], dtype=np.float32), "attention")


def methods_for(captioner) -> list[str]:
    attribution = _attr_module()
    fn = getattr(attribution, "available_methods", None)
    if fn is not None:
        return list(fn(captioner))
    has_att = getattr(captioner.decoder, "has_attention", False)
    return [m for m in attribution.METHODS if m != "attention" or has_att]


METHOD_TITLES = {"grad_cam": "Grad-CAM (HiResCAM)", "integrated_gradients": "Integrated Gradients",
                 "smoothgrad": "SmoothGrad (sensitivity)", "gradient_shap": "GradientSHAP", "occlusion": "Occlusion",
                 "attention": "Decoder attention (weights)"}
#: Attention is where the decoder looked, not why it said the word (Jain & Wallace 2019), and on the
#: shipped default it barely beats a random order at deleting the word, so the app shows it as the
#: decoder's weights with that measured score. Deletion AUC / random-order deletion AUC, measured
#: in docs/faithfulness.md.
ATTENTION_SCORE = {"attention": 0.90, "grad_cam": 0.75, "words": 90}
ATTENTION_NOTE = ("Decoder attention is the decoder's own weights over the image grid, not an explanation of the "
                  "word: over {words} Flickr8k test words of the default model, deleting pixels in its order lowers "
                  "the word's probability with a deletion area {attention:.2f}× a random order's (Grad-CAM "
                  "{grad_cam:.2f}×; lower is better).").format(**ATTENTION_SCORE)
#: SmoothGrad's |gradient| map is mostly the frozen encoder's sensitivity: re-initialising the
#: decoder barely changes it (Adebayo et al. 2018's check; Spearman of the two maps, mean over the
#: words in docs/faithfulness.md, at the app's settings).
SMOOTHGRAD_SCORE = {"smoothgrad": 0.87, "grad_cam": 0.13, "words": 32}
SMOOTHGRAD_NOTE = ("SmoothGrad shows how sensitive the word is to each pixel, not evidence for it, and fails the "
                   "model-randomisation check (Adebayo et al. 2018): with the decoder's weights re-initialised its "
                   "map keeps a rank correlation of {smoothgrad:.2f} with the trained model's (mean over {words} "
                   "Flickr8k test words; Grad-CAM {grad_cam:.2f}). It is not an explanation.").format(**SMOOTHGRAD_SCORE)
#: Maps the app offers for comparison but never as an explanation, with what to say about them.
NOT_EXPLANATIONS = {"attention": ATTENTION_NOTE, "smoothgrad": SMOOTHGRAD_NOTE}


def explanation_methods(captioner) -> list[str]:
    """The attribution methods the app offers as explanations (tested against random deletion and
    weight randomisation on the shipped default, tests/test_explain_faithfulness.py)."""
    return [m for m in methods_for(captioner) if m not in NOT_EXPLANATIONS]


#: Cheaper settings than the library defaults, so a CPU answers in seconds.
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"nt_samples": 8},
    # 8 samples deleted at 0.87x random over 24 test words, 32 at 0.79x (docs/faithfulness.md).
    "gradient_shap": {"n_samples": 32},
    "occlusion": {"window": 32, "stride": 32},
}


def grad_cam_all(captioner, image: Image.Image, tokens: Sequence[int]) -> list[np.ndarray]:
    """Grad-CAM maps (S, S) for every word of a caption and its <end>, in one backward pass."""
    attribution = _attr_module()
    with COMPUTE_LOCK:
        if hasattr(attribution, "grad_cam_all_words"):
            return [a.map for a in attribution.grad_cam_all_words(captioner, image, list(tokens))]
        return [attribution.attribute(captioner, image, list(tokens), t, "grad_cam").map
                for t in range(len(tokens) + 1)]


def attribution_map(captioner, image: Image.Image, tokens: Sequence[int], t: int, method: str,
                    fast: bool = True) -> tuple[np.ndarray, dict]:
    """One word's (S, S) map for one method, and its metadata (seconds, options...)."""
    attribution = _attr_module()
    opts = dict(FAST_OPTIONS.get(method, {})) if fast else {}
    with COMPUTE_LOCK:
        a = attribution.attribute(captioner, image, list(tokens), int(t), method, **opts)
    meta = {k: v for k, v in a.metadata.items() if isinstance(v, (int, float, str, dict, list))}
    meta["logprob"] = a.logprob
    return np.asarray(a.map, dtype=np.float32), meta


#: Seeded random block orders averaged for the baseline: one order over 16 steps is noisy enough
#: to flip a verdict, so a map counts only outside their band (mean ± 1 standard deviation).
RANDOM_SEEDS = 5


@dataclass
class Faithfulness:
    """Deletion / insertion AUCs of one map against the random-order baseline.

    random_*_auc: the mean over the seeded random orders; random_*_band: their mean ± 1 standard
    deviation (equal to the mean when there was one order)."""

    method: str
    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    random_deletion_band: Optional[tuple[float, float]] = None
    random_insertion_band: Optional[tuple[float, float]] = None
    seeds: int = 1

    def __post_init__(self):
        if self.random_deletion_band is None:
            self.random_deletion_band = (self.random_deletion_auc, self.random_deletion_auc)
        if self.random_insertion_band is None:
            self.random_insertion_band = (self.random_insertion_auc, self.random_insertion_auc)

    @property
    def beats_random(self) -> bool:
        """Deletion AUC below the random band and insertion AUC above it: a map inside the band
        is not evidence of anything."""
        return (self.deletion_auc < self.random_deletion_band[0]
                and self.insertion_auc > self.random_insertion_band[1])

    @property
    def verdict(self) -> str:
        """"faithful", "worse than random" (outside the band on the wrong side of either curve)
        or "inside the random band"."""
        if self.beats_random:
            return "faithful"
        if self.deletion_auc > self.random_deletion_band[1] or self.insertion_auc < self.random_insertion_band[0]:
            return "worse than random"
        return "inside the random band"


def faithfulness(captioner, image: Image.Image, tokens: Sequence[int], t: int, maps: dict[str, np.ndarray],
                 steps: int = 16, seeds: int = RANDOM_SEEDS) -> list[Faithfulness]:
    """Deletion/insertion for several maps of one word against ``seeds`` seeded random orders
    (computed once, shared by every map). The curves hold the random mean and its band
    ("random deletion low"/"high": the pointwise mean ∓ 1 standard deviation of the orders)."""
    run = _need("faithfulness", "deletion_insertion")
    rand_fn = _need("faithfulness", "random_baselines")
    out = []
    seeds = max(1, int(seeds))

    def xy(c):
        return list(map(float, c.fractions)), list(map(float, c.probs))

    with COMPUTE_LOCK:
        pixels = model_pixels(captioner, image)
        rands = [rand_fn(captioner, pixels, list(tokens), int(t), steps=steps, seed=s) for s in range(seeds)]
        band = {}
        for i, kind in enumerate(("deletion", "insertion")):
            x = list(map(float, rands[0][i].fractions))
            ys = np.array([c[i].probs for c in rands], dtype=np.float64)
            aucs = np.array([float(c[i].auc) for c in rands])
            mu, sd = float(aucs.mean()), float(aucs.std())
            band[kind] = (mu, (mu - sd, mu + sd),
                          {f"random {kind}": (x, ys.mean(0).tolist()),
                           f"random {kind} low": (x, (ys.mean(0) - ys.std(0)).tolist()),
                           f"random {kind} high": (x, (ys.mean(0) + ys.std(0)).tolist())})
        for method, m in maps.items():
            r = run(captioner, pixels, list(tokens), int(t), m, steps=steps, random_curves=rands[0])
            curves = {"deletion": xy(r.deletion), "insertion": xy(r.insertion), **band["deletion"][2],
                      **band["insertion"][2]}
            out.append(Faithfulness(method, r.deletion.auc, r.insertion.auc, band["deletion"][0], band["insertion"][0],
                                    curves, band["deletion"][1], band["insertion"][1], seeds))
    return out


#: Said beside every faithfulness verdict: the check is about the map, not the caption.
FAITHFUL_IS_NOT_CORRECT = ("A faithful map is not a correct caption: it shows why the model said the word, right or "
                           "wrong (a wrong “dog” in a kitchen can have a faithful map).")


#: Adebayo et al.'s model-randomisation check passes when the map's rank correlation with the map
#: of a decoder with re-initialised weights is below this (the threshold the slow tests use on
#: the shipped default, tests/test_explain_faithfulness.py).
RANDOMISATION_MAX_RHO = 0.4


def randomisation_check(captioner, image: Image.Image, tokens: Sequence[int], t: int, method: str) -> dict[str, Any]:
    """The model-randomisation check for one word and method: {"spearman", "passes"}.

    The decoder's weights are re-initialised (in a copy) and the map recomputed; a map that
    barely changes does not depend on what the model learned (Adebayo et al. 2018)."""
    fn = _need("faithfulness", "model_randomisation")
    opts = dict(FAST_OPTIONS.get(method, {}))
    with COMPUTE_LOCK:
        r = fn(captioner, model_pixels(captioner, image), list(tokens), int(t), method=method, target="decoder", **opts)
    rho = float(r.spearman)
    return {"method": method, "spearman": rho, "passes": bool(np.isfinite(rho) and rho < RANDOMISATION_MAX_RHO)}


def faithfulness_figure(results: Sequence[Faithfulness]):
    """Deletion and insertion curves of every method, the random baselines dashed."""
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
            fig.add_trace(go.Scatter(x=x, y=y, name=METHOD_TITLES.get(r.method, r.method), legendgroup=r.method,
                                     showlegend=col == 1, line=dict(color=_COLORS[i % len(_COLORS)])), 1, col)
        fig.update_xaxes(title_text="fraction of the image", range=[0, 1], row=1, col=col)
        fig.update_yaxes(title_text="p(word)", row=1, col=col)
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=40, b=10))
    return fig


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


# --------------------------------------------------------------------------- beam tree

def beam_tree_figure(lattice: Optional[list[dict]], vocab, best_tokens: Optional[Sequence[int]] = None,
                     best_finished: bool = True):
    """The beam-search tree (explain.beam links the lattice) drawn with Plotly: x = step,
    y = rank of the candidate in its step; kept beams blue, pruned candidates grey, finished
    captions as squares, the returned caption's path red."""
    import plotly.graph_objects as go

    if not lattice:
        raise NotAvailable("no beam lattice for this caption (greedy decoding keeps none)")
    tree = _need("beam", "beam_tree")(lattice, vocab, best_tokens=list(best_tokens) if best_tokens is not None else None,
                                      best_finished=best_finished)
    pos = tree.positions()
    fig = go.Figure()
    for style, color, width, pick in (("pruned", "#cccccc", 1, lambda c: not c.kept and not c.finished),
                                      ("kept", "#6fa8dc", 1.5, lambda c: (c.kept or c.finished) and not c.on_best),
                                      ("best", "#d62728", 3, lambda c: c.on_best)):
        xs, ys = [], []
        for parent, child in tree.edges():
            c = tree.nodes[child]
            if pick(c):
                (x0, y0), (x1, y1) = pos[parent], pos[child]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=width), hoverinfo="skip",
                                     name=f"{style} edges", showlegend=False))
    groups = (("best path", lambda n: n.on_best, "#d62728"),
              ("kept beam", lambda n: n.kept and not n.on_best, "#1f77b4"),
              ("finished caption", lambda n: n.finished and not n.on_best, "#2ca02c"),
              ("pruned", lambda n: not (n.kept or n.finished or n.on_best), "#aaaaaa"))
    for name, pick, color in groups:
        ns = [n for n in tree.nodes if pick(n)]
        if not ns:
            continue
        fig.add_trace(go.Scatter(
            x=[pos[n.id][0] for n in ns], y=[pos[n.id][1] for n in ns], mode="markers+text", name=name,
            text=[n.word for n in ns], textposition="top center", textfont=dict(size=10, color=color),
            marker=dict(color=color, size=9, symbol=["square" if n.finished else "circle" for n in ns]),
            customdata=[[n.step + 1, n.logprob, n.step_logprob, "yes" if n.kept else "no", "yes" if n.finished else "no"]
                        for n in ns],
            hovertemplate="<b>%{text}</b><br>step %{customdata[0]}<br>cumulative log-prob %{customdata[1]:.3f}"
                          "<br>word log-prob %{customdata[2]:.3f}<br>kept %{customdata[3]}, finished %{customdata[4]}"
                          "<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="rank in step", zeroline=False)
    fig.update_xaxes(title_text="step", dtick=1, zeroline=False)
    fig.update_layout(height=max(360, 40 * (2 * tree.beam_size + 1)), margin=dict(l=10, r=10, t=30, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
                      title=f"{len(tree.nodes) - 1} candidates over {tree.steps} steps")
    return fig


def _accepts(fn, arg: str) -> bool:
    import inspect

    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- encoder

def imagenet_top5(captioner, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
    with COMPUTE_LOCK:
        try:
            fn = _need("encoder", "imagenet_top5")
            pixels = model_pixels(captioner, image)
            return fn(captioner.encoder, pixels, k)
        except NotAvailable:
            return captioner.classify(image, k)


def encoder_layers(captioner) -> list[dict]:
    """[{name, channels, height, width}] of the encoder's inspectable layers."""
    fn = _need("encoder", "layer_info")
    with COMPUTE_LOCK:
        return [{"name": li.name, "channels": li.channels, "height": li.height, "width": li.width}
                for li in fn(captioner.encoder, captioner.prep.size)]


def top_channel_maps(captioner, image: Image.Image, layer: str, k: int = 8) -> list[dict]:
    """The layer's k most active channels: [{channel, mean, overlay (H, W, 3)}]."""
    acts_fn = _need("encoder", "activations")
    top_fn = _need("encoder", "top_channels")
    montage = _need("encoder", "channel_montage")
    with COMPUTE_LOCK:
        pixels = model_pixels(captioner, image)
        acts = acts_fn(captioner.encoder, pixels, layer)
    top = top_fn(acts, k)
    views = montage(image, acts, [c for c, _ in top], cmap=CMAP)  # the app's one colour map
    return [{"channel": c, "mean": m, "overlay": to_uint8(v)} for (c, m), v in zip(top, views)]


def feature_vis(captioner, layer: str, channel: int, steps: int = 64, size: int = 128) -> tuple[np.ndarray, dict]:
    fn = _need("encoder", "feature_visualisation")
    with COMPUTE_LOCK:
        fv = fn(captioner.encoder, layer, int(channel), size=size, steps=steps, prep=captioner.prep)
    return fv.image, {"objective": fv.objective, "seconds": fv.seconds, "source": fv.source}


# --------------------------------------------------------------------------- embeddings

PROJECTION_NAMES = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}


@dataclass
class Projection:
    """2-D coordinates of the vocabulary for one method ("tsne", "pca" or "umap")."""

    words: list[str]  # in vocabulary order: most frequent first
    xy: np.ndarray  # (N, 2)
    method: str
    note: str = ""


def embedding_spaces(captioner, model_path: Optional[str] = None) -> tuple[list[str], str]:
    """(the spaces this model has, its default: the best-measured one)."""
    return (_need("embeddings", "available_spaces")(captioner.decoder, model_path),
            _need("embeddings", "default_space")(captioner.decoder, model_path))


def space_about(name: str) -> str:
    return str(_need("embeddings", "SPACES").get(name, name))


def embedding_space(captioner, space: Optional[str] = None, model_path: Optional[str] = None):
    fn = _need("embeddings", "embedding_space")
    with COMPUTE_LOCK:
        return fn(captioner.decoder, captioner.vocab, space, model_path)


def embedding_projections(captioner, model_path: Optional[str] = None, space: Optional[str] = None,
                          umap: bool = False) -> dict[str, Projection]:
    """One space's words in 2-D, {"tsne", "pca"} and "umap" when the bundle has it or ``umap``
    asks for it (and umap-learn is there). The bundle's ``projection.<space>.json`` is used when
    it matches the weights; otherwise they are computed here (seconds to a minute) and kept in
    memory only: the app never writes into a model folder."""
    sp = embedding_space(captioner, space, model_path)
    with COMPUTE_LOCK:
        proj = None
        if model_path is not None:
            proj = _need("embeddings", "load_projection")(model_path, sp.fingerprint(), sp.name)
        if proj is None or (umap and proj.umap is None):
            proj = _need("embeddings", "project")(sp, umap=umap)
    ev = list(getattr(proj, "explained_variance", []) or [])
    out = {
        "tsne": Projection(list(proj.words), np.asarray(proj.tsne, dtype=np.float32), "tsne",
                           f"t-SNE, cosine distance, perplexity {proj.perplexity:g}, seed {proj.seed}"),
        "pca": Projection(list(proj.words), np.asarray(proj.pca, dtype=np.float32), "pca",
                          "PCA" + (": explained variance " + ", ".join(f"{v:.1%}" for v in ev[:2]) if ev else "")),
    }
    if getattr(proj, "umap", None) is not None:
        out["umap"] = Projection(list(proj.words), np.asarray(proj.umap, dtype=np.float32), "umap",
                                 f"UMAP, cosine distance, 15 neighbours, seed {proj.seed}")
    return out


def embedding_quality(model_path: Optional[str]) -> list[dict[str, Any]]:
    """The bundle's measured neighbourhood quality per space (``embeddings.json``), as table rows."""
    info = _need("embeddings", "read_embeddings_info")(model_path) if model_path else None
    rows = []
    for name, t in ((info or {}).get("spaces") or {}).items():
        c = t.get("categories", {})
        rho = lambda b: (f"{t[b]['rho']:.2f} ({t[b]['pairs']} pairs)" if t.get(b, {}).get("rho") is not None
                         else "—")
        rows.append({"space": name + (" (default)" if name == info.get("default") else ""),
                     f"category P@{c.get('k', 5)} (judged)": round(float(c.get("judged", float("nan"))), 3),
                     "chance": round(float(c.get("judged_chance", float("nan"))), 3),
                     f"P@{c.get('k', 5)} (whole vocabulary)": round(float(c.get("all", float("nan"))), 3),
                     "WordSim-353 ρ": rho("wordsim353"), "SimLex-999 ρ": rho("simlex999")})
    return rows


@lru_cache(maxsize=1)
def word_categories() -> dict[str, str]:
    """word -> category from the project's word lists (empty if the file is missing)."""
    try:
        cats = _need("wordsim", "load_categories")()
    except (NotAvailable, OSError, ValueError):
        return {}
    return {w: c for c, ws in cats.items() for w in ws}


def word_clusters(captioner, space: Optional[str], model_path: Optional[str], n: int = 12) -> dict[str, int]:
    """word -> k-means cluster (cosine: on unit vectors; seeded), for colouring a map by structure."""
    from sklearn.cluster import KMeans

    sp = embedding_space(captioner, space, model_path)
    with COMPUTE_LOCK:
        lab = KMeans(n_clusters=min(n, len(sp.words)), n_init=4, random_state=0).fit_predict(sp.unit)
    return {w: int(c) for w, c in zip(sp.words, lab)}


def search_words(captioner, query: str, limit: int = 20, space: Optional[str] = None,
                 model_path: Optional[str] = None) -> list[str]:
    return list(_need("embeddings", "search")(embedding_space(captioner, space, model_path), query, limit))


def nearest_words(captioner, word: str, k: int = 10, space: Optional[str] = None,
                  model_path: Optional[str] = None) -> list[tuple[str, float]]:
    """[(word, cosine similarity)] most similar first (the word itself excluded).
    Raises KeyError (explain's UnknownWord, with spelling suggestions) for a word not in the vocabulary."""
    fn = _need("embeddings", "nearest")
    return [(str(w), float(s)) for w, s in fn(embedding_space(captioner, space, model_path), word, k, include_self=False)]


def embedding_figure(proj: Projection, highlight: Sequence[str] = (), focus: Optional[str] = None,
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
    xy = proj.xy
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
    title = PROJECTION_NAMES.get(proj.method, proj.method)
    fig.update_layout(height=600, margin=dict(l=10, r=10, t=30, b=10), title=f"{title} of the word embeddings",
                      legend=dict(orientation="h"), clickmode="event+select", dragmode="pan")
    return fig


# --------------------------------------------------------------------------- model page

#: Published Flickr8k test results, fractions (papers report x100). Only numbers in the papers.
PUBLISHED: list[dict[str, Any]] = [
    {"model": "Show, Attend and Tell, soft attention", "BLEU-1": 0.67, "BLEU-2": 0.448, "BLEU-3": 0.299,
     "BLEU-4": 0.195, "METEOR": 0.1893,
     "source": "Xu et al. 2015, ICML, arXiv:1502.03044, Table 1 (Flickr8k)"},
    {"model": "Show, Attend and Tell, hard attention", "BLEU-1": 0.67, "BLEU-2": 0.457, "BLEU-3": 0.314,
     "BLEU-4": 0.213, "METEOR": 0.2030,
     "source": "Xu et al. 2015, ICML, arXiv:1502.03044, Table 1 (Flickr8k)"},
    {"model": "Show and Tell (NIC)", "BLEU-1": 0.63,
     "source": "Vinyals et al. 2015, CVPR, arXiv:1411.4555, Table 2 (Flickr8k reports BLEU-1 only)"},
]
METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def model_card(model_path: str) -> Optional[str]:
    return read_text(Path(model_path) / "MODEL_CARD.md")


def model_config(model_path: str) -> Optional[dict]:
    try:
        return read_config(model_path)
    except BundleError:
        return None


def test_metrics(model_path: str) -> Optional[dict[str, float]]:
    """``metrics.json``'s test metrics, or None (missing or unreadable)."""
    text = read_text(Path(model_path) / "metrics.json")
    if text is None:
        return None
    try:
        d = json.loads(text)
    except ValueError:
        return None
    m = d.get("metrics", d) if isinstance(d, dict) else None
    if not isinstance(m, dict):
        return None
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metrics_table(models: dict[str, Optional[dict[str, float]]]) -> list[dict[str, Any]]:
    """Rows for the comparison table: our models' test metrics, then the published ones."""
    rows = []
    for name, m in models.items():
        if m:
            rows.append({"model": name, **{k: m.get(k) for k in METRIC_KEYS}, "source": "this repository, Flickr8k test"})
    for p in PUBLISHED:
        rows.append({"model": p["model"], **{k: p.get(k) for k in METRIC_KEYS}, "source": p["source"]})
    return rows


def training_curves(model_path: str) -> Optional[list[dict[str, float]]]:
    """``metrics.csv`` rows as floats (missing cells None; ``stage``, the training stage of a
    fine-tuned model's curve, stays text), or None when absent/unreadable."""
    text = read_text(Path(model_path) / "metrics.csv")
    if not text:
        return None
    rows = []
    try:
        for r in csv.DictReader(io.StringIO(text)):
            row = {}
            for k, v in r.items():
                if k is None:
                    continue
                if k.strip() == "stage":
                    row["stage"] = (v or "").strip() or None
                    continue
                try:
                    row[k.strip()] = float(v) if v not in (None, "") else None
                except ValueError:
                    row[k.strip()] = None
            rows.append(row)
    except csv.Error:
        return None
    return rows or None


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


def curve_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-curve rows for a table, without columns that say nothing: empty in every
    row, or 0 in every row (e.g. sample_prob when scheduled sampling was off)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if any(r.get(k) not in (None, 0, 0.0, "") for r in rows)]
    return [{k: r.get(k) for k in keys} for r in rows]
