"""The model registry: every bundle folder under the models directory, loaded through
captioning.bundle, and the files a bundle ships beside its weights (model card, test metrics,
training curve)."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from captioning.bundle import MODELS_DIR, BundleError, read_config
from captioning.decode_config import DecodeConfig
from captioning.lab.published import PUBLISHED

from app.services import COMPUTE_LOCK

#: Preferred order of the shipped decoders; others follow alphabetically.
MODEL_ORDER = ("show_attend_tell", "show_tell", "merge")
DECODER_TITLES = {"show_attend_tell": "Show, Attend and Tell", "show_tell": "Show and Tell", "merge": "Merge"}


def models_dir() -> Path:
    """Where bundles are listed from: $CAPTIONING_MODELS_DIR, else assets/models."""
    env = os.environ.get("CAPTIONING_MODELS_DIR")
    return Path(env) if env else MODELS_DIR


@dataclass(frozen=True)
class ModelInfo:
    """One folder under the models directory. ``error`` is set when it cannot be loaded."""

    name: str
    path: str
    decoder: str = ""
    encoder: str = ""
    has_attention: bool = False
    error: Optional[str] = None
    stamp: float = 0.0  # weights' modification time: a retrained bundle gets a new cache key
    length_penalty: float = 0.0  # the bundle's recommended decoding (config.json "decoding")
    rerank: float = 0.0  # its matcher weight for re-ranking the beams (0: none)
    rerank_pool: int = 0  # how many finished captions re-ranking considers (0: the beam size)

    def rerank_candidates(self, beam: int) -> int:
        """How many finished captions the matcher re-ranks at this beam size."""
        from captioning.decoding import rerank_candidates

        return rerank_candidates(beam, self.rerank_pool)

    @property
    def key(self) -> str:
        return f"{self.path}@{self.stamp}"

    @property
    def title(self) -> str:
        """"Show, Attend and Tell" for the shipped folder of that decoder, else "name (decoder)"."""
        t = DECODER_TITLES.get(self.decoder)
        if not t:
            return self.name
        return t if self.name == self.decoder else f"{self.name} ({t})"


def list_models(root: Optional[Path] = None) -> list[ModelInfo]:
    """Every bundle folder in ``root`` (default ``models_dir()``), shipped decoders first.

    A folder without ``config.json`` is ignored; one with a broken config is listed with its error.
    """
    root = Path(root) if root is not None else models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (d / "config.json").is_file():
            continue
        try:
            cfg = read_config(d)
            kind = str(cfg["decoder"].get("type", ""))
            w = d / "model.safetensors"
            stamp = w.stat().st_mtime if w.is_file() else 0.0
            err = None if w.is_file() else f"{w}: missing"
            dec = DecodeConfig.from_bundle(cfg)  # read_config has checked it
            out.append(ModelInfo(d.name, str(d), kind, str(cfg["encoder"].get("name", "")),
                                 kind == "show_attend_tell", err, stamp, dec.length_penalty, dec.rerank,
                                 dec.rerank_pool))
        except (BundleError, KeyError, TypeError, AttributeError, OSError) as e:
            out.append(ModelInfo(d.name, str(d), error=str(e).splitlines()[0]))
    rank = {n: i for i, n in enumerate(MODEL_ORDER)}
    out.sort(key=lambda m: (rank.get(m.name, len(rank)), m.name))
    return out


def no_models_message(root: Optional[Path] = None) -> str:
    root = Path(root) if root is not None else models_dir()
    return (f"No trained model found in {root}. Put a model bundle there (a folder with config.json, "
            f"vocab.json and model.safetensors, e.g. assets/models/show_attend_tell), or set "
            f"CAPTIONING_MODELS_DIR to a folder of bundles, then reload the page.")


def load_encoder(name: str):
    from captioning.encoders import build_encoder

    with COMPUTE_LOCK:
        return build_encoder(name)


def load_captioner(path: str, encoder=None):
    """A Captioner for one bundle. Raises BundleError / EncoderUnavailable with a readable message."""
    from captioning.api import Captioner

    with COMPUTE_LOCK:
        return Captioner.from_pretrained(path, encoder=encoder)


# --------------------------------------------------------------------------- a bundle's files

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def model_card(model_path: str) -> Optional[str]:
    return read_text(Path(model_path) / "MODEL_CARD.md")


def model_config(model_path: str) -> Optional[dict]:
    try:
        return read_config(model_path)
    except BundleError:
        return None


def test_metrics(model_path: str) -> Optional[dict[str, float]]:
    """``metrics.json``'s test metrics, or None (missing or unreadable)."""
    text = read_text(Path(model_path) / "metrics.json")
    if text is None:
        return None
    try:
        d = json.loads(text)
    except ValueError:
        return None
    m = d.get("metrics", d) if isinstance(d, dict) else None
    if not isinstance(m, dict):
        return None
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metrics_line(m: Optional[dict[str, float]], keys: Sequence[str] = ("CIDEr", "BLEU-4", "METEOR")) -> str:
    """"CIDEr 0.553 · BLEU-4 0.213 · METEOR 0.201" from test metrics (the keys it has), or ""."""
    return " · ".join(f"{k} {m[k]:.3f}" for k in keys if m and m.get(k) is not None)


def metrics_table(models: dict[str, Optional[dict[str, float]]]) -> list[dict[str, Any]]:
    """Rows for the comparison table: our models' test metrics, then the published ones."""
    rows = []
    for name, m in models.items():
        if m:
            rows.append({"model": name, **{k: m.get(k) for k in METRIC_KEYS}, "source": "this repository, Flickr8k test"})
    for p in PUBLISHED:
        rows.append({"model": p["model"], **{k: p.get(k) for k in METRIC_KEYS}, "source": p["source"]})
    return rows


def training_curves(model_path: str) -> Optional[list[dict[str, float]]]:
    """``metrics.csv`` rows as floats (missing cells None; ``stage``, the training stage of a
    fine-tuned model's curve, stays text), or None when absent/unreadable."""
    text = read_text(Path(model_path) / "metrics.csv")
    if not text:
        return None
    rows = []
    try:
        for r in csv.DictReader(io.StringIO(text)):
            row = {}
            for k, v in r.items():
                if k is None:
                    continue
                if k.strip() == "stage":
                    row["stage"] = (v or "").strip() or None
                    continue
                try:
                    row[k.strip()] = float(v) if v not in (None, "") else None
                except ValueError:
                    row[k.strip()] = None
            rows.append(row)
    except csv.Error:
        return None
    return rows or None



def curve_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-curve rows for a table, without columns that say nothing: empty in every
    row, or 0 in every row (e.g. sample_prob when scheduled sampling was off)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if any(r.get(k) not in (None, 0, 0.0, "") for r in rows)]
    return [{k: r.get(k) for k in keys} for r in rows]

