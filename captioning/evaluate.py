"""Evaluation on a split with the standard COCO caption metrics, and how well each metric
agrees with people (Kendall's tau against Flickr8k's expert judgements)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from .api import Captioner
from .bundle import DEFAULT_MODEL
from .data import load_dataset, resolve_data_dir
from .features import FeatureCache, find_cache
from .metrics import score_captions


def evaluate(model: str | Path | list | None = None, data: str | Path | None = None, split: str = "test",
             beam_size: int = 3, limit: int = 0, features: str | Path | None = None,
             length_penalty: Optional[float] = None,
             out: str | Path | None = None, batch_size: int = 64, use_java: Optional[bool] = None,
             progress: bool = True) -> dict:
    """Caption every image of ``split`` with beam search and score against the references.

    Uses the feature cache when one matches the model's encoder and preprocessing (same
    numbers, no encoder pass); otherwise runs the encoder. Writes ``metrics.json`` (or
    ``metrics_<split>.json`` for other splits) and ``captions_<split>.json`` to ``out``
    (default: the model folder). A list of model folders is evaluated as one ensemble.

    Returns:
        {"metrics": {...}, "notes": [...], "tokenizer": ..., "split", "n_images", "beam_size", "seconds"}
    """
    t0 = time.time()
    models = [Path(m) for m in model] if isinstance(model, (list, tuple)) else [Path(model) if model else DEFAULT_MODEL]
    if len(models) > 1 and out is None:
        raise ValueError("an ensemble's results need --out DIR")
    model = models[0]
    cap = Captioner.from_pretrained(models)
    if length_penalty is None:
        length_penalty = cap.default_length_penalty
    ds = load_dataset(data)
    images = ds.split(split)
    if limit:
        images = images[:limit]
    cache = None
    if features is not None:
        folder = find_cache(features, cap.config["encoder"]["name"], cap.prep, sorted(ds.captions))
        try:
            cache = FeatureCache.open(folder)
        except (FileNotFoundError, RuntimeError):
            cache = None
    index = cache.index() if cache else None
    preds: dict[str, str] = {}
    for i in tqdm(range(0, len(images), batch_size), desc=f"captioning {split}", disable=not progress, unit="batch"):
        names = images[i:i + batch_size]
        if cache is not None:
            grid, pooled = cache.batch(np.asarray([index[n] for n in names]))
        else:
            grid, pooled = cap.encode(cap.pixels([ds.path(n) for n in names]))
        for n, r in zip(names, cap.caption_features(grid, pooled, beam_size=beam_size, length_penalty=length_penalty)):
            preds[n] = r.text
    s = score_captions(preds, {n: ds.captions[n] for n in images}, use_java=use_java, per_image=True)
    res = {"model": [str(m) for m in models] if len(models) > 1 else str(model), "split": split, "n_images": len(images), "beam_size": beam_size,
           "length_penalty": length_penalty, "metrics": {k: round(v, 4) for k, v in s.metrics.items()},
           "tokenizer": s.tokenizer, "notes": s.notes, "features_from_cache": cache is not None,
           "seconds": round(time.time() - t0, 1)}
    outdir = Path(out) if out else model
    outdir.mkdir(parents=True, exist_ok=True)
    name = "metrics.json" if split == "test" and not limit else f"metrics_{split}{'_' + str(limit) if limit else ''}.json"
    (outdir / name).write_text(json.dumps(res, indent=2))
    (outdir / f"captions_{split}.json").write_text(json.dumps(
        [{"image": n, "caption": preds[n], **{k: round(v, 4) for k, v in s.per_image.get(n, {}).items()}}
         for n in images], indent=1))
    return res


def human_agreement(data: str | Path | None = None, use_java: Optional[bool] = None) -> dict:
    """Kendall's tau-b between each metric and the mean expert score (1-4) of Flickr8k's
    ``ExpertAnnotations.txt`` (Hodosh et al. 2013): each judged caption is scored against the
    image's own reference captions, leaving out the judged caption itself."""
    from scipy.stats import kendalltau

    root = resolve_data_dir(data)
    ds = load_dataset(root)
    by_id: dict[str, str] = {}
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        k, _, text = line.partition("\t")
        by_id[k.strip()] = text.strip()
    preds, refs, human = {}, {}, []
    for i, line in enumerate((root / "ExpertAnnotations.txt").read_text().splitlines()):
        parts = line.split("\t")
        if len(parts) < 5 or parts[0] not in ds.captions or parts[1] not in by_id:
            continue
        cand = by_id[parts[1]]
        rs = [c for c in ds.captions[parts[0]] if c.strip() != cand]
        key = f"pair{i}"
        preds[key], refs[key] = cand, rs
        human.append(float(np.mean([float(x) for x in parts[2:5]])))
    s = score_captions(preds, refs, use_java=use_java, per_image=True,
                       metrics=("bleu", "cider"))
    per = {"BLEU-4": [s.per_image[k]["BLEU-4"] for k in preds], "CIDEr": [s.per_image[k]["CIDEr"] for k in preds]}
    per.update(_per_pair_scores(preds, refs, s.tokenizer == "ptb"))
    taus = {}
    for name, vals in per.items():
        tau, p = kendalltau(vals, human)
        taus[name] = {"tau": round(float(tau), 4), "p": float(p)}
    return {"pairs": len(human), "tokenizer": s.tokenizer, "kendall_tau": taus}


def _per_pair_scores(preds: dict, refs: dict, java: bool) -> dict[str, list[float]]:
    """Per-pair ROUGE-L, BLEU-1 and (with Java) METEOR."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    from .metrics import py_tokenize

    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()):
            gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs[k]] for k in preds})
            res = PTBTokenizer().tokenize({k: [{"caption": preds[k]}] for k in preds})
    else:
        gts, res = py_tokenize(refs), py_tokenize({k: [v] for k, v in preds.items()})
    out: dict[str, list[float]] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        out["BLEU-1"] = list(map(float, Bleu(4).compute_score(gts, res)[1][0]))
        out["ROUGE-L"] = list(map(float, Rouge().compute_score(gts, res)[1]))
        if java:
            from pycocoevalcap.meteor.meteor import Meteor

            out["METEOR"] = list(map(float, Meteor().compute_score(gts, res)[1]))
    return out
