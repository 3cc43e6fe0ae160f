"""Captioning one photo for the app, the words of a caption (labels, the first content word),
and per-photo scores against reference captions."""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Optional, Sequence

from PIL import Image

from captioning.api import CaptionResult
from captioning.lab.data import default_data_dir
from captioning.metrics import CiderD, py_tokenize, score_captions

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


def guided_note(result: CaptionResult, tagger_penalty: bool = False) -> str:
    """One line on whether and how the caption was guided (``CaptionResult.guided``);
    ``tagger_penalty``: the model's guidance also penalises what its concept tagger finds no sign of."""
    if result.guided is None:
        return "Not guided: plain beam search, which may not name what the encoder recognised."
    tagger = " Words for things the concept tagger finds no sign of were penalised." if tagger_penalty else ""
    if not result.guided:
        return ("Guidance on, but the encoder recognised nothing confidently enough to ask for a word"
                + (f".{tagger}" if tagger else ": the caption is plain beam search's."))
    words = " or ".join(f"“{w}”" for w in result.guided)
    return (f"Guided: the caption had to contain {words}, from what the encoder recognised; words its recognition "
            f"rules out were penalised.{tagger}")


def tagger_penalty(model) -> bool:
    """Whether a captioner's guidance penalises what its concept tagger finds no sign of."""
    return getattr(model, "tagger", None) is not None and bool(model.decoding.guide_settings.absent)


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


def word_diff(base: Sequence[str], other: Sequence[str]) -> list[tuple[str, str]]:
    """``other`` against ``base`` word by word, in reading order: ("same", w), ("added", w) for a
    word only ``other`` says, ("removed", w) for a word of ``base`` that ``other`` leaves out."""
    base, other = list(base), list(other)
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=base, b=other, autojunk=False).get_opcodes():
        if op == "equal":
            out += [("same", w) for w in other[j1:j2]]
        else:
            out += [("removed", w) for w in base[i1:i2]] + [("added", w) for w in other[j1:j2]]
    return out


# --------------------------------------------------------------------------- scores

def _words(s: str) -> list[str]:
    """pycocoevalcap's tokenisation of one caption, as words."""
    return py_tokenize({"x": [s]})["x"][0].split()


def cider_from_refs(refs: dict[str, list[str]]) -> CiderD:
    """CIDEr-D with the document frequencies of a corpus of references (image -> captions)."""
    return CiderD({k: [_words(c) for c in caps] for k, caps in refs.items()})


@lru_cache(maxsize=2)
def _training_cider(data_dir: str) -> CiderD:
    ds = photos.load_flickr(data_dir)
    return cider_from_refs({n: list(ds.captions[n]) for n in ds.split("train")})


def training_cider() -> Optional[CiderD]:
    """CIDEr-D with the Flickr8k training references' document frequencies (built once, a few
    seconds), or None without the data: one photo's CIDEr-D then means what it means over a test set."""
    d = default_data_dir()
    if d is None or photos.flickr_dataset() is None:
        return None
    return _training_cider(str(d))


def per_image_scores(candidate: str, refs: Sequence[str], cider: Optional[CiderD] = None) -> dict[str, float]:
    """BLEU-4 (pycocoevalcap, sentence level) and CIDEr-D (``cider``'s document frequencies, by
    default the Flickr8k training captions')."""
    s = score_captions({"img": candidate}, {"img": list(refs)}, use_java=False, metrics=("bleu",), per_image=True)
    out = {"BLEU-4": float(s.per_image["img"]["BLEU-4"])}
    cider = cider or training_cider()
    if cider is not None:
        out["CIDEr"] = cider.score_refs(_words(candidate), [_words(r) for r in refs])
    return out
