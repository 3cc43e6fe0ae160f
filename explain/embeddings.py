"""Word-embedding spaces of a captioning model: named spaces, 2-D maps, nearest neighbours and word search.

Spaces (``SPACES``), each one row per vocabulary word:

* ``output``: the rows of the decoder's softmax layer (``fc.weight``), the vectors each next word
  is scored against, mean-centred over the vocabulary (every row shares a direction that only
  tracks word frequency; removing it is the first step of Mu & Viswanath 2018, "All-but-the-Top").
* ``input``: the decoder's input embedding matrix (``embed.weight``). On the shipped models
  training barely moves it from its initialisation, so its neighbours are close to random.
* ``tied``: a model trained with ``--tie-weights`` (Press & Wolf 2017) has one matrix for both
  roles; it replaces ``output`` and ``input``, mean-centred like ``output``.
* ``word2vec``: skip-gram vectors (Mikolov et al. 2013) trained with gensim on the training
  captions and stored beside the bundle (``word2vec.safetensors`` + ``word2vec.json``).

Which space is the default is measured, not assumed: ``explain.wordsim`` scores every space and
``python -m explain embeddings`` records the best in the bundle's ``embeddings.json``.

Projections: t-SNE (van der Maaten & Hinton 2008) with cosine distances, PCA initialisation and
a fixed seed; PCA (sign-fixed SVD) as the linear view; UMAP (McInnes et al. 2018, cosine metric,
fixed seed). t-SNE and UMAP preserve neighbourhoods, not distances between clusters (Wattenberg,
Viegas & Johnson 2016). Each space's projection is saved in the bundle as
``projection.<space>.json`` with a fingerprint of its vectors, so a viewer opens instantly; a
stale or missing file is recomputed on demand.

Dimensions: N words (specials skipped), E embedding size, V vocabulary.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from captioning.atomic import atomic_write as _atomic_write
from captioning.vocab import SPECIALS

PROJECTION_VERSION = 2
PROJECTION_METHODS = ("tsne", "pca", "umap")
W2V_WEIGHTS, W2V_CONFIG = "word2vec.safetensors", "word2vec.json"
EMBEDDINGS_INFO = "embeddings.json"

#: Every space this module knows, with a one-line description for people.
SPACES: dict[str, str] = {
    "output": "the softmax layer's word vectors (fc.weight), mean-centred",
    "input": "the decoder's input embedding (embed.weight)",
    "tied": "the one matrix a weight-tied model reads and predicts words with, mean-centred",
    "word2vec": "skip-gram word2vec (gensim) trained on the training captions",
}
#: Used when a bundle has no measured default (embeddings.json): the best on every shipped model.
FALLBACK_DEFAULT = ("tied", "output")


class UnknownWord(KeyError):
    """A word not in the vocabulary; ``suggestions`` holds close spellings that are."""

    def __init__(self, word: str, suggestions: list[str]):
        self.word = word
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"{word!r} is not in the vocabulary{hint}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownSpace(ValueError):
    """A space name this model does not have; the message lists the ones it has."""

@dataclass
class EmbeddingSpace:
    """Words and their embedding vectors.

    words: N words. vectors: (N, E) float32. name: which space (a key of ``SPACES``, or any
    label). unit: (N, E) rows scaled to length 1 (zero rows stay zero). index: word -> row.
    """

    words: list[str]
    vectors: np.ndarray
    name: str = "custom"
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


def _first_member(decoder):
    if not hasattr(decoder, "embed") and hasattr(decoder, "members"):
        return decoder.members[0]
    return decoder


def is_tied(decoder) -> bool:
    """True when the decoder's output layer shares its input embedding matrix."""
    d = _first_member(decoder)
    return getattr(d, "fc", None) is not None and d.fc.weight is d.embed.weight


def available_spaces(decoder, folder: Union[str, Path, None] = None) -> list[str]:
    """The spaces this model has, in ``SPACES`` order: ``tied`` or ``output`` + ``input``, and
    ``word2vec`` when its files are in the bundle ``folder``."""
    names = ["tied"] if is_tied(decoder) else ["output", "input"]
    if folder is not None and (Path(folder) / W2V_WEIGHTS).is_file():
        names.append("word2vec")
    return names


def default_space(decoder, folder: Union[str, Path, None] = None) -> str:
    """The space a model is explored in by default: the best-measured one that the bundle's
    ``embeddings.json`` records, else ``tied`` or ``output``."""
    have = available_spaces(decoder, folder)
    if folder is not None:
        info = read_embeddings_info(folder)
        if info and info.get("default") in have:
            return str(info["default"])
    return next(n for n in FALLBACK_DEFAULT if n in have)


def embedding_space(decoder, vocab, space: Optional[str] = None, folder: Union[str, Path, None] = None,
                    skip_specials: bool = True) -> EmbeddingSpace:
    """One named embedding space of a model as an ``EmbeddingSpace``.

    Args:
        decoder: a captioning Decoder (an Ensemble uses its first member).
        vocab: the model's ``Vocab``.
        space: a key of ``SPACES``; None gives ``default_space(decoder, folder)``. On a tied
            model ``output`` and ``input`` both mean ``tied``.
        folder: the model's bundle folder (needed for ``word2vec`` and the measured default).
        skip_specials: leave out <pad>, <start>, <end>, <unk>.
    Returns:
        ``EmbeddingSpace`` with N = len(vocab) (- 4) words.
    Raises:
        UnknownSpace: a space this model does not have.
    """
    d = _first_member(decoder)
    name = space or default_space(decoder, folder)
    if name in ("output", "input") and is_tied(decoder):
        name = "tied"
    have = available_spaces(decoder, folder)
    if name not in have:
        hint = " (build it with `python -m explain embeddings --model DIR`)" if name == "word2vec" else ""
        raise UnknownSpace(f"this model has no {name!r} embedding space{hint}; it has: {', '.join(have)}")
    rows = [i for i, t in enumerate(vocab.itos) if not (skip_specials and t in SPECIALS)]
    words = [vocab.itos[i] for i in rows]
    if name == "word2vec":
        return _load_word2vec(Path(folder), vocab, words)
    w = (d.embed.weight if name == "input" else d.fc.weight).detach().float().cpu().numpy()  # (V, E)
    if w.shape[0] != len(vocab):
        raise ValueError(f"embedding has {w.shape[0]} rows but the vocabulary {len(vocab)} words")
    w = w[rows]  # (N, E)
    if name != "input":
        w = w - w.mean(0, keepdims=True)  # drop the shared frequency direction (module docstring)
    return EmbeddingSpace(words, w, name)


def model_spaces(decoder, vocab, folder: Union[str, Path, None] = None) -> dict[str, EmbeddingSpace]:
    """Every space of ``available_spaces``, by name."""
    return {n: embedding_space(decoder, vocab, n, folder) for n in available_spaces(decoder, folder)}


# --------------------------------------------------------------------------- word2vec

@dataclass
class Word2VecConfig:
    """Skip-gram settings (Mikolov et al. 2013). One worker and a fixed seed make training
    reproducible (gensim seeds each word's start vector from the seed, not from Python's hash)."""

    dim: int = 100
    window: int = 3
    epochs: int = 30
    negative: int = 5
    sample: float = 1e-3  # gensim's down-sampling of frequent words
    seed: int = 0


def train_word2vec(sentences: Iterable[list[str]], words: list[str], cfg: Word2VecConfig = Word2VecConfig()
                   ) -> np.ndarray:
    """Skip-gram vectors for ``words`` from tokenised sentences.

    Tokens outside ``words`` are read as ``<unk>``, so context windows stay as in the text.
    Args:
        sentences: token lists (``captioning.vocab.tokenize`` of each caption).
        words: the N words to return vectors for, in order.
    Returns:
        (N, cfg.dim) float32; a word that never occurs gets a zero row.
    """
    from gensim.models import Word2Vec

    keep = set(words)
    corpus = [[t if t in keep else "<unk>" for t in s] for s in sentences]
    corpus = [s for s in corpus if s]
    if not corpus:
        raise ValueError("no sentences to train word2vec on")
    model = Word2Vec(corpus, vector_size=cfg.dim, window=cfg.window, min_count=1, sg=1, negative=cfg.negative,
                     sample=cfg.sample, epochs=cfg.epochs, seed=cfg.seed, workers=1)
    out = np.zeros((len(words), cfg.dim), dtype=np.float32)
    for i, w in enumerate(words):
        if w in model.wv.key_to_index:
            out[i] = model.wv[w]
    return out


def save_word2vec(folder: Union[str, Path], words: list[str], vectors: np.ndarray, cfg: Word2VecConfig,
                  source: dict[str, Any]) -> Path:
    """Write ``word2vec.safetensors`` (float16, (N, D)) and ``word2vec.json`` (words, settings,
    where the sentences came from) into a bundle folder, each atomically. Returns the weights path."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    if vectors.shape[0] != len(words):
        raise ValueError(f"{len(words)} words but {vectors.shape[0]} vectors")
    _atomic_write(folder / W2V_CONFIG, lambda p: Path(p).write_text(json.dumps(
        {"format": "captioning-word2vec", "version": 1, "config": asdict(cfg), "source": source, "words": words})))
    _atomic_write(folder / W2V_WEIGHTS, lambda p: save_file({"vectors": np.ascontiguousarray(vectors, np.float16)}, str(p)))
    return folder / W2V_WEIGHTS


def _load_word2vec(folder: Path, vocab, words: list[str]) -> EmbeddingSpace:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    wp, cp = folder / W2V_WEIGHTS, folder / W2V_CONFIG
    try:
        meta = json.loads(cp.read_text())
        vec = load_file(str(wp))["vectors"].astype(np.float32)  # (N', D)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ValueError(f"{wp}: cannot read word2vec vectors ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    stored = meta.get("words") if isinstance(meta, dict) else None
    if not isinstance(stored, list) or vec.ndim != 2 or vec.shape[0] != len(stored):
        raise ValueError(f"{cp}: word list does not match {W2V_WEIGHTS}")
    index = {w: i for i, w in enumerate(stored)}
    missing = [w for w in words if w not in index]
    if missing:
        raise ValueError(f"{cp}: made for another vocabulary ({len(missing)} of the model's words missing, "
                         f"e.g. {missing[0]!r}); rebuild with `python -m explain embeddings`")
    return EmbeddingSpace(words, vec[[index[w] for w in words]], "word2vec")


def read_embeddings_info(folder: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The bundle's ``embeddings.json`` (measured quality per space and the default), or None."""
    try:
        d = json.loads((Path(folder) / EMBEDDINGS_INFO).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def write_embeddings_info(folder: Union[str, Path], info: dict[str, Any]) -> Path:
    path = Path(folder) / EMBEDDINGS_INFO
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
    return path



# --------------------------------------------------------------------------- projections

@dataclass
class Projection:
    """2-D coordinates of every word of one space: tsne, pca and umap (N, 2) (umap None when not
    computed), with how they were made."""

    words: list[str]
    tsne: np.ndarray
    pca: np.ndarray
    seed: int
    perplexity: float
    fingerprint: str
    explained_variance: list[float] = field(default_factory=list)
    umap: Optional[np.ndarray] = None
    space: str = "custom"

    def coords(self, method: str) -> Optional[np.ndarray]:
        return {"tsne": self.tsne, "pca": self.pca, "umap": self.umap}[method]

    def to_json(self) -> dict[str, Any]:
        d = {"format": "captioning-projection", "version": PROJECTION_VERSION, "space": self.space,
             "fingerprint": self.fingerprint, "seed": self.seed, "perplexity": self.perplexity,
             "explained_variance": self.explained_variance, "words": self.words,
             "tsne": np.round(self.tsne, 4).tolist(), "pca": np.round(self.pca, 4).tolist()}
        if self.umap is not None:
            d["umap"] = np.round(self.umap, 4).tolist()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Projection":
        if d.get("format") != "captioning-projection":
            raise ValueError("not a captioning projection file")
        if int(d.get("version", 0)) > PROJECTION_VERSION:
            raise ValueError(f"projection version {d['version']} is newer than this code reads")
        words = list(d["words"])
        xy = {m: np.asarray(d[m], dtype=np.float32).reshape(len(words), 2) for m in PROJECTION_METHODS if m in d}
        return cls(words, xy["tsne"], xy["pca"], int(d["seed"]), float(d["perplexity"]), str(d["fingerprint"]),
                   [float(x) for x in d.get("explained_variance", [])], xy.get("umap"), str(d.get("space", "custom")))


def project(space: EmbeddingSpace, seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000,
            umap: bool = True) -> Projection:
    """t-SNE, PCA and UMAP of the embeddings. Deterministic for a fixed seed (single-threaded
    t-SNE with PCA initialisation; UMAP with a random_state runs single-threaded).

    Args:
        space: from ``embedding_space``.
        seed: t-SNE and UMAP random state.
        perplexity: t-SNE perplexity, capped at (N - 1) / 3 for small vocabularies.
        max_iter: t-SNE iterations.
        umap: also compute UMAP (needs ``umap-learn``; skipped with a warning-free None if absent).
    Returns:
        ``Projection`` with arrays of shape (N, 2).
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
    U = _umap(X, seed) if umap else None
    return Projection(list(space.words), Y.astype(np.float32), P.astype(np.float32), seed, perp, space.fingerprint(),
                      [float(v) for v in pca.explained_variance_ratio_], U, space.name)


def _umap(X: np.ndarray, seed: int) -> Optional[np.ndarray]:
    try:
        import warnings

        import umap
    except ImportError:
        return None
    n = min(15, X.shape[0] - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": single-threaded is what we want
        return umap.UMAP(n_neighbors=n, metric="cosine", random_state=seed, init="spectral" if X.shape[0] > n + 1 else "random"
                         ).fit_transform(X).astype(np.float32)


def projection_path(folder: Union[str, Path], space: str) -> Path:
    return Path(folder) / f"projection.{space}.json"


def save_projection(folder: Union[str, Path], projection: Projection) -> Path:
    """Write ``projection.<space>.json`` into a model bundle folder (atomically). Returns its path."""
    path = projection_path(folder, projection.space)
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(projection.to_json())))
    return path


def load_projection(folder: Union[str, Path], fingerprint: Optional[str] = None, space: str = "custom"
                    ) -> Optional[Projection]:
    """Read one space's projection from a bundle folder.

    Args:
        fingerprint: if given, a file made from other vectors counts as missing.
        space: which space's file.
    Returns:
        The ``Projection``, or None if absent, unreadable or stale.
    """
    path = projection_path(folder, space)
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
                      seed: int = 0, perplexity: float = 30.0, umap: bool = True) -> Projection:
    """The saved projection of ``space`` in a bundle if it matches its vectors, else a fresh one
    (saved when ``save`` and the folder is writable).

    Args:
        folder: the model bundle folder.
        space: one of the model's spaces (``embedding_space``).
        recompute: ignore a saved file.
    Returns:
        ``Projection``.
    """
    if not recompute:
        proj = load_projection(folder, space.fingerprint(), space.name)
        if proj is not None and proj.seed == seed and (proj.umap is not None or not umap):
            return proj
    proj = project(space, seed=seed, perplexity=perplexity, umap=umap)
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
