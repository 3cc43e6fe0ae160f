"""Timing of the explain package: each attribution method per word and per caption, feature
visualisation, and deletion/insertion. Prints a markdown table with machine information.

    OMP_NUM_THREADS=1 python bench/bench_explain.py --threads 1 [--model DIR] [--quick]

Without a trained bundle the decoder is a randomly initialised show_attend_tell of the real
size (512-d embedding / LSTM / attention, 2.5k-word vocabulary): timings depend on the
architecture, not on the weights. Per-word numbers are the median of ``--repeats`` runs;
"caption" is measured for Grad-CAM (one batched pass over all words) and attention, and is
per-word x words for the others (marked "est.") unless ``--full``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine_info(threads: int) -> str:
    import captum
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"CPU: {cpu}; {os.cpu_count()} cores; torch threads: {threads}; load average: {load}; "
            f"torch {torch.__version__}, captum {captum.__version__}, Python {platform.python_version()}")


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU seconds of ``repeats`` calls. CPU time is shown too
    because a busy machine (another job on the cores) inflates wall time, not CPU time."""
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), statistics.median(cs)


def load_captioner(model: str | None):
    import torch

    from captioning.api import Captioner
    from captioning.bundle import DEFAULT_MODEL
    from captioning.decoders import build_decoder
    from captioning.encoders import build_encoder
    from captioning.vocab import Vocab

    for cand in [model, DEFAULT_MODEL]:
        if cand and Path(cand).is_dir() and (Path(cand) / "model.safetensors").is_file():
            return Captioner.from_pretrained(cand), str(cand)
    torch.manual_seed(0)
    vocab = Vocab([f"w{i}" for i in range(2536)])
    dec = build_decoder("show_attend_tell", {"vocab_size": len(vocab)}).eval()
    return Captioner(build_encoder("efficientnet-lite0"), dec, vocab), "random show_attend_tell (512-d, 2540 words)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--image", default=None, help="image file (default: a Flickr8k image, else synthetic)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--words", type=int, default=12, help="caption length used with an untrained model")
    ap.add_argument("--quick", action="store_true", help="1 repeat; skip occlusion, gradient_shap and featvis")
    ap.add_argument("--full", action="store_true", help="measure every method over the whole caption")
    a = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(a.threads)
    from explain.attribution import attribute, attribute_caption, available_methods
    from explain.encoder import feature_visualisation
    from explain.faithfulness import deletion_insertion

    cap, model_name = load_captioner(a.model)
    img_path = a.image
    if img_path is None:
        imgs = sorted((ROOT.parent / "shared" / "data" / "flickr8k" / "Images").glob("*.jpg"))
        img_path = str(imgs[0]) if imgs else None
    image = Image.open(img_path).convert("RGB") if img_path else Image.fromarray(
        (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8))
    pixels = cap.pixels([image])[0]
    res = cap.caption(image)[0]
    tokens = res.tokens if "random" not in model_name else list(range(10, 10 + a.words))
    T = len(tokens) + 1  # words + <end>
    t_mid = len(tokens) // 2
    repeats = 1 if a.quick else a.repeats

    methods = available_methods(cap)
    if a.quick:
        methods = [m for m in methods if m not in ("occlusion", "gradient_shap")]
    rows = []
    attribute(cap, pixels, tokens, t_mid, "grad_cam")  # warm-up (imports, allocator)
    for m in methods:
        per_word = median_time(lambda: attribute(cap, pixels, tokens, t_mid, m), repeats)
        if m in ("grad_cam", "attention"):
            caption = median_time(lambda: attribute_caption(cap, pixels, tokens, m), repeats)
            note = "measured, one batched pass"
        elif a.full:
            caption = median_time(lambda: attribute_caption(cap, pixels, tokens, m), 1)
            note = "measured"
        else:
            caption = (per_word[0] * T, per_word[1] * T)
            note = "est. per-word x words"
        rows.append((m, per_word, caption, note))

    extra = []
    sal = attribute(cap, pixels, tokens, t_mid, "grad_cam").map
    extra.append(("deletion + insertion + random (25 points each, 1 word)",
                  median_time(lambda: deletion_insertion(cap, pixels, tokens, t_mid, sal), repeats)))
    if not a.quick:
        for layer in ("stage3.block4", "stage6.block11", "head"):
            c0 = time.process_time()
            fv = feature_visualisation(cap.encoder, layer, 0, use_cache=False)
            extra.append((f"feature visualisation, {layer}, 128 px, 128 steps", (fv.seconds, time.process_time() - c0)))

    print(f"## explain timings\n\n{machine_info(a.threads)}\n\nmodel: {model_name}; caption: {T - 1} words + <end>; "
          f"median of {repeats} run(s)\n")
    print("| method | per word: wall s | CPU s | whole caption: wall s | CPU s | note |\n|---|---:|---:|---:|---:|---|")
    for m, w, c, note in rows:
        print(f"| {m} | {w[0]:.3f} | {w[1]:.3f} | {c[0]:.3f} | {c[1]:.3f} | {note} |")
    print("\n| task | wall s | CPU s |\n|---|---:|---:|")
    for name, (w, c) in extra:
        print(f"| {name} | {w:.3f} | {c:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
