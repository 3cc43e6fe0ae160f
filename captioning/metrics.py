"""Caption metrics through pycocoevalcap, the code published results use.

With Java (the PTB tokenizer and METEOR are Java programs): BLEU-1..4, METEOR, ROUGE-L,
CIDEr on PTB-tokenised text. Without Java: BLEU, ROUGE-L and CIDEr on our own tokenizer,
METEOR left out, and the result says so.
"""
from __future__ import annotations

import contextlib
import io
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .vocab import tokenize


def java_available() -> bool:
    return shutil.which("java") is not None


@dataclass
class Scores:
    metrics: dict[str, float]
    tokenizer: str
    notes: list[str] = field(default_factory=list)
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)


def py_tokenize(d: dict[str, list[str]]) -> dict[str, list[str]]:
    """The no-Java tokenizer: lower-case words, punctuation dropped; each caption re-joined by spaces."""
    return {k: [" ".join(t for t in tokenize(s) if t.isalnum() or "'" in t or "-" in t) for s in v] for k, v in d.items()}


def score_captions(preds: dict[str, str], refs: dict[str, list[str]], use_java: bool | None = None,
                   metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider"),
                   per_image: bool = False) -> Scores:
    """Score one predicted caption per image against its references.

    Args:
        preds: image id -> caption. refs: image id -> reference captions (same ids).
        use_java: force (True) or forbid (False) the Java path; None picks it when java is on PATH.
        metrics: any of bleu, meteor, rouge, cider.
        per_image: also return each image's BLEU-4 and CIDEr.
    Returns:
        Scores with keys BLEU-1..BLEU-4, METEOR, ROUGE-L, CIDEr (those computed).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [k for k in preds if k in refs]
    if not ids:
        raise ValueError("no predicted caption has references")
    java = java_available() if use_java is None else use_java
    notes: list[str] = []
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in ids})
            res = tok.tokenize({k: [{"caption": preds[k]}] for k in ids})
        tokenizer = "ptb"
    else:
        gts = py_tokenize({k: refs[k] for k in ids})
        res = py_tokenize({k: [preds[k]] for k in ids})
        tokenizer = "python"
        if "meteor" in metrics:
            notes.append("METEOR left out: it needs Java, which is not installed; BLEU/ROUGE-L/CIDEr use a Python tokenizer")
    # An empty prediction would crash some scorers; score it as a single unknown token.
    res = {k: [v[0] if v and v[0].strip() else "<empty>"] for k, v in res.items()}
    out: dict[str, float] = {}
    per: dict[str, dict[str, float]] = {k: {} for k in ids} if per_image else {}
    with contextlib.redirect_stdout(io.StringIO()):
        if "bleu" in metrics:
            s, ss = Bleu(4).compute_score(gts, res)
            out.update({f"BLEU-{i + 1}": float(v) for i, v in enumerate(s)})
            if per_image:
                for k, v in zip(gts.keys(), ss[3]):
                    per[k]["BLEU-4"] = float(v)
        if "meteor" in metrics and java:
            from pycocoevalcap.meteor.meteor import Meteor

            m = Meteor()
            try:
                out["METEOR"] = float(m.compute_score(gts, res)[0])
            finally:
                with contextlib.suppress(Exception):
                    m.close()
        if "rouge" in metrics:
            out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in metrics:
            s, ss = Cider().compute_score(gts, res)
            out["CIDEr"] = float(s)
            if per_image:
                for k, v in zip(gts.keys(), ss):
                    per[k]["CIDEr"] = float(v)
    return Scores(out, tokenizer, notes, per)


# --- CIDEr-D in pure Python, for rewards and single photos ---------------------------------

Ngram = tuple[str, ...]


def _ngram_counts(words: Sequence[str], n: int = 4) -> dict[Ngram, int]:
    counts: dict[Ngram, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) exactly as pycocoevalcap computes it, with the document
    frequencies of a fixed reference corpus (the training captions) computed once, and every
    reference's tf-idf vector cached, so scoring a candidate costs a few dict lookups.

    pycocoevalcap's quirks are kept: the length penalty uses the number of *bigrams*, and the
    log corpus size is the number of images.

    Args:
        refs: image id -> its tokenised reference captions (lists of words).
    """

    def __init__(self, refs: dict[str, list[list[str]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        df: dict[Ngram, int] = defaultdict(int)
        counts = {k: [_ngram_counts(r, n) for r in rs] for k, rs in refs.items()}
        for cs in counts.values():
            for g in {g for c in cs for g in c}:
                df[g] += 1
        self.log_df = {g: math.log(max(1.0, v)) for g, v in df.items()}
        self.ref_len = math.log(float(len(refs)))
        self.refs = {k: [self._vec(c) for c in cs] for k, cs in counts.items()}

    def _vec(self, counts: dict[Ngram, int]):
        vec: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v = tf * (self.ref_len - self.log_df.get(g, 0.0))
            vec[k][g] = v
            norm[k] += v * v
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: str, words: Sequence[str]) -> float:
        """CIDEr-D of one candidate (list of words) against ``image``'s references."""
        return self._score(words, self.refs[image])

    def score_refs(self, words: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        """CIDEr-D of one candidate against references outside the corpus (lists of words), with
        the corpus's document frequencies: one photo's score then means what it means in a corpus
        evaluation, instead of collapsing to zero idf."""
        return self._score(words, [self._vec(_ngram_counts(r, self.n)) for r in refs])

    def _score(self, words: Sequence[str], refs: list) -> float:
        vh, nh, lh = self._vec(_ngram_counts(words, self.n))
        total = 0.0
        for vr, nr, lr in refs:
            pen = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                r = vr[k]
                val = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total += val * pen
        return total / self.n / max(len(refs), 1) * 10.0
