"""Captioning one photo for the app, the words of a caption (labels, the first content word),
and per-photo scores against reference captions."""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from captioning.api import CaptionResult

from app.services import COMPUTE_LOCK
from app.services import photos

@dataclass
class TimedCaption(CaptionResult):
    """The library's CaptionResult with the time its computation took. ``cached`` is set by the UI
    on a copy that came from its cache (where ``seconds`` is still the first computation's)."""

    seconds: float = 0.0
    cached: bool = False


def caption(captioner, image: Image.Image, beam_size: int = 3, length_penalty: float = 0.0, nbest: int = 1,
            method: str = "beam", lattice: bool = True, rerank: Optional[float] = None,
            guide: Optional[bool] = None) -> TimedCaption:
    """Caption one RGB image. nbest is clipped to beam_size. rerank: the matcher weight (None: the
    model's default; 0: plain beam search). guide: guided decoding on or off (None: the model's
    default)."""
    beam_size = max(1, int(beam_size))
    nbest = max(1, min(int(nbest), beam_size))
    t0 = time.perf_counter()
    with COMPUTE_LOCK:
        res = captioner.caption([image], beam_size=beam_size, nbest=nbest, length_penalty=float(length_penalty),
                                method=method, return_lattice=lattice and method == "beam", rerank=rerank,
                                guide=guide)[0]
    return TimedCaption(**{f.name: getattr(res, f.name) for f in fields(CaptionResult)},
                        seconds=time.perf_counter() - t0)


def guided_note(result: CaptionResult) -> str:
    """One line on whether and how the caption was guided (``CaptionResult.guided``)."""
    if result.guided is None:
        return "Not guided: plain beam search, which may not name what the encoder recognised."
    if not result.guided:
        return ("Guidance on, but the encoder recognised nothing confidently enough to ask for a word: the caption "
                "is plain beam search's.")
    words = " or ".join(f"“{w}”" for w in result.guided)
    return (f"Guided: the caption had to contain {words}, from what the encoder recognised; words its recognition "
            "rules out were penalised.")


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
    ds = photos.load_flickr(data_dir)
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
    if d is None or photos.flickr_dataset() is None:
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

