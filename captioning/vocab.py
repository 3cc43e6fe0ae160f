"""Tokenizer and vocabulary: lower-case, punctuation split off, min-count threshold."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Words keep inner apostrophes and hyphens ("don't", "t-shirt"); every other
# punctuation mark becomes a token of its own.
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """'A dog, running.' -> ['a', 'dog', ',', 'running', '.']"""
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Inverse of tokenize up to spacing: punctuation attaches to the word before it."""
    out = ""
    for t in tokens:
        if out and not (len(t) == 1 and not t.isalnum() and t not in "(\"'"):
            out += " "
        out += t
    return out


class Vocab:
    """Word <-> id map with the four specials at ids 0..3."""

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")

    pad, start, end, unk = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, drop_punct: bool = True) -> "Vocab":
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for c in captions for t in tokenize(c) if not (drop_punct and _is_punct(t)))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def encode(self, text: str, add_special: bool = True, drop_punct: bool = True) -> list[int]:
        ids = [self.stoi.get(t, self.unk) for t in tokenize(text) if not (drop_punct and _is_punct(t))]
        return [self.start, *ids, self.end] if add_special else ids

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at <end> and dropping <start>/<pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            out.append(self.itos[i])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return detokenize(self.decode_tokens(ids))

    def to_json(self) -> dict:
        return {"itos": self.itos}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def from_json(cls, d: object) -> "Vocab":
        """Inverse of to_json. Raises ValueError (one line) for anything but {"itos": [the four
        specials, then distinct non-empty strings]}: the file may come from anyone."""
        if not isinstance(d, dict) or not isinstance(d.get("itos"), list):
            raise ValueError('expected an object with an "itos" list of words')
        itos = d["itos"]
        if itos[:4] != list(SPECIALS):
            raise ValueError(f"vocabulary does not start with {SPECIALS}")
        bad = next((w for w in itos if not isinstance(w, str) or not w or w != w.strip()), None)
        if bad is not None or any(isinstance(w, str) and w in SPECIALS for w in itos[4:]):
            raise ValueError(f"every word must be a distinct non-empty string without surrounding "
                             f"spaces, got {bad!r:.40}")
        return cls(itos[4:])

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _is_punct(t: str) -> bool:
    return len(t) == 1 and not t.isalnum()
