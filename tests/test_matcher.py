"""The image-caption matcher (captioning/matcher.py) and re-ranking the beams with it."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from captioning import Captioner
from captioning.bundle import read_config, save_bundle
from captioning.lab.matcher_fit import train_matcher
from captioning.matcher import (MATCHER_CONFIG, MATCHER_WEIGHTS, Matcher, MatcherConfig, load_matcher,
                                retrieval_recall, save_matcher)
from captioning.lab.modelcard import set_decoding
from captioning.vocab import Vocab
from conftest import KINDS
from test_bundle_api_cli import images, small_decoder  # noqa: F401 (images is a fixture)

KIND_NAMES = list(KINDS)


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab.build([c for caps in KINDS.values() for c in caps], min_count=1)


def synthetic_pairs(vocab: Vocab, per_kind: int, seed: int, dim: int = 32):
    """Features: one random prototype per kind plus noise; captions: that kind's captions."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(len(KINDS), dim, generator=g)  # the same prototypes for every call
    g.manual_seed(seed)
    kinds = [k for k in range(len(KINDS)) for _ in range(per_kind)]
    feats = protos[kinds] + 0.5 * torch.randn(len(kinds), dim, generator=g)  # (B, dim)
    caps = [[vocab.encode(c, add_special=False) for c in KINDS[KIND_NAMES[k]]] for k in kinds]
    return feats, caps, kinds


def kind_accuracy(m: Matcher, feats, kinds, vocab) -> float:
    """How often a photo's own kind's first caption is the closest of the four kinds' captions."""
    caps = [vocab.encode(KINDS[k][0], add_special=False) for k in KIND_NAMES]
    return float(np.mean([int(m.similarity(f, caps).argmax()) == k for f, k in zip(feats, kinds)]))


def test_matcher_learns_which_caption_fits(vocab):
    """Trained contrastively, the matcher picks each held-out photo's own caption; untrained it
    is near chance (1 in 4)."""
    feats, caps, kinds = synthetic_pairs(vocab, per_kind=12, seed=1)
    vf, vcaps, vkinds = synthetic_pairs(vocab, per_kind=5, seed=2)
    cfg = MatcherConfig(vocab_size=len(vocab), feature_dim=32, embed_dim=16, joint_dim=32)
    torch.manual_seed(0)
    assert kind_accuracy(Matcher(cfg).eval(), vf, vkinds, vocab) < 0.6
    m, log = train_matcher(feats, caps, vf, [c[0] for c in vcaps], cfg, epochs=25, batch_size=16, lr=3e-3,
                           progress=False)
    assert len(log) == 25 and log[-1]["loss"] < log[0]["loss"]
    assert kind_accuracy(m, vf, vkinds, vocab) == 1.0
    # The kept epoch is the one with the best validation R@5, and its recall is what it reports.
    best = max(log, key=lambda r: r["R@5"])
    assert retrieval_recall(m, vf, [c[0] for c in vcaps])["R@5"] == pytest.approx(best["R@5"])


def synthetic_grids(vocab: Vocab, per_kind: int, seed: int, cells: int = 9, dim: int = 32):
    """Grids of noise cells with the kind's prototype in one random cell, and pooled features that
    are noise: only the grid tells the kinds apart."""
    g = torch.Generator().manual_seed(0)
    protos = 3 * torch.randn(len(KINDS), dim, generator=g)
    g.manual_seed(seed)
    kinds = [k for k in range(len(KINDS)) for _ in range(per_kind)]
    grid = torch.randn(len(kinds), cells, dim, generator=g)  # (B, P, dim)
    where = torch.randint(cells, (len(kinds),), generator=g)
    grid[torch.arange(len(kinds)), where] = protos[kinds]
    caps = [[vocab.encode(c, add_special=False) for c in KINDS[KIND_NAMES[k]]] for k in kinds]
    return torch.randn(len(kinds), dim, generator=g), grid, caps, kinds


def test_regions_matcher_grounds_words_in_cells(vocab):
    """With ``regions``, the word-region head learns to find the cell that holds the photo's
    object and picks each held-out photo's own caption, where a pooled-only matcher cannot (its
    features say nothing); the matcher then needs the grid."""
    pooled, grid, caps, kinds = synthetic_grids(vocab, per_kind=12, seed=1)
    vp, vg, vcaps, vkinds = synthetic_grids(vocab, per_kind=5, seed=2)
    cfg = MatcherConfig(vocab_size=len(vocab), feature_dim=32, embed_dim=16, joint_dim=32, regions=True)
    firsts = [vocab.encode(KINDS[k][0], add_special=False) for k in KIND_NAMES]

    def region_accuracy(m: Matcher) -> float:
        with torch.no_grad():
            s = m.region_score(m.regions(vg), *m.words(m.pad(firsts)))  # (B, 4)
        return float((s.argmax(1) == torch.tensor(vkinds)).float().mean())

    torch.manual_seed(0)
    assert region_accuracy(Matcher(cfg).eval()) < 0.6
    pooled_only, _ = train_matcher(pooled, caps, vp, [c[0] for c in vcaps],
                                   MatcherConfig(**{**cfg.to_dict(), "regions": False}), epochs=25, batch_size=16,
                                   lr=3e-3, progress=False)
    assert kind_accuracy(pooled_only, vp, vkinds, vocab) < 0.6
    m, log = train_matcher(pooled, caps, vp, [c[0] for c in vcaps], cfg, epochs=25, batch_size=16, lr=3e-3,
                           progress=False, grid=grid, val_grid=vg)
    assert log[-1]["loss"] < log[0]["loss"]
    assert region_accuracy(m) == 1.0
    # similarity = the cosine + the word-region score, and it cannot be had without the grid.
    with torch.no_grad():
        cos = m.text(m.pad(firsts)) @ m.image(vp[:1])[0]
        want = cos + m.region_score(m.regions(vg[:1]), *m.words(m.pad(firsts)))[0]
    assert torch.allclose(m.similarity(vp[0], firsts, vg[0]), want, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        m.similarity(vp[0], firsts)
    with pytest.raises(ValueError, match="grid"):
        train_matcher(pooled, caps, vp, [c[0] for c in vcaps], cfg, epochs=1, progress=False)


def test_region_score_attends_to_the_matching_cell(vocab):
    """SCAN's score by hand: a one-word caption whose word vector is cell 2 of the photo, with a
    sharp attention, scores cos(word, cell 2) = 1; padding does not count towards the mean."""
    m = Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=8, embed_dim=4, joint_dim=8, regions=True,
                              region_sharpness=1000.0))
    regions = torch.nn.functional.normalize(torch.randn(1, 5, 8), dim=-1)  # (B, P, D)
    words = torch.stack([regions[0, 2], regions[0, 4]])[None]  # (1, 2, D)
    assert m.region_score(regions, words[:, :1], torch.ones(1, 1)).item() == pytest.approx(1.0, abs=1e-4)
    assert m.region_score(regions, words, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.0, abs=1e-4)
    other = torch.nn.functional.normalize(torch.randn(1, 1, 8), dim=-1)
    got = m.region_score(regions, other, torch.ones(1, 1)).item()
    cos = regions[0] @ other[0, 0]  # (P,)
    attended = torch.softmax(1000.0 * torch.nn.functional.leaky_relu(cos, 0.1), 0) @ regions[0]  # (D,)
    assert got < 1.0 - 1e-3 and got == pytest.approx(float(attended @ other[0, 0] / attended.norm()), abs=1e-4)


def test_save_load_round_trip_and_bad_files(tmp_path, vocab):
    m = Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=32, embed_dim=16, joint_dim=32)).eval()
    save_matcher(tmp_path, m, {"note": "kept"})
    assert json.loads((tmp_path / MATCHER_CONFIG).read_text())["note"] == "kept"
    loaded = load_matcher(tmp_path)
    x, caps = torch.randn(32), [vocab.encode(c, add_special=False) for c in KINDS["red_square"]]
    assert torch.allclose(loaded.similarity(x, caps), m.similarity(x, caps), atol=2e-2)  # fp16 on disk
    assert load_matcher(tmp_path / "nowhere") is None

    (tmp_path / MATCHER_WEIGHTS).write_bytes((tmp_path / MATCHER_WEIGHTS).read_bytes()[:100])
    with pytest.raises(ValueError, match="matcher.safetensors"):
        load_matcher(tmp_path)

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    (tmp_path / MATCHER_WEIGHTS).write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ValueError, match="matcher.safetensors"):
        load_matcher(tmp_path)
    assert not (tmp_path / "pwned").exists()

    (tmp_path / MATCHER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="matcher.json"):
        load_matcher(tmp_path)


def test_rerank_reorders_the_beams_by_the_matcher(tmp_path, vocab, encoder, images):
    """With re-ranking, each caption's score is its beam score plus weight x cosine, the list is
    sorted by that, and a large weight puts the matcher's favourite first; weight 0 is plain beam
    search. The bundle's recorded weight is the default; without a matcher it is refused."""
    folder = save_bundle(tmp_path / "m", small_decoder(vocab_size=len(vocab)), vocab, "efficientnet-lite0", half=False)
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    assert cap.matcher is None and cap.default_rerank == 0.0
    with pytest.raises(ValueError, match="matcher"):
        cap.caption(images, beam_size=3, rerank=1.0)

    torch.manual_seed(1)
    save_matcher(folder, Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=1280)))
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    plain = cap.caption(images, beam_size=3, nbest=3)
    assert all(c.match is None for r in plain for c in r.captions)
    big = cap.caption(images, beam_size=3, nbest=3, rerank=1000.0)
    moved = 0
    for p, r in zip(plain, big):
        assert sorted(c.text for c in p.captions) == sorted(c.text for c in r.captions)
        by_text = {c.text: c for c in p.captions}
        for c in r.captions:
            assert c.score == pytest.approx(by_text[c.text].score + 1000.0 * c.match, rel=1e-5)
        assert r.captions[0].match == max(c.match for c in r.captions)
        assert [c.score for c in r.captions] == sorted((c.score for c in r.captions), reverse=True)
        moved += r.text != p.text
    assert moved > 0  # a random matcher disagrees with the decoder on some photo
    # nbest=1 keeps the re-ranked best, not the beam's.
    assert [r.text for r in cap.caption(images, beam_size=3, rerank=1000.0)] == [r.text for r in big]

    set_decoding(folder, 3, 0.0, rerank=1000.0)
    assert read_config(folder)["decoding"] == {"beam_size": 3, "length_penalty": 0.0, "rerank": 1000.0}
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    assert cap.default_rerank == 1000.0
    assert [r.text for r in cap.caption(images, beam_size=3)] == [r.text for r in big]
    assert [r.text for r in cap.caption(images, beam_size=3, rerank=0)] == [r.text for r in plain]
    assert Captioner.from_pretrained([folder, folder], encoder=encoder).default_rerank == 0.0


def test_rerank_with_a_regions_matcher_reads_the_grid(tmp_path, vocab, encoder, images):
    """A regions matcher re-ranks with each photo's grid: the re-ranked best is the favourite of
    ``similarity(pooled, captions, grid)``; it survives the save/load round trip, and a matcher
    file written before regions existed still loads as a pooled one."""
    folder = save_bundle(tmp_path / "m", small_decoder(vocab_size=len(vocab)), vocab, "efficientnet-lite0", half=False)
    torch.manual_seed(1)
    save_matcher(folder, Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=1280, regions=True)))
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    assert cap.matcher.config.regions
    grid, pooled = cap.encode(cap.pixels(images))
    plain = cap.caption_features(grid, pooled, beam_size=3, nbest=3, rerank=0)
    got = cap.caption_features(grid, pooled, beam_size=3, rerank=1000.0)
    for b, (p, r) in enumerate(zip(plain, got)):
        sims = cap.matcher.similarity(pooled[b], [c.tokens for c in p.captions], grid[b])
        assert r.tokens == p.captions[int(sims.argmax())].tokens
        assert r.captions[0].match == pytest.approx(float(sims.max()), abs=1e-5)

    def as_before_regions() -> None:
        """Rewrite matcher.json without the fields regions added, as an older file has it."""
        cfg = json.loads((folder / MATCHER_CONFIG).read_text())
        for k in ("regions", "region_dim", "region_sharpness", "region_temperature", "packed"):
            del cfg["config"][k]
        (folder / MATCHER_CONFIG).write_text(json.dumps(cfg))

    as_before_regions()
    with pytest.raises(ValueError, match="matcher.safetensors"):  # its region weights are unexpected
        load_matcher(folder)
    save_matcher(folder, Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=1280)))
    as_before_regions()
    old = load_matcher(folder)
    assert not old.config.regions and not old.config.packed  # read as it was trained: padding included


def test_a_captions_score_does_not_depend_on_the_others(vocab):
    """A packed matcher reads each caption's own words: scored alone, padded to the length of a
    longer caption beside it, or padded to max_tokens, a caption gets the same cosine and
    word-region score. A matcher trained before packing (``packed=False``) read the padding, so
    there the scores differ, which is why its weights keep that behaviour."""
    short = vocab.encode(KINDS["red_square"][0], add_special=False)
    long = vocab.encode(" ".join(KINDS["blue_circle"][:3]), add_special=False)
    assert len(long) > len(short) + 3
    pooled, grid = torch.randn(32), torch.randn(9, 32)
    for packed in (True, False):
        torch.manual_seed(0)
        m = Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=32, embed_dim=16, joint_dim=32, regions=True,
                                  region_dim=16, packed=packed)).eval()
        alone = m.similarity(pooled, [short], grid)[0]
        beside = m.similarity(pooled, [short, long], grid)[0]
        with torch.no_grad():
            padded = torch.zeros(1, m.config.max_tokens, dtype=torch.long)
            padded[0, :len(short)] = torch.tensor(short)
            full = m.scores(pooled[None], grid[None], padded)[0, 0]
        if packed:
            assert torch.allclose(alone, beside, atol=1e-6) and torch.allclose(alone, full, atol=1e-6)
        else:
            assert not torch.allclose(alone, beside, atol=1e-4)


def test_rerank_pool_widens_the_candidates_not_the_beam(tmp_path, vocab, encoder, images):
    """rerank_pool=P re-ranks the P best captions that finished during the same beam-3 search
    (what beam_search returns with nbest=P), never one cut off at max_len while enough others
    ended; the pool is at least the beam size; the bundle's recorded pool is the default."""
    from captioning.decoding import beam_search

    folder = save_bundle(tmp_path / "m", small_decoder(vocab_size=len(vocab)), vocab, "efficientnet-lite0", half=False)
    torch.manual_seed(1)
    save_matcher(folder, Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=1280)))
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    grid, pooled = cap.encode(cap.pixels(images))
    P, max_len = 8, 6  # short captions: some hypotheses are cut off, so the filter is exercised
    ref = beam_search(cap.decoder, grid, pooled, beam_size=3, nbest=P, max_len=max_len, ids=cap.ids)
    got = cap.caption_features(grid, pooled, beam_size=3, nbest=3, max_len=max_len, rerank=1000.0, rerank_pool=P)
    wider = 0
    for b, (hs, r) in enumerate(zip(ref, got)):
        done = [h for h in hs if h.finished]
        assert len(done) >= 3
        sims = cap.matcher.similarity(pooled[b], [h.tokens for h in done])
        assert r.tokens == done[int(sims.argmax())].tokens  # the matcher's favourite of all P
        assert all(c.finished for c in r.captions)
        top3 = cap.caption_features(grid[b:b + 1], pooled[b:b + 1], beam_size=3, max_len=max_len, rerank=1000.0)[0]
        assert top3.tokens == done[int(sims[:3].argmax())].tokens  # pool 0: the beam size
        wider += r.tokens != top3.tokens
    assert wider > 0  # the wider pool changed some photo's caption
    # A pool below the beam size is the beam size; a negative one is refused.
    assert [r.tokens for r in cap.caption_features(grid, pooled, beam_size=3, max_len=max_len, rerank=1000.0,
                                                   rerank_pool=2)] == \
        [r.tokens for r in cap.caption_features(grid, pooled, beam_size=3, max_len=max_len, rerank=1000.0)]
    with pytest.raises(ValueError, match="rerank_pool"):
        cap.caption_features(grid, pooled, rerank=1.0, rerank_pool=-1)

    set_decoding(folder, 3, 0.0, rerank=1000.0, rerank_pool=P)
    assert read_config(folder)["decoding"] == {"beam_size": 3, "length_penalty": 0.0, "rerank": 1000.0,
                                                "rerank_pool": P}
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    assert cap.default_rerank_pool == P
    assert [r.tokens for r in cap.caption_features(grid, pooled, max_len=max_len)] == [r.tokens for r in got]
    set_decoding(folder, 3, 0.0, rerank=0.0, rerank_pool=P)  # no re-ranking: no pool recorded
    assert "rerank_pool" not in read_config(folder)["decoding"]


def test_train_matcher_and_ship_with_rerank(synth, features_dir, tmp_path):
    """`train-matcher` writes a matcher into a run's best bundle; `ship --rerank W` keeps it,
    records W as the bundle's decoding default, scores the test split with it, and the model card
    gives the commands, train-matcher included."""
    from captioning.cli import main
    from captioning.lab.train import TrainConfig, train
    from test_scst import SMALL

    run = train(str(synth.root), tmp_path / "xe", TrainConfig(decoder="show_attend_tell", epochs=2, lr=1e-2, **SMALL),
                features=features_dir, progress=False)
    common = ["--model", str(run / "best"), "--data", str(synth.root), "--features", str(features_dir)]
    assert main(["train-matcher", *common, "--epochs", "3"]) == 0
    info = json.loads((run / "best" / MATCHER_CONFIG).read_text())
    assert info["epochs"] == 3 and len(info["log"]) == 3 and set(info["dev_recall"]) == {"R@1", "R@5", "R@10"}
    first = load_matcher(run / "best")
    # --regions adds a word-region head to that matcher and leaves the rest of it as it was.
    assert main(["train-matcher", *common, "--epochs", "2", "--regions", "--batch-size", "8"]) == 0
    info2 = json.loads((run / "best" / MATCHER_CONFIG).read_text())
    assert info2["config"]["regions"] and info2["log"] == info["log"] and info2["epochs"] == 3
    assert info2["regions"]["epochs"] == 2 and info2["regions"]["batch_size"] == 8 and len(info2["regions"]["log"]) == 2
    both = load_matcher(run / "best")
    for k, v in first.state_dict().items():
        assert torch.equal(both.state_dict()[k], v), k
    assert both.region_parameters() and not first.region_parameters()
    assert main(["train-matcher", *common, "--epochs", "1", "--regions"]) == 2  # it has one already
    assert main(["ship", str(run), "--name", "sat", "--dest", str(tmp_path / "models"), "--data", str(synth.root),
                 "--features", str(features_dir), "--rerank", "2.0", "--rerank-pool", "5"]) == 0
    dest = tmp_path / "models" / "sat"
    assert (dest / MATCHER_WEIGHTS).is_file()
    assert read_config(dest)["decoding"]["rerank"] == 2.0 and read_config(dest)["decoding"]["rerank_pool"] == 5
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["rerank"] == 2.0 and metrics["rerank_pool"] == 5
    card = (dest / "MODEL_CARD.md").read_text()
    assert ("train-matcher --model runs/xe/best --epochs 3\n"
            "python -m captioning train-matcher --model runs/xe/best --epochs 2 --batch-size 8 --regions") in card
    assert "--rerank 2.0 --rerank-pool 5" in card and "SCAN text-to-image" in card
    assert "the 5 best finished captions of beam 3 search are re-ranked" in card


def test_cli_caption_rerank(tmp_path, vocab, encoder, images, capsys):
    """`caption --rerank W` re-ranks with the model's matcher; without one, or with a negative
    --rerank-pool, it is a one-line error."""
    from captioning.cli import main

    folder = save_bundle(tmp_path / "m", small_decoder(vocab_size=len(vocab)), vocab, "efficientnet-lite0", half=False)
    assert main(["caption", str(images[0]), "--model", str(folder), "--rerank", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "matcher" in err
    torch.manual_seed(1)
    save_matcher(folder, Matcher(MatcherConfig(vocab_size=len(vocab), feature_dim=1280)))
    assert main(["caption", *map(str, images), "--model", str(folder), "--rerank", "1000", "--json"]) == 0
    got = [r["captions"][0]["text"] for r in json.loads(capsys.readouterr().out)["results"]]
    want = Captioner.from_pretrained(folder, encoder=encoder).caption(images, beam_size=3, rerank=1000.0)
    assert got == [r.text for r in want]
    assert main(["caption", str(images[0]), "--model", str(folder), "--rerank", "1", "--rerank-pool", "-1"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "rerank_pool" in err
