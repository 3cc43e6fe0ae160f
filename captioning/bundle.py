"""Model bundles: a folder with ``config.json``, ``vocab.json`` and ``model.safetensors``.

Loading parses JSON and safetensors only, so opening a model file cannot run code. Every
failure names the file at fault.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .decoders import Decoder, build_decoder, decoder_kind
from .images import Preprocessing
from .vocab import Vocab

FORMAT = "captioning-bundle"
VERSION = 1
CONFIG, VOCAB, WEIGHTS = "config.json", "vocab.json", "model.safetensors"
REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "assets" / "models"
DEFAULT_MODEL = MODELS_DIR / "show_attend_tell"


class BundleError(ValueError):
    """A model folder that cannot be loaded; the message names the file."""


def _versions() -> dict[str, str]:
    from . import __version__

    return {"captioning": __version__, "torch": torch.__version__.split("+")[0]}


def save_bundle(folder: str | Path, decoder: Decoder, vocab: Vocab, encoder: str,
                prep: Preprocessing = Preprocessing(), extra: dict[str, Any] | None = None,
                half: bool = True) -> Path:
    """Write a bundle atomically: files go to a temporary folder that replaces ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cfg = {
        "format": FORMAT, "version": VERSION,
        "encoder": {"name": encoder},
        "decoder": {"type": decoder_kind(decoder), "config": decoder.config.to_dict()},
        "preprocessing": prep.to_dict(),
        "vocab_size": len(vocab),
        "dtype": "float16" if half else "float32",
        "versions": _versions(),
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is for everyone to read
    try:
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        vocab.save(tmp / VOCAB)
        sd = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in decoder.state_dict().items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        # Keep files that are not ours (metrics.json, model card, curves) across re-saves.
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name not in (CONFIG, VOCAB, WEIGHTS) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name) if f.is_file() else shutil.copytree(f, tmp / f.name)
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: model folder not found")
    p = folder / CONFIG
    if not p.is_file():
        raise BundleError(f"{p}: missing")
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise BundleError(f"{p}: not a {FORMAT} config")
    if cfg.get("version", 0) > VERSION:
        raise BundleError(f"{p}: bundle version {cfg['version']} is newer than this code reads ({VERSION})")
    for key in ("encoder", "decoder", "preprocessing", "vocab_size"):
        if key not in cfg:
            raise BundleError(f"{p}: missing field {key!r}")
    return cfg


def load_bundle(folder: str | Path) -> tuple[Decoder, Vocab, dict]:
    """Rebuild a decoder (float32, eval mode) and its vocabulary from a bundle folder."""
    folder = Path(folder)
    cfg = read_config(folder)
    vp = folder / VOCAB
    if not vp.is_file():
        raise BundleError(f"{vp}: missing")
    try:
        vocab = Vocab.load(vp)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BundleError(f"{vp}: not a valid vocabulary ({e})") from None
    if len(vocab) != cfg["vocab_size"]:
        raise BundleError(f"{vp}: {len(vocab)} words but {CONFIG} says {cfg['vocab_size']}")
    try:
        decoder = build_decoder(cfg["decoder"]["type"], cfg["decoder"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{folder / CONFIG}: bad decoder section ({e})") from None
    wp = folder / WEIGHTS
    if not wp.is_file():
        raise BundleError(f"{wp}: missing")
    try:
        sd = load_file(str(wp))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{wp}: cannot read weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    own = decoder.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        raise BundleError(f"{wp}: weights do not match {CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                          f"wrong shape {bad_shape[:3]})")
    decoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    decoder.eval()
    return decoder, vocab, cfg
