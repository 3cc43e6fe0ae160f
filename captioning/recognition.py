"""What the encoder's own ImageNet head recognises in a photo, in caption words.

``assets/imagenet_words.json`` (built once from WordNet by ``python -m captioning.lab.tools.imagenet_words``)
maps each of the 1,000 classes to the vocabulary words that name it (Egyptian cat -> cat, cats;
every dog breed -> dog, dogs; espresso -> coffee, cup). Classes without a fitting word map to
nothing. Nothing here needs WordNet.

Which view the head reads (``head_log_probs``): the decoder reads the photo stretched to a square,
as it was trained (images.py), but ImageNet classifiers are trained on square crops of photos
whose aspect was kept. For a photo that is not square, the head's probabilities are averaged over
the whole stretched photo and its central square, pooled from the same feature grid (the grid
cells the central square covers, weighted by how much of each it covers): no second encoder
pass. On the COCO dev set (photos of many aspects) this made more of the forced words right
(docs/ood.md); a square photo is read exactly as before.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

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


def centre_weights(size: tuple[int, int], side: int) -> torch.Tensor:
    """How much of each cell of a ``side`` x ``side`` feature grid of the stretched photo lies in
    the photo's central square, normalised to sum to 1: (side * side,), row-major like the grid.
    ``size`` is the photo's (width, height) before the stretch; a square photo gives uniform weights."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    edges = torch.arange(side + 1, dtype=torch.float64) / side

    def overlap(lo: float, hi: float) -> torch.Tensor:  # (side,) length of each cell inside [lo, hi]
        return (torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(min=0)

    short = min(w, h)
    fx = overlap((w - short) / (2 * w), (w + short) / (2 * w))  # (side,)
    fy = overlap((h - short) / (2 * h), (h + short) / (2 * h))  # (side,)
    m = torch.outer(fy, fx).flatten()  # (side * side,)
    return (m / m.sum()).float()


def head_log_probs(head, grid: torch.Tensor, pooled: torch.Tensor,
                   sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> torch.Tensor:
    """The ImageNet head's log-probabilities, read as the module docstring says.

    Args:
        head: the encoder's ``head`` ((B, C, 1, 1) -> (B, 1000) logits).
        grid: (B, P, C) feature grid of the stretched photos, P a square number.
        pooled: (B, C) their mean over the grid.
        sizes: each photo's (width, height) before the stretch; None (for all, or for one photo):
            unknown, and the whole stretched photo alone is read.
    Returns:
        (B, 1000) log-probabilities (``recognise`` and ``word_evidence`` take them as logits).
    """
    p = torch.softmax(head(pooled.float()[:, :, None, None]).float(), -1)  # (B, 1000)
    side = int(round(grid.shape[1] ** 0.5))
    rows = [b for b, s in enumerate(sizes or []) if s is not None and s[0] != s[1]]
    if rows and side * side == grid.shape[1]:
        wts = torch.stack([centre_weights(sizes[b], side) for b in rows])  # (R, P)
        centre = torch.einsum("rp,rpc->rc", wts, grid[rows].float())  # (R, C)
        pc = torch.softmax(head(centre[:, :, None, None]).float(), -1)  # (R, 1000)
        p = p.clone()
        p[rows] = (p[rows] + pc) / 2
    return p.clamp_min(1e-12).log()


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
