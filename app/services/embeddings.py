"""Adapters from the app to ``explain.embeddings``: a model's word-embedding spaces, their 2-D
projections (the library's Projection), neighbours, search, clusters and measured quality."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

from explain import embeddings as E
from explain.embeddings import EmbeddingSpace, Projection
from explain.wordsim import load_categories

from app.services import COMPUTE_LOCK


def embedding_spaces(captioner, model_path: Optional[str] = None) -> tuple[list[str], str]:
    """(the spaces this model has, its default: the best-measured one)."""
    return E.available_spaces(captioner.decoder, model_path), E.default_space(captioner.decoder, model_path)


def space_about(name: str) -> str:
    return str(E.SPACES.get(name, name))


def embedding_space(captioner, space: Optional[str] = None, model_path: Optional[str] = None) -> EmbeddingSpace:
    with COMPUTE_LOCK:
        return E.embedding_space(captioner.decoder, captioner.vocab, space, model_path)


def embedding_projection(captioner, model_path: Optional[str] = None, space: Optional[str] = None,
                         umap: bool = False) -> Projection:
    """One space's words in 2-D (t-SNE, PCA, and UMAP when the bundle has it or ``umap`` asks for it
    and umap-learn is there). The bundle's ``projection.<space>.json`` is used when it matches the
    weights; otherwise it is computed here (seconds to a minute) and kept in memory only: the app
    never writes into a model folder."""
    sp = embedding_space(captioner, space, model_path)
    with COMPUTE_LOCK:
        proj = E.load_projection(model_path, sp.fingerprint(), sp.name) if model_path is not None else None
        if proj is None or (umap and proj.umap is None):
            proj = E.project(sp, umap=umap)
    return proj


def projection_note(proj: Projection, method: str) -> str:
    """How one method's coordinates were made, for the caption under the map."""
    if method == "pca":
        ev = list(proj.explained_variance or [])
        return "PCA" + (": explained variance " + ", ".join(f"{v:.1%}" for v in ev[:2]) if ev else "")
    if method == "umap":
        return f"UMAP, cosine distance, 15 neighbours, seed {proj.seed}"
    return f"t-SNE, cosine distance, perplexity {proj.perplexity:g}, seed {proj.seed}"


def embedding_quality(model_path: Optional[str]) -> list[dict[str, Any]]:
    """The bundle's measured neighbourhood quality per space (``embeddings.json``), as table rows."""
    info = E.read_embeddings_info(model_path) if model_path else None
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
        cats = load_categories()
    except (OSError, ValueError):
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
    return list(E.search(embedding_space(captioner, space, model_path), query, limit))


def nearest_words(captioner, word: str, k: int = 10, space: Optional[str] = None,
                  model_path: Optional[str] = None) -> list[tuple[str, float]]:
    """[(word, cosine similarity)] most similar first (the word itself excluded).
    Raises KeyError (explain's UnknownWord, with spelling suggestions) for a word not in the vocabulary."""
    return [(str(w), float(s)) for w, s in E.nearest(embedding_space(captioner, space, model_path), word, k,
                                                     include_self=False)]
