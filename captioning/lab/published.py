"""Published Flickr8k test results that our models are compared with, kept in one place: the
app's results table and the model cards both read them. Fractions (papers report x100); only
numbers printed in the papers."""
from __future__ import annotations

from typing import Any

XU = "Xu et al. 2015, ICML, arXiv:1502.03044, Table 1 (Flickr8k)"

PUBLISHED: list[dict[str, Any]] = [
    {"model": "Show, Attend and Tell, soft attention", "BLEU-1": 0.67, "BLEU-2": 0.448, "BLEU-3": 0.299,
     "BLEU-4": 0.195, "METEOR": 0.1893, "source": XU, "decoder": "show_attend_tell"},
    {"model": "Show, Attend and Tell, hard attention", "BLEU-1": 0.67, "BLEU-2": 0.457, "BLEU-3": 0.314,
     "BLEU-4": 0.213, "METEOR": 0.2030, "source": XU, "decoder": "show_attend_tell"},
    {"model": "Show and Tell (NIC)", "BLEU-1": 0.63,
     "source": "Vinyals et al. 2015, CVPR, arXiv:1411.4555, Table 2 (Flickr8k reports BLEU-1 only)",
     "decoder": "show_tell"},
]

# Xu et al.'s Table 1 also lists Google NIC on Flickr8k, from their own run of it.
_NIC_BY_XU = {"BLEU-1": 0.63, "BLEU-2": 0.41, "BLEU-3": 0.27}


def _row(model: str) -> dict[str, Any]:
    return next(r for r in PUBLISHED if r["model"] == model)


def card_reference(kind: str) -> str:
    """The model card's one-line published reference for a decoder kind ("n/a" if none)."""
    if kind == "show_attend_tell":
        soft, hard = _row("Show, Attend and Tell, soft attention"), _row("Show, Attend and Tell, hard attention")
        return (f"Xu et al. 2015 (Show, Attend and Tell), Flickr8k, Table 1: soft attention BLEU-4 {soft['BLEU-4']:.3f}, "
                f"METEOR {soft['METEOR']:.3f}; hard attention BLEU-4 {hard['BLEU-4']:.3f}, METEOR {hard['METEOR']:.3f}.")
    if kind == "show_tell":
        nic = _row("Show and Tell (NIC)")
        return (f"Vinyals et al. 2015 (Show and Tell) report BLEU-1 {nic['BLEU-1']:.2f} on Flickr8k; Xu et al. 2015, "
                f"Table 1, list Google NIC on Flickr8k as BLEU-1/2/3 "
                f"{'/'.join(f'{v:.2f}' for v in _NIC_BY_XU.values())} (no BLEU-4 given).")
    if kind == "merge":
        return ("Tanti et al. 2018 compare inject and merge on Flickr8k/30k/MSCOCO with their own settings; "
                "their absolute numbers are not comparable one-to-one (different encoder and vocabulary).")
    return "n/a"
