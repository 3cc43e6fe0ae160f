"""Is B better than A on the same photos? A paired bootstrap over two ``evaluate`` runs.

    python -m captioning.lab.tools.paired_bootstrap A/captions_all.json B/captions_all.json
        [--metrics CIDEr,consensus_recall] [--resamples 2000] [--seed 0]

``evaluate`` writes each photo's caption with its own scores (``captions_<split>.json``; CIDEr-D
per photo averages to the corpus CIDEr-D). For each metric, the photos both runs scored are
resampled with replacement, and the mean of B - A is taken per resample. Printed: the number of
photos, both means, the difference, its 95% percentile interval, and the share of resamples in
which B came out ahead (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """{photo: {metric: score}} from an evaluate ``captions_<split>.json``; one-line errors."""
    try:
        rows = json.loads(Path(path).read_text())
        return {str(r["image"]): {k: float(v) for k, v in r.items() if k not in ("image", "caption")} for r in rows}
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file (python -m captioning evaluate writes captions_<split>.json)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not an evaluate captions file ({type(e).__name__}: {e})") from None


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired scores (N,) of two systems -> mean difference b - a, its 95% interval and P(b ahead)."""
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two equal-length 1-d score arrays, got {a.shape} and {b.shape}")
    d = b - a  # (N,)
    idx = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))  # (R, N)
    means = d[idx].mean(1)  # (R,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"n": len(d), "a": float(a.mean()), "b": float(b.mean()), "difference": float(d.mean()),
            "ci95": (float(lo), float(hi)), "b_ahead": float((means > 0).mean())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metrics", default="CIDEr,consensus_recall")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    A, B = load_scores(args.a), load_scores(args.b)
    print("| metric | photos | A | B | B - A | 95% interval | B ahead in |\n|---|---|---|---|---|---|---|")
    for m in args.metrics.split(","):
        keys = sorted(k for k in A.keys() & B.keys() if m in A[k] and m in B[k])
        if not keys:
            raise SystemExit(f"no photo has {m!r} in both files")
        r = paired_bootstrap(np.array([A[k][m] for k in keys]), np.array([B[k][m] for k in keys]),
                             args.resamples, args.seed)
        print(f"| {m} | {r['n']} | {r['a']:.4f} | {r['b']:.4f} | {r['difference']:+.4f} | "
              f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['b_ahead']:.1%} |")


if __name__ == "__main__":
    main()
