"""What the encoder's own ImageNet head recognises in a photo, in caption words.

``assets/imagenet_words.json`` (built once from WordNet by ``python -m captioning.lab.tools.imagenet_words``)
maps each of the 1,000 classes to the vocabulary words that name it (Egyptian cat -> cat, cats;
every dog breed -> dog, dogs; espresso -> coffee, cup). Classes without a fitting word map to
nothing. Nothing here needs WordNet.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .paths import ASSETS

IMAGENET_WORDS = ASSETS / "imagenet_words.json"


@dataclass
class Recognition:
    """One ImageNet class the encoder's head gives, with its probability and caption words."""

    label: str
    prob: float
    words: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"label": self.label, "prob": round(self.prob, 4), "words": list(self.words)}

    def __str__(self) -> str:
        return f"{self.label} {self.prob:.2f}" + (f" -> {self.words[0]}" if self.words else "")


@lru_cache(maxsize=4)
def class_words(path: Optional[str] = None) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(class names, words of each class), in the order of the encoder's logits."""
    p = Path(path) if path else IMAGENET_WORDS
    try:
        classes = json.loads(p.read_text())["classes"]
        names = tuple(str(c["name"]) for c in classes)
        words = tuple(tuple(str(w) for w in c["words"]) for c in classes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: ImageNet word table not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not an ImageNet word table ({type(e).__name__}: {e})") from None
    if len(names) != 1000:
        raise ValueError(f"{p}: expected 1000 classes, found {len(names)}")
    return names, words


def words_for(label: str) -> list[str]:
    """The caption words of one ImageNet class name (as in assets/imagenet_classes.txt); [] if none fit."""
    names, words = class_words()
    try:
        return list(words[names.index(label)])
    except ValueError:
        raise KeyError(f"unknown ImageNet class {label!r}") from None


def recognise(logits: torch.Tensor, k: int = 5) -> list[list[Recognition]]:
    """ImageNet logits (B, 1000) -> per image, the top-k classes with probabilities and words."""
    names, words = class_words()
    p = torch.softmax(logits.float(), -1)
    top = p.topk(k, -1)
    return [[Recognition(names[i], float(v), list(words[i])) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(top.values, top.indices)]


def word_evidence(logits: torch.Tensor, vocab_words: Optional[set[str]] = None) -> list[dict[str, float]]:
    """Per image, each caption word's total probability over the classes it names: Egyptian cat
    0.79 + tiger cat 0.08 + tabby 0.08 gives "cat" 0.95. Only words with probability >= 0.01."""
    names, words = class_words()
    p = torch.softmax(logits.float(), -1)  # (B, 1000)
    out = []
    for row in p.tolist():
        ev: dict[str, float] = {}
        for i, q in enumerate(row):
            if q < 1e-3:
                continue
            for w in words[i]:
                if vocab_words is None or w in vocab_words:
                    ev[w] = ev.get(w, 0.0) + q
        out.append({w: q for w, q in sorted(ev.items(), key=lambda kv: -kv[1]) if q >= 0.01})
    return out
