"""Command line:

* ``python -m explain faithfulness --model DIR --data DIR --split test --limit N --method M``
* ``python -m explain embeddings --model DIR`` (train word2vec, measure every embedding space,
  record the default and save the projections in the bundle)
* ``python -m explain neighbours WORD... [--model DIR] [--space NAME] [-k 10] [--json]``
* ``python -m explain project --model DIR`` (only the projections)

For each of the first N images of a split the model captions the image (beam search), and
for the caption's words (by default up to 3 content words) each method's map is scored by
deletion and insertion AUC (Petsiuk et al. 2018) next to a seeded random block order. Prints
the per-method means. Errors are one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

STOPWORDS = frozenset("""a an the is are was were be being been in on of at to into onto with and or for from
by while near his her their its it he she they this that there some two three up down out over under""".split())


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def default_model() -> Optional[Path]:
    from captioning.bundle import DEFAULT_MODEL

    return DEFAULT_MODEL if DEFAULT_MODEL.is_dir() else None


def pick_words(words: Sequence[str], mode: str, max_words: int) -> list[int]:
    """Indices of the caption words to evaluate: "all" or "content" (stopwords skipped;
    falls back to all words if none is left), at most ``max_words`` (0 = no cap)."""
    idx = list(range(len(words)))
    if mode == "content":
        idx = [i for i in idx if words[i] not in STOPWORDS] or idx
    return idx[:max_words] if max_words > 0 else idx


def cmd_faithfulness(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from captioning.api import Captioner
    from captioning.lab.data import load_dataset
    from captioning.images import load_image, preprocess

    from .attribution import attribute, available_methods, grad_cam_all_words
    from .faithfulness import deletion_insertion, random_baselines

    model = Path(a.model) if a.model else default_model()
    if model is None:
        raise ValueError("no --model given and assets/models/show_attend_tell does not exist; pass --model DIR")
    cap = Captioner.from_pretrained(model)
    if a.block < 1 or cap.prep.size % a.block:
        raise ValueError(f"--block must divide the model's input side {cap.prep.size}, got {a.block}")
    methods: list[str] = []
    for part in a.method:
        methods += [m.strip() for m in part.split(",") if m.strip()]
    valid = available_methods(cap)
    if "all" in methods:
        methods = valid
    for m in methods:
        if m not in valid:
            raise ValueError(f"method {m!r} is not available for this model; valid: {', '.join(valid)}")
    methods = list(dict.fromkeys(methods))
    ds = load_dataset(a.data)
    names = ds.split(a.split)[: a.limit]
    if not names:
        raise ValueError(f"split {a.split!r} has no images")
    if a.threads:
        torch.set_num_threads(a.threads)

    rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    n_words = 0
    t_all = time.perf_counter()
    for i, name in enumerate(names):
        pixels = preprocess(load_image(ds.path(name)), cap.prep)
        res = cap.caption_features(*cap.encode(pixels[None]), beam_size=a.beam)[0]
        chosen = pick_words(res.words, a.words, a.max_words)
        if a.progress:
            print(f"[{i + 1}/{len(names)}] {name}: {res.text}", file=sys.stderr)
        cams = None
        for t in chosen:
            rnd = random_baselines(cap, pixels, res.tokens, t, block=a.block, steps=a.steps, seed=a.seed)
            n_words += 1
            for m in methods:
                t0 = time.perf_counter()
                if m == "grad_cam":
                    if cams is None:
                        cams = grad_cam_all_words(cap, pixels, res.tokens, include_end=False)
                    sal = cams[t].map
                else:
                    sal = attribute(cap, pixels, res.tokens, t, m).map
                seconds[m] += time.perf_counter() - t0
                r = deletion_insertion(cap, pixels, res.tokens, t, sal, block=a.block, steps=a.steps, seed=a.seed,
                                       random_curves=rnd)
                rows[m].append(r.summary())
    out = {
        "model": str(model), "split": a.split, "images": len(names), "words": n_words,
        "settings": {"block": a.block, "steps": a.steps, "seed": a.seed, "beam": a.beam, "words": a.words,
                     "max_words": a.max_words, "deletion_substrate": "black", "insertion_substrate": "blur"},
        "seconds": round(time.perf_counter() - t_all, 2),
        "methods": {},
    }
    for m in methods:
        r = rows[m]
        if not r:
            continue
        mean = {k: float(np.mean([x[k] for x in r])) for k in r[0]}
        mean["deletion_below_random"] = float(np.mean([x["deletion_auc"] < x["random_deletion_auc"] for x in r]))
        mean["insertion_above_random"] = float(np.mean([x["insertion_auc"] > x["random_insertion_auc"] for x in r]))
        mean["words"] = len(r)
        mean["map_seconds_per_word"] = seconds[m] / len(r)
        out["methods"][m] = mean
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"model {out['model']} | split {a.split} | {len(names)} images, {n_words} words | "
          f"{a.block}px blocks, {a.steps} steps, seed {a.seed}")
    print(f"{'method':22s} {'words':>5s} {'deletion AUC (lower better)':>28s} {'random':>7s} "
          f"{'insertion AUC (higher better)':>30s} {'random':>7s} {'s/word':>7s}")
    for m, v in out["methods"].items():
        print(f"{m:22s} {v['words']:5d} {v['deletion_auc']:28.4f} {v['random_deletion_auc']:7.4f} "
              f"{v['insertion_auc']:30.4f} {v['random_insertion_auc']:7.4f} {v['map_seconds_per_word']:7.2f}")
    return 0


def _model_dir(a: argparse.Namespace) -> Path:
    model = Path(a.model) if a.model else default_model()
    if model is None:
        raise ValueError("no --model given and assets/models/show_attend_tell does not exist; pass --model DIR")
    return model


def cmd_project(a: argparse.Namespace) -> int:
    from captioning.bundle import load_bundle

    from .embeddings import bundle_projection, load_projection, model_spaces, projection_path

    model = _model_dir(a)
    decoder, vocab, _ = load_bundle(model)
    out = []
    for name, space in model_spaces(decoder, vocab, model).items():
        t0 = time.perf_counter()
        proj = bundle_projection(model, space, recompute=True, save=True, seed=a.seed, perplexity=a.perplexity,
                                 umap=not a.no_umap)
        if load_projection(model, proj.fingerprint, name) is None:
            raise OSError(f"{model}: could not write {projection_path(model, name).name} (read-only folder?)")
        out.append({"space": name, "path": str(projection_path(model, name)), "words": len(proj.words),
                    "seconds": round(time.perf_counter() - t0, 2), "fingerprint": proj.fingerprint})
    if a.json:
        print(json.dumps(out[0] if len(out) == 1 else out))
    else:
        for o in out:
            print(f"{o['path']}: {o['words']} words ({o['space']}: t-SNE, PCA{'' if a.no_umap else ', UMAP'}) "
                  f"in {o['seconds']} s")
    return 0


def cmd_embeddings(a: argparse.Namespace) -> int:
    """Train word2vec on the training captions, score every space, record the best as the default."""
    from captioning.bundle import load_bundle
    from captioning.lab.data import load_dataset
    from captioning.vocab import SPECIALS, tokenize

    from .embeddings import (SPACES, Word2VecConfig, bundle_projection, model_spaces, save_word2vec, train_word2vec,
                             write_embeddings_info)
    from .wordsim import CATEGORIES_PATH, load_categories, measure

    model = _model_dir(a)
    decoder, vocab, _ = load_bundle(model)
    if not a.no_word2vec:
        ds = load_dataset(a.data)
        images = ds.split("train")
        sentences = [tokenize(c) for im in images for c in ds.captions[im]]
        words = [w for w in vocab.itos if w not in SPECIALS]
        cfg = Word2VecConfig(seed=a.seed)
        t0 = time.perf_counter()
        vec = train_word2vec(sentences, words, cfg)
        save_word2vec(model, words, vec, cfg, {"data": str(ds.image_dir.parent.name), "split": "train",
                                               "images": len(images), "sentences": len(sentences)})
        print(f"word2vec: {len(words)} words x {cfg.dim} from {len(sentences)} training captions "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cats = load_categories()
    spaces = model_spaces(decoder, vocab, model)
    table = {name: measure(sp, cats, a.k) for name, sp in spaces.items()}
    best = max(table, key=lambda n: table[n]["categories"]["judged"])
    write_embeddings_info(model, {
        "format": "captioning-embeddings", "version": 1, "default": best,
        "rule": f"the space with the highest judged category precision@{a.k}",
        "categories": CATEGORIES_PATH.name, "spaces": {n: {"about": SPACES[n], **table[n]} for n in table}})
    if not a.no_project:
        for sp in spaces.values():
            bundle_projection(model, sp, recompute=True, seed=a.seed)
    if a.json:
        print(json.dumps({"model": str(model), "default": best, "spaces": table}))
    else:
        print(f"{model}: default space {best}")
        print(f"{'space':10s} {'P@' + str(a.k) + ' judged':>12s} {'chance':>7s} {'P@' + str(a.k) + ' all':>9s} "
              f"{'chance':>7s} {'WS-353 rho':>11s} {'SimLex rho':>11s}")
        for n, t in table.items():
            c = t["categories"]
            ws, sl = t["wordsim353"], t["simlex999"]
            fmt = lambda b: f"{b['rho']:.3f} ({b['pairs']})" if b["rho"] is not None else f"- ({b['pairs']})"
            print(f"{n:10s} {c['judged']:12.3f} {c['judged_chance']:7.3f} {c['all']:9.3f} {c['all_chance']:7.3f} "
                  f"{fmt(ws):>11s} {fmt(sl):>11s}")
    return 0


def cmd_neighbours(a: argparse.Namespace) -> int:
    """Nearest neighbours of each word; an unknown word gets its one line (with spelling
    suggestions) and exit status 1, the other words are still answered."""
    from captioning.bundle import load_bundle

    from .embeddings import UnknownWord, embedding_space, nearest

    model = _model_dir(a)
    decoder, vocab, _ = load_bundle(model)
    space = embedding_space(decoder, vocab, a.space, model)
    results, status = {}, 0
    for word in a.words:
        try:
            results[word] = nearest(space, word, a.k, include_self=False)
        except UnknownWord as e:
            _err(str(e))
            status = 1
    if a.json:
        print(json.dumps({"model": str(model), "space": space.name, "k": a.k,
                          "neighbours": {w: [{"word": n, "cosine": round(c, 4)} for n, c in nn]
                                         for w, nn in results.items()}}))
    else:
        for w, nn in results.items():
            print(f"{w} ({space.name}): " + ", ".join(f"{n} {c:.2f}" for n, c in nn))
    return status


def build_parser() -> argparse.ArgumentParser:
    from .attribution import METHODS

    ap = argparse.ArgumentParser(prog="python -m explain", description="Interpretability tools for the captioner.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("faithfulness", help="deletion / insertion AUC of attribution methods on a data split")
    f.add_argument("--model", default=None, help="model bundle folder (default: assets/models/show_attend_tell)")
    f.add_argument("--data", default=None, help="dataset folder/JSON/CSV (default: ../shared/data/flickr8k)")
    f.add_argument("--split", default="test")
    f.add_argument("--limit", type=_positive, default=10, help="number of images (default 10)")
    f.add_argument("--method", action="append", default=None,
                   help=f"method(s), comma-separated or repeated, or 'all' (default grad_cam); one of: {', '.join(METHODS)}")
    f.add_argument("--words", choices=("content", "all"), default="content",
                   help="which caption words to explain (default: content words, stopwords skipped)")
    f.add_argument("--max-words", type=int, default=3, help="at most this many words per caption (0 = no cap)")
    f.add_argument("--block", type=int, default=16, help="block side in pixels (default 16)")
    f.add_argument("--steps", type=_positive, default=24, help="curve steps (default 24)")
    f.add_argument("--beam", type=_positive, default=3)
    f.add_argument("--seed", type=int, default=0, help="seed of the random baseline order")
    f.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    f.add_argument("--progress", action="store_true", help="one line per image on stderr")
    f.add_argument("--json", action="store_true", help="print one JSON document")
    f.set_defaults(fn=cmd_faithfulness)
    p = sub.add_parser("project", help="compute the word-embedding projections of every space and save them in the bundle")
    p.add_argument("--model", default=None, help="model bundle folder (default: assets/models/show_attend_tell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--no-umap", action="store_true", help="t-SNE and PCA only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_project)
    e = sub.add_parser("embeddings", help="train word2vec, measure every embedding space, record the default, "
                                          "save projections (all into the bundle)")
    e.add_argument("--model", default=None, help="model bundle folder (default: assets/models/show_attend_tell)")
    e.add_argument("--data", default=None, help="dataset whose train split word2vec reads (default: ../shared/data/flickr8k)")
    e.add_argument("-k", type=_positive, default=5, help="neighbours scored per word (default 5)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-word2vec", action="store_true", help="keep the bundle's word2vec files as they are")
    e.add_argument("--no-project", action="store_true", help="skip the projections")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_embeddings)
    n = sub.add_parser("neighbours", aliases=["neighbors"], help="nearest neighbours of words in an embedding space")
    n.add_argument("words", nargs="+", metavar="WORD")
    n.add_argument("--model", default=None, help="model bundle folder (default: assets/models/show_attend_tell)")
    n.add_argument("--space", default=None, help="output, input, tied or word2vec (default: the model's best-measured)")
    n.add_argument("-k", type=_positive, default=10)
    n.add_argument("--json", action="store_true")
    n.set_defaults(fn=cmd_neighbours)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if getattr(a, "method", None) is None:
        a.method = ["grad_cam"]
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        msg = str(e).strip().strip("'\"") or type(e).__name__
        _err(msg.splitlines()[0])
        return 2
