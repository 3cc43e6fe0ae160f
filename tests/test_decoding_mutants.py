"""Decoding behaviour that mutation testing (bench/mutation.sh, docs/mutation.md) found no test
for: the re-ranking pool rule, and ensembles whose members read different feature grids."""
from __future__ import annotations

import pytest
import torch

from captioning.decoders import build_decoder
from captioning.decoding import Ensemble, beam_search, rerank_candidates

V, C = 12, 8


def _sat(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_decoder("show_attend_tell", dict(vocab_size=V, feature_dim=C, embed_dim=16, hidden_dim=16,
                                                  attention_dim=16, dropout=0.0)).eval()


def _feats(n: int, positions: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(n, positions, C, generator=g)
    return grid, grid.mean(1)


@pytest.mark.parametrize("beam, pool, nbest, expect", [
    (3, 5, 1, 5),   # the pool asked for
    (3, 0, 1, 3),   # no pool: the beam's own finished captions
    (3, 2, 1, 3),   # never fewer than the beam
    (3, 5, 7, 7),   # never fewer than the captions wanted
    (1, 1, 1, 1),
])
def test_rerank_candidates(beam, pool, nbest, expect):
    assert rerank_candidates(beam, pool, nbest) == expect
    if nbest == 1:
        assert rerank_candidates(beam, pool) == expect  # one caption wanted by default


def test_ensemble_of_members_with_different_grids():
    """Members reading a 2x2 and a 3x3 grid (say photos at two sizes): beam search runs on the
    per-member features, and there is no common attention map to average."""
    ens = Ensemble([_sat(0), _sat(1)]).eval()
    (g4, p4), (g9, p9) = _feats(2, 4, 0), _feats(2, 9, 1)
    state, feats = ens.start([g4, g9], [p4, p9])
    logp, _, att = ens.step(torch.full((2,), 1), state, feats)
    assert logp.shape == (2, V) and att is None
    hyps = beam_search(ens, [g4, g9], [p4, p9], beam_size=2, max_len=5)
    assert len(hyps) == 2 and all(len(h) == 1 for h in hyps)
    # The same grid for both: their attention maps are averaged.
    _, _, att = ens.step(torch.full((2,), 1), *ens.start(g4, p4))
    assert att is not None and att.shape == (2, 4)


def test_ensemble_rejects_features_for_the_wrong_number_of_members():
    ens = Ensemble([_sat(0), _sat(1)]).eval()
    (g, p) = _feats(2, 4, 0)
    with pytest.raises(ValueError, match="an ensemble of 2 decoders"):
        ens.start([g, g, g], [p, p])  # one grid too many, pooled right
    with pytest.raises(ValueError, match="an ensemble of 2 decoders"):
        ens.start([g, g], [p])
    with pytest.raises(ValueError, match="at least one decoder"):
        Ensemble([])
