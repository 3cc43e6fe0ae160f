"""A plain per-image reference beam search, written from decoding.beam_search's documented
semantics (python lists, one image and one beam at a time). The tests check the batched search
against it; bench/bench_caption.py measures the batched search's speed-up over it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from captioning.decoding import Hypothesis

PAD, START, END, UNK = 0, 1, 2, 3


@dataclass
class RefBeam:
    tokens: list[int]
    logprob: float
    state: object
    att: list[np.ndarray] = field(default_factory=list)


def banned_tokens(tokens: list[int], t: int, min_len: int, no_repeat: int, allow_unk: bool) -> set[int]:
    ban = {PAD, START}
    if not allow_unk:
        ban.add(UNK)
    if t < min_len:
        ban.add(END)
    n = no_repeat
    if n > 0:
        tail = tokens[len(tokens) - (n - 1):] if n > 1 else []
        for i in range(len(tokens) - n + 1):
            if tokens[i:i + n - 1] == tail:
                ban.add(tokens[i + n - 1])
    return ban


def norm(length: int, alpha: float) -> float:
    return length ** alpha if alpha else 1.0


@torch.no_grad()
def reference_beam_search(model, grid, pooled, K, nbest=1, max_len=20, min_len=1, alpha=0.0, no_repeat=0,
                          allow_unk=False, early_stop=True):
    """Beam search for ONE image (grid (1, P, C)), one beam at a time, on python lists.

    Returns (hypotheses, log) where log[t] lists step t's candidates as
    (parent, token, logprob, finished, kept)."""
    state, f = model.start(grid, pooled)
    live = [RefBeam([], 0.0, state)]
    pool: list[Hypothesis] = []
    log = []
    for t in range(max_len):
        cands = []
        for k, beam in enumerate(live):
            prev = beam.tokens[-1] if beam.tokens else START
            logp, new_state, a = model.step(torch.tensor([prev]), beam.state, f)
            ban = banned_tokens(beam.tokens, t, min_len, no_repeat, allow_unk)
            for w, lp in enumerate(logp[0].tolist()):
                if w not in ban:
                    cands.append((beam.logprob + lp, k, w, new_state, None if a is None else a[0].numpy()))
        cands.sort(key=lambda c: -c[0])
        new_live, entries = [], []
        for s, k, w, st, a in cands[: 2 * K]:  # the 2K best extensions
            parent = live[k]
            att = parent.att + ([a] if a is not None else [])
            kept = False
            if w == END:  # length counts <end>: t words + 1
                pool.append(Hypothesis(list(parent.tokens), s, s / norm(t + 1, alpha), True,
                                       np.stack(att) if att else None))
            elif len(new_live) < K:
                new_live.append(RefBeam(parent.tokens + [w], s, st, att))
                kept = True
            entries.append((k, w, s, w == END, kept))
        log.append(entries)
        live = new_live
        pool.sort(key=lambda h: -h.score)
        if not live:
            break
        if early_stop and len(pool) >= nbest:
            best = live[0].logprob
            # Can the best live beam still beat the nbest-th finished caption at any length it can reach?
            reach = max_len if alpha > 0 else min(t + 2, max_len)
            if pool[nbest - 1].score >= best / norm(reach, alpha):
                break
    hyps = pool[:nbest]
    if len(hyps) < nbest:
        rest = sorted(live, key=lambda b: -b.logprob / norm(len(b.tokens), alpha))
        hyps += [Hypothesis(b.tokens, b.logprob, b.logprob / norm(len(b.tokens), alpha), False,
                            np.stack(b.att) if b.att else None) for b in rest[: nbest - len(hyps)]]
    return hyps, log
