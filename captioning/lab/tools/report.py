"""What the dev-data tools here share: the scores of one variant's captions, and the rows they
write (JSON) and print (a markdown table)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from ...metrics import score_captions
from ..evaluate import consensus_recall, unsupported_rate


def dev_scores(preds: dict[str, str], refs: dict[str, list[str]], vocab_itos: list[str],
               unsupported: bool = False) -> dict[str, float]:
    """CIDEr (Python tokenizer) and consensus-word recall of ``preds`` (and, with ``unsupported``,
    the unsupported-word rate), rounded to 4 places, under the names the tools' rows use."""
    out = {"CIDEr": round(score_captions(preds, refs, use_java=False, metrics=("cider",)).metrics["CIDEr"], 4),
           "consensus recall": round(consensus_recall(preds, refs, vocab_itos)[0], 4)}
    if unsupported:
        out["unsupported"] = round(unsupported_rate(preds, refs, vocab_itos)[0], 4)
    return out


def write_and_print(rows: list[dict], out: str | Path, headers: Sequence[str], cells: Callable[[dict], Sequence],
                    title: str = "") -> None:
    """Write ``rows`` to ``out`` as JSON, then print them as a markdown table: ``headers`` and, per
    row, ``cells(row)`` (already formatted)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\n{title}| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(str(c) for c in cells(r)) + " |")
