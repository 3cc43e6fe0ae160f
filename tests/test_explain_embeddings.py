"""Word-embedding space: neighbours, projections and their cache in a bundle folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explain.embeddings import (PROJECTION_FILE, EmbeddingSpace, UnknownWord, bundle_projection, embedding_space,
                                load_projection, lookup, nearest, project, save_projection, search, suggest)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def space():
    rng = np.random.default_rng(0)
    words = ["dog", "dogs", "cat", "grass", "green", "running", "runs", "water", "ball", "man"]
    words += [f"w{i:02d}" for i in range(50)]
    return EmbeddingSpace(words, rng.normal(size=(len(words), 16)).astype(np.float32))


def test_nearest_neighbour_is_itself_with_similarity_one(space):
    for w in ("dog", "grass", "w07"):
        nn = nearest(space, w, k=5)
        assert nn[0] == (w, 1.0)
        sims = [s for _, s in nn]
        assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    assert nearest(space, "dog", k=3, include_self=False)[0][0] != "dog"
    # cosine: scaling a vector does not change its neighbours
    v = space.vectors.copy()
    v[space.index["cat"]] *= 7
    scaled = EmbeddingSpace(space.words, v)
    assert [w for w, _ in nearest(scaled, "cat", 6)] == [w for w, _ in nearest(space, "cat", 6)]


def test_unknown_words_suggest_close_spellings(space):
    with pytest.raises(UnknownWord) as e:
        nearest(space, "dgo")
    assert "dog" in e.value.suggestions and "did you mean" in str(e.value)
    assert lookup(space, "  Dog ") == space.index["dog"]
    assert suggest(space, "runing")[0] in ("running", "runs")
    with pytest.raises(UnknownWord) as e:
        lookup(space, "zzzzqqq")
    assert e.value.suggestions == []


def test_search(space):
    assert search(space, "dog") == ["dog", "dogs"]
    assert search(space, "gr") == ["grass", "green"]
    assert search(space, "un")[:2] == ["running", "runs"]  # substring matches
    assert search(space, "wter") == ["water"]  # nothing matches: close spellings
    assert search(space, "  ") == []


def test_tsne_is_deterministic_for_a_fixed_seed(space):
    a = project(space, seed=0, perplexity=10, max_iter=250)
    b = project(space, seed=0, perplexity=10, max_iter=250)
    np.testing.assert_array_equal(a.tsne, b.tsne)
    np.testing.assert_array_equal(a.pca, b.pca)
    assert a.tsne.shape == a.pca.shape == (len(space.words), 2)
    assert a.explained_variance[0] >= a.explained_variance[1] > 0


def test_projection_saved_in_bundle_folder_and_reused(space, tmp_path, monkeypatch):
    proj = bundle_projection(tmp_path, space, seed=0, perplexity=10)
    f = tmp_path / PROJECTION_FILE
    assert f.is_file()
    d = json.loads(f.read_text())
    assert d["words"] == space.words and len(d["tsne"]) == len(space.words)
    loaded = load_projection(tmp_path, space.fingerprint())
    np.testing.assert_allclose(loaded.tsne, proj.tsne, atol=1e-4)

    import explain.embeddings as emb

    def boom(*a, **k):
        raise AssertionError("should have used the saved projection")

    monkeypatch.setattr(emb, "project", boom)
    again = bundle_projection(tmp_path, space, seed=0)
    np.testing.assert_allclose(again.pca, proj.pca, atol=1e-4)
    monkeypatch.undo()

    # Other embeddings: the saved file is stale and recomputed.
    other = EmbeddingSpace(space.words, space.vectors * 2)
    assert load_projection(tmp_path, other.fingerprint()) is None
    fresh = bundle_projection(tmp_path, other, perplexity=10)
    assert fresh.fingerprint == other.fingerprint() == load_projection(tmp_path).fingerprint
    (tmp_path / PROJECTION_FILE).write_text("{not json")
    assert load_projection(tmp_path) is None
    save_projection(tmp_path, proj)
    assert load_projection(tmp_path).words == space.words


def test_embedding_space_from_a_decoder_skips_specials():
    from explain.toy import cached_toy_captioner

    cap = cached_toy_captioner("merge")
    sp = embedding_space(cap.decoder, cap.vocab)
    assert sp.words == cap.vocab.itos[4:]
    np.testing.assert_array_equal(sp.vectors, cap.decoder.embed.weight.detach().numpy()[4:])
    assert len(embedding_space(cap.decoder, cap.vocab, skip_specials=False).words) == len(cap.vocab)
    assert nearest(sp, "red", 1) == [("red", 1.0)]
