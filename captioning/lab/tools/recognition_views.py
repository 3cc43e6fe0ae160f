"""Which view of a photo should the ImageNet head read for guidance? (issue 24; dev data only)

    python -m captioning.lab.tools.recognition_views [--coco DIR] [--thresholds 0.4,0.5]
        [--out runs/recognition_views.json]

The decoder reads each photo stretched to a square (its training framing, images.py), and until
2026-12-02 the encoder's ImageNet head read the same stretched view. ImageNet classifiers are
trained on square crops of photos whose aspect was kept, so for a photo that is not square the
head may be better read in that framing. Each view below feeds guided decoding
(captioning/guidance.py, the bundle's threshold and penalties otherwise) on the COCO dev set,
whose photos have many aspects; Flickr8k's copy is all 224 x 224, where every view but the
flipped ones is the stretched photo itself:

  stretch            the whole stretched photo (the encoder pass the decoder reads)
  crop               a true centre crop: the shorter side resized to the input size, the middle
                     square cut out (a second encoder pass)
  +flip              averaged with the same view mirrored (a second encoder pass each)
  grid centre        the central square pooled from the stretched photo's feature grid
                     (recognition.centre_weights; no second pass)
  A + B              the head's probabilities averaged over both views

Per view: how many photos get a constraint, for how many of them at least one of the 5 references
uses a constraint word, and the captions' CIDEr (Python tokenizer) and consensus-word recall.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ... import Captioner
from ...guidance import plan
from ...images import preprocess
from ...recognition import centre_weights, word_evidence
from ...vocab import tokenize
from ..data import load_dataset
from ..evaluate import _stem
from .report import dev_scores, write_and_print
from .tagger_guidance import COCO


def centre_crop(im: Image.Image, cap: Captioner) -> torch.Tensor:
    """(3, S, S): the shorter side resized to S, the middle square cut out, normalised."""
    S, (w, h) = cap.prep.size, im.size
    scale = S / min(w, h)
    im = im.resize((max(S, round(w * scale)), max(S, round(h * scale))), Image.BICUBIC)
    return TF.normalize(TF.to_tensor(TF.center_crop(im, S)), cap.prep.mean, cap.prep.std)


@torch.no_grad()
def view_probabilities(cap: Captioner, ims: list[Image.Image], batch: int = 32):
    """(grid, pooled) of the stretched photos and {view: (N, 1000) head probabilities}."""
    head = lambda p: torch.softmax(cap.encoder.head(p.float()[:, :, None, None]), -1)  # (n, 1000)
    grids, pooled, probs = [], [], {k: [] for k in ("stretch", "stretch flipped", "crop", "crop flipped", "grid centre")}
    for i in range(0, len(ims), batch):
        part = ims[i:i + batch]
        x = torch.stack([preprocess(im, cap.prep) for im in part])  # (n, 3, S, S)
        xc = torch.stack([centre_crop(im, cap) for im in part])
        g, p = cap.encode(x)  # (n, P, C), (n, C)
        side = int(round(g.shape[1] ** 0.5))
        wts = torch.stack([centre_weights(im.size, side) for im in part])  # (n, P)
        probs["stretch"].append(head(p))
        probs["stretch flipped"].append(head(cap.encode(x.flip(-1))[1]))
        probs["crop"].append(head(cap.encode(xc)[1]))
        probs["crop flipped"].append(head(cap.encode(xc.flip(-1))[1]))
        probs["grid centre"].append(head(torch.einsum("np,npc->nc", wts, g.float())))
        grids.append(g)
        pooled.append(p)
    P = {k: torch.cat(v) for k, v in probs.items()}
    views = {
        "stretch (before 2026-12-02)": P["stretch"],
        "crop": P["crop"],
        "stretch + flip": (P["stretch"] + P["stretch flipped"]) / 2,
        "crop + flip": (P["crop"] + P["crop flipped"]) / 2,
        "stretch + crop": (P["stretch"] + P["crop"]) / 2,
        "grid centre": P["grid centre"],
        "stretch + grid centre (shipped)": (P["stretch"] + P["grid centre"]) / 2,
    }
    return torch.cat(grids), torch.cat(pooled), views


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coco", default=str(COCO))
    ap.add_argument("--thresholds", default="0.4,0.5", help="evidence thresholds to try")
    ap.add_argument("--out", default="runs/recognition_views.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cap = Captioner.from_pretrained()
    if not cap.decoding.guide:
        raise SystemExit("the default bundle has guidance off; this compares views under its settings")
    ds = load_dataset(args.coco)
    names = sorted(ds.captions)
    refs = {n: ds.captions[n] for n in names}
    ims = [cap.load(ds.path(n)) for n in names]
    grid, pooled, views = view_probabilities(cap, ims)
    vocab = set(cap.vocab.itos)
    ref_words = {n: [{_stem(t, vocab) for t in tokenize(r)} for r in refs[n]] for n in names}
    rows, t0, real = [], time.time(), cap._guide
    for th in map(float, args.thresholds.split(",")):
        # The head's constraint only: its patched plan below has no tagger for the ``absent`` penalty.
        s = replace(cap.decoding.guide_settings, threshold=th, absent=0.0)
        for view, pr in views.items():
            forced = [[w for w, q in ev.items() if q >= th] for ev in word_evidence(pr.log(), vocab)]
            right = sum(any(_stem(w, vocab) in rw for w in ws for rw in ref_words[n]) for n, ws in zip(names, forced) if ws)
            texts = []
            for lo in range(0, len(names), 32):
                cap._guide = lambda g, p, st, sz=None, lo=lo: plan(pr[lo:lo + len(p)].log(), cap.vocab.itos, st)
                try:
                    texts += [r.text for r in cap.caption_features(grid[lo:lo + 32], pooled[lo:lo + 32], guide=s)]
                finally:
                    cap._guide = real
            rows.append({"threshold": th, "view": view, "photos with a constraint": sum(map(bool, forced)),
                         "a reference uses it": right, **dev_scores(dict(zip(names, texts)), refs, cap.vocab.itos)})
            print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    write_and_print(rows, args.out, ["threshold", "view", "photos with a constraint", "a reference uses it", "CIDEr",
                                     "consensus recall"],
                    lambda r: [f"{r['threshold']:g}", r["view"], r["photos with a constraint"], r["a reference uses it"],
                               f"{r['CIDEr']:.4f}", f"{r['consensus recall']:.4f}"],
                    title=f"COCO set ({len(names)} photos)\n\n")


if __name__ == "__main__":
    main()
