"""Decoding written once for every decoder: greedy, sampling and batched beam search.

Everything here talks to a model only through ``start(grid, pooled)`` and
``step(tokens, state, features)`` (decoders.py), so an Ensemble of decoders that share a
vocabulary decodes the same way as one decoder.

Dimensions: B images, K beams, V vocabulary, P grid positions, L caption length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .decoders import Decoder, step_through


@dataclass(frozen=True)
class SpecialIds:
    pad: int = 0
    start: int = 1
    end: int = 2
    unk: int = 3


@dataclass
class Hypothesis:
    """One decoded caption.

    tokens: word ids without <start>/<end>. logprob: sum of log-probabilities of the words
    and, when ``finished``, of <end>. score: the length-normalised logprob beams are ranked
    by. attention: (steps, P) for decoders with attention, one row per step incl. <end>.
    """

    tokens: list[int]
    logprob: float
    score: float
    finished: bool
    attention: Optional[np.ndarray] = None


@dataclass
class Lattice:
    """What beam search considered, per image and step: every candidate (parent beam,
    token, cumulative logprob), and which became the next beams or a finished caption."""

    steps: list[list[dict[str, Any]]] = field(default_factory=list)  # [image][step] -> dict


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    return tuple(tree_map(fn, y) for y in x)


def rerank_candidates(beam_size: int, rerank_pool: int, nbest: int = 1) -> int:
    """How many finished captions re-ranking chooses from: the pool asked for (0: none), never
    fewer than the beam or the captions wanted. Captioner, the model card and the app share it."""
    return max(int(nbest), int(beam_size), int(rerank_pool))


class Ensemble(nn.Module):
    """Decoders that share a vocabulary, stepped together; their log-probabilities are
    averaged and renormalised (Show and Tell's COCO 2015 entry was an ensemble)."""

    def __init__(self, members: Sequence[Decoder]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one decoder")
        sizes = {m.config.vocab_size for m in members}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members have different vocabulary sizes: {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.has_attention = any(m.has_attention for m in members)

    def start(self, grid, pooled):
        """grid (B, P, C) and pooled (B, C) read by every member, or a sequence of one of each
        per member, for members that read different inputs (say 224 and 288 px photos)."""
        n = len(self.members)
        if isinstance(grid, torch.Tensor):
            grid, pooled = [grid] * n, [pooled] * n
        if len(grid) != n or len(pooled) != n:
            raise ValueError(f"an ensemble of {n} decoders got features for {len(grid)}")
        outs = [m.start(g, p) for m, g, p in zip(self.members, grid, pooled)]
        return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

    def step(self, tokens, state, features):
        logps, states, atts = [], [], []
        for m, s, f in zip(self.members, state, features):
            lp, s, a = m.step(tokens, s, f)
            logps.append(lp)
            states.append(s)
            if a is not None:
                atts.append(a)
        logp = torch.log_softmax(torch.stack(logps).mean(0), -1)  # (B, V)
        # Attention over grids of different sizes has no common map to average into.
        same_grid = len({a.shape for a in atts}) == 1
        return logp, tuple(states), (torch.stack(atts).mean(0) if atts and same_grid else None)

    def teacher_forced(self, grid, pooled, captions: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Score captions (B, T) from <start> as a decoder does: logprobs (B, T-1, V), attention or None."""
        return step_through(self, grid, pooled, captions)

    def forward(self, grid, pooled, captions: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.teacher_forced(grid, pooled, captions)


def _constrain(logp: torch.Tensor, seqs: torch.Tensor, t: int, ids: SpecialIds, min_len: int,
               no_repeat_ngram: int, allow_unk: bool) -> torch.Tensor:
    """Mask tokens that may not come next. logp (N, V), seqs (N, t) of words so far."""
    logp = logp.clone()
    logp[:, ids.pad] = -math.inf
    logp[:, ids.start] = -math.inf
    if not allow_unk:
        logp[:, ids.unk] = -math.inf
    if t < min_len:
        logp[:, ids.end] = -math.inf
    n = no_repeat_ngram
    if n > 0 and t >= n:
        # Ban w if (last n-1 words, w) already occurred: compare every earlier window with the tail.
        windows = seqs.unfold(1, n, 1)  # (N, t-n+1, n)
        tail = seqs[:, t - n + 1:] if n > 1 else seqs[:, :0]  # (N, n-1)
        match = (windows[:, :, : n - 1] == tail.unsqueeze(1)).all(2)  # (N, t-n+1)
        rows, cols = match.nonzero(as_tuple=True)
        logp[rows, windows[rows, cols, n - 1]] = -math.inf
    return logp


def _rows(x, idx: list[int]):
    """Rows ``idx`` of a grid or pooled tensor, or of each member's for an ensemble's sequence."""
    return x[idx] if isinstance(x, torch.Tensor) else [y[idx] for y in x]


def _lead(grid) -> torch.Tensor:
    """The grid tensor, or the first member's when an ensemble gets one grid per member."""
    return grid if isinstance(grid, torch.Tensor) else grid[0]


def length_norm(length: int | torch.Tensor, alpha: float):
    """Score = logprob / length**alpha (alpha 0: plain sum; 1: mean per word)."""
    return length ** alpha if alpha else 1.0


@torch.no_grad()
def sample_decode(model, grid: torch.Tensor, pooled: torch.Tensor, *, greedy: bool = True,
                  temperature: float = 1.0, top_k: int = 0, max_len: int = 20, min_len: int = 1,
                  no_repeat_ngram: int = 0, allow_unk: bool = False, ids: SpecialIds = SpecialIds(),
                  generator: Optional[torch.Generator] = None) -> list[Hypothesis]:
    """Greedy (``greedy=True``) or sampled decoding, batched over B images.

    Args:
        grid: (B, P, C) encoder grid. pooled: (B, C). An Ensemble also takes one of each per member.
        temperature, top_k: sampling only; logits are divided by temperature and, if top_k,
            all but the k most likely words are dropped.
    Returns:
        B hypotheses; logprob is under the model (not the tempered distribution).
    """
    B, dev = _lead(grid).size(0), _lead(grid).device
    state, feats = model.start(grid, pooled)
    tokens = torch.full((B,), ids.start, dtype=torch.long, device=dev)
    seqs = torch.zeros(B, 0, dtype=torch.long, device=dev)
    total = torch.zeros(B, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), max_len, dtype=torch.long, device=dev)
    atts = []
    for t in range(max_len):
        logp, state, att = model.step(tokens, state, feats)
        logp = _constrain(logp, seqs, t, ids, min_len, no_repeat_ngram, allow_unk)
        if greedy:
            nxt = logp.argmax(1)
        else:
            z = logp / max(temperature, 1e-6)
            if top_k:
                kth = z.topk(min(top_k, z.size(1)), 1).values[:, -1:]
                z = z.masked_fill(z < kth, -math.inf)
            nxt = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1)
        total += torch.where(done, torch.zeros_like(total), logp.gather(1, nxt[:, None]).squeeze(1))
        if att is not None:
            atts.append(att)
        newly = (~done) & (nxt == ids.end)
        lengths[newly] = t
        done |= newly
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        tokens = nxt
        if done.all():
            break
    att_all = torch.stack(atts, 1).cpu().numpy() if atts else None  # (B, L, P)
    out = []
    for b in range(B):
        L = int(lengths[b])
        fin = bool(done[b])
        steps = L + 1 if fin else L
        out.append(Hypothesis(seqs[b, :L].tolist(), float(total[b]), float(total[b]), fin,
                              None if att_all is None else att_all[b, :steps]))
    return out


@dataclass
class Guide:
    """What guided beam search (``beam_search(..., guide=)``) is told about each of B images.

    words: (B, V) bool, the image's disjunctive constraint: its caption must contain one of
        these words ("cat" or "cats" or "kitten"); a row with none set leaves that image free.
    penalty: (B, V) float or None, added to every step's log-probabilities (<= 0 for words the
        image's evidence rules out). Scores and logprobs of guided captions include it.
    """

    words: torch.Tensor
    penalty: Optional[torch.Tensor] = None


@torch.no_grad()
def beam_search(model, grid: torch.Tensor, pooled: torch.Tensor, *, beam_size: int = 3, nbest: int = 1,
                max_len: int = 20, min_len: int = 1, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                allow_unk: bool = False, ids: SpecialIds = SpecialIds(), lattice: Optional[Lattice] = None,
                guide: Optional[Guide] = None) -> list[list[Hypothesis]]:
    """Beam search batched over images and beams with tensor operations.

    At each step the 2K best extensions of the K live beams are taken; those ending in <end>
    join the image's pool of finished captions (ranked by logprob / length**length_penalty,
    length counting <end>), the K best others live on. An image stops once no live beam can
    beat its nbest-th finished caption. If fewer than ``nbest`` captions end within
    ``max_len`` words, the best live beams fill the list, marked ``finished=False``.

    Args:
        model: a Decoder or Ensemble. grid: (B, P, C). pooled: (B, C); an Ensemble also takes
            one of each per member (Ensemble.start).
        lattice: if given, filled with every step's candidates (for drawing the search tree).
        guide: constrained ("guided") search, see ``guided_beam_search``.
    Returns:
        For each of the B images, its ``nbest`` hypotheses, best first.
    """
    kw = dict(beam_size=beam_size, nbest=nbest, max_len=max_len, min_len=min_len, length_penalty=length_penalty,
              no_repeat_ngram=no_repeat_ngram, allow_unk=allow_unk, ids=ids)
    if guide is None:
        return _one_bank_search(model, grid, pooled, None, lattice=lattice, **kw)
    need = guide.words.any(1)  # (B,)
    if bool(need.all()):
        return guided_beam_search(model, grid, pooled, guide, lattice=lattice, **kw)
    # Images without a constraint are searched with one bank of K beams instead of two (with
    # their penalties, if any): the second bank costs only where there is a word to force.
    on, off = need.nonzero().flatten().tolist(), (~need).nonzero().flatten().tolist()
    pen_off = None
    if guide.penalty is not None and bool((guide.penalty[off] != 0).any()):
        pen_off = guide.penalty[off]  # (b, V)
    if not on:
        return _one_bank_search(model, grid, pooled, pen_off, lattice=lattice, **kw)
    lat_on, lat_off = (Lattice(), Lattice()) if lattice is not None else (None, None)
    sub = Guide(guide.words[on], None if guide.penalty is None else guide.penalty[on])
    got_on = guided_beam_search(model, _rows(grid, on), _rows(pooled, on), sub, lattice=lat_on, **kw)
    got_off = _one_bank_search(model, _rows(grid, off), _rows(pooled, off), pen_off, lattice=lat_off, **kw)
    out: list = [None] * len(need)
    steps: list = [None] * len(need)
    for idx, got, lat in ((on, got_on, lat_on), (off, got_off, lat_off)):
        for j, b in enumerate(idx):
            out[b] = got[j]
            if lat is not None:
                steps[b] = lat.steps[j]
    if lattice is not None:
        lattice.steps = steps
    return out


def _one_bank_search(model, grid, pooled, penalty: Optional[torch.Tensor], *, beam_size: int, nbest: int,
                     max_len: int, min_len: int, length_penalty: float, no_repeat_ngram: int, allow_unk: bool,
                     ids: SpecialIds, lattice: Optional[Lattice]) -> list[list[Hypothesis]]:
    """``beam_search`` proper; ``penalty`` (B, V) or None is added to every step's log-probabilities
    (``Guide.penalty`` of images without a constraint), as ``guided_beam_search`` adds it."""
    B, K, dev = _lead(grid).size(0), beam_size, _lead(grid).device
    penalty = None if penalty is None else penalty.to(dev).float().repeat_interleave(K, 0)  # (B*K, V)
    npool = max(nbest, K)
    state, feats = model.start(grid, pooled)
    state = tree_map(lambda x: x.repeat_interleave(K, 0), state)  # (B*K, ...)
    feats = tree_map(lambda x: x.repeat_interleave(K, 0), feats)
    tokens = torch.full((B * K,), ids.start, dtype=torch.long, device=dev)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=dev)  # (B*K, t)
    beam_att: Optional[torch.Tensor] = None  # (B*K, t, P)
    beam_scores = torch.full((B, K), -math.inf, device=dev)
    beam_scores[:, 0] = 0.0  # all K beams start identical: expand only the first
    pool_score = torch.full((B, npool), -math.inf, device=dev)
    pool_logp = torch.full((B, npool), -math.inf, device=dev)
    pool_len = torch.zeros(B, npool, dtype=torch.long, device=dev)
    pool_seq = torch.zeros(B, npool, max_len, dtype=torch.long, device=dev)
    pool_att: Optional[torch.Tensor] = None  # (B, npool, max_len, P)
    if lattice is not None:
        lattice.steps = [[] for _ in range(B)]
    rows = torch.arange(B, device=dev).unsqueeze(1)  # (B, 1)
    for t in range(max_len):
        logp, state, att = model.step(tokens, state, feats)  # (B*K, V)
        if penalty is not None:
            logp = logp + penalty
        logp = _constrain(logp, seqs, t, ids, min_len, no_repeat_ngram, allow_unk)
        V = logp.size(1)
        beam_att, pool_att = _grow_attention(att, beam_att, pool_att, B, npool, max_len)
        cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)  # (B, K*V)
        top_s, top_i = cand.topk(min(2 * K, K * V), 1)  # (B, 2K)
        parent, tok = top_i // V, top_i % V  # (B, 2K)
        flat_parent = (rows * K + parent).view(-1)  # (B*2K,)
        is_end = (tok == ids.end) & torch.isfinite(top_s)

        # Finished candidates join the pool; the pool keeps its npool best by score.
        steps = t + 1
        pool_score, pool_logp, pool_len, pool_seq, pool_att = _join_pool(
            (pool_score, pool_logp, pool_len, pool_seq, pool_att), is_end, top_s, tok, flat_parent, seqs, beam_att,
            t, length_penalty)

        # The K best unfinished candidates live on.
        live_s = top_s.masked_fill(is_end, -math.inf)
        beam_scores, sel = live_s.topk(K, 1)  # (B, K)
        sel_parent = (rows * K + parent.gather(1, sel)).view(-1)  # (B*K,)
        tokens = tok.gather(1, sel).view(-1)
        seqs, state, beam_att = _follow(sel_parent, tokens, seqs, state, beam_att)
        if lattice is not None:
            _record(lattice, top_s, parent, tok, is_end, sel, beam_scores)

        # Stop an image once no live beam can still beat its nbest-th finished caption.
        if _all_settled(pool_score, beam_scores, nbest, steps, max_len, length_penalty):
            break

    return [_collect(b, nbest, pool_score, pool_logp, pool_len, pool_seq, pool_att, beam_scores, seqs, beam_att,
                     K, length_penalty) for b in range(B)]


# --- one search step's bookkeeping, shared by beam_search and guided_beam_search --------------

def _grow_attention(att, beam_att, pool_att, B: int, npool: int, max_len: int):
    """Append this step's attention (N, P) to the live beams' (N, t, P); make the pool's store
    (B, npool, max_len, P) at the first step that has attention."""
    if att is None:
        return beam_att, pool_att
    step_att = att.unsqueeze(1)  # (N, 1, P)
    beam_att = step_att if beam_att is None else torch.cat([beam_att, step_att], 1)
    if pool_att is None:
        pool_att = torch.zeros(B, npool, max_len, att.size(1), device=att.device)
    return beam_att, pool_att


def _join_pool(pool, finish, top_s, tok, flat_parent, seqs, beam_att, t: int, alpha: float):
    """Candidates (B, M) marked ``finish`` join each image's pool of finished captions, which keeps
    its npool best by length-normalised score. pool: (score, logp, len, seq, att) -> the same."""
    pool_score, pool_logp, pool_len, pool_seq, pool_att = pool
    B, npool, max_len = pool_seq.shape
    dev = top_s.device
    rows = torch.arange(B, device=dev).unsqueeze(1)
    steps = t + 1
    end_score = torch.where(finish, top_s / length_norm(steps, alpha), torch.full_like(top_s, -math.inf))
    cand_seq = torch.zeros(B, top_s.size(1), max_len, dtype=torch.long, device=dev)
    if t > 0:
        cand_seq[:, :, :t] = seqs[flat_parent].view(B, -1, t)
    all_score = torch.cat([pool_score, end_score], 1)
    keep = all_score.topk(npool, 1).indices  # (B, npool)
    pool_score = all_score.gather(1, keep)
    pool_logp = torch.cat([pool_logp, top_s], 1).gather(1, keep)
    pool_len = torch.cat([pool_len, torch.full_like(tok, t)], 1).gather(1, keep)
    pool_seq = torch.cat([pool_seq, cand_seq], 1)[rows, keep]
    if pool_att is not None:
        cand_att = torch.zeros(B, top_s.size(1), max_len, pool_att.size(3), device=dev)
        cand_att[:, :, :steps] = beam_att[flat_parent].view(B, -1, steps, pool_att.size(3))
        pool_att = torch.cat([pool_att, cand_att], 1)[rows, keep]
    return pool_score, pool_logp, pool_len, pool_seq, pool_att


def _follow(sel_parent, tokens, seqs, state, beam_att):
    """The live beams become the chosen candidates: their parents' words, state and attention,
    plus the new token."""
    seqs = torch.cat([seqs[sel_parent], tokens[:, None]], 1)
    state = tree_map(lambda x: x.index_select(0, sel_parent), state)
    return seqs, state, (None if beam_att is None else beam_att[sel_parent])


def _all_settled(pool_score, beam_scores, nbest: int, steps: int, max_len: int, alpha: float) -> bool:
    """True once, for every image, no live beam can still beat its nbest-th finished caption."""
    best_live = beam_scores.max(1).values  # (B,)
    # logprobs only fall as words are added; the length term is largest at the longest
    # (alpha > 0) or shortest (alpha < 0) length a live beam can still reach.
    reach = max_len if alpha > 0 else min(steps + 1, max_len)
    bound = best_live / length_norm(reach, alpha)
    return bool(((pool_score[:, nbest - 1] >= bound) | ~torch.isfinite(best_live)).all())


def _collect(b, nbest, pool_score, pool_logp, pool_len, pool_seq, pool_att, beam_scores, seqs, beam_att, K, alpha,
             by_score: bool = True):
    hyps = []
    for j in range(pool_score.size(1)):
        if not math.isfinite(float(pool_score[b, j])):
            continue
        L = int(pool_len[b, j])
        hyps.append(Hypothesis(pool_seq[b, j, :L].tolist(), float(pool_logp[b, j]), float(pool_score[b, j]), True,
                               None if pool_att is None else pool_att[b, j, : L + 1].cpu().numpy()))
    if len(hyps) < nbest:
        # Fallback: no (or too few) caption reached <end>; the best live beams stand in.
        L = seqs.size(1)
        live = []
        for k in range(K):
            s = float(beam_scores[b, k])
            if math.isfinite(s):
                live.append(Hypothesis(seqs[b * K + k].tolist(), s, s / length_norm(L, alpha), False,
                                       None if beam_att is None else beam_att[b * K + k].cpu().numpy()))
        if by_score:  # guided search passes its live beams in the order it prefers them
            live.sort(key=lambda h: -h.score)
        hyps += live[: nbest - len(hyps)]
    return hyps[:nbest]


def _record(lattice: Lattice, top_s, parent, tok, is_end, sel, beam_scores) -> None:
    kept = torch.zeros_like(is_end)
    kept.scatter_(1, sel, torch.isfinite(beam_scores))
    for b in range(top_s.size(0)):
        lattice.steps[b].append({
            "parent": parent[b].tolist(), "token": tok[b].tolist(), "logprob": top_s[b].tolist(),
            "finished": is_end[b].tolist(), "kept": kept[b].tolist(),
        })


@torch.no_grad()
def guided_beam_search(model, grid, pooled, guide: Guide, *, beam_size: int = 3, nbest: int = 1, max_len: int = 20,
                       min_len: int = 1, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                       allow_unk: bool = False, ids: SpecialIds = SpecialIds(),
                       lattice: Optional[Lattice] = None) -> list[list[Hypothesis]]:
    """Constrained beam search for one disjunctive constraint per image (Anderson et al. 2017,
    "Guided Open Vocabulary Image Captioning with Constrained Beam Search", EMNLP): each image
    keeps two banks of ``beam_size`` beams, one whose words do not yet contain a constraint word
    and one whose words do. A beam of the first bank that adds a constraint word moves to the
    second; only the second bank's captions may end, so every finished caption contains one of
    ``guide.words`` and is still the decoder's own fluent sentence (the constraint steers the
    search, it never pastes a word in). An image whose constraint is empty starts in the met bank
    and is searched exactly as ``beam_search`` searches it (plus ``guide.penalty``).

    Per step and bank the 2K best extensions are taken, as in ``beam_search``: a met-bank one that
    ends joins the image's finished pool, an unmet-bank one that ends is dropped, the K best others
    of each bank live on. The 2K live beams are kept ordered by score across both banks, so the
    lattice's parent slots read like ``beam_search``'s (its steps list 4K candidates: 2K per bank).
    If fewer than ``nbest`` captions end within ``max_len`` words, the best live beams of the met
    bank, then of the unmet bank, fill the list, marked ``finished=False``.
    """
    B, K, dev = _lead(grid).size(0), beam_size, _lead(grid).device
    G = 2 * K  # live slots per image: K per bank
    npool = max(nbest, K)
    words = guide.words.to(dev, torch.bool)  # (B, V)
    penalty = None if guide.penalty is None else guide.penalty.to(dev).float().repeat_interleave(G, 0)
    state, feats = model.start(grid, pooled)
    state = tree_map(lambda x: x.repeat_interleave(G, 0), state)  # (B*G, ...)
    feats = tree_map(lambda x: x.repeat_interleave(G, 0), feats)
    tokens = torch.full((B * G,), ids.start, dtype=torch.long, device=dev)
    seqs = torch.zeros(B * G, 0, dtype=torch.long, device=dev)
    beam_att: Optional[torch.Tensor] = None
    beam_scores = torch.full((B, G), -math.inf, device=dev)
    beam_scores[:, 0] = 0.0
    beam_met = torch.zeros(B, G, dtype=torch.bool, device=dev)
    beam_met[:, 0] = ~words.any(1)  # nothing to meet: the one starting beam is already in the met bank
    pool_score = torch.full((B, npool), -math.inf, device=dev)
    pool_logp = torch.full((B, npool), -math.inf, device=dev)
    pool_len = torch.zeros(B, npool, dtype=torch.long, device=dev)
    pool_seq = torch.zeros(B, npool, max_len, dtype=torch.long, device=dev)
    pool_att: Optional[torch.Tensor] = None
    if lattice is not None:
        lattice.steps = [[] for _ in range(B)]
    rows = torch.arange(B, device=dev).unsqueeze(1)
    for t in range(max_len):
        logp, state, att = model.step(tokens, state, feats)  # (B*G, V)
        if penalty is not None:
            logp = logp + penalty
        logp = _constrain(logp, seqs, t, ids, min_len, no_repeat_ngram, allow_unk)
        V = logp.size(1)
        beam_att, pool_att = _grow_attention(att, beam_att, pool_att, B, npool, max_len)
        cand = (beam_scores.view(-1, 1) + logp).view(B, G * V)
        # A candidate is in the met bank if its parent was, or its word is a constraint word.
        cand_met = (beam_met.unsqueeze(2) | words.unsqueeze(1)).view(B, G * V)
        n2 = min(2 * K, G * V)
        s_u, i_u = cand.masked_fill(cand_met, -math.inf).topk(n2, 1)
        s_m, i_m = cand.masked_fill(~cand_met, -math.inf).topk(n2, 1)
        top_s, top_i = torch.cat([s_u, s_m], 1), torch.cat([i_u, i_m], 1)  # (B, 2*n2): unmet bank, met bank
        top_met = torch.zeros_like(top_i, dtype=torch.bool)
        top_met[:, n2:] = True
        parent, tok = top_i // V, top_i % V
        flat_parent = (rows * G + parent).view(-1)
        is_end = (tok == ids.end) & torch.isfinite(top_s)

        # Only met-bank captions may finish; an unmet one that ends is dropped.
        steps = t + 1
        finish = is_end & top_met
        pool_score, pool_logp, pool_len, pool_seq, pool_att = _join_pool(
            (pool_score, pool_logp, pool_len, pool_seq, pool_att), finish, top_s, tok, flat_parent, seqs, beam_att,
            t, length_penalty)

        # The K best unfinished candidates of each bank live on, ordered by score across banks.
        live_s = top_s.masked_fill(is_end, -math.inf)
        s_uk, sel_u = live_s[:, :n2].topk(K, 1)
        s_mk, sel_m = live_s[:, n2:].topk(K, 1)
        sc, sel = torch.cat([s_uk, s_mk], 1), torch.cat([sel_u, sel_m + n2], 1)  # (B, G)
        order = sc.sort(dim=1, descending=True, stable=True).indices
        beam_scores, sel = sc.gather(1, order), sel.gather(1, order)
        beam_met = top_met.gather(1, sel)
        sel_parent = (rows * G + parent.gather(1, sel)).view(-1)
        tokens = tok.gather(1, sel).view(-1)
        seqs, state, beam_att = _follow(sel_parent, tokens, seqs, state, beam_att)
        if lattice is not None:
            _record(lattice, top_s, parent, tok, finish, sel, beam_scores)

        # Stop as beam_search does; a live beam of either bank may still reach the pool.
        if _all_settled(pool_score, beam_scores, nbest, steps, max_len, length_penalty):
            break

    out = []
    for b in range(B):
        # The fallback prefers live beams that met the constraint: list them first.
        order = sorted(range(G), key=lambda k: (not bool(beam_met[b, k]), k))
        idx = torch.tensor([b * G + k for k in order], device=dev)
        out.append(_collect(0, nbest, pool_score[b:b + 1], pool_logp[b:b + 1], pool_len[b:b + 1],
                            pool_seq[b:b + 1], None if pool_att is None else pool_att[b:b + 1],
                            beam_scores[b:b + 1, order], seqs[idx], None if beam_att is None else beam_att[idx],
                            G, length_penalty, by_score=False))
    return out
