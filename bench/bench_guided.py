"""What guided decoding costs (guidance.py; Anderson et al. 2017, "Guided Open Vocabulary Image
Captioning with Constrained Beam Search"): beam 3 at batch 64 with guidance vs without, the
bundle's other decoding settings (length penalty, matcher re-ranking) the same both ways.

    python bench/bench_guided.py [--model DIR] [--runs 5] [--split dev] [--data FOLDER]

Two timings, medians over ``--runs`` after a warm-up: decoding alone (cached encoder features ->
captions) and the whole caption (encoder + decoding, from normalised pixels). Guided search runs
two banks of beams, but only for the images whose ImageNet head is confident about a word
(the others are searched exactly as without guidance), so its cost depends on the photos:
the share of guided photos is printed, and the worst case (every photo guided) is timed too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from captioning import Captioner  # noqa: E402
from captioning.images import upright_size  # noqa: E402
from captioning.lab.data import load_dataset  # noqa: E402
from captioning.lab.evaluate import _View  # noqa: E402
from captioning.lab.train import DEFAULT_FEATURES  # noqa: E402


def median_times(fns, runs: int) -> list[float]:
    """Median seconds of each function, run in turns (after a warm-up) so that load from other
    processes on a shared machine hits all of them alike."""
    ts: list[list[float]] = [[] for _ in fns]
    for r in range(runs + 1):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if r:
                ts[i].append(time.perf_counter() - t)
    return [statistics.median(x) for x in ts]


# The worst case: a threshold every photo reaches, so every photo is searched with two banks.
EVERY = {"threshold": 0.01}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None, help="default: Flickr8k")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cap = Captioner.from_pretrained(a.model)
    ds = load_dataset(a.data)
    names = ds.split(a.split)[: a.batch]
    grid, pooled = _View(cap, ds, DEFAULT_FEATURES).features(names)
    sizes = [upright_size(ds.path(n)) for n in names]  # the head also reads a photo's central square
    guided_share = sum(bool(r.guided) for r in cap.caption_features(grid, pooled, guide=True, image_sizes=sizes)) / len(names)
    pixels = cap.pixels([ds.path(n) for n in names])
    rows = []
    for what, fn in (
        ("decoding only", lambda g: cap.caption_features(grid, pooled, beam_size=3, guide=g, image_sizes=sizes)),
        ("encoder + decoding", lambda g: cap.caption_features(*cap.encode(pixels), beam_size=3, guide=g, image_sizes=sizes)),
    ):
        off, on, every = median_times([lambda: fn(False), lambda: fn(True), lambda: fn(EVERY)], a.runs)
        rows.append((what, off, on, every))
    print(f"{len(names)} {a.split} photos of {a.data or 'Flickr8k'}, beam 3, batch {len(names)}, "
          f"{torch.get_num_threads()} threads; guided photos: {guided_share:.0%}")
    print("| timing | plain beam 3 | guided (model's settings) | ratio | every photo guided | ratio |\n"
          "|---|---|---|---|---|---|")
    for what, off, on, every in rows:
        print(f"| {what} | {off:.2f} s | {on:.2f} s | {on / off:.2f}x | {every:.2f} s | {every / off:.2f}x |")


if __name__ == "__main__":
    main()
