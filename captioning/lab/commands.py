"""The training lab's subcommands of ``python -m captioning``: extract-features, train, evaluate,
train-matcher, ship, human-agreement, human-baseline and the tagger's. ``captioning.cli`` adds
them only when a lab command is run (or for ``--help``), so captioning loads no training code."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..cli import decode_args
from .tagging import add_commands as add_tagger_commands  # tag, train-tagger, ship-tagger, evaluate-tagger
from .train import DEFAULT_FEATURES, DecoderOptions, TrainConfig


def cmd_extract(a: argparse.Namespace) -> int:
    from .data import load_dataset
    from .features import extract_features
    from ..images import Preprocessing

    folder = extract_features(load_dataset(a.data), a.encoder, a.out, Preprocessing(size=a.image_size), flip=a.flip)
    print(folder)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .train import DecoderOptions, TrainConfig, train

    names = [f.name for f in fields(TrainConfig) if f.name != "model"] + [f.name for f in fields(DecoderOptions)]
    overrides = {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}
    cfg = TrainConfig(**overrides)
    run = train(a.data, a.out, cfg, features=a.features, resume=a.resume)
    print(f"run folder: {run}; best bundle: {run / 'best'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate

    res = evaluate(a.model[0] if a.model and len(a.model) == 1 else a.model, a.data, split=a.split,
                   decode=decode_args(a, guide=_guide_arg(a)), limit=a.limit, features=a.features, out=a.out)
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
    from .matcher_fit import fit_matcher

    info = fit_matcher(a.model, a.data, a.features, epochs=a.epochs, seed=a.seed, regions=a.regions,
                       batch_size=a.batch_size, region_dim=a.region_dim)
    r = info["dev_recall"]
    print(f"matcher written into {a.model} (best epoch {info['best_epoch']}: dev R@1 {r['R@1']:.3f}, "
          f"R@5 {r['R@5']:.3f}, R@10 {r['R@10']:.3f})")
    return 0


def cmd_agreement(a: argparse.Namespace) -> int:
    from .evaluate import human_agreement

    res = human_agreement(a.data)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"Kendall tau-b vs mean expert score, {res['pairs']} judged captions ({res['tokenizer']} tokenizer)")
        for k, v in sorted(res["kendall_tau"].items(), key=lambda kv: -kv[1]["tau"]):
            print(f"{k:8s} {v['tau']:.3f}")
    return 0


def cmd_baseline(a: argparse.Namespace) -> int:
    from .evaluate import human_baseline

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
    from .evaluate import evaluate
    from .modelcard import reproduce_command, set_decoding, ship, write_card

    dest = ship(a.run, a.name, a.dest) if a.dest else ship(a.run, a.name)
    set_decoding(dest, a.beam, a.length_penalty, a.rerank, a.rerank_pool)
    res = evaluate(dest, a.data, split="test", decode=decode_args(a), features=a.features, out=dest)
    cmd = reproduce_command(dest, a.run, a.name, a.beam, a.length_penalty, a.rerank, a.rerank_pool)
    write_card(dest, cmd, a.notes or "")
    print(json.dumps(res["metrics"]))
    return 0


def add_commands(sub) -> None:
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
    for f in [f for f in fields(TrainConfig) if f.name != "model"] + list(fields(DecoderOptions)):
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

    add_tagger_commands(sub)
