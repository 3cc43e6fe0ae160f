"""Captioning speed on this machine: latency at batch 1, throughput at batch 64, each as a
ratio to encoder-only time, and batched beam search vs the per-image reference.

    python bench/bench_caption.py [--model DIR] [--runs 9]

Prints a markdown table (the README's). Medians over ``--runs`` repetitions after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from captioning import Captioner  # noqa: E402
from captioning.lab.data import default_data_dir, load_dataset  # noqa: E402
from captioning.samples import load_sample, sample_names  # noqa: E402
from reference_beam import reference_beam_search  # noqa: E402


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
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    cap = Captioner.from_pretrained(a.model)
    data = default_data_dir()
    if data:
        ds = load_dataset(data)
        images = [cap.load(ds.path(n)) for n in ds.split("test")[: a.batch]]
    else:
        images = [load_sample(n) for n in sample_names()]
        images = (images * (a.batch // len(images) + 1))[: a.batch]
    one = images[:1]
    _px1, px64 = cap.pixels(one), cap.pixels(images)
    settings = {"greedy": dict(method="greedy"), "beam 3": dict(beam_size=3, rerank=0), "beam 5": dict(beam_size=5, rerank=0)}
    if cap.default_rerank:
        settings["beam 3, re-ranked (the default)"] = dict(beam_size=3)

    enc1 = median_time(lambda: cap.encode(cap.pixels(one)), a.runs)
    enc64 = median_time(lambda: cap.encode(cap.pixels(images)), max(3, a.runs // 3))
    rows = []
    for name, kw in settings.items():
        lat = median_time(lambda: cap.caption(one, **kw), a.runs)
        thr = median_time(lambda: cap.caption(images, **kw), max(3, a.runs // 3))
        rows.append((name, lat, lat / enc1, len(images) / thr, thr / enc64))

    grid, pooled = cap.encode(px64)
    batched = median_time(lambda: cap.caption_features(grid, pooled, beam_size=3, rerank=0), 3)

    def per_image():
        for i in range(grid.size(0)):
            reference_beam_search(cap.decoder, grid[i:i + 1], pooled[i:i + 1], 3)

    ref = median_time(per_image, 1)

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {cap.config['decoder']['type']}; "
          f"{len(images)} {'Flickr8k test' if data else 'sample'} photos; medians of {a.runs} runs\n")
    print(f"| decoding | latency p50, batch 1 | ÷ encoder-only | throughput, batch {len(images)} | ÷ encoder-only |")
    print("|---|---|---|---|---|")
    print(f"| encoder only | {enc1 * 1000:.0f} ms | 1.00 | {len(images) / enc64:.1f} img/s | 1.00 |")
    for name, lat, r1, thr, r64 in rows:
        print(f"| {name} | {lat * 1000:.0f} ms | {r1:.2f} | {thr:.1f} img/s | {r64:.2f} |")
    print(f"\nBeam 3 decoding of {len(images)} images (encoder output given): batched {batched:.2f} s, "
          f"per-image reference {ref:.2f} s, speed-up {ref / batched:.1f}x")


if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    main()
