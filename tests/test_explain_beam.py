"""The beam-search lattice as a tree."""
from __future__ import annotations

import json
import math

import pytest
import torch

from captioning.api import Captioner
from captioning.decoders import build_decoder
from explain.beam import beam_tree
from toy import ToyEncoder, cached_toy_captioner, toy_image, toy_vocab

torch.set_num_threads(1)


def _check_tree(tree, K):
    assert tree.root.word == "<start>" and tree.root.parent is None
    for n in tree.nodes[1:]:
        p = tree.nodes[n.parent]
        assert p.step == n.step - 1
        assert p.kept, "only live beams are extended"
        assert n.logprob == pytest.approx(p.logprob + n.step_logprob, abs=1e-5)
        assert n.step_logprob <= 1e-6 and math.isfinite(n.logprob)
        assert not (n.kept and n.finished)
        if n.finished:
            assert n.word == "<end>"
    for s in range(tree.steps):
        step = [n for n in tree.nodes if n.step == s]
        assert sum(n.kept for n in step) <= K and len(step) <= 2 * K
        assert sorted(n.rank for n in step) == list(range(len(step)))


def test_tree_of_toy_caption():
    cap = cached_toy_captioner("show_attend_tell")
    res = cap.caption(toy_image("blue", (4, 4), seed=2), beam_size=3, return_lattice=True)[0]
    tree = beam_tree(res, cap.vocab)
    _check_tree(tree, 3)
    best = tree.best_path()
    assert [n.word for n in best] == res.words + ["<end>"]
    assert best[-1].finished and best[-1].logprob == pytest.approx(res.logprob, abs=1e-5)
    assert tree.path(best[-1].id) == best
    assert tree.finished()[0].id == best[-1].id
    d = tree.to_dict()
    json.dumps(d)
    assert len(d["edges"]) == len(tree.nodes) - 1
    assert set(tree.positions()) == {n.id for n in tree.nodes}


def test_tree_of_untrained_decoder_with_long_captions():
    torch.manual_seed(1)
    vocab = toy_vocab()
    dec = build_decoder("show_tell", {"vocab_size": len(vocab), "feature_dim": 16, "embed_dim": 8,
                                      "hidden_dim": 16, "dropout": 0.0}).eval()
    cap = Captioner(ToyEncoder(), dec, vocab)
    for K in (2, 4):
        res = cap.caption(toy_image("red", (0, 0)), beam_size=K, max_len=8, nbest=2, return_lattice=True)[0]
        tree = beam_tree(res, vocab)
        _check_tree(tree, K)
        assert tree.beam_size == K
        best = tree.best_path()
        words = res.words + (["<end>"] if res.best.finished else [])
        assert [n.word for n in best] == words
        # the second-best caption is in the tree too
        second = res.captions[1]
        assert beam_tree(res.lattice, vocab, second.tokens, second.finished).best_path()[-1].logprob == \
            pytest.approx(second.logprob, abs=1e-5)


def test_no_lattice_is_a_clear_error():
    cap = cached_toy_captioner("show_attend_tell")
    res = cap.caption(toy_image("red", (1, 1)), method="greedy")[0]
    with pytest.raises(ValueError, match="return_lattice"):
        beam_tree(res, cap.vocab)
