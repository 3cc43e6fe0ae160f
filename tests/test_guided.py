"""Guided (constrained) beam search: Anderson et al. 2017, "Guided Open Vocabulary Image
Captioning with Constrained Beam Search", EMNLP. The batched search (decoding.guided_beam_search)
is checked against a plain per-image two-bank search written here from its documented semantics,
on the same random decoders that check plain beam search (test_decoders_decoding.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captioning.decoding import Ensemble, Guide, Hypothesis, Lattice, beam_search
from reference_beam import END, START, RefBeam, banned_tokens, norm
from test_decoders_decoding import VARIANTS, assert_same_hyps, feats, make_decoder, markov

V = 15


@torch.no_grad()
def reference_guided_search(model, grid, pooled, words: set[int], penalty=None, K=3, nbest=1, max_len=20,
                            min_len=1, alpha=0.0, no_repeat=0, allow_unk=False):
    """ONE image, one beam at a time: bank False (no constraint word yet) and bank True (met)."""
    state, f = model.start(grid, pooled)
    pen = [0.0] * 10_000 if penalty is None else penalty.tolist()
    live = {False: [], True: []}
    live[not words].append(RefBeam([], 0.0, state))  # no constraint: start in the met bank
    pool: list[Hypothesis] = []
    for t in range(max_len):
        cands = {False: [], True: []}
        for met in (False, True):
            for beam in live[met]:
                prev = beam.tokens[-1] if beam.tokens else START
                logp, st, a = model.step(torch.tensor([prev]), beam.state, f)
                ban = banned_tokens(beam.tokens, t, min_len, no_repeat, allow_unk)
                for w, lp in enumerate(logp[0].tolist()):
                    if w not in ban:
                        cands[met or w in words].append(
                            (beam.logprob + lp + pen[w], beam, w, st, None if a is None else a[0].numpy()))
        new = {False: [], True: []}
        for met in (False, True):
            cands[met].sort(key=lambda c: -c[0])
            for s, parent, w, st, a in cands[met][: 2 * K]:
                att = parent.att + ([a] if a is not None else [])
                if w == END:
                    if met:  # only captions that contain a constraint word may finish
                        pool.append(Hypothesis(list(parent.tokens), s, s / norm(t + 1, alpha), True,
                                               np.stack(att) if att else None))
                elif len(new[met]) < K:
                    new[met].append(RefBeam(parent.tokens + [w], s, st, att))
        live = new
        pool.sort(key=lambda h: -h.score)
        everyone = live[False] + live[True]
        if not everyone:
            break
        if len(pool) >= nbest:
            best = max(b.logprob for b in everyone)
            reach = max_len if alpha > 0 else min(t + 2, max_len)
            if pool[nbest - 1].score >= best / norm(reach, alpha):
                break
    hyps = pool[:nbest]
    for met in (True, False):  # fallback: met beams first
        rest = sorted(live[met], key=lambda b: -b.logprob)
        hyps += [Hypothesis(b.tokens, b.logprob, b.logprob / norm(len(b.tokens), alpha), False,
                            np.stack(b.att) if b.att else None) for b in rest[: nbest - len(hyps)]]
    return hyps


def guide_for(n: int, seed: int, with_penalty: bool, vocab_size: int = V) -> tuple[Guide, list[set[int]]]:
    """Image 0: no constraint; the others: one or two constraint words out of the content words."""
    g = torch.Generator().manual_seed(seed)
    words = torch.zeros(n, vocab_size, dtype=torch.bool)
    for b in range(1, n):
        ix = torch.randperm(vocab_size - 4, generator=g)[: 1 + b % 2] + 4
        words[b, ix] = True
    pen = None
    if with_penalty:
        pen = -3.0 * (torch.rand(n, vocab_size, generator=g) < 0.3).float()
    return Guide(words, pen), [set(torch.nonzero(r).flatten().tolist()) for r in words]


def check_against_reference(model, grid, pooled, guide, sets, **kw):
    got = beam_search(model, grid, pooled, guide=guide, **kw)
    for b in range(grid.size(0)):
        want = reference_guided_search(model, grid[b:b + 1], pooled[b:b + 1], sets[b],
                                       None if guide.penalty is None else guide.penalty[b], K=kw["beam_size"],
                                       nbest=kw.get("nbest", 1), max_len=kw.get("max_len", 20),
                                       alpha=kw.get("length_penalty", 0.0), no_repeat=kw.get("no_repeat_ngram", 0))
        assert_same_hyps(got[b], want, f"image {b} constraint {sorted(sets[b])}")
    return got


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("K,nbest,alpha,no_repeat,pen", [(1, 1, 0.0, 0, False), (3, 1, 0.7, 0, True),
                                                         (3, 3, 0.0, 2, False), (4, 2, 0.7, 2, True)])
def test_guided_matches_reference(variant, K, nbest, alpha, no_repeat, pen):
    model = make_decoder(variant, seed=20 + K)
    grid, pooled = feats(5, seed=K + nbest)
    guide, sets = guide_for(5, seed=K * 3 + nbest, with_penalty=pen)
    got = check_against_reference(model, grid, pooled, guide, sets, beam_size=K, nbest=nbest, max_len=10,
                                  length_penalty=alpha, no_repeat_ngram=no_repeat)
    for b in range(1, 5):
        for h in got[b]:
            if h.finished:  # every caption that ended names a constraint word
                assert sets[b] & set(h.tokens), (b, h.tokens, sets[b])


def test_guided_captions_contain_a_constraint_word_and_end():
    """On decoders whose plain captions mostly lack the word, guided captions have it and end."""
    changed = finished = total = 0
    for variant in VARIANTS:
        model = make_decoder(variant, seed=5, end_bias=3.0)
        grid, pooled = feats(6, seed=1)
        plain = beam_search(model, grid, pooled, beam_size=3, nbest=2, max_len=16)
        for w in range(4, V):
            words = torch.zeros(6, V, dtype=torch.bool)
            words[:, w] = True
            got = beam_search(model, grid, pooled, beam_size=3, nbest=2, max_len=16, guide=Guide(words))
            for b in range(6):
                for h in got[b]:
                    assert w in h.tokens, (variant, w, h.tokens)
                    finished += h.finished
                    total += 1
                changed += w not in plain[b][0].tokens
    assert changed > 200  # the constraint did real work: most plain captions lacked the word
    assert finished >= 0.85 * total, (finished, total)  # and nearly all still end (some random decoders loop)


@pytest.mark.parametrize("variant", ["show_tell", "show_attend_tell"])
def test_no_constraint_is_plain_beam_search(variant):
    model = make_decoder(variant, seed=7)
    grid, pooled = feats(4, seed=7)
    plain = beam_search(model, grid, pooled, beam_size=3, nbest=3, max_len=12, length_penalty=0.7)
    free = beam_search(model, grid, pooled, beam_size=3, nbest=3, max_len=12, length_penalty=0.7,
                       guide=Guide(torch.zeros(4, V, dtype=torch.bool)))
    for g, w in zip(free, plain):
        assert_same_hyps(g, w)


def test_penalty_steers_away_from_a_word():
    model = make_decoder("show_tell", seed=5)
    grid, pooled = feats(6, seed=1)
    plain = beam_search(model, grid, pooled, beam_size=3, max_len=16)
    for b in range(6):
        w = plain[b][0].tokens[0]
        pen = torch.zeros(6, V)
        pen[b, w] = -50.0
        got = beam_search(model, grid, pooled, beam_size=3, max_len=16,
                          guide=Guide(torch.zeros(6, V, dtype=torch.bool), pen))
        assert w not in got[b][0].tokens
        assert [h.tokens for h in got[(b + 1) % 6]] == [h.tokens for h in plain[(b + 1) % 6]]


def test_ensemble_guided_matches_reference():
    model = Ensemble([make_decoder("show_tell", seed=1), make_decoder("show_attend_tell", seed=2)])
    grid, pooled = feats(4, seed=4)
    guide, sets = guide_for(4, seed=4, with_penalty=True)
    check_against_reference(model, grid, pooled, guide, sets, beam_size=3, nbest=2, max_len=10)


def test_unreachable_constraint_falls_back_to_unfinished_beams():
    """A word the model never gives (probability 1e-12) within max_len: the met bank still gets
    it only when nothing else is left; the fallback marks captions unfinished, met ones first."""
    A, B_, C_ = 4, 5, 6
    model = markov(8, {START: {A: 0.9, B_: 0.1}, A: {END: 0.99}, B_: {C_: 0.99}, C_: {END: 0.99}})
    grid, pooled = torch.zeros(1, 4, 8), torch.zeros(1, 8)
    words = torch.zeros(1, 8, dtype=torch.bool)
    words[0, C_] = True
    (h,) = beam_search(model, grid, pooled, beam_size=2, max_len=5, guide=Guide(words))[0]
    assert h.tokens == [B_, C_] and h.finished  # the unlikely path that names the word
    cut = beam_search(model, grid, pooled, beam_size=2, max_len=1, guide=Guide(words))[0]
    assert all(not h.finished for h in cut)
    want = reference_guided_search(model, grid, pooled, {C_}, K=2, max_len=1)
    assert_same_hyps(cut, want)


def test_guided_lattice_draws_as_a_tree():
    from explain.beam import beam_tree
    from captioning.vocab import Vocab

    model = make_decoder("show_attend_tell", seed=5, end_bias=3.0)
    grid, pooled = feats(2, seed=1)
    words = torch.zeros(2, V, dtype=torch.bool)
    words[:, 9] = True
    lat = Lattice()
    got = beam_search(model, grid, pooled, beam_size=3, max_len=12, guide=Guide(words), lattice=lat)
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(4, V)])
    for b in range(2):
        tree = beam_tree(lat.steps[b], vocab, got[b][0].tokens, got[b][0].finished)
        path = [n.token for n in tree.nodes if n.on_best and n.parent is not None]
        assert got[b][0].finished and path == got[b][0].tokens + [END]  # the best caption is found in the drawn tree


def test_absent_concepts_are_penalised_but_never_the_constraint():
    """guidance.plan's ``absent`` penalty: every vocabulary form of each concept the tagger scores
    below ``absent_below``, on every photo, never on a constraint word (the tagger may miss the
    cat the head is sure of); without the tagger's scores it is a ValueError."""
    from captioning.guidance import GuideSettings, plan
    from captioning.recognition import class_words
    from captioning.tagger import ConceptSpace

    names, _ = class_words()
    logits = torch.zeros(2, 1000)
    logits[0, names.index("Egyptian cat")] = 20.0  # photo 0: a sure cat; photo 1: nothing sure
    itos = ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "cats", "snow", "grass", "ball", "balls", "dog"]
    concepts = ConceptSpace(["snow", "grass", "cat", "ball"], [9, 9, 2, 5], {"balls": "ball", "cats": "cat"})
    probs = torch.tensor([[0.01, 0.90, 0.001, 0.04], [0.01, 0.01, 0.01, 0.01]])  # (B, K)
    settings = GuideSettings(threshold=0.4, absent=3.0, absent_below=0.05)
    guide, chosen = plan(logits, itos, settings, (probs, concepts.vocab_forms(itos)))
    assert chosen == [["cat", "cats"], []]
    pen = {w: guide.penalty[0, i].item() for i, w in enumerate(itos)}
    assert pen == {**{w: 0.0 for w in itos}, "snow": -3.0, "ball": -3.0, "balls": -3.0}
    # No constraint, and the tagger sure of nothing: every concept's forms, the cat's included.
    assert {itos[i] for i in guide.penalty[1].nonzero().flatten()} == {"snow", "grass", "cat", "cats", "ball", "balls"}
    assert not guide.words[1].any()
    # A higher bar rules out grass too; with the default strength 0 nothing is penalised.
    guide, _ = plan(logits, itos, GuideSettings(threshold=0.4, absent=2.0, absent_below=0.95),
                    (probs, concepts.vocab_forms(itos)))
    assert guide.penalty[0, itos.index("grass")].item() == -2.0 and guide.penalty[0, itos.index("cat")].item() == 0.0
    assert plan(logits, itos, GuideSettings(threshold=0.4), None)[0].penalty is None
    with pytest.raises(ValueError, match="tagger"):
        plan(logits, itos, settings, None)


# --- the shipped default model, through the API and the command line -----------------------------

@pytest.fixture(scope="module")
def cat_photo():
    pytest.importorskip("skimage", reason="the cat photo ships with scikit-image")
    from captioning.samples import load_sample

    return load_sample("chelsea (cat)")


def test_api_guides_the_cat_photo(cat_photo):
    from captioning.api import Captioner

    cap = Captioner.from_pretrained()
    off, on = cap.caption(cat_photo, guide=False)[0], cap.caption(cat_photo, guide=True, nbest=2, beam_size=3)[0]
    assert off.guided is None and "cat" not in off.words  # "a small child is playing in the snow"
    assert "cat" in on.guided
    for c in on.captions:
        assert c.finished and {"cat", "cats"} & set(c.words), c.text
    # Settings are read as given; a threshold no class reaches leaves the search unguided.
    free = cap.caption(cat_photo, guide={"threshold": 1.01, "absent": 0})[0]
    assert free.guided == [] and free.text == off.text
    with pytest.raises(ValueError):
        cap.caption(cat_photo, guide=True, method="greedy")


# The four package photos and the words that name their main object.
NAMED = {"chelsea (cat)": {"cat", "cats"}, "coffee": {"coffee", "cup", "cups"}, "rocket": {"rocket", "rockets"},
         "motorcycle": {"motorcycle", "motorcycles", "bike", "bikes", "scooter", "scooters"}}


@pytest.fixture(scope="module")
def default_captioner():
    from captioning.api import Captioner

    return Captioner.from_pretrained()


@pytest.mark.parametrize("sample", list(NAMED))
def test_the_package_photos_are_named_in_the_default_caption(sample, default_captioner):
    pytest.importorskip("skimage", reason="the photos ship with scikit-image")
    from captioning.samples import load_sample

    cap, im = default_captioner, load_sample(sample)
    res = cap.caption(im)[0]
    assert NAMED[sample] & set(res.words), res.text
    assert set(res.guided) <= NAMED[sample] | {"mug", "mugs"}, res.guided
    # caption() and caption_features() with the photo's size read the same view; so does classify().
    grid, pooled = cap.encode(cap.pixels([im]))
    assert cap.caption_features(grid, pooled, image_sizes=[im.size])[0].text == res.text
    assert cap.classify(im, 1)[0] == (res.recognised[0].label, pytest.approx(res.recognised[0].prob, abs=1e-6))


def test_the_default_caption_drops_what_the_concept_tagger_finds_no_sign_of(cat_photo, default_captioner):
    """Without the ``absent`` penalty the cat photo's guided caption has the cat in the snow; the
    shipped guidance, whose tagger scores snow below its bar, says no word of a concept the
    tagger rules out, and still names the cat."""
    cap = default_captioner
    bar = cap.decoding.guide_settings.absent_below
    assert cap.tagger is not None and cap.decoding.guide_settings.absent > 0
    grid, pooled, sizes = cap.encode_images([cat_photo])
    probs = cap.tagger.probabilities("image", grid)[0]  # (K,)
    ruled_out = {w for k, ws in cap.tagger.concepts.vocab_forms(cap.vocab.itos).items() if probs[k] < bar for w in ws}
    before = cap.caption_features(grid, pooled, image_sizes=sizes, guide={"absent": 0})[0]
    now = cap.caption_features(grid, pooled, image_sizes=sizes)[0]
    assert "snow" in ruled_out and "snow" in before.words, before.text
    assert not ruled_out & set(now.words) and "cat" in now.words, now.text
    assert cap.caption(cat_photo)[0].text == now.text


def test_cli_guide_flags(cat_photo, capsys):
    import json

    from captioning.cli import main

    assert main(["caption", "--sample", "chelsea (cat)", "--guide", "--json"]) == 0
    on = json.loads(capsys.readouterr().out)["results"][0]
    assert "cat" in on["guided"] and "cat" in on["captions"][0]["text"].split()
    assert main(["caption", "--sample", "chelsea (cat)", "--no-guide", "--json"]) == 0
    off = json.loads(capsys.readouterr().out)["results"][0]
    assert "guided" not in off and "cat" not in off["captions"][0]["text"].split()


@pytest.mark.parametrize("bad", [{"threshold": "high"}, {"conflict": -1}, {"person": float("nan")}, {"on": "yes"},
                                 [1], {"threshold": True}, {"absent_below": 1.5}, {"absent": -2}])
def test_bad_guide_settings_are_refused(bad):
    from captioning.guidance import GuideSettings, resolve

    with pytest.raises(ValueError):
        resolve(True, {"decoding": {"guide": bad}})
    assert resolve(None, {"decoding": {"guide": {"on": False, "threshold": 0.3}}}) is None
    assert resolve(None, {"decoding": {"guide": {"on": True, "threshold": 0.3}}}) == GuideSettings(0.3)
    assert resolve({"conflict": 2}, {"decoding": {"guide": {"threshold": 0.3}}}) == GuideSettings(0.3, 2.0)
