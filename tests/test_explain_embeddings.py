"""Word-embedding spaces: neighbours, named spaces, word2vec, neighbourhood quality, projections
and their cache in a bundle folder, the ``neighbours`` CLI, and the shipped models' spaces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from explain.embeddings import (EmbeddingSpace, UnknownSpace, UnknownWord, Word2VecConfig, available_spaces,
                                bundle_projection, default_space, embedding_space, load_projection, lookup,
                                model_spaces, nearest, project, projection_path, save_projection, save_word2vec,
                                search, suggest, train_word2vec)
from explain.wordsim import category_precision, load_categories, word_similarity

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
    a = project(space, seed=0, perplexity=10, max_iter=250, umap=False)
    b = project(space, seed=0, perplexity=10, max_iter=250, umap=False)
    np.testing.assert_array_equal(a.tsne, b.tsne)
    np.testing.assert_array_equal(a.pca, b.pca)
    assert a.tsne.shape == a.pca.shape == (len(space.words), 2)
    assert a.explained_variance[0] >= a.explained_variance[1] > 0


@pytest.mark.slow  # numba compiles UMAP on first use (about half a minute)
def test_umap_is_deterministic_and_keeps_neighbourhoods():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    v = np.concatenate([c + rng.normal(size=(20, 16)) for c in centres]).astype(np.float32)
    sp = EmbeddingSpace([f"w{i}" for i in range(60)], v)
    a, b = project(sp, seed=0, perplexity=10, max_iter=250), project(sp, seed=0, perplexity=10, max_iter=250)
    np.testing.assert_array_equal(a.umap, b.umap)
    # each point's nearest 2-D neighbour comes from its own blob
    d = np.linalg.norm(a.umap[:, None] - a.umap[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert (d.argmin(1) // 20 == np.arange(60) // 20).mean() > 0.95


def test_projection_saved_in_bundle_folder_and_reused(space, tmp_path, monkeypatch):
    proj = bundle_projection(tmp_path, space, seed=0, perplexity=10, umap=False)
    f = projection_path(tmp_path, space.name)
    assert f.is_file()
    d = json.loads(f.read_text())
    assert d["words"] == space.words and len(d["tsne"]) == len(space.words)
    loaded = load_projection(tmp_path, space.fingerprint(), space.name)
    np.testing.assert_allclose(loaded.tsne, proj.tsne, atol=1e-4)

    import explain.embeddings as emb

    def boom(*a, **k):
        raise AssertionError("should have used the saved projection")

    monkeypatch.setattr(emb, "project", boom)
    again = bundle_projection(tmp_path, space, seed=0, umap=False)
    np.testing.assert_allclose(again.pca, proj.pca, atol=1e-4)
    monkeypatch.undo()

    # Other embeddings: the saved file is stale and recomputed.
    other = EmbeddingSpace(space.words, space.vectors * 2)
    assert load_projection(tmp_path, other.fingerprint()) is None
    fresh = bundle_projection(tmp_path, other, perplexity=10, umap=False)
    assert fresh.fingerprint == other.fingerprint() == load_projection(tmp_path).fingerprint
    f.write_text("{not json")
    assert load_projection(tmp_path) is None
    save_projection(tmp_path, proj)
    assert load_projection(tmp_path).words == space.words
    # each space has its own file
    import dataclasses

    save_projection(tmp_path, dataclasses.replace(proj, space="output"))
    assert projection_path(tmp_path, "output").is_file()
    assert load_projection(tmp_path, proj.fingerprint, "output").space == "output"
    assert load_projection(tmp_path, proj.fingerprint).space == "custom"


def test_embedding_space_from_a_decoder_skips_specials():
    from toy import cached_toy_captioner

    cap = cached_toy_captioner("merge")
    sp = embedding_space(cap.decoder, cap.vocab, "input")
    assert sp.words == cap.vocab.itos[4:]
    np.testing.assert_array_equal(sp.vectors, cap.decoder.embed.weight.detach().numpy()[4:])
    assert len(embedding_space(cap.decoder, cap.vocab, "input", skip_specials=False).words) == len(cap.vocab)
    assert nearest(sp, "red", 1) == [("red", 1.0)]


# --------------------------------------------------------------------------- ranking is cosine, nearest first

def brute_force_cosine(vectors: np.ndarray, i: int) -> np.ndarray:
    """Independent reference: cosine of row i with every row, in float64."""
    v = vectors.astype(np.float64)
    n = np.linalg.norm(v, axis=1)
    return v @ v[i] / (n * n[i])


def test_nearest_ranks_by_cosine_most_similar_first(space):
    """Against a float64 reference: fails if the ranking is reversed, shuffled or uses another score."""
    for w in ("dog", "water", "w33"):
        i = space.index[w]
        ref = brute_force_cosine(space.vectors, i)
        ref[i] = -np.inf
        expect = [space.words[j] for j in np.argsort(-ref, kind="stable")[:8]]
        got = nearest(space, w, k=8, include_self=False)
        assert [x for x, _ in got] == expect
        np.testing.assert_allclose([c for _, c in got], ref[[space.index[x] for x in expect]], atol=1e-5)


def test_nearest_is_cosine_not_dot_product():
    """Long vectors pointing elsewhere must not win: dot product would rank "far" first."""
    words = ["query", "near", "far", "other"]
    v = np.array([[1.0, 0.0], [1.0, 0.1], [10.0, 10.0], [-1.0, 0.2]], dtype=np.float32)
    sp = EmbeddingSpace(words, v)
    assert [w for w, _ in nearest(sp, "query", 3, include_self=False)] == ["near", "far", "other"]
    assert nearest(sp, "query", 1, include_self=False)[0][1] == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)


# --------------------------------------------------------------------------- named spaces

def _tiny_decoder(kind: str, tie: bool):
    from captioning.decoders import build_decoder
    from captioning.vocab import Vocab

    vocab = Vocab([f"w{i}" for i in range(30)])
    extra = {"merge": {"merge_dim": 8}, "show_attend_tell": {"attention_dim": 8}}.get(kind, {})
    dec = build_decoder(kind, {"vocab_size": len(vocab), "feature_dim": 6, "embed_dim": 8, "hidden_dim": 8,
                               "tie_weights": tie, **extra})
    return dec, vocab


@pytest.mark.parametrize("kind", ["show_tell", "merge", "show_attend_tell"])
def test_every_space_has_one_row_per_vocabulary_word(kind):
    dec, vocab = _tiny_decoder(kind, tie=False)
    assert available_spaces(dec) == ["output", "input"] and default_space(dec) == "output"
    spaces = model_spaces(dec, vocab)
    for name, sp in spaces.items():
        assert sp.name == name and sp.words == vocab.itos[4:] and sp.vectors.shape[0] == len(vocab) - 4
    w = dec.fc.weight.detach().numpy()[4:]
    np.testing.assert_allclose(spaces["output"].vectors, w - w.mean(0), atol=1e-6)  # centred softmax rows
    np.testing.assert_array_equal(spaces["input"].vectors, dec.embed.weight.detach().numpy()[4:])
    with pytest.raises(UnknownSpace, match="word2vec"):
        embedding_space(dec, vocab, "word2vec")


def test_a_tied_model_has_one_shared_space_that_survives_save_and_load(tmp_path):
    import torch.nn.functional as F

    from captioning.bundle import load_bundle, save_bundle

    dec, vocab = _tiny_decoder("show_tell", tie=True)
    assert dec.fc.weight is dec.embed.weight
    assert dec.embed.weight.abs().max() <= 0.1  # small start, not N(0, 1) logits (Press & Wolf 2017)
    assert available_spaces(dec) == ["tied"] and default_space(dec) == "tied"
    assert embedding_space(dec, vocab, "output").name == embedding_space(dec, vocab, "input").name == "tied"
    # one optimiser step moves the single matrix through both roles
    opt = torch.optim.SGD(dec.parameters(), lr=0.1)
    caps = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    before = dec.embed.weight.detach().clone()
    logp, _ = dec(torch.randn(2, 4, 6), torch.randn(2, 6), caps)
    F.nll_loss(logp.reshape(-1, logp.size(-1)), caps[:, 1:].reshape(-1)).backward()
    opt.step()
    assert not torch.equal(before, dec.embed.weight) and dec.fc.weight is dec.embed.weight
    save_bundle(tmp_path / "tied", dec, vocab, "efficientnet-lite0", half=False)
    back, _, cfg = load_bundle(tmp_path / "tied")
    assert cfg["decoder"]["config"]["tie_weights"] is True
    assert back.fc.weight is back.embed.weight
    torch.testing.assert_close(back.embed.weight, dec.embed.weight)


def test_tying_needs_matching_sizes():
    from captioning.decoders import build_decoder

    with pytest.raises(ValueError, match="tie_weights"):
        build_decoder("show_tell", {"vocab_size": 20, "feature_dim": 6, "embed_dim": 8, "hidden_dim": 16,
                                    "tie_weights": True})


# --------------------------------------------------------------------------- word2vec

COLOURS = ["red", "blue", "green", "yellow", "pink"]
ANIMALS = ["dog", "cat", "horse", "bird", "cow"]
PLACES = ["beach", "park", "street", "field", "lake"]


def _corpus(n: int = 1500, seed: int = 0) -> list[list[str]]:
    """Sentences in which the words of one category share their contexts and no others do."""
    rng = np.random.default_rng(seed)
    frames = [(COLOURS, ["a", "{}", "ball"]), (ANIMALS, ["the", "{}", "barks"]), (PLACES, ["at", "{}", "today"])]
    out = []
    for _ in range(n):
        words, frame = frames[rng.integers(3)]
        out.append([str(rng.choice(words)) if t == "{}" else t for t in frame])
    return out


W2V_SMALL = Word2VecConfig(dim=16, window=2, epochs=20, seed=0)


def test_word2vec_puts_words_that_share_contexts_together():
    words = COLOURS + ANIMALS + PLACES + ["a", "ball", "the", "barks", "at", "today", "never"]
    vec = train_word2vec(_corpus(), words, W2V_SMALL)
    assert vec.shape == (len(words), 16)
    assert not vec[words.index("never")].any()  # absent from the text: a zero row, not noise
    sp = EmbeddingSpace(words, vec, "word2vec")
    cats = {"colours": COLOURS, "animals": ANIMALS, "places": PLACES}
    score = category_precision(sp, cats, k=3)
    assert score.judged > 0.9 > 0.3 > score.judged_chance


def test_word2vec_is_reproducible_across_processes(tmp_path):
    """Same seed, one worker: identical vectors even under another PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    code = ("import sys, numpy as np; sys.path.insert(0, 'tests'); "
            "from test_explain_embeddings import _corpus, W2V_SMALL, COLOURS, ANIMALS, PLACES; "
            "from explain.embeddings import train_word2vec; "
            "np.save(sys.argv[1], train_word2vec(_corpus(300), COLOURS + ANIMALS + PLACES, W2V_SMALL))")
    root = Path(__file__).resolve().parent.parent
    for i, seed in enumerate(("1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"v{i}.npy")], cwd=root, env=env, check=True,
                       timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "v0.npy"), np.load(tmp_path / "v1.npy"))


def test_word2vec_files_beside_a_bundle(tmp_path):
    dec, vocab = _tiny_decoder("merge", tie=False)
    words = vocab.itos[4:]
    vec = np.random.default_rng(0).normal(size=(len(words), 5)).astype(np.float32)
    save_word2vec(tmp_path, list(reversed(words)), vec[::-1].copy(), W2V_SMALL, {"data": "test"})
    assert available_spaces(dec, tmp_path) == ["output", "input", "word2vec"]
    sp = embedding_space(dec, vocab, "word2vec", tmp_path)
    assert sp.words == words  # rows follow the model's vocabulary whatever order the file has
    np.testing.assert_allclose(sp.vectors, vec, atol=2e-3)  # float16 on disk
    # a file for another vocabulary is a clear error, not wrong neighbours
    save_word2vec(tmp_path, words[:-1], vec[:-1], W2V_SMALL, {"data": "test"})
    with pytest.raises(ValueError, match="another vocabulary"):
        embedding_space(dec, vocab, "word2vec", tmp_path)


# --------------------------------------------------------------------------- neighbourhood quality

def test_category_precision_by_hand():
    """Two tight clusters and a stray: every precision worked out on paper."""
    words = ["red", "blue", "green", "dog", "cat", "cow", "stray"]
    v = np.array([[1, 0.1, 0], [1, 0.2, 0], [1, 0.3, 0], [0, 1, 0.1], [0, 1, 0.2], [0.1, 1, 0.3], [1, 0.12, 0]],
                 dtype=np.float32)
    cats = {"colours": ["red", "blue", "green"], "animals": ["dog", "cat", "cow"]}
    s = category_precision(EmbeddingSpace(words, v), cats, k=2)
    assert s.judged == 1.0 and s.words == 6
    assert s.judged_chance == pytest.approx(2 / 5)  # 2 same-category words among the 5 other listed ones
    assert s.all_chance == pytest.approx(2 / 6)
    # "stray" is unlisted and sits among the colours: with the whole vocabulary it is one of the
    # two nearest of red, blue and green, and counts as wrong for each: (3 * 1/2 + 3 * 1) / 6
    assert s.all == pytest.approx(0.75)
    # mixed clusters {red, green, cat} and {blue, dog, cow}: red, green, dog and cow find one
    # same-category word among their two neighbours, blue and cat none: 4 * 1/2 / 6
    mixed = EmbeddingSpace(words, v[[0, 3, 1, 4, 2, 5, 6]])
    assert category_precision(mixed, cats, k=2).judged == pytest.approx(1 / 3)


def test_category_lists_are_well_formed():
    cats = load_categories()
    assert len(cats) >= 12 and all(len(ws) >= 10 for ws in cats.values())
    assert {"colours", "numbers", "animals", "people", "clothing", "places", "vehicles", "sports"} <= set(cats)


def test_word_similarity_is_spearman_on_covered_pairs():
    from explain.wordsim import read_benchmark

    pairs = read_benchmark("wordsim353")
    assert len(pairs) >= 350
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    rng = np.random.default_rng(0)
    noise = EmbeddingSpace(words, rng.normal(size=(len(words), 32)).astype(np.float32))
    rho, n = word_similarity(noise, "wordsim353")
    assert n == len({(a, b) for a, b, _ in pairs}) or n >= 350
    assert abs(rho) < 0.15  # random vectors: no agreement with people


# --------------------------------------------------------------------------- CLI

def test_neighbours_cli(tmp_path, capsys):
    from captioning.bundle import save_bundle
    from explain.cli import main

    dec, vocab = _tiny_decoder("merge", tie=False)
    save_bundle(tmp_path / "m", dec, vocab, "efficientnet-lite0", half=False)
    m = str(tmp_path / "m")
    assert main(["neighbours", "w5", "w7", "--model", m, "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["space"] == "output" and list(out["neighbours"]) == ["w5", "w7"]
    sp = embedding_space(dec, vocab, "output")
    assert [n["word"] for n in out["neighbours"]["w5"]] == [w for w, _ in nearest(sp, "w5", 4, include_self=False)]
    assert main(["neighbours", "w5", "nope", "--model", m, "--space", "input"]) == 1  # the known word is answered
    io = capsys.readouterr()
    assert io.out.startswith("w5 (input): ") and "'nope' is not in the vocabulary" in io.err
    assert main(["neighbours", "w5", "--model", m, "--space", "word2vec"]) == 2
    assert "no 'word2vec' embedding space" in capsys.readouterr().err


# --------------------------------------------------------------------------- the shipped models

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "models"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["show_attend_tell", "show_tell", "merge"])
def test_shipped_default_space_means_something(name):
    """The default space of every shipped model: colour words nearest to colour words far above
    chance, precision@5 at least 0.5 on the project's lists, and the recorded default is the
    space that measures best now."""
    from captioning.bundle import load_bundle
    from explain.embeddings import read_embeddings_info
    from explain.wordsim import measure

    folder = SHIPPED / name
    dec, vocab, _ = load_bundle(folder)
    info = read_embeddings_info(folder)
    assert info is not None, f"{folder}: no embeddings.json; run python -m explain embeddings --model {folder}"
    spaces = model_spaces(dec, vocab, folder)
    assert set(spaces) == set(info["spaces"]) and "word2vec" in spaces
    for sp in spaces.values():
        assert sp.words == [w for w in vocab.itos if not w.startswith("<")]
    cats = load_categories()
    scores = {n: category_precision(sp, cats, k=5) for n, sp in spaces.items()}
    best = max(scores, key=lambda n: scores[n].judged)
    assert default_space(dec, folder) == info["default"] == best
    d = scores[best]
    assert d.judged >= 0.5 and d.per_category["colours"] >= 0.6 > 5 * d.judged_chance
    colour_nn = nearest(spaces[best], "red", 5, include_self=False)
    assert sum(w in cats["colours"] for w, _ in colour_nn) >= 3, colour_nn
    recorded = info["spaces"][best]["categories"]["judged"]
    assert recorded == pytest.approx(d.judged, abs=1e-9)  # the bundle's table is this code's measurement
    assert measure(spaces[best], cats)["wordsim353"]["rho"] > 0.3
