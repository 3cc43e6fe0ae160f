"""The three decoders and the decoding algorithms written once for all of them.

The batched beam search is checked against a plain per-image reference written here from its
documented semantics (python lists, one beam and one image at a time).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from captioning.decoders import DECODERS, MergeConfig, build_decoder, decoder_kind
from captioning.decoding import Ensemble, Hypothesis, Lattice, SpecialIds, beam_search, sample_decode
from captioning.lab.train import caption_loss
from captioning.vocab import Vocab

PAD, START, END, UNK = 0, 1, 2, 3
IDS = SpecialIds()
V, C, P = 15, 8, 4  # small vocabulary, feature channels, grid positions (2x2)
VARIANTS = ["show_tell", "merge", "merge_bi", "show_attend_tell", "sat_deep"]  # sat_deep: deep output layer
ATTENTION = {"show_attend_tell", "sat_deep"}


def make_decoder(variant: str, seed: int = 0, dim: int = 16, vocab_size: int = V, feature_dim: int = C,
                 gain: float = 2.0, sharpen: float = 3.0, end_weight: float = 3.0, end_bias: float = 0.0,
                 dropout: float = 0.0):
    """A random-weight decoder whose word distributions are peaked enough to make search matter.

    ``gain`` scales every weight but the output layer (livelier states), ``sharpen`` the output
    layer, ``end_weight``/``end_bias`` the <end> logit: the defaults give captions that end at
    many different lengths, and some that never end."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=dim, hidden_dim=dim, dropout=dropout)
    kind = variant
    if variant in ("merge", "merge_bi"):
        kind = "merge"
        cfg.update(merge_dim=dim, bidirectional=variant == "merge_bi")
    elif variant in ATTENTION:
        kind = "show_attend_tell"
        cfg.update(attention_dim=dim, deep_output=variant == "sat_deep")
    d = build_decoder(kind, cfg).eval()
    with torch.no_grad():
        for name, p in d.named_parameters():
            if not name.startswith("fc."):
                p.mul_(gain)
        d.fc.weight.mul_(sharpen)
        d.fc.weight[END] *= end_weight
        d.fc.bias[END] += end_bias
    return d


def feats(n: int, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(n, P, C, generator=g) * scale
    return grid, grid.mean(1)


def random_captions(n: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(4, V, (n, T), generator=g)
    caps[:, 0] = START
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        caps[i, L - 1] = END
        caps[i, L:] = PAD
    return caps


# --- shapes and the step / forward contract -------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes(variant):
    d = make_decoder(variant)
    B, T = 3, 7
    grid, pooled = feats(B)
    caps = random_captions(B, T)
    logp, alphas = d(grid, pooled, caps)
    assert logp.shape == (B, T - 1, V)
    valid = caps[:, 1:] != PAD  # positions whose target is a word or <end> (what the loss reads)
    assert torch.allclose(logp.exp().sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5)
    if variant in ATTENTION:
        assert d.has_attention and alphas.shape == (B, T - 1, P)
        assert torch.allclose(alphas.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5)
    else:
        assert not d.has_attention and alphas is None
    state, f = d.start(grid, pooled)
    for x in list(state) + list(f):
        assert x.shape[0] == B  # batch-first, so beam search can reorder and expand them
    lp, state2, att = d.step(torch.full((B,), START), state, f)
    assert lp.shape == (B, V)
    assert (att is None) == (variant not in ATTENTION)
    if att is not None:
        assert att.shape == (B, P)
    if variant == "merge_bi":
        assert state2[0].shape == (B, 1)  # the prefix read so far
    else:
        assert all(s.shape == (B, 16) for s in state2)


def test_merge_bidirectional_doubles_rnn_output():
    d = make_decoder("merge_bi", dim=12)
    assert d.lstm.bidirectional and d.merge.in_features == 2 * 12 + 12
    assert make_decoder("merge", dim=12).merge.in_features == 12 + 12


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forced_forward_equals_stepping(variant):
    d = make_decoder(variant, seed=1, dropout=0.5)  # dropout must be off in eval mode
    d.eval()
    B, T = 4, 9
    grid, pooled = feats(B, seed=1)
    caps = random_captions(B, T, seed=1)
    with torch.no_grad():
        logp, alphas = d(grid, pooled, caps)
        state, f = d.start(grid, pooled)
        steps, atts = [], []
        for t in range(T - 1):
            lp, state, a = d.step(caps[:, t], state, f)
            steps.append(lp)
            atts.append(a)
    # Compared where the target is not padding: a decoder may skip finished captions.
    valid = caps[:, 1:] != PAD
    assert (~valid).any() and valid.sum(1).unique().numel() > 1  # ragged lengths are exercised
    assert torch.allclose(logp[valid], torch.stack(steps, 1)[valid], atol=1e-5)
    if alphas is not None:
        assert torch.allclose(alphas[valid], torch.stack(atts, 1)[valid], atol=1e-6)
    # ... and the loss, which reads only those positions, is the same either way.
    nll = -torch.stack(steps, 1).gather(2, caps[:, 1:, None]).squeeze(2)[valid].mean()
    with torch.no_grad():
        loss = caption_loss(d, grid, pooled, caps, 0.0, 0.0)
    assert math.isclose(float(loss), float(nll), abs_tol=1e-5)


@pytest.mark.parametrize("variant", ["show_tell", "merge_bi", "show_attend_tell", "sat_deep"])
def test_scheduled_sampling_forward(variant):
    d = make_decoder(variant, seed=2)
    grid, pooled = feats(2, seed=2)
    caps = random_captions(2, 6, seed=2)
    torch.manual_seed(0)
    with torch.no_grad():
        tf, _ = d(grid, pooled, caps)
        s0, _ = d(grid, pooled, caps, sample_prob=1e-9)  # sampled path, but (almost) never used
        s1, _ = d(grid, pooled, caps, sample_prob=1.0)
    valid = caps[:, 1:] != PAD
    assert torch.allclose(tf[valid], s0[valid], atol=1e-5)
    assert s1.shape == tf.shape
    assert torch.allclose(s1[:, 0], tf[:, 0], atol=1e-6)  # the first input is always <start>
    assert not torch.allclose(s1[:, 1:][valid[:, 1:]], tf[:, 1:][valid[:, 1:]])  # later: the model's own samples


def test_train_mode_dropout_changes_output():
    d = make_decoder("show_tell", dropout=0.5).train()
    grid, pooled = feats(2)
    caps = random_captions(2, 5)
    torch.manual_seed(0)
    a, _ = d(grid, pooled, caps)
    b, _ = d(grid, pooled, caps)
    assert not torch.allclose(a, b)


def test_build_decoder_registry():
    with pytest.raises(KeyError) as e:
        build_decoder("transformer", {"vocab_size": 10})
    for k in DECODERS:
        assert k in str(e.value)
    with pytest.raises(ValueError, match="bogus"):
        build_decoder("merge", {"vocab_size": 10, "bogus": 1})
    for kind in DECODERS:
        d = build_decoder(kind, {"vocab_size": 10, "feature_dim": 6, "embed_dim": 4, "hidden_dim": 4})
        assert decoder_kind(d) == kind and d.config.vocab_size == 10
    cfg = MergeConfig(vocab_size=9, feature_dim=6, embed_dim=4, hidden_dim=4, merge_dim=5, bidirectional=True)
    d = build_decoder("merge", cfg)
    assert MergeConfig.from_dict(d.config.to_dict()) == cfg


# --- overfitting: every decoder can learn 20 captions exactly ------------------------------

OVERFIT_CAPTIONS = [
    "a red square on white", "a red square on black", "a blue circle on white", "a blue circle",
    "a green triangle on black", "the big red square", "the small blue circle on white", "a square",
    "a circle", "green on black", "a big green triangle", "the red circle is small",
    "a blue square and a red circle", "white", "black and white", "a small triangle on white",
    "the green square", "a red triangle on black", "big blue", "a circle on a square",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfit_small_set(variant):
    vocab = Vocab.build(OVERFIT_CAPTIONS, min_count=1)
    ids = [vocab.encode(c) for c in OVERFIT_CAPTIONS]
    T = max(map(len, ids))
    caps = torch.tensor([i + [PAD] * (T - len(i)) for i in ids])
    N, Cf = len(ids), 16
    grid = torch.randn(N, P, Cf, generator=torch.Generator().manual_seed(0))
    pooled = grid.mean(1)
    d = make_decoder(variant, seed=0, dim=64, vocab_size=len(vocab), feature_dim=Cf,
                     gain=1.0, sharpen=1.0, end_weight=1.0)
    # Before training the decoder gets (almost) nothing right.
    before = sample_decode(d.eval(), grid, pooled)
    assert sum(h.tokens == i[1:-1] for h, i in zip(before, ids)) <= 1
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    first = last = None
    for it in range(1, 401):
        d.train()
        loss = caption_loss(d, grid, pooled, caps, alpha_c=0.0, sample_prob=0.0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()
        if it % 10 == 0:
            hyps = sample_decode(d.eval(), grid, pooled)
            if all(h.finished and h.tokens == i[1:-1] for h, i in zip(hyps, ids)):
                break
    hyps = sample_decode(d.eval(), grid, pooled)
    got = [vocab.decode(h.tokens) for h in hyps]
    assert got == OVERFIT_CAPTIONS, f"after {it} steps (loss {first:.3f} -> {last:.3f})"
    assert all(h.finished for h in hyps)
    assert last < first / 5


# --- the reference beam search (tests/reference_beam.py) ---------------------------------------

from reference_beam import norm, reference_beam_search  # noqa: E402


def assert_same_hyps(got: list[Hypothesis], want: list[Hypothesis], ctx=""):
    assert len(got) == len(want), ctx
    for j, (g, w) in enumerate(zip(got, want)):
        c = f"{ctx} hyp {j}: got {g.tokens} {g.score:.5f}, want {w.tokens} {w.score:.5f}"
        assert g.tokens == w.tokens, c
        assert g.finished == w.finished, c
        assert math.isclose(g.logprob, w.logprob, abs_tol=1e-4), c
        assert math.isclose(g.score, w.score, abs_tol=1e-4), c
        if w.attention is None:
            assert g.attention is None, c
        else:
            assert g.attention.shape == w.attention.shape, c
            assert np.allclose(g.attention, w.attention, atol=1e-5), c


def run_both(model, grid, pooled, **kw):
    """Batched beam search on all images vs the reference on each image alone."""
    ref_kw = dict(K=kw["beam_size"], nbest=kw.get("nbest", 1), max_len=kw.get("max_len", 20),
                  min_len=kw.get("min_len", 1), alpha=kw.get("length_penalty", 0.0),
                  no_repeat=kw.get("no_repeat_ngram", 0), allow_unk=kw.get("allow_unk", False))
    with torch.no_grad():
        got = beam_search(model, grid, pooled, **kw)
        want = [reference_beam_search(model, grid[b:b + 1], pooled[b:b + 1], **ref_kw)[0] for b in range(grid.size(0))]
    return got, want


BEAM_CONFIGS = [(1, 1), (3, 1), (3, 3), (5, 2)]  # (beam_size, nbest)


@pytest.mark.parametrize("no_repeat", [0, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
@pytest.mark.parametrize("K,nbest", BEAM_CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_matches_reference(variant, K, nbest, alpha, no_repeat):
    model = make_decoder(variant, seed=10 + K + nbest)
    grid, pooled = feats(4, seed=K * 7 + nbest)
    got, want = run_both(model, grid, pooled, beam_size=K, nbest=nbest, max_len=10, length_penalty=alpha,
                         no_repeat_ngram=no_repeat)
    for b in range(4):
        assert_same_hyps(got[b], want[b], f"image {b}")
        scores = [h.score for h in got[b]]
        assert scores == sorted(scores, reverse=True)


def test_reference_sees_varied_searches():
    """Guard against a vacuous comparison: the random decoders above must produce captions that
    end at different lengths, unfinished ones at max_len, and pools with several finished."""
    lengths, finished, unfinished = set(), 0, 0
    for variant in VARIANTS:
        for K, nbest in BEAM_CONFIGS:
            model = make_decoder(variant, seed=10 + K + nbest)
            grid, pooled = feats(4, seed=K * 7 + nbest)
            for hs in beam_search(model, grid, pooled, beam_size=K, nbest=nbest, max_len=10):
                for h in hs:
                    lengths.add(len(h.tokens))
                    finished += h.finished
                    unfinished += not h.finished
    assert len(lengths) >= 5 and finished >= 40 and unfinished >= 1, (lengths, finished, unfinished)


@pytest.mark.parametrize("variant", ["show_tell", "show_attend_tell"])
def test_early_stop_never_changes_the_result(variant):
    """The stopping rule is a true bound: searching to max_len finds nothing better."""
    model = make_decoder(variant, seed=3, end_bias=2.0)
    grid, pooled = feats(5, seed=3)
    for alpha in (0.0, 0.7, 1.0):
        got = beam_search(model, grid, pooled, beam_size=4, nbest=2, max_len=12, length_penalty=alpha)
        for b in range(5):
            full, _ = reference_beam_search(model, grid[b:b + 1], pooled[b:b + 1], K=4, nbest=2, max_len=12,
                                            alpha=alpha, early_stop=False)
            assert_same_hyps(got[b], full, f"alpha {alpha} image {b}")


class Markov(torch.nn.Module):
    """A toy 'decoder' whose next word depends only on the previous one: a table of log-probs."""

    has_attention = False

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V, V): previous token -> next-token logprobs

    def start(self, grid, pooled):
        return (torch.zeros(grid.size(0), 1),), ()

    def step(self, tokens, state, features):
        return self.table[tokens], state, None


def markov(vocab_size: int, edges: dict[int, dict[int, float]]) -> Markov:
    """Given probabilities on the listed edges; what is left is spread over all other words."""
    table = torch.empty(vocab_size, vocab_size)
    for prev in range(vocab_size):
        given = edges.get(prev, {})
        rest = [w for w in range(4, vocab_size) if w not in given] + ([END] if END not in given else [])
        p = torch.full((vocab_size,), 1e-12)
        for w, q in given.items():
            p[w] = q
        p[rest] = max(1.0 - sum(given.values()), 1e-6) / len(rest)
        table[prev] = (p / p.sum()).log()
    return Markov(table)


def test_hand_made_search_problem():
    """START -> A (0.8) -> <end> (0.99) is short and likely; START -> B (0.2) leads along a sure chain
    of 17 more words to <end>. Plain logprob prefers [A]; per-word scoring (alpha 1) the long chain,
    which the search must not give up on early; greedy is stuck with [A]."""
    A, B = 4, 5
    chain = list(range(6, 23))
    edges = {START: {A: 0.8, B: 0.2}, A: {END: 0.99}}
    for prev, nxt in zip([B] + chain, chain + [END]):
        edges[prev] = {nxt: 0.999}
    model = markov(23, edges)
    grid, pooled = torch.zeros(1, P, C), torch.zeros(1, C)
    (short,) = beam_search(model, grid, pooled, beam_size=2, max_len=20)[0]
    assert short.tokens == [A] and short.finished
    assert math.isclose(short.logprob, math.log(0.8 * 0.99), abs_tol=1e-5)
    (long,) = beam_search(model, grid, pooled, beam_size=2, max_len=20, length_penalty=1.0)[0]
    assert long.tokens == [B] + chain and long.finished
    assert math.isclose(long.score, long.logprob / 19, rel_tol=1e-6)
    assert long.score > short.logprob / 2
    # With room for only 18 words the chain cannot end: [A] is the only finished caption.
    (cut,) = beam_search(model, grid, pooled, beam_size=2, max_len=18, length_penalty=1.0)[0]
    assert cut.tokens == [A]
    # A single beam never keeps B alive.
    (one,) = beam_search(model, grid, pooled, beam_size=1, max_len=20, length_penalty=1.0)[0]
    assert one.tokens == [A]
    assert sample_decode(model, grid, pooled, max_len=20)[0].tokens == [A]
    for alpha in (0.0, 0.5, 1.0):
        for K in (1, 2, 3):
            got = beam_search(model, grid, pooled, beam_size=K, nbest=1, max_len=20, length_penalty=alpha)[0]
            want, _ = reference_beam_search(model, grid, pooled, K=K, max_len=20, alpha=alpha, early_stop=False)
            assert_same_hyps(got, want, f"alpha {alpha} K {K}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_min_len_and_unk(variant):
    model = make_decoder(variant, seed=4, end_bias=4.0)  # eager to stop ...
    with torch.no_grad():
        model.fc.bias[UNK] += 6.0  # ... and to say <unk>
    grid, pooled = feats(3, seed=4)
    got, want = run_both(model, grid, pooled, beam_size=3, nbest=2, min_len=4, max_len=9)
    for b in range(3):
        assert_same_hyps(got[b], want[b])
        assert all(len(h.tokens) >= 4 for h in got[b])
        assert all(UNK not in h.tokens for h in got[b])
    free = beam_search(model, grid, pooled, beam_size=3, max_len=9)
    assert min(len(hs[0].tokens) for hs in free) < 4  # without min_len it would stop earlier
    g = sample_decode(model, grid, pooled, min_len=4, max_len=9)
    assert all(len(h.tokens) >= 4 and UNK not in h.tokens for h in g)
    # allow_unk lets it through
    got, want = run_both(model, grid, pooled, beam_size=3, allow_unk=True, max_len=9)
    for b in range(3):
        assert_same_hyps(got[b], want[b])
    assert any(UNK in hs[0].tokens for hs in got)
    assert any(UNK in h.tokens for h in sample_decode(model, grid, pooled, allow_unk=True, max_len=9))


@pytest.mark.parametrize("variant", ["show_tell", "merge_bi", "show_attend_tell", "sat_deep"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_fallback_when_nothing_ends(variant, alpha):
    model = make_decoder(variant, seed=5)
    grid, pooled = feats(3, seed=5)
    for max_len, min_len in ((1, 1), (3, 5)):
        got, want = run_both(model, grid, pooled, beam_size=3, nbest=3, max_len=max_len, min_len=min_len,
                             length_penalty=alpha)
        for b in range(3):
            assert_same_hyps(got[b], want[b])
            assert [h.finished for h in got[b]] == [False] * 3
            assert all(len(h.tokens) == max_len for h in got[b])
            for h in got[b]:
                assert math.isclose(h.score, h.logprob / norm(max_len, alpha), rel_tol=1e-5)
                if h.attention is not None:
                    assert h.attention.shape == (max_len, P)
    g = sample_decode(model, grid, pooled, max_len=3, min_len=5)
    assert all(not h.finished and len(h.tokens) == 3 for h in g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_repeat_ngram(variant):
    # long, repetitive captions (seed 6 gives a deep-output decoder that happens not to repeat)
    model = make_decoder(variant, seed=7 if variant == "sat_deep" else 6, end_bias=-3.0, sharpen=5.0)
    grid, pooled = feats(3, seed=6)

    def ngrams(toks, n):
        return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]

    plain = beam_search(model, grid, pooled, beam_size=3, max_len=14)
    assert any(len(set(ngrams(hs[0].tokens, 2))) < len(ngrams(hs[0].tokens, 2)) for hs in plain), \
        "the test decoder should repeat itself without the constraint"
    for n in (1, 2, 3):
        got, want = run_both(model, grid, pooled, beam_size=3, nbest=2, max_len=14, no_repeat_ngram=n)
        for b in range(3):
            assert_same_hyps(got[b], want[b], f"n={n}")
            for h in got[b]:
                g = ngrams(h.tokens, n)
                assert len(set(g)) == len(g), (n, h.tokens)
        for h in sample_decode(model, grid, pooled, max_len=14, no_repeat_ngram=n):
            g = ngrams(h.tokens, n)
            assert len(set(g)) == len(g), (n, h.tokens)


def test_beam_of_one_follows_the_greedy_path():
    """With one beam the live path is the greedy path; captions that end on the way are kept,
    so the result is a prefix of the greedy caption and at least as likely as it."""
    same = 0
    for variant in VARIANTS:
        model = make_decoder(variant, seed=7)
        grid, pooled = feats(6, seed=7)
        greedy = sample_decode(model, grid, pooled, max_len=10)
        beam = beam_search(model, grid, pooled, beam_size=1, max_len=10)
        for g, (b,) in zip(greedy, beam):
            assert g.tokens[: len(b.tokens)] == b.tokens
            if g.finished:
                assert b.finished and b.logprob >= g.logprob - 1e-5
            if not b.finished:
                assert b.tokens == g.tokens and not g.finished
                assert math.isclose(g.logprob, b.logprob, abs_tol=1e-4)
            if g.tokens == b.tokens and g.finished == b.finished:
                assert math.isclose(g.logprob, b.logprob, abs_tol=1e-4)
                same += 1
    assert same >= 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_match_teacher_forcing(variant):
    """Every hypothesis' logprob is the model's own log-probability of its words (+ <end>)."""
    model = make_decoder(variant, seed=8)
    grid, pooled = feats(3, seed=8)
    hyps = [h for hs in beam_search(model, grid, pooled, beam_size=4, nbest=4, max_len=8) for h in hs]
    hyps += sample_decode(model, grid, pooled, greedy=False, max_len=8, generator=torch.Generator().manual_seed(0))
    rows = [i // 4 for i in range(12)] + [0, 1, 2]
    for h, r in zip(hyps, rows):
        seq = [START] + h.tokens + ([END] if h.finished else [])
        caps = torch.tensor([seq])
        with torch.no_grad():
            lp, _ = model(grid[r:r + 1], pooled[r:r + 1], caps)
        want = float(lp[0].gather(1, caps[:, 1:].T).sum())
        assert math.isclose(h.logprob, want, abs_tol=1e-4), (h.tokens, h.logprob, want)


def test_sampling():
    model = make_decoder("show_attend_tell", seed=9)
    grid, pooled = feats(5, seed=9)
    kw = dict(greedy=False, max_len=10)
    a = sample_decode(model, grid, pooled, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_decode(model, grid, pooled, generator=torch.Generator().manual_seed(1), **kw)
    assert [h.tokens for h in a] == [h.tokens for h in b]
    many = {tuple(h.tokens) for s in range(8)
            for h in sample_decode(model, grid[:1], pooled[:1], generator=torch.Generator().manual_seed(s), **kw)}
    assert len(many) > 1
    greedy = sample_decode(model, grid, pooled, max_len=10)
    top1 = sample_decode(model, grid, pooled, top_k=1, generator=torch.Generator().manual_seed(2), **kw)
    cold = sample_decode(model, grid, pooled, temperature=1e-4, generator=torch.Generator().manual_seed(3), **kw)
    assert [h.tokens for h in top1] == [h.tokens for h in greedy] == [h.tokens for h in cold]
    for h in a:
        steps = len(h.tokens) + (1 if h.finished else 0)
        assert h.attention.shape == (steps, P)
        assert np.allclose(h.attention.sum(1), 1.0, atol=1e-5)


# --- ensembles -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_ensemble_of_identical_copies_equals_single(variant):
    model = make_decoder(variant, seed=11)
    ens = Ensemble([model, copy.deepcopy(model)]).eval()
    grid, pooled = feats(3, seed=11)
    single = beam_search(model, grid, pooled, beam_size=3, nbest=2, max_len=10, length_penalty=0.7)
    double = beam_search(ens, grid, pooled, beam_size=3, nbest=2, max_len=10, length_penalty=0.7)
    for s, d in zip(single, double):
        assert_same_hyps(d, s)
    g1 = sample_decode(model, grid, pooled, max_len=10)
    g2 = sample_decode(ens, grid, pooled, max_len=10)
    assert [h.tokens for h in g1] == [h.tokens for h in g2]


def test_mixed_ensemble_averages_and_searches_like_reference():
    members = [make_decoder("show_tell", seed=12), make_decoder("show_attend_tell", seed=13),
               make_decoder("merge_bi", seed=14)]
    ens = Ensemble(members).eval()
    assert ens.has_attention
    grid, pooled = feats(3, seed=12)
    state, f = ens.start(grid, pooled)
    tok = torch.full((3,), START)
    lp, _, att = ens.step(tok, state, f)
    parts = [m.step(tok, *m.start(grid, pooled))[0] for m in members]
    assert torch.allclose(lp, torch.log_softmax(torch.stack(parts).mean(0), -1), atol=1e-6)
    assert torch.allclose(lp.exp().sum(1), torch.ones(3), atol=1e-5)
    assert att.shape == (3, P)
    got, want = run_both(ens, grid, pooled, beam_size=3, nbest=2, max_len=8, length_penalty=0.7, no_repeat_ngram=2)
    for b in range(3):
        assert_same_hyps(got[b], want[b])


def test_ensemble_scores_captions_like_a_decoder():
    """Teacher-forced scoring (explain's attributions use it) is one loop for decoders and
    ensembles: a one-member ensemble scores exactly as its member."""
    member = make_decoder("show_attend_tell", seed=15).eval()
    grid, pooled = feats(3, seed=15)
    caps = random_captions(3, 7, seed=15)
    with torch.no_grad():
        want, want_att = member.forward_sampled(grid, pooled, caps, 0.0)
        got, got_att = Ensemble([member]).eval().teacher_forced(grid, pooled, caps)
    assert torch.allclose(got, torch.log_softmax(want, -1), atol=1e-6)
    assert torch.allclose(got_att, want_att)


def test_ensemble_checks_members():
    with pytest.raises(ValueError):
        Ensemble([])
    with pytest.raises(ValueError, match="vocabulary sizes"):
        Ensemble([make_decoder("show_tell"), make_decoder("show_tell", vocab_size=V + 1)])


# --- the lattice ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["merge", "show_attend_tell"])
def test_lattice_records_the_search(variant):
    model = make_decoder(variant, seed=15)
    grid, pooled = feats(3, seed=15)
    K = 3
    for b in range(3):
        lat = Lattice()
        hyps = beam_search(model, grid[b:b + 1], pooled[b:b + 1], beam_size=K, nbest=2, max_len=10, lattice=lat)[0]
        _, log = reference_beam_search(model, grid[b:b + 1], pooled[b:b + 1], K=K, nbest=2, max_len=10)
        assert len(lat.steps) == 1
        steps = lat.steps[0]
        assert len(steps) == len(log)
        for t, (rec, ref) in enumerate(zip(steps, log)):
            assert set(rec) == {"parent", "token", "logprob", "finished", "kept"}
            assert all(len(v) == 2 * K for v in rec.values())
            finite = [j for j, s in enumerate(rec["logprob"]) if math.isfinite(s)]
            assert len(finite) == len(ref)
            for j, (parent, tok, s, fin, kept) in zip(finite, ref):
                assert rec["parent"][j] == parent and rec["token"][j] == tok, t
                assert math.isclose(rec["logprob"][j], s, abs_tol=1e-4)
                assert rec["finished"][j] == fin and rec["kept"][j] == kept
            assert sum(rec["kept"]) <= K
            if t == 0:
                assert set(rec["parent"][j] for j in finite) == {0}
        # The best caption can be traced through the lattice: its words were kept step by step.
        best = hyps[0]
        for t, w in enumerate(best.tokens):
            rec = steps[t]
            assert any(tok == w and kept for tok, kept in zip(rec["token"], rec["kept"]))
        if best.finished:
            end = steps[len(best.tokens)]
            assert any(tok == END and fin and math.isclose(s, best.logprob, abs_tol=1e-4)
                       for tok, fin, s in zip(end["token"], end["finished"], end["logprob"]))


def test_lattice_batched():
    model = make_decoder("show_tell", seed=16)
    grid, pooled = feats(4, seed=16)
    lat = Lattice()
    beam_search(model, grid, pooled, beam_size=2, max_len=6, lattice=lat)
    assert len(lat.steps) == 4
    n = {len(s) for s in lat.steps}
    assert len(n) == 1 and 1 <= n.pop() <= 6
