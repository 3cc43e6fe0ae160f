"""The beam-search lattice as a tree to draw.

``captioning.decoding.beam_search`` records, per step, its 2K best candidate extensions:
the parent beam slot, the token, the cumulative log-probability, and whether the candidate
became one of the K live beams ("kept") or a finished caption (it chose <end>). This module
links those candidates into a tree rooted at <start> and marks the path of the returned
caption. Beam search for captioning: Vinyals et al. 2015 (arXiv:1411.4555); visualising the
search tree follows Lee et al. 2017, "Interactive Visualization and Manipulation of Attention-
based Neural Machine Translation" (EMNLP demos).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

START_WORD = "<start>"


@dataclass
class BeamNode:
    """One candidate.

    id: index in ``BeamTree.nodes`` (the root is 0). step: decoding step (root -1).
    token / word: the candidate's token. logprob: cumulative log-probability of the prefix
    ending here; step_logprob: this token's own log-probability. parent: parent node id (None
    for the root). kept: became a live beam; finished: chose <end> (a complete caption).
    rank: 0 = best candidate of its step. on_best: on the path of the returned caption.
    """

    id: int
    step: int
    token: int
    word: str
    logprob: float
    step_logprob: float
    parent: Optional[int]
    kept: bool
    finished: bool
    rank: int
    on_best: bool = False


@dataclass
class BeamTree:
    """All candidates beam search looked at for one image, as a tree."""

    nodes: list[BeamNode]
    beam_size: int
    _children: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._children = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            if n.parent is not None:
                self._children[n.parent].append(n.id)

    @property
    def root(self) -> BeamNode:
        return self.nodes[0]

    @property
    def steps(self) -> int:
        return max((n.step for n in self.nodes), default=-1) + 1

    def children(self, node_id: int) -> list[BeamNode]:
        return [self.nodes[i] for i in self._children[node_id]]

    def edges(self) -> list[tuple[int, int]]:
        """(parent id, child id) for every non-root node."""
        return [(n.parent, n.id) for n in self.nodes if n.parent is not None]

    def path(self, node_id: int) -> list[BeamNode]:
        """Nodes from the first word to ``node_id`` (root excluded)."""
        out = []
        n: Optional[BeamNode] = self.nodes[node_id]
        while n is not None and n.parent is not None:
            out.append(n)
            n = self.nodes[n.parent]
        return out[::-1]

    def best_path(self) -> list[BeamNode]:
        return [n for n in self.nodes if n.on_best and n.parent is not None]

    def finished(self) -> list[BeamNode]:
        """Finished captions (their <end> nodes), best cumulative log-probability first."""
        return sorted((n for n in self.nodes if n.finished), key=lambda n: -n.logprob)

    def positions(self, collapse_pruned: bool = False) -> dict[int, tuple[float, float]]:
        """A simple layout: x = step + 1, y = rank within the step (0 at the top); the root at (0, 0).
        ``collapse_pruned``: leave out the candidates that were neither kept, finished nor on the
        marked path, and rank the rest among themselves, so no gaps are left."""
        if not collapse_pruned:
            return {n.id: (float(n.step + 1), float(n.rank)) for n in self.nodes}
        shown = sorted((n for n in self.nodes if n.kept or n.finished or n.on_best or n.parent is None),
                       key=lambda n: (n.step, n.rank))
        pos, seen = {}, {}
        for n in shown:  # rank order within a step is beam_tree's (-logprob, id)
            pos[n.id] = (float(n.step + 1), float(seen.setdefault(n.step, 0)))
            seen[n.step] += 1
        return pos

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"beam_size", "nodes": [...], "edges": [[parent, child], ...]}."""
        return {"beam_size": self.beam_size, "nodes": [asdict(n) for n in self.nodes],
                "edges": [list(e) for e in self.edges()]}


def beam_tree(lattice: Union[Sequence[dict], Any], vocab, best_tokens: Optional[Sequence[int]] = None,
              best_finished: bool = True) -> BeamTree:
    """Link one image's lattice into a tree.

    Args:
        lattice: a ``CaptionResult`` (from ``Captioner.caption(..., return_lattice=True)``; its
            best caption is marked) or its ``.lattice``: a list of per-step dicts with equal-length
            lists "parent", "token", "logprob", "finished", "kept".
        vocab: the model's ``Vocab`` (token ids -> words).
        best_tokens: word ids of the caption to mark (default: the CaptionResult's best).
        best_finished: whether that caption ended with <end> (default: the CaptionResult's).
    Returns:
        ``BeamTree``; candidates with -inf log-probability (masked tokens) are left out.
    Raises:
        ValueError: no lattice (caption was called without ``return_lattice=True``).
    """
    if hasattr(lattice, "captions"):  # a CaptionResult
        if best_tokens is None:
            best_tokens, best_finished = lattice.tokens, lattice.best.finished
        lattice = lattice.lattice
    if lattice is None:
        raise ValueError("no beam lattice: caption with return_lattice=True (beam search only)")
    nodes = [BeamNode(0, -1, vocab.start, START_WORD, 0.0, 0.0, None, True, False, 0)]
    slots = [0]  # live beam slot -> node id
    beam = 1
    for t, step in enumerate(lattice):
        n = len(step["token"])
        beam = max(beam, n // 2)
        new = []
        for j in range(n):
            lp = float(step["logprob"][j])
            p = int(step["parent"][j])
            if not math.isfinite(lp) or p >= len(slots):
                continue
            parent = nodes[slots[p]]
            tok = int(step["token"][j])
            new.append(BeamNode(len(nodes) + len(new), t, tok, vocab.itos[tok], lp, lp - parent.logprob, parent.id,
                                bool(step["kept"][j]), bool(step["finished"][j]), 0))
        for r, node in enumerate(sorted(new, key=lambda x: (-x.logprob, x.id))):
            node.rank = r
        nodes += new
        # Live beams are numbered like beam_search's topk: best score first.
        slots = [x.id for x in sorted((x for x in new if x.kept), key=lambda x: (-x.logprob, x.id))]
    tree = BeamTree(nodes, beam)
    if best_tokens is not None:
        _mark_best(tree, list(best_tokens), best_finished, vocab.end)
    return tree


def _mark_best(tree: BeamTree, tokens: list[int], finished: bool, end: int) -> None:
    cur = tree.root
    cur.on_best = True
    want = tokens + ([end] if finished else [])
    for i, tok in enumerate(want):
        last = i == len(want) - 1
        nxt = [c for c in tree.children(cur.id) if c.token == tok and (c.finished if (last and finished) else c.kept)]
        if not nxt:
            return  # the caption is not in this lattice (e.g. another decoding's tokens)
        cur = nxt[0]
        cur.on_best = True
