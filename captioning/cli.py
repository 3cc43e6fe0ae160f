"""Command line: ``python -m captioning {caption,extract-features,train,evaluate}``.

Errors reach the user as one line on stderr and a non-zero exit, never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence

from .bundle import DEFAULT_MODEL, BundleError


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    """An unexpected exception as one line: its type (the message alone can be just '0') and message."""
    text = " ".join(str(e).strip("'\"").split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def cmd_caption(a: argparse.Namespace) -> int:
    from .api import Captioner
    from .images import ImageError

    from .samples import load_sample, sample_names

    inputs: list = list(a.images)
    names = sample_names() if a.samples else (a.sample or [])
    for n in names:
        inputs.append(("sample:" + n, n))
    if not inputs:
        _err("give IMAGE files, --sample NAME or --samples")
        return 2
    # Settings are checked once, before any image: a bad one is the command's error, not each image's.
    if a.beam < 1 or a.nbest < 1:
        _err(f"--beam and --nbest must be at least 1 (got {a.beam} and {a.nbest})")
        return 2
    if a.nbest > a.beam and a.beam > 1:
        _err(f"--nbest ({a.nbest}) cannot exceed --beam ({a.beam})")
        return 2
    if a.rerank_pool is not None and a.rerank_pool < 0:
        _err(f"rerank_pool must be >= 0, got {a.rerank_pool} (--rerank-pool)")
        return 2
    cap = Captioner.from_pretrained(a.model)
    if a.rerank and cap.matcher is None:
        _err(f"{a.model or DEFAULT_MODEL}: --rerank needs a matcher in the model folder (python -m captioning train-matcher)")
        return 2
    results, failed = [], 0
    for item in inputs:
        path = item[0] if isinstance(item, tuple) else item
        # Each image is isolated at every stage (reading the sample, decoding, encoding,
        # decoding the caption): whatever one image raises costs that image its caption, not
        # the others theirs.
        try:
            src = load_sample(item[1]) if isinstance(item, tuple) else item
            # Guidance needs beam search: a beam of one is then searched, not decoded greedily.
            greedy = a.beam == 1 and not a.guide
            r = cap.caption(src, beam_size=a.beam, nbest=a.nbest, length_penalty=a.length_penalty,
                            method="greedy" if greedy else "beam", rerank=a.rerank,
                            rerank_pool=a.rerank_pool, guide=a.guide)[0]
        except Exception as e:  # noqa: BLE001 (KeyboardInterrupt still stops the run)
            msg = str(e) if isinstance(e, ImageError) else _one_line(e)
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            _err(msg)
            failed += 1
            results.append({"image": path, "error": msg})
            continue
        results.append({"image": path, "captions": [
            {"text": c.text, "logprob": round(c.logprob, 4), "score": round(c.score, 4), "finished": c.finished}
            for c in r.captions],
            **({"familiarity": r.familiarity.to_dict()} if r.familiarity else {}),
            **({"recognised": [x.to_dict() for x in r.recognised[:3]]} if r.recognised else {}),
            **({"guided": r.guided} if r.guided is not None else {})})
        if not a.json:
            if a.nbest == 1:
                print(f"{path}\t{r.text}")
            else:
                print(path)
                for c in r.captions:
                    print(f"  {c.logprob:8.3f}  {c.text}")
    if a.json:
        print(json.dumps({"model": str(a.model or DEFAULT_MODEL), "results": results}, indent=2))
    return 1 if failed else 0


def cmd_extract(a: argparse.Namespace) -> int:
    from .lab.data import load_dataset
    from .lab.features import extract_features
    from .images import Preprocessing

    folder = extract_features(load_dataset(a.data), a.encoder, a.out, Preprocessing(size=a.image_size), flip=a.flip)
    print(folder)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .lab.train import TrainConfig, train

    overrides = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if getattr(a, f.name, None) is not None}
    cfg = TrainConfig(**overrides)
    run = train(a.data, a.out, cfg, features=a.features, resume=a.resume)
    print(f"run folder: {run}; best bundle: {run / 'best'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .lab.evaluate import evaluate

    res = evaluate(a.model[0] if a.model and len(a.model) == 1 else a.model, a.data, split=a.split, beam_size=a.beam, limit=a.limit, features=a.features,
                   length_penalty=a.length_penalty, rerank=a.rerank, rerank_pool=a.rerank_pool, out=a.out,
                   guide=_guide_arg(a))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res["metrics"].items():
            print(f"{k:8s} {v:.4f}")
        for n in res["notes"]:
            print(f"note: {n}")
    return 0


def _guide_arg(a: argparse.Namespace):
    """--guide/--no-guide (None: the model's default), with --guide-settings JSON for tuning."""
    if getattr(a, "guide_settings", None):
        if a.guide is False:
            raise ValueError("--guide-settings contradicts --no-guide")
        return json.loads(a.guide_settings)
    return a.guide


def cmd_matcher(a: argparse.Namespace) -> int:
    from .lab.matcher_fit import fit_matcher

    info = fit_matcher(a.model, a.data, a.features, epochs=a.epochs, seed=a.seed, regions=a.regions,
                       batch_size=a.batch_size, region_dim=a.region_dim)
    r = info["dev_recall"]
    print(f"matcher written into {a.model} (best epoch {info['best_epoch']}: dev R@1 {r['R@1']:.3f}, "
          f"R@5 {r['R@5']:.3f}, R@10 {r['R@10']:.3f})")
    return 0


def cmd_agreement(a: argparse.Namespace) -> int:
    from .lab.evaluate import human_agreement

    res = human_agreement(a.data)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"Kendall tau-b vs mean expert score, {res['pairs']} judged captions ({res['tokenizer']} tokenizer)")
        for k, v in sorted(res["kendall_tau"].items(), key=lambda kv: -kv[1]["tau"]):
            print(f"{k:8s} {v['tau']:.3f}")
    return 0


def cmd_baseline(a: argparse.Namespace) -> int:
    from .lab.evaluate import human_baseline

    res = human_baseline(a.data, a.split, a.captions)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{a.split} split, {res['n_images']} images: each caption scored against {res['references']} "
          f"references of its image ({res['tokenizer']} tokenizer)")
    for note in res["notes"]:
        print(f"note: {note}")
    names = list(res["people"])
    print(f"{'':8s} " + " ".join(f"{m:>8s}" for m in names))
    for who in ("people", "model"):
        if who in res:
            print(f"{who:8s} " + " ".join(f"{res[who][m]:8.3f}" for m in names))
    return 0


def cmd_ship(a: argparse.Namespace) -> int:
    from .lab.evaluate import evaluate
    from .lab.modelcard import reproduce_command, set_decoding, ship, write_card

    dest = ship(a.run, a.name, a.dest) if a.dest else ship(a.run, a.name)
    set_decoding(dest, a.beam, a.length_penalty, a.rerank, a.rerank_pool)
    res = evaluate(dest, a.data, split="test", beam_size=a.beam, features=a.features,
                   length_penalty=a.length_penalty, rerank=a.rerank, rerank_pool=a.rerank_pool, out=dest)
    cmd = reproduce_command(dest, a.run, a.name, a.beam, a.length_penalty, a.rerank, a.rerank_pool)
    write_card(dest, cmd, a.notes or "")
    print(json.dumps(res["metrics"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .lab.train import DEFAULT_FEATURES, TrainConfig

    ap = argparse.ArgumentParser(prog="captioning", description="Neural image captioning (CNN encoder + LSTM decoder).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("caption", help="caption image files")
    c.add_argument("images", nargs="*", metavar="IMAGE")
    c.add_argument("--sample", action="append", help="caption a sample photo shipped with installed packages")
    c.add_argument("--samples", action="store_true", help="caption every sample photo")
    c.add_argument("--model", default=None, help=f"model folder (default: {DEFAULT_MODEL})")
    c.add_argument("--beam", type=int, default=3, help="beam size (1 = greedy)")
    c.add_argument("--nbest", type=int, default=1, help="how many captions per image")
    c.add_argument("--length-penalty", type=float, default=None, help="default: the model's (config.json decoding)")
    c.add_argument("--rerank", type=float, default=None,
                   help="matcher weight for re-ranking the beams (default: the model's; 0: off)")
    c.add_argument("--rerank-pool", type=int, default=None,
                   help="how many finished captions re-ranking considers (default: the model's; 0: the beam size)")
    c.add_argument("--guide", action=argparse.BooleanOptionalAction, default=None,
                   help="guided decoding: name what the encoder's ImageNet head confidently recognises "
                        "(default: the model's, config.json decoding.guide)")
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.set_defaults(fn=cmd_caption)

    e = sub.add_parser("extract-features", help="cache encoder features for a dataset")
    e.add_argument("--data", default=None, help="dataset folder/JSON/CSV (default: ../shared/data/flickr8k)")
    e.add_argument("--encoder", default="efficientnet-lite0")
    e.add_argument("--out", default=str(DEFAULT_FEATURES))
    e.add_argument("--flip", action="store_true",
                   help="mirror every photo left to right (the view `train --flip-prob` reads)")
    e.add_argument("--image-size", type=int, default=224, help="encoder input side in pixels (train --image-size)")
    e.set_defaults(fn=cmd_extract)

    t = sub.add_parser("train", help="train a decoder on cached features")
    t.add_argument("--data", default=None)
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--features", default=str(DEFAULT_FEATURES))
    t.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    for f in fields(TrainConfig):
        if f.type in ("bool", bool):
            t.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_const", const=True, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            t.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, default=None,
                           help=f"default {f.default}")
    t.set_defaults(fn=cmd_train)

    v = sub.add_parser("evaluate", help="score a model on a split (BLEU, METEOR, ROUGE-L, CIDEr)")
    v.add_argument("--model", default=None, nargs="+", help="model folder; several make an ensemble")
    v.add_argument("--data", default=None)
    v.add_argument("--split", default="test")
    v.add_argument("--beam", type=int, default=3)
    v.add_argument("--length-penalty", type=float, default=None, help="default: the model's (config.json decoding)")
    v.add_argument("--rerank", type=float, default=None,
                   help="matcher weight for re-ranking the beams (default: the model's; 0: off)")
    v.add_argument("--rerank-pool", type=int, default=None,
                   help="how many finished captions re-ranking considers (default: the model's; 0: the beam size)")
    v.add_argument("--guide", action=argparse.BooleanOptionalAction, default=None,
                   help="guided decoding (default: the model's, config.json decoding.guide)")
    v.add_argument("--guide-settings", default=None,
                   help='guided decoding with these settings, JSON: {"threshold": 0.5, "conflict": 3, "person": 0}')
    v.add_argument("--limit", type=int, default=0)
    v.add_argument("--features", default=str(DEFAULT_FEATURES))
    v.add_argument("--out", default=None, help="where metrics.json and captions go (default: the model folder; "
                                               "runs/evaluate/MODEL-DATA for any other --data than Flickr8k)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_evaluate)

    m = sub.add_parser("train-matcher", help="train the image-caption matcher that re-ranks a model's beams")
    m.add_argument("--model", required=True, help="bundle folder; the matcher is written into it")
    m.add_argument("--data", default=None)
    m.add_argument("--features", default=str(DEFAULT_FEATURES))
    m.add_argument("--epochs", type=int, default=30)
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--regions", action="store_true",
                   help="also match each word to the photo's grid cells (SCAN text-to-image; needs the grid cache); "
                        "added to the model's matcher when it has one")
    m.add_argument("--region-dim", type=int, default=512, help="size of the word-region space (with --regions)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=cmd_matcher)

    s = sub.add_parser("ship", help="copy RUN/best to assets/models/NAME, evaluate on test, write its model card")
    s.add_argument("run")
    s.add_argument("--name", required=True)
    s.add_argument("--dest", default=None, help="models folder (default: assets/models)")
    s.add_argument("--data", default=None)
    s.add_argument("--beam", type=int, default=3)
    s.add_argument("--length-penalty", type=float, default=0.0,
                   help="chosen on the dev split; recorded as the model's default (config.json decoding)")
    s.add_argument("--rerank", type=float, default=0.0,
                   help="matcher weight for re-ranking the beams, chosen on the dev split (needs train-matcher)")
    s.add_argument("--rerank-pool", type=int, default=0,
                   help="how many finished captions re-ranking considers, chosen on the dev split (0: the beam size)")
    s.add_argument("--features", default=str(DEFAULT_FEATURES))
    s.add_argument("--notes", default=None)
    s.set_defaults(fn=cmd_ship)

    h = sub.add_parser("human-agreement", help="Kendall's tau of each metric vs Flickr8k expert judgements")
    h.add_argument("--data", default=None)
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_agreement)

    b = sub.add_parser("human-baseline", help="what people score: each reference against the others "
                                              "(and a model's captions against the same references)")
    b.add_argument("--data", default=None)
    b.add_argument("--split", default="dev")
    b.add_argument("--captions", default=None, help="a captions_<split>.json that evaluate wrote")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_baseline)

    from .lab.tagging import add_commands as add_tagger_commands  # tag, train-tagger, ship-tagger, evaluate-tagger

    add_tagger_commands(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (BundleError, FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
        msg = str(e).strip("'\"") or type(e).__name__
        _err(msg.splitlines()[0])
        return 2
    except Exception as e:  # noqa: BLE001 (the promise is one line, never a traceback)
        _err(_one_line(e))
        return 1
