"""What the concept tagger adds to a caption: the tagger reads the encoder output the captioner
already computed, so tags beside a caption cost only the tagger's own networks.

    python bench/bench_tagger.py [--model DIR] [--tagger DIR] [--runs 7] [--batch 64]

For batch 1 and batch 64 (photos from disk to results, the default decoding) it times the
caption alone, caption + tags from one encoder pass (``captioning.tagger.caption_and_tag``), and
the tagger alone on the encoder output; medians over ``--runs`` repetitions after a warm-up
(the first two interleaved, so that other processes' load falls on both alike).
Prints a markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from captioning import Captioner  # noqa: E402
from captioning.lab.data import default_data_dir, load_dataset  # noqa: E402
from captioning.samples import load_sample, sample_names  # noqa: E402
from captioning.tagger import Tagger, caption_and_tag  # noqa: E402


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tagger", default=None)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    cap = Captioner.from_pretrained(a.model)
    tagger = Tagger.from_pretrained(a.tagger, encoder=cap.encoder)
    data = default_data_dir()
    if data:
        ds = load_dataset(data)
        images = [cap.load(ds.path(n)) for n in ds.split("test")[: a.batch]]
    else:
        images = [load_sample(n) for n in sample_names()]
        images = (images * (a.batch // len(images) + 1))[: a.batch]
    rows, out = [], {}
    for b in (1, a.batch):
        ims = images[:b]
        runs = a.runs if b == 1 else max(3, a.runs // 2)
        # interleaved, so that load from other processes falls on both alike
        fa, fb = (lambda: cap.caption(ims, batch_size=b)), (lambda: caption_and_tag(cap, tagger, ims))
        fa(), fb()
        ta, tb = [], []
        for _ in range(runs):
            for f, ts in ((fa, ta), (fb, tb)):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
        alone, both = statistics.median(ta), statistics.median(tb)
        grid, pooled = cap.encode(cap.pixels(ims))
        tags = median_time(lambda: tagger.tag_features(grid, pooled, captions=["a dog runs"] * b), runs)
        out[f"batch{b}"] = {"caption_s": alone, "caption_and_tags_s": both, "tags_on_features_s": tags,
                            "ratio": both / alone, "tagger_share": tags / alone}
        rows.append(f"| {b} | {alone * 1000:.0f} ms | {both * 1000:.0f} ms | {both / alone:.3f} | {tags * 1000:.1f} ms "
                    f"({100 * tags / alone:.1f}% of the caption) |")
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"networks: {', '.join(tagger.networks)}")
    print("| batch | caption alone | caption + tags (one encoder pass) | ratio | tagger alone on the features |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
