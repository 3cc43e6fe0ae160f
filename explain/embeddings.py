"""The decoder's word-embedding space: 2-D maps, nearest neighbours and word search.

Projections: t-SNE (van der Maaten & Hinton 2008, "Visualizing Data using t-SNE", JMLR 9)
with cosine distances, PCA initialisation and a fixed seed, so the same model always gives
the same picture; and PCA (Pearson 1901; scikit-learn's SVD, sign-fixed) as the linear
view. t-SNE preserves neighbourhoods, not distances between clusters (Wattenberg, Viegas &
Johnson 2016, "How to Use t-SNE Effectively", Distill).

A projection is saved beside a model as ``projection.json`` in its bundle folder (words and
both 2-D coordinate sets, plus a fingerprint of the embedding matrix) so a viewer can open
instantly; a stale or missing file is recomputed on demand.

Dimensions: N words (specials skipped), E embedding size.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from captioning.vocab import SPECIALS

PROJECTION_FILE = "projection.json"
PROJECTION_VERSION = 1


class UnknownWord(KeyError):
    """A word not in the vocabulary; ``suggestions`` holds close spellings that are."""

    def __init__(self, word: str, suggestions: list[str]):
        self.word = word
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"{word!r} is not in the vocabulary{hint}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class EmbeddingSpace:
    """Words and their embedding vectors.

    words: N words. vectors: (N, E) float32 as in the model. unit: (N, E) rows scaled to
    length 1 (zero rows stay zero). index: word -> row.
    """

    words: list[str]
    vectors: np.ndarray
    unit: np.ndarray = field(init=False, repr=False)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(f"{len(self.words)} words but vectors of shape {self.vectors.shape}")
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.unit = self.vectors / np.where(norms > 0, norms, 1.0)
        self.index = {w: i for i, w in enumerate(self.words)}

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the words and vectors: identifies a model's embeddings."""
        h = hashlib.sha256("\n".join(self.words).encode())
        h.update(np.ascontiguousarray(self.vectors).tobytes())
        return h.hexdigest()[:16]


def embedding_space(decoder, vocab, skip_specials: bool = True) -> EmbeddingSpace:
    """The decoder's input embedding matrix ``decoder.embed.weight`` as an ``EmbeddingSpace``.

    Args:
        decoder: a captioning Decoder (an Ensemble uses its first member).
        vocab: the model's ``Vocab``.
        skip_specials: leave out <pad>, <start>, <end>, <unk>.
    Returns:
        ``EmbeddingSpace`` with N = len(vocab) (- 4) words.
    """
    if not hasattr(decoder, "embed") and hasattr(decoder, "members"):
        decoder = decoder.members[0]
    w = decoder.embed.weight.detach().float().cpu().numpy()  # (V, E)
    if w.shape[0] != len(vocab):
        raise ValueError(f"embedding has {w.shape[0]} rows but the vocabulary {len(vocab)} words")
    rows = [i for i, t in enumerate(vocab.itos) if not (skip_specials and t in SPECIALS)]
    return EmbeddingSpace([vocab.itos[i] for i in rows], w[rows])


# --------------------------------------------------------------------------- projections

@dataclass
class Projection:
    """2-D coordinates of every word: tsne (N, 2) and pca (N, 2), with how they were made."""

    words: list[str]
    tsne: np.ndarray
    pca: np.ndarray
    seed: int
    perplexity: float
    fingerprint: str
    explained_variance: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": "captioning-projection", "version": PROJECTION_VERSION, "fingerprint": self.fingerprint,
                "seed": self.seed, "perplexity": self.perplexity, "explained_variance": self.explained_variance,
                "words": self.words, "tsne": np.round(self.tsne, 5).tolist(), "pca": np.round(self.pca, 5).tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Projection":
        if d.get("format") != "captioning-projection":
            raise ValueError("not a captioning projection file")
        if int(d.get("version", 0)) > PROJECTION_VERSION:
            raise ValueError(f"projection version {d['version']} is newer than this code reads")
        words = list(d["words"])
        tsne = np.asarray(d["tsne"], dtype=np.float32).reshape(len(words), 2)
        pca = np.asarray(d["pca"], dtype=np.float32).reshape(len(words), 2)
        return cls(words, tsne, pca, int(d["seed"]), float(d["perplexity"]), str(d["fingerprint"]),
                   [float(x) for x in d.get("explained_variance", [])])


def project(space: EmbeddingSpace, seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000) -> Projection:
    """t-SNE and PCA of the embeddings. Deterministic for a fixed seed (single-threaded t-SNE; with
    the PCA initialisation the seed in fact hardly matters, which is the point).

    Args:
        space: from ``embedding_space``.
        seed: t-SNE random state.
        perplexity: t-SNE perplexity, capped at (N - 1) / 3 for small vocabularies.
        max_iter: t-SNE iterations.
    Returns:
        ``Projection`` with tsne and pca arrays of shape (N, 2).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = space.vectors.astype(np.float64)
    N = X.shape[0]
    if N < 3:
        raise ValueError(f"need at least 3 words to project, got {N}")
    pca = PCA(n_components=2, svd_solver="full")
    P = pca.fit_transform(X)
    perp = float(min(perplexity, max(1.0, (N - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", metric="cosine", random_state=seed,
                learning_rate="auto", max_iter=max_iter, n_jobs=1)
    Y = tsne.fit_transform(X)
    return Projection(list(space.words), Y.astype(np.float32), P.astype(np.float32), seed, perp, space.fingerprint(),
                      [float(v) for v in pca.explained_variance_ratio_])


def save_projection(folder: Union[str, Path], projection: Projection) -> Path:
    """Write ``projection.json`` into a model bundle folder (atomically). Returns its path."""
    folder = Path(folder)
    path = folder / PROJECTION_FILE
    fd, tmp = tempfile.mkstemp(prefix=".projection.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(projection.to_json(), f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_projection(folder: Union[str, Path], fingerprint: Optional[str] = None) -> Optional[Projection]:
    """Read ``projection.json`` from a bundle folder.

    Args:
        fingerprint: if given, a file made from other embeddings counts as missing.
    Returns:
        The ``Projection``, or None if absent, unreadable or stale.
    """
    path = Path(folder) / PROJECTION_FILE
    if not path.is_file():
        return None
    try:
        proj = Projection.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if fingerprint is not None and proj.fingerprint != fingerprint:
        return None
    return proj


def bundle_projection(folder: Union[str, Path], space: EmbeddingSpace, recompute: bool = False, save: bool = True,
                      seed: int = 0, perplexity: float = 30.0) -> Projection:
    """The saved projection of a bundle if it matches ``space``, else a fresh one (saved when
    ``save`` and the folder is writable).

    Args:
        folder: the model bundle folder.
        space: the model's embeddings (``embedding_space(decoder, vocab)``).
        recompute: ignore a saved file.
    Returns:
        ``Projection``.
    """
    if not recompute:
        proj = load_projection(folder, space.fingerprint())
        if proj is not None and proj.seed == seed:
            return proj
    proj = project(space, seed=seed, perplexity=perplexity)
    if save:
        try:
            save_projection(folder, proj)
        except OSError:
            pass  # read-only model folder: the projection is just not cached
    return proj


# --------------------------------------------------------------------------- neighbours and search

def suggest(space: EmbeddingSpace, word: str, n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Vocabulary words spelled closest to ``word`` (difflib ratio), best first."""
    return difflib.get_close_matches(word.strip().lower(), space.words, n=n, cutoff=cutoff)


def lookup(space: EmbeddingSpace, word: str) -> int:
    """Row of ``word`` (case and surrounding spaces ignored). Raises ``UnknownWord`` with suggestions."""
    w = word.strip().lower()
    if w not in space.index:
        raise UnknownWord(word, suggest(space, w))
    return space.index[w]


def nearest(space: EmbeddingSpace, word: str, k: int = 10, include_self: bool = True) -> list[tuple[str, float]]:
    """The k words with the highest cosine similarity to ``word``.

    Args:
        include_self: keep the word itself (always first, similarity 1.0 for a non-zero vector).
    Returns:
        [(word, cosine similarity)], most similar first. Raises ``UnknownWord``.
    """
    i = lookup(space, word)
    sims = space.unit @ space.unit[i]  # (N,)
    sims[i] = 1.0 if np.any(space.vectors[i]) else 0.0  # exact, not 0.99999994
    order = np.lexsort((np.arange(len(sims)), -sims))
    if not include_self:
        order = order[order != i]
    return [(space.words[j], float(sims[j])) for j in order[:k]]


def search(space: EmbeddingSpace, query: str, limit: int = 20) -> list[str]:
    """Words matching a query: exact match first, then prefix matches, then substring matches
    (each group in vocabulary order, i.e. most frequent first); close spellings if none match."""
    q = query.strip().lower()
    if not q:
        return []
    exact = [q] if q in space.index else []
    prefix = [w for w in space.words if w.startswith(q) and w != q]
    inner = [w for w in space.words if q in w and not w.startswith(q)]
    found = exact + prefix + inner
    return (found or suggest(space, q, n=limit))[:limit]
