"""Should guided decoding also penalise what the concept tagger says is absent? (issue 24; dev data only)

    python -m captioning.lab.tools.absent_concepts [--flickr8k DIR] [--coco DIR] [--limit N]
        [--grid "0.02:3,0.05:3"] [--scopes guided,all] [--sets coco,flickr8k] [--out runs/absent_concepts.json]

Guided decoding names what the ImageNet head recognises, but the rest of a caption of a close-up
is still Flickr8k's prior ("a small cat is playing with a ball in the snow"). ImageNet has no
class for snow, a child or a ball in a cat photo, so the head cannot rule them out; the concept
tagger (captioning/tagger.py, trained on Flickr8k's captions) can: it scores each of its concepts
for presence. Each variant is guidance's ``absent`` penalty (captioning/guidance.py): a
log-probability penalty ``strength`` on every vocabulary form of each concept whose tagger
probability is below ``below``, for every photo (``all``, what guidance does) or only for the
photos that have a guidance constraint (``guided``); the constraint's own words are never
penalised. "no absent penalty" is the default bundle's guidance without it; everything else is
the default's decoding ("captions changed" counts against that).

Scores: CIDEr (Python tokenizer), consensus-word recall and the unsupported-word rate (the
share of a caption's content words that none of its references uses; captioning.lab.evaluate).
Prints a markdown table and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ... import Captioner
from ...decoding import Guide
from ..data import default_data_dir
from .report import dev_scores, write_and_print
from .tagger_guidance import COCO, encode_set


def cached_set(cap: Captioner, root: Path, split: str, limit: int, stem: Path):
    """encode_set's output, kept in ``stem``.safetensors/.json: the Flickr8k dev photos take
    minutes to encode, and every run of this tool reads them the same way."""
    from safetensors.torch import load_file, save_file

    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if st.is_file() and js.is_file():
        t, meta = load_file(str(st)), json.loads(js.read_text())
        return meta["names"], meta["refs"], t["grid"], t["pooled"], [tuple(s) for s in meta["sizes"]]
    names, refs, grid, pooled, sizes = encode_set(cap, root, split, limit)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file({"grid": grid.contiguous(), "pooled": pooled.contiguous()}, str(st))
    js.write_text(json.dumps({"names": names, "refs": refs, "sizes": sizes}))
    return names, refs, grid, pooled, sizes


def decode(cap: Captioner, grid, pooled, sizes, guide, guided_only: bool = False, batch: int = 32) -> list[str]:
    """Captions with the bundle's decoding and ``guide`` (False, or GuideSettings); ``guided_only``
    drops the penalties of photos without a constraint (the ``absent`` penalty is the only one
    they can have)."""
    texts, real = [], cap._guide
    if guided_only:
        def patched(gr, p, settings, sz=None):
            g, chosen = real(gr, p, settings, sz)
            if g is not None and g.penalty is not None:
                g = Guide(g.words, g.penalty * g.words.any(1, keepdim=True))
            return g, chosen
        cap._guide = patched
    try:
        for lo in range(0, len(pooled), batch):
            hi = min(lo + batch, len(pooled))
            res = cap.caption_features(grid[lo:hi].float(), pooled[lo:hi], guide=guide, image_sizes=sizes[lo:hi])
            texts += [r.text for r in res]
    finally:
        cap._guide = real
    return texts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flickr8k", default=None, help="Flickr8k folder (default: ../shared/data/flickr8k)")
    ap.add_argument("--coco", default=str(COCO))
    ap.add_argument("--limit", type=int, default=0, help="first N photos of each set (0: all)")
    ap.add_argument("--grid", default="0.02:3,0.02:5,0.03:2,0.03:3,0.05:1,0.05:3,0.1:3",
                    help="below:strength pairs to try")
    ap.add_argument("--scopes", default="guided,all")
    ap.add_argument("--sets", default="coco,flickr8k")
    ap.add_argument("--out", default="runs/absent_concepts.json")
    ap.add_argument("--cache", default="runs/absent_concepts_features", help="where the encoded photos are kept")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cap = Captioner.from_pretrained()
    if not cap.decoding.guide:
        raise SystemExit("the default bundle has guidance off; this compares against its settings")
    if cap.tagger is None:
        raise SystemExit("the default bundle names no concept tagger (config.json 'tagger')")
    known = {"coco": ("COCO dev set", Path(args.coco), "test"),
             "flickr8k": ("Flickr8k dev", Path(args.flickr8k or default_data_dir()), "dev")}
    rows, t0 = [], time.time()
    for key in args.sets.split(","):
        set_name, root, split = known[key]
        names, refs, grid, pooled, sizes = cached_set(cap, root, split, args.limit, Path(args.cache) / f"{key}_{split}_{args.limit}")
        base = replace(cap.decoding.guide_settings, absent=0.0)
        variants = {"off": dict(guide=False), "no absent penalty": dict(guide=base)}
        for pair in args.grid.split(","):
            below, strength = map(float, pair.split(":"))
            for scope in args.scopes.split(","):
                variants[f"absent<{below:g} x{strength:g} ({scope})"] = dict(
                    guide=replace(base, absent=strength, absent_below=below), guided_only=scope == "guided")
        before = None
        for v, kw in variants.items():
            texts = decode(cap, grid, pooled, sizes, **kw)
            before = texts if v == "no absent penalty" else before
            changed = sum(a != b for a, b in zip(texts, before)) if before else 0
            rows.append({"set": set_name, "photos": len(names), "variant": v,
                         **dev_scores(dict(zip(names, texts)), refs, cap.vocab.itos, unsupported=True),
                         "changed": changed})
            print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    write_and_print(rows, args.out, ["set", "variant", "CIDEr", "consensus recall", "unsupported words", "captions changed"],
                    lambda r: [f"{r['set']} ({r['photos']})", r["variant"], f"{r['CIDEr']:.4f}",
                               f"{r['consensus recall']:.4f}", f"{r['unsupported']:.4f}", r["changed"]])


if __name__ == "__main__":
    main()
