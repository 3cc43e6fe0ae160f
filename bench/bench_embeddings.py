"""Neighbourhood quality of every embedding space of every shipped model, as a Markdown table.

    python bench/bench_embeddings.py                      # assets/models/*
    python bench/bench_embeddings.py --model runs/x/best  # any bundle(s)

Category precision@k (judged: among the listed words; all: the whole vocabulary, unlisted
neighbours wrong) on assets/word_categories.json, and Spearman's rho on WordSim-353 and
SimLex-999 over the pairs the vocabulary holds (see explain/wordsim.py). The word2vec space is
there once ``python -m explain embeddings --model DIR`` has trained it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioning.bundle import MODELS_DIR, load_bundle  # noqa: E402
from explain.embeddings import model_spaces  # noqa: E402
from explain.wordsim import category_precision, load_categories, word_similarity  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=None, help="bundle folders (default: every shipped model)")
    ap.add_argument("-k", type=int, nargs="*", default=[1, 5, 10])
    a = ap.parse_args()
    folders = [Path(m) for m in a.model] if a.model else sorted(p for p in MODELS_DIR.iterdir() if p.is_dir())
    cats = load_categories()
    head = ["model", "space"] + [f"P@{k} judged" for k in a.k] + [f"P@{k} all" for k in a.k]
    head += ["chance@5 judged", "WS-353 ρ (pairs)", "SimLex-999 ρ (pairs)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in folders:
        dec, vocab, _ = load_bundle(f)
        for name, sp in model_spaces(dec, vocab, f).items():
            scores = {k: category_precision(sp, cats, k) for k in set(a.k) | {5}}
            sims = []
            for b in ("wordsim353", "simlex999"):
                rho, n = word_similarity(sp, b)
                sims.append(f"{rho:.3f} ({n})" if rho is not None else f"– ({n})")
            row = [f.name, name] + [f"{scores[k].judged:.3f}" for k in a.k] + [f"{scores[k].all:.3f}" for k in a.k]
            row += [f"{scores[5].judged_chance:.3f}"] + sims
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
