"""Does the concept tagger help guided decoding? (issue 23, item 8; measured on dev data only)

    python -m captioning.lab.tools.tagger_guidance [--flickr8k DIR] [--coco DIR] [--limit N]
        [--out runs/tagger_guidance.json]

Guided decoding (captioning/guidance.py, Anderson et al. 2017) forces one disjunctive
constraint per photo: the words the encoder's ImageNet head names with evidence >= 0.4. The
tagger (captioning/tagger.py) gives a second source of such words, in the caption vocabulary
already and trained on Flickr8k's own captions. Each variant below decodes Flickr8k dev and the
COCO dev set with the shipped default's settings (beam, length penalty, re-ranking) and only the
constraint changed:

  off            no constraint
  imagenet       the shipped guidance (head evidence >= threshold, conflict penalty)
  tagger@T       the tagger's most probable concept, when its probability >= T, in any of its
                 word forms the vocabulary holds ("dog" or "dogs")
  both@T         imagenet's words, or else tagger@T's for a photo the head is not sure of
  missing@T      the most probable concept with probability >= T that the unguided caption does
                 not name (the tagger's "the caption left this out", made a constraint)

Scores: CIDEr (Python tokenizer, pycocoevalcap) and consensus-word recall
(captioning.lab.evaluate). Prints a markdown table and writes the numbers as JSON.
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
from ...paths import REPO_ROOT
from ...tagger import Tagger
from ..data import default_data_dir, load_dataset
from .report import dev_scores, write_and_print

COCO = REPO_ROOT.parent / "shared" / "data" / "coco-ood"


def encode_set(cap: Captioner, root: Path, split: str, limit: int, batch: int = 32):
    """(names, refs, grid (N, P, C) fp16, pooled (N, C), each photo's (width, height)) for a split
    of a dataset folder."""
    ds = load_dataset(str(root))
    names = ds.split(split) if ds.splits.get(split) else sorted(ds.captions)  # no splits: every photo
    names = names[:limit] if limit else names
    grids, pooled, sizes = [], [], []
    for i in range(0, len(names), batch):
        g, p, sz = cap.encode_images([ds.path(n) for n in names[i:i + batch]])
        grids.append(g.half())
        pooled.append(p)
        sizes += sz
    return names, {n: ds.captions[n] for n in names}, torch.cat(grids), torch.cat(pooled), sizes


def tagger_words(tagger: Tagger, probs: torch.Tensor, itos: list[str], threshold: float) -> list[list[str]]:
    """Per photo: the word forms (in the caption vocabulary) of its most probable concept, if that
    concept's probability reaches ``threshold``; else []."""
    forms = tagger.concepts.vocab_forms(itos)
    top = [int(row.argmax()) for row in probs]
    return [forms.get(k, []) if float(row[k]) >= threshold else [] for row, k in zip(probs, top)]


def missing_words(tagger: Tagger, probs: torch.Tensor, itos: list[str], threshold: float,
                  captions: list[str]) -> list[list[str]]:
    """Per photo: the word forms of the most probable concept with probability >= ``threshold``
    that the photo's unguided caption does not name; else []."""
    forms = tagger.concepts.vocab_forms(itos)
    out = []
    for row, text in zip(probs, captions):
        named = tagger.concepts.mentioned(text)
        sure = [k for k in torch.argsort(row, descending=True).tolist() if float(row[k]) >= threshold]
        out.append(next((forms[k] for k in sure if k not in named and k in forms), []))
    return out


def guide_from_words(words: list[list[str]], itos: list[str]) -> Guide:
    """A Guide whose row b forces one of ``words[b]`` (an empty list leaves photo b free)."""
    stoi = {w: i for i, w in enumerate(itos)}
    mask = torch.zeros(len(words), len(itos), dtype=torch.bool)
    for b, ws in enumerate(words):
        mask[b, [stoi[w] for w in ws]] = True
    return Guide(mask)


def decode(cap: Captioner, grid, pooled, sizes, words_for=None, guide=None, batch: int = 32) -> list[str]:
    """Captions with the bundle's decoding and ``guide`` (caption_features': None, False or
    GuideSettings); ``words_for(lo, hi, imagenet_words)`` -> constraint words per photo of the
    batch replaces the ImageNet plan (None: the plan ``guide`` makes)."""
    texts = []
    real = cap._guide
    for lo in range(0, len(pooled), batch):
        hi = min(lo + batch, len(pooled))
        if words_for is not None:
            def patched(gr, p, settings, sz=None, lo=lo, hi=hi):
                g, chosen = real(gr, p, settings, sz)
                ws = words_for(lo, hi, chosen)
                # The ImageNet plan's penalties apply only to photos whose constraint came from it.
                pen = None
                if g is not None and g.penalty is not None:
                    pen = g.penalty.clone()
                    for b, (w, c) in enumerate(zip(ws, chosen)):
                        if w != c:
                            pen[b] = 0
                return Guide(guide_from_words(ws, cap.vocab.itos).words, pen), ws
            cap._guide = patched
        try:
            res = cap.caption_features(grid[lo:hi].float(), pooled[lo:hi], guide=guide, image_sizes=sizes[lo:hi])
        finally:
            cap._guide = real
        texts += [r.text for r in res]
    return texts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flickr8k", default=None, help="Flickr8k folder (default: ../shared/data/flickr8k)")
    ap.add_argument("--coco", default=str(COCO))
    ap.add_argument("--limit", type=int, default=0, help="first N photos of each set (0: all)")
    ap.add_argument("--thresholds", default="0.5,0.7,0.9", help="tagger probabilities to try")
    ap.add_argument("--out", default="runs/tagger_guidance.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cap = Captioner.from_pretrained()
    if not cap.decoding.guide:
        raise SystemExit("the default bundle has guidance off; this compares against its settings")
    tagger = Tagger.from_pretrained(encoder=cap.encoder)
    sets = {"Flickr8k dev": (Path(args.flickr8k or default_data_dir()), "dev"), "COCO dev set": (Path(args.coco), "test")}
    rows, t0 = [], time.time()
    for set_name, (root, split) in sets.items():
        names, refs, grid, pooled, sizes = encode_set(cap, root, split, args.limit)
        probs = torch.as_tensor(tagger.probabilities("image", grid.float()))
        off = decode(cap, grid, pooled, sizes, guide=False)
        # The constraint sources are compared without the tagger's ``absent`` penalty, as measured.
        base = replace(cap.decoding.guide_settings, absent=0.0)
        variants = {"off": None, "imagenet": None}
        for t in map(float, args.thresholds.split(",")):
            tw = tagger_words(tagger, probs, cap.vocab.itos, t)
            mw = missing_words(tagger, probs, cap.vocab.itos, t, off)
            variants[f"tagger@{t:g}"] = lambda lo, hi, chosen, tw=tw: tw[lo:hi]
            variants[f"both@{t:g}"] = lambda lo, hi, chosen, tw=tw: [c or w for c, w in zip(chosen, tw[lo:hi])]
            variants[f"missing@{t:g}"] = lambda lo, hi, chosen, mw=mw: mw[lo:hi]
        for v, fn in variants.items():
            texts = off if v == "off" else decode(cap, grid, pooled, sizes, fn, guide=base)
            changed = sum(a != b for a, b in zip(texts, off))
            rows.append({"set": set_name, "photos": len(names), "variant": v,
                         **dev_scores(dict(zip(names, texts)), refs, cap.vocab.itos), "captions changed": changed})
            print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    write_and_print(rows, args.out, ["set", "variant", "CIDEr", "consensus recall", "captions changed"],
                    lambda r: [f"{r['set']} ({r['photos']})", r["variant"], f"{r['CIDEr']:.4f}",
                               f"{r['consensus recall']:.4f}", r["captions changed"]])


if __name__ == "__main__":
    main()
