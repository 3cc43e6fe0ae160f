"""How much an embedding space's neighbourhoods mean: category precision@k and word similarity.

Category precision@k: ``assets/word_categories.json`` holds word lists by category (colours,
numbers, animals, people, clothing, places, vehicles, sports, verbs of motion, ...), written for
this project from general English, one category per word. For each listed word in the
vocabulary, precision@k is the share of its k nearest neighbours (cosine, itself excluded) that
are in its own category; the score is the mean over words. Two variants:

* ``judged`` (the headline): neighbours are searched among the listed words only. A neighbour
  no list mentions cannot be judged right or wrong, so it is skipped, as in the condensed-list
  precision used for incomplete relevance judgements (Sakai 2007, SIGIR).
* ``all``: neighbours are searched in the whole vocabulary; unlisted neighbours count as wrong
  (a lower bound).

Each comes with its chance level: the same precision when neighbours are drawn at random.

Word similarity: Spearman's rho between cosine similarity and human ratings on WordSim-353
(Finkelstein et al. 2002) and SimLex-999 (Hill, Reichart & Korhonen 2015), read from the copies
that ship inside gensim's test data, over the pairs whose both words the vocabulary holds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from captioning.paths import ASSETS

from .embeddings import EmbeddingSpace

CATEGORIES_PATH = ASSETS / "word_categories.json"
BENCHMARKS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


def load_categories(path: Union[str, Path, None] = None) -> dict[str, list[str]]:
    """{category: [words]} from the project's list (or ``path``). A word in two lists is an error."""
    path = Path(path) if path else CATEGORIES_PATH
    d = json.loads(path.read_text())
    cats = d["categories"] if isinstance(d, dict) and "categories" in d else d
    seen: dict[str, str] = {}
    for c, words in cats.items():
        for w in words:
            if w in seen and seen[w] != c:
                raise ValueError(f"{path}: {w!r} is in both {seen[w]!r} and {c!r}")
            seen[w] = c
    return {str(c): [str(w) for w in ws] for c, ws in cats.items()}


@dataclass
class CategoryScore:
    """Precision@k of same-category neighbours (see the module docstring).

    judged / all: mean precision over the scored words; *_chance: the same for random
    neighbours. per_category: {category: judged precision}. words: how many listed words the
    vocabulary holds (the ones scored).
    """

    k: int
    judged: float
    judged_chance: float
    all: float
    all_chance: float
    words: int
    per_category: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def category_precision(space: EmbeddingSpace, categories: dict[str, list[str]], k: int = 5) -> CategoryScore:
    """Score ``space`` on category lists.

    Args:
        space: an embedding space (N words).
        categories: {category: [words]} (``load_categories()``); words outside the space are skipped.
        k: neighbours per word.
    Returns:
        ``CategoryScore``.
    """
    label = {w: c for c, ws in categories.items() for w in ws if w in space.index}
    if len(label) < k + 1:
        raise ValueError(f"only {len(label)} listed words are in this space; need more than k={k}")
    rows = np.array([space.index[w] for w in label])  # (L,)
    cat_of = np.array([label[w] for w in label])  # (L,)
    sims = space.unit[rows] @ space.unit.T  # (L, N) cosine
    sims[np.arange(len(rows)), rows] = -np.inf  # a word is not its own neighbour
    in_list = np.zeros(len(space.words), dtype=bool)
    in_list[rows] = True
    listed_cat = np.full(len(space.words), "", dtype=object)
    listed_cat[rows] = cat_of

    def score(candidates: np.ndarray) -> np.ndarray:
        s = np.where(candidates, sims, -np.inf)
        # stable order: ties broken by row, as nearest() does
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (L, k)
        return (listed_cat[top] == cat_of[:, None]).mean(1)  # (L,)

    judged = score(np.broadcast_to(in_list, sims.shape))
    every = score(np.ones_like(sims, dtype=bool))
    size = {c: sum(1 for w in label if label[w] == c) for c in categories}
    same = np.array([size[c] - 1 for c in cat_of], dtype=np.float64)  # same-category candidates per word
    per_cat = {c: round(float(judged[cat_of == c].mean()), 4) for c in categories if size[c]}
    return CategoryScore(k, float(judged.mean()), float((same / (len(label) - 1)).mean()),
                         float(every.mean()), float((same / (len(space.words) - 1)).mean()), len(label), per_cat)


def read_benchmark(name: str) -> list[tuple[str, str, float]]:
    """(word, word, human score) pairs of a published word-similarity benchmark shipped in gensim."""
    from gensim.test.utils import datapath

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    pairs = []
    for line in Path(datapath(BENCHMARKS[name])).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            pairs.append((parts[0].lower(), parts[1].lower(), float(parts[2])))
        except (IndexError, ValueError):
            continue  # header line
    return pairs


def word_similarity(space: EmbeddingSpace, name: str) -> tuple[Optional[float], int]:
    """Spearman's rho between cosine similarity and the benchmark's human scores, over the pairs
    the space covers. Returns (rho or None if fewer than 10 pairs, number of pairs)."""
    from scipy.stats import spearmanr

    got = [(space.index[a], space.index[b], s) for a, b, s in read_benchmark(name)
           if a in space.index and b in space.index]
    if len(got) < 10:
        return None, len(got)
    cos = [float(space.unit[i] @ space.unit[j]) for i, j, _ in got]
    return float(spearmanr(cos, [s for _, _, s in got]).statistic), len(got)


def measure(space: EmbeddingSpace, categories: Optional[dict[str, list[str]]] = None, k: int = 5) -> dict:
    """Every measure of one space: {"categories": CategoryScore dict, "<benchmark>": {"rho", "pairs"}}."""
    out: dict = {"categories": category_precision(space, categories or load_categories(), k).to_dict()}
    for b in BENCHMARKS:
        rho, n = word_similarity(space, b)
        out[b] = {"rho": rho, "pairs": n}
    return out
