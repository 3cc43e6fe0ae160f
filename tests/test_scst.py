"""Self-critical sequence training: the CIDEr-D reward, and fine-tuning that raises it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from captioning.bundle import load_bundle
from captioning.decoders import build_decoder
from captioning.decoding import SpecialIds
from captioning.lab.scst import CiderD, sample_with_logprobs, scst_loss
from captioning.lab.train import TrainConfig, train

from test_train import SMALL, greedy_bleu, read_metrics

REFS = {
    "a": ["a dog runs on the grass", "a brown dog is running", "the dog runs across a green field"],
    "b": ["two children play in the snow", "kids playing in snow", "two kids are playing outside in the snow"],
    "c": ["a man rides a red bike", "a person on a bicycle", "a man is riding his bike down the street"],
}


def test_cider_d_matches_pycocoevalcap():
    """Same document frequencies (the references of the scored images) -> the same per-image
    CIDEr-D as pycocoevalcap's, quirks included, for good, poor and empty captions."""
    from pycocoevalcap.cider.cider import Cider

    for cands in ({"a": "a dog runs on the grass", "b": "two kids play in snow", "c": "a man on a bike"},
                  {"a": "a cat", "b": "a man rides a red bike in the snow", "c": "the the the"}):
        _, per = Cider().compute_score({k: v for k, v in REFS.items()}, {k: [v] for k, v in cands.items()})
        ours = CiderD({k: [r.split() for r in v] for k, v in REFS.items()})
        for k, want in zip(REFS, per):
            assert ours.score(k, cands[k].split()) == pytest.approx(float(want), rel=1e-9, abs=1e-12), k
    assert ours.score("a", []) == 0.0


def test_cider_d_scores_references_outside_its_corpus():
    """The app scores one photo's caption against that photo's references with the training
    corpus's document frequencies: the same numbers as when the photo is part of the corpus."""
    from captioning.metrics import CiderD as CoreCiderD

    assert CoreCiderD is CiderD  # one CIDEr-D in the repository
    ours = CiderD({k: [r.split() for r in v] for k, v in REFS.items()})
    for k, refs in REFS.items():
        for cand in ("a dog runs on the grass", "two kids play in snow", "the the the", ""):
            assert ours.score_refs(cand.split(), [r.split() for r in refs]) == pytest.approx(ours.score(k, cand.split()))


def test_samples_stop_at_end_and_carry_gradients():
    torch.manual_seed(0)
    dec = build_decoder("show_attend_tell", dict(vocab_size=12, feature_dim=8, embed_dim=8, hidden_dim=8,
                                                 attention_dim=8, dropout=0.0))
    grid, pooled = torch.randn(3, 4, 8), torch.randn(3, 8)
    ids = SpecialIds()
    tok, lp, fin = sample_with_logprobs(dec, grid, pooled, samples=4, max_len=30, ids=ids)
    assert tok.shape[0] == 12 and lp.shape == tok.shape and lp.requires_grad
    for row, lrow, f in zip(tok.tolist(), lp.tolist(), fin.tolist()):
        assert ids.unk not in row and ids.start not in row
        if f:
            e = row.index(ids.end)
            assert all(t == ids.pad for t in row[e + 1:]) and all(x == 0 for x in lrow[e + 1:])
            assert all(x < 0 for x in lrow[: e + 1])


def test_leave_one_out_baseline_pushes_towards_the_better_sample():
    """One image, a model that can say "dog" or "cat": after a few SCST steps with a reward that
    prefers "dog", the model says "dog" far more often."""
    itos = ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat"]
    cider = CiderD({"x": [["dog", "</s>"]] * 3, "y": [["cat", "</s>"]] * 3})
    torch.manual_seed(1)
    dec = build_decoder("show_tell", dict(vocab_size=6, feature_dim=4, embed_dim=4, hidden_dim=8, dropout=0.0))
    opt = torch.optim.Adam(dec.parameters(), lr=0.05)
    grid, pooled = torch.zeros(1, 1, 4), torch.ones(1, 4)

    def first_word() -> torch.Tensor:
        with torch.no_grad():
            (h, c), _ = dec.start(grid, pooled)
            return dec.step(torch.tensor([1]), (h, c), ())[0][0].exp()  # (V,)

    def p_dog() -> float:
        p = first_word()
        return float(p[4] / (p[4] + p[5]))

    before, unk_before = p_dog(), float(first_word()[3])
    rewards = []
    for _ in range(30):
        loss, r = scst_loss(dec, grid, pooled, ["x"], cider, itos, samples=8, max_len=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(r)
    assert p_dog() > max(0.9, before + 0.3), (before, p_dog())
    # <unk> is never sampled, so it must get no gradient at all: it may not soak up probability.
    assert float(first_word()[3]) <= unk_before * 1.5, (unk_before, float(first_word()[3]))
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5])


def _xe_then_scst(synth, features_dir, tmp_path, **scst_kw):
    # A short cross-entropy run leaves room to improve.
    xe = train(str(synth.root), tmp_path / "xe", TrainConfig(decoder="show_attend_tell", epochs=2, lr=1e-2,
                                                             dropout=0.2, **SMALL),
               features=features_dir, progress=False)
    cfg = TrainConfig(**dict(SMALL, batch_size=4, dropout=0.2, init=str(xe / "best"), scst=True, scst_samples=4,
                             scst_max_len=12, **scst_kw))
    return xe, cfg


def test_scst_fine_tuning_raises_reward_and_cider(synth, features_dir, tmp_path):
    # The bundle decides the decoder, whatever the config says.
    # Margins checked over SCST seeds 0-4: the reward's rise was 0.10-0.49 and greedy CIDEr-D's
    # 0.44-2.65 (the per-epoch reward is a noisy mean over few images; six epochs were too few).
    xe, cfg = _xe_then_scst(synth, features_dir, tmp_path, epochs=10, lr=3e-3, decoder="merge")
    run = train(str(synth.root), tmp_path / "scst", cfg, features=features_dir, progress=False)
    rows = read_metrics(run)
    assert len(rows) == 10
    rewards = [float(r["train_reward"]) for r in rows]
    assert np.mean(rewards[-3:]) > rewards[0] + 0.05, rewards
    # The XE model's settings and vocabulary carry over; the run records where it started.
    saved = json.loads((run / "config.json").read_text())
    assert saved["init"] == str(xe / "best") and saved["decoder"] == "show_attend_tell"
    assert (run / "vocab.json").read_text() == (xe / "vocab.json").read_text()
    before, _, _ = load_bundle(xe / "best")
    after, vocab, _ = load_bundle(run / "best")
    assert after.config == before.config

    # Greedy captions of the training images score higher on the objective (CIDEr-D against the
    # training references, <end> counted) than the cross-entropy model's did.
    from captioning.lab.features import FeatureCache, find_cache
    from captioning.images import Preprocessing
    from captioning.vocab import tokenize

    cache = FeatureCache.open(find_cache(features_dir, cfg.encoder, Preprocessing(), sorted(synth.captions)))
    names = synth.splits["train"]
    cider = CiderD({n: [tokenize(c) + ["</s>"] for c in synth.captions[n]] for n in names})
    _, p0 = greedy_bleu(before, cache, {n: synth.captions[n] for n in names}, vocab)
    _, p1 = greedy_bleu(after, cache, {n: synth.captions[n] for n in names}, vocab)
    c0 = np.mean([cider.score(n, tokenize(p0[n]) + ["</s>"]) for n in names])
    c1 = np.mean([cider.score(n, tokenize(p1[n]) + ["</s>"]) for n in names])
    assert c1 > c0 + 0.2, (c0, c1, p1)


def test_scst_resume_is_exact(synth, features_dir, tmp_path):
    _, cfg = _xe_then_scst(synth, features_dir, tmp_path, epochs=2, lr=1e-3, seed=5)
    whole = train(str(synth.root), tmp_path / "whole", cfg, features=features_dir, progress=False)
    n_batches = math.ceil(len(synth.splits["train"]) / cfg.batch_size)
    part = tmp_path / "part"
    train(str(synth.root), part, cfg, features=features_dir, progress=False, max_batches=n_batches + 1)
    train(str(synth.root), part, cfg, features=features_dir, progress=False, resume=True)
    a, b = load_file(str(whole / "checkpoint" / "state.safetensors")), load_file(str(part / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ship_a_fine_tuned_run(synth, features_dir, tmp_path):
    """Shipping keeps both stages: the curve has the cross-entropy epochs up to the one SCST started
    from, then the SCST epochs numbered on; the card describes both and the commands reproduce both."""
    from captioning.cli import main

    xe, cfg = _xe_then_scst(synth, features_dir, tmp_path, epochs=2, lr=1e-3)
    run = train(str(synth.root), tmp_path / "scst", cfg, features=features_dir, progress=False)
    assert main(["ship", str(run), "--name", "sat", "--dest", str(tmp_path / "models"), "--data", str(synth.root),
                 "--features", str(features_dir)]) == 0
    dest = tmp_path / "models" / "sat"
    rows = read_metrics(dest)
    start = json.loads((xe / "best" / "config.json").read_text())["training"]["epoch"]
    assert [r["stage"] for r in rows] == ["xe"] * start + ["scst"] * 2
    assert [int(r["epoch"]) for r in rows] == list(range(1, start + 3))
    assert rows[0]["train_reward"] == "" and float(rows[-1]["train_reward"]) > 0
    card = (dest / "MODEL_CARD.md").read_text()
    assert "Self-critical fine-tuning" in card and "--init runs/xe/best --scst --out runs/scst" in card
    assert json.loads((dest / "metrics.json").read_text())["metrics"]["CIDEr"] >= 0


def test_scst_ddp_two_ranks_end_identical(synth, features_dir, tmp_path):
    """Under torchrun the SCST step bypasses DDP's forward, so gradients are averaged by hand:
    both ranks must still end with identical weights, moved away from the starting bundle."""
    from test_train import run_ddp

    xe, cfg = _xe_then_scst(synth, features_dir, tmp_path, epochs=1, lr=1e-3, seed=3)
    w0, w1, _, _ = run_ddp(synth, features_dir, tmp_path / "ddp", cfg.to_dict())
    start, _, _ = load_bundle(xe / "best")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert not torch.equal(w0["fc.weight"], start.state_dict()["fc.weight"])
