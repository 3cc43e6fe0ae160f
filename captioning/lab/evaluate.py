"""Evaluation on a split with the standard COCO caption metrics, how well each metric agrees
with people (Kendall's tau against Flickr8k's expert judgements), and what people themselves
score under those metrics (each reference against the others)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..api import Captioner
from ..bundle import DEFAULT_MODEL, read_config
from ..decode_config import DecodeConfig
from ..decoding import Ensemble
from ..encoders import Encoder, build_encoder
from ..images import upright_size
from ..paths import REPO_ROOT
from .data import load_dataset, resolve_data_dir
from .features import FeatureCache, find_cache
from ..metrics import score_captions


def evaluate(model: str | Path | list | None = None, data: str | Path | None = None, split: str = "test",
             decode: Optional[DecodeConfig] = None, limit: int = 0, features: str | Path | None = None,
             out: str | Path | None = None, batch_size: int = 64, use_java: Optional[bool] = None,
             progress: bool = True, **settings) -> dict:
    """Caption every image of ``split`` with beam search and score against the references.

    Uses the feature cache when one matches the model's encoder and preprocessing (same
    numbers, no encoder pass); otherwise runs the encoder. Writes ``metrics.json`` (or
    ``metrics_<split>.json`` for other splits) and ``captions_<split>.json`` to ``out``
    (default: a folder under runs/evaluate/; a shipped model's own files change only when
    ``out`` names its folder). A list of model folders is evaluated as one ensemble; its
    members may read different encoders or preprocessings (each gets its own features).
    ``split="train"`` with an ensemble makes teacher captions for ``train --extra-captions``.
    ``decode`` (DecodeConfig) and ``settings`` (its fields, e.g. ``beam_size=5``) are
    ``Captioner.caption``'s: the length penalty, re-ranking and guidance the bundle's where
    left None.

    Returns:
        {"metrics": {...}, "notes": [...], "tokenizer": ..., "split", "n_images", "beam_size", "seconds"}
    """
    t0 = time.time()
    models = [Path(m) for m in model] if isinstance(model, (list, tuple)) else [Path(model) if model else DEFAULT_MODEL]
    if len(models) > 1 and out is None:
        raise ValueError("an ensemble's results need --out DIR")
    model = models[0]
    members = load_members(models)
    cap = members[0] if len(members) == 1 else Captioner(
        members[0].encoder, Ensemble([m.decoder for m in members]), members[0].vocab, members[0].prep, members[0].config)
    dc = (decode or DecodeConfig()).replace(**settings)
    dc.check()
    # Resolved once: every batch and the record below use the same numbers.
    dc = dc.replace(**{k: v for k, v in vars(dc.resolve(cap.decoding)).items()
                       if k in ("length_penalty", "rerank", "rerank_pool")})
    ds = load_dataset(data)
    if split == "test" and not ds.splits:  # a folder of photos with captions.json names no splits
        split = "all"
    images = ds.split(split)
    if limit:
        images = images[:limit]
    keys = [_view_key(m) for m in members]
    views: dict[str, _View] = {}
    for k, m in zip(keys, members):
        if k not in views:
            views[k] = _View(m, ds, features)
    preds: dict[str, str] = {}
    for i in tqdm(range(0, len(images), batch_size), desc=f"captioning {split}", disable=not progress, unit="batch"):
        names = images[i:i + batch_size]
        feats = {k: v.features(names) for k, v in views.items()}  # grid (b, P, C), pooled (b, C) each
        if len(views) == 1:
            grid, pooled = feats[keys[0]]
        else:  # members that read different inputs get one grid each (Ensemble.start)
            grid, pooled = [feats[k][0] for k in keys], [feats[k][1] for k in keys]
        sizes = [upright_size(ds.path(n)) for n in names]  # the head also reads a photo's central square
        for n, r in zip(names, cap.caption_features(grid, pooled, dc, image_sizes=sizes)):
            preds[n] = r.text
    s = score_captions(preds, {n: ds.captions[n] for n in images}, use_java=use_java, per_image=True)
    recall, per_recall = consensus_recall(preds, {n: ds.captions[n] for n in images}, cap.vocab.itos)
    s.metrics["consensus_recall"] = recall
    for n, r in per_recall.items():
        s.per_image.setdefault(n, {})["consensus_recall"] = r
    unsup, per_unsup = unsupported_rate(preds, {n: ds.captions[n] for n in images}, cap.vocab.itos)
    s.metrics["unsupported_words"] = unsup
    for n, r in per_unsup.items():
        s.per_image.setdefault(n, {})["unsupported_words"] = r
    res = {"model": [str(m) for m in models] if len(models) > 1 else str(model), "split": split, "n_images": len(images), "beam_size": dc.beam_size,
           "length_penalty": dc.length_penalty, **({"rerank": dc.rerank} if dc.rerank else {}),
           **({"rerank_pool": dc.rerank_pool} if dc.rerank and dc.rerank_pool else {}),
           "guide": (lambda g: g.to_dict() if g else None)(dc.guide_for(cap.decoding)), "metrics": {k: round(v, 4) for k, v in s.metrics.items()},
           "tokenizer": s.tokenizer, "notes": s.notes, "features_from_cache": all(v.cache is not None for v in views.values()),
           "seconds": round(time.time() - t0, 1)}
    outdir = Path(out) if out else _default_out(model, data)
    res["out"] = str(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = "metrics.json" if split == "test" and not limit else f"metrics_{split}{'_' + str(limit) if limit else ''}.json"
    (outdir / name).write_text(json.dumps(res, indent=2))
    (outdir / f"captions_{split}.json").write_text(json.dumps(
        [{"image": n, "caption": preds[n], **{k: round(v, 4) for k, v in s.per_image.get(n, {}).items()}}
         for n in images], indent=1))
    return res


def _default_out(model: Path, data) -> Path:
    """runs/evaluate/MODEL-DATA: scoring a model never overwrites the metrics.json and captions
    shipped in its folder unless ``out`` names that folder (``ship`` does)."""
    label = model.parent.name if model.name == "best" else model.name
    return REPO_ROOT / "runs" / "evaluate" / f"{label}-{resolve_data_dir(data).resolve().stem}"


# Words that carry no content of their own; consensus recall counts the rest.
STOPWORDS = frozenset("""a an the in on of with and or is are was were be been being at to from by for
into onto over under up down out off near through while as his her their its it its this that these
those there here he she they them him who whom which what some one two three four several other another
each all both many few has have had do does while next behind front top side out around""".split())


def _stem(w: str, vocab: set[str]) -> str:
    """A plural as its singular when the vocabulary holds both ("dogs" -> "dog")."""
    for suf, rep in (("ies", "y"), ("es", ""), ("s", "")):
        if w.endswith(suf) and len(w) > len(suf) + 1 and w[: -len(suf)] + rep in vocab:
            return w[: -len(suf)] + rep
    return w


def consensus_recall(preds: dict[str, str], refs: dict[str, list[str]], vocab_words,
                     min_refs: int = 3) -> tuple[float, dict[str, float]]:
    """Consensus-word recall: of the content words that at least ``min_refs`` of a photo's
    references use and the vocabulary holds, the share its caption names (plural and singular
    count as one word). Photos without such words are left out of the mean.

    Returns (mean over photos, {photo: recall})."""
    from ..vocab import tokenize

    vocab = set(vocab_words)
    per: dict[str, float] = {}
    for k, rs in refs.items():
        counts: dict[str, int] = {}
        for r in rs:
            for w in {_stem(t, vocab) for t in tokenize(r)}:
                counts[w] = counts.get(w, 0) + 1
        want = {w for w, c in counts.items() if c >= min_refs and w in vocab and w.isalpha() and w not in STOPWORDS}
        if want and k in preds:
            said = {_stem(t, vocab) for t in tokenize(preds[k])}
            per[k] = len(want & said) / len(want)
    return (float(np.mean(list(per.values()))) if per else 0.0), per


def unsupported_rate(preds: dict[str, str], refs: dict[str, list[str]], vocab_words) -> tuple[float, dict[str, float]]:
    """Unsupported-word rate: of a caption's content words (consensus recall's: in the vocabulary,
    not a stopword; plural and singular as one word), the share that none of the photo's
    references uses. A rough hallucination rate: a paraphrase ("puppy" for "dog") counts too.
    Captions without content words are left out of the mean.

    Returns (mean over photos, {photo: rate})."""
    from ..vocab import tokenize

    vocab = set(vocab_words)
    per: dict[str, float] = {}
    for k, text in preds.items():
        said = {w for w in (_stem(t, vocab) for t in tokenize(text)) if w in vocab and w.isalpha() and w not in STOPWORDS}
        if said and k in refs:
            used = {_stem(t, vocab) for r in refs[k] for t in tokenize(r)}
            per[k] = len(said - used) / len(said)
    return (float(np.mean(list(per.values()))) if per else 0.0), per


def load_members(models: list[Path]) -> list[Captioner]:
    """One Captioner per model folder; members that name the same encoder share one instance.
    All must share a vocabulary (an ensemble averages distributions over the same words)."""
    encoders: dict[str, Encoder] = {}
    members = []
    for m in models:
        name = read_config(m)["encoder"]["name"]
        if name not in encoders:
            encoders[name] = build_encoder(name)
        members.append(Captioner.from_pretrained(m, encoder=encoders[name]))
        if members[-1].vocab.itos != members[0].vocab.itos:
            raise ValueError(f"{m}: vocabulary differs from {models[0]}; an ensemble needs one vocabulary")
    return members


def _view_key(cap: Captioner) -> str:
    return json.dumps([cap.config["encoder"]["name"], cap.prep.to_dict()], sort_keys=True)


class _View:
    """The features one (encoder, preprocessing) gives: from the feature cache when a complete
    one matches (same numbers, no encoder pass), else from the encoder."""

    def __init__(self, cap: Captioner, ds, features: str | Path | None):
        self.cap, self.ds, self.cache = cap, ds, None
        if features is not None:
            folder = find_cache(features, cap.config["encoder"]["name"], cap.prep, sorted(ds.captions))
            try:
                self.cache = FeatureCache.open(folder)
            except (FileNotFoundError, RuntimeError):
                pass
        self.index = self.cache.index() if self.cache else None

    def features(self, names: list[str]):
        if self.cache is not None:
            return self.cache.batch(np.asarray([self.index[n] for n in names]))
        return self.cap.encode(self.cap.pixels([self.ds.path(n) for n in names]))


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


def read_captions_file(path: str | Path) -> dict[str, str]:
    """The captions ``evaluate`` writes (captions_<split>.json: a list of {"image", "caption", ...})."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
        return {str(it["image"]): str(it["caption"]) for it in items}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: captions file not found") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a list of {{\"image\", \"caption\"}} records ({type(e).__name__}: {e})") from None


def human_baseline(data: str | Path | None = None, split: str = "dev", captions: str | Path | None = None,
                   use_java: Optional[bool] = None) -> dict:
    """What people score: each of an image's first n reference captions in turn is scored against
    the other n - 1, and the n scores of every metric are averaged (n: the fewest references any
    image of the split has, so every row uses the same number; 5 in Flickr8k). With ``captions`` (a file that
    ``evaluate`` wrote) the model's caption is scored against the same n - 1 references each
    time, so the two rows compare like with like (a model scored against all n references, as
    ``evaluate`` does, has one reference more than any person).

    Returns:
        {"split", "n_images", "references" (n - 1), "tokenizer", "notes", "people": {metric: score},
        "model": {metric: score} (with ``captions``), "captions": path}
    """
    model = read_captions_file(captions) if captions else None  # a bad file fails before the data is read
    ds = load_dataset(data)
    images = ds.split(split)
    if model is not None:
        images = [k for k in images if k in model]
        if not images:
            raise ValueError(f"{captions}: no caption for any image of the {split} split")
    n = min((len(ds.captions[k]) for k in images), default=0)
    if n < 2:
        raise ValueError(f"the {split} split needs at least two reference captions per image")
    rows: dict[str, list[dict[str, float]]] = {"people": [], "model": []}
    for i in range(n):
        refs = {k: ds.captions[k][:i] + ds.captions[k][i + 1:n] for k in images}
        s = score_captions({k: ds.captions[k][i] for k in images}, refs, use_java=use_java)
        rows["people"].append(s.metrics)
        if model is not None:
            rows["model"].append(score_captions({k: model[k] for k in images}, refs, use_java=use_java).metrics)
    res = {"split": split, "n_images": len(images), "references": n - 1, "tokenizer": s.tokenizer, "notes": s.notes}
    for who, scores in rows.items():
        if scores:
            res[who] = {m: round(float(np.mean([x[m] for x in scores])), 4) for m in scores[0]}
    if captions:
        res["captions"] = str(captions)
    return res


def _per_pair_scores(preds: dict, refs: dict, java: bool) -> dict[str, list[float]]:
    """Per-pair ROUGE-L, BLEU-1 and (with Java) METEOR."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    from ..metrics import py_tokenize

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
