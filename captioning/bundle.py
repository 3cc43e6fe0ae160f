"""Model bundles: a folder with ``config.json``, ``vocab.json`` and ``model.safetensors``.

Loading parses JSON and safetensors only, so opening a model file cannot run code. Every
failure is a one-line ``BundleError`` naming the file at fault.

A model folder may come from anyone, so loading trusts nothing in it: JSON files are size-capped
and type-checked, and the safetensors header is checked against the file's real size *before*
any tensor is read. The decoder is first built on PyTorch's "meta" device (shapes, no memory) and
compared with the header, so a config that claims enormous layers, or a header that claims
enormous tensors, is refused without allocating them. What loading allocates is bounded by the
weights file itself, which is capped at ``MAX_WEIGHTS_BYTES``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .decode_config import DecodeConfig
from .decoders import DECODERS, Decoder, build_decoder, decoder_kind
from .atomic import recover_swap, swap_folder  # noqa: F401 (recover_swap: its old import path)
from .images import Preprocessing
from .paths import MODELS_DIR, REPO_ROOT, default_model  # noqa: F401 (REPO_ROOT: callers' old import path)
from .vocab import Vocab

FORMAT = "captioning-bundle"
VERSION = 1
CONFIG, VOCAB, WEIGHTS = "config.json", "vocab.json", "model.safetensors"
DEFAULT_MODEL = default_model()  # $CAPTIONING_MODEL, else the shipped show_attend_tell (paths.py)


#: Caps on what a model folder may make us read. The shipped models are a few MB of JSON at
#: most and tens of MB of weights; these leave room for far larger ones.
MAX_JSON_BYTES = 32 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header
MAX_DIM = 1 << 20  # any one size in a decoder config (vocabulary, embedding, hidden, ...)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class BundleError(ValueError):
    """A model folder that cannot be loaded; the message is one line and names the file."""


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of a model folder; BundleError (naming it) for anything unreadable."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BundleError(f"{path}: {size:,} bytes is over the limit of {max_bytes:,} for a {what}")
        return json.loads(path.read_bytes())
    except BundleError:
        raise
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    # RecursionError: a few KB of "[[[[..." nest deeper than the parser's stack.
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: not valid JSON ({_short(e)})") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({_short(e)})") from None


def _weights_error(path: Path, detail: str) -> BundleError:
    return BundleError(f"{path}: cannot read weights ({detail})")


def read_safetensors_header(path: str | Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file, checked against the file's size.

    Reads only the header. Raises BundleError naming the file for a file that is too short, too
    large, truncated, or whose header is malformed or claims more data than the file holds.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _weights_error(path, f"{size:,} bytes is over the limit of {max_bytes:,} for model weights")
        if size < 8:
            raise _weights_error(path, f"{size} bytes is too short for a safetensors file")
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _weights_error(path, f"the header claims {n:,} bytes but the file has {size:,} "
                                           "(truncated, or not a safetensors file)")
            raw = f.read(n)
        header = json.loads(raw)
    except BundleError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _weights_error(path, f"not a safetensors file (header is not JSON: {_short(e)})") from None
    except OSError as e:
        raise _weights_error(path, _short(e)) from None
    if not isinstance(header, dict):
        raise _weights_error(path, "not a safetensors file (header is not an object)")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        bad = f"tensor {name[:80]!r} has a malformed entry"
        if not isinstance(t, dict):
            raise _weights_error(path, bad)
        dtype, shape, offs = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if (not isinstance(dtype, str) or dtype not in _ITEMSIZE or not isinstance(shape, list)
                or not isinstance(offs, list) or len(offs) != 2):
            raise _weights_error(path, bad)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape + offs):
            raise _weights_error(path, bad)
        begin, end = offs
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if end > data_bytes or begin > end:
            raise _weights_error(path, f"tensor {name[:80]!r} claims bytes {begin:,}..{end:,} but the file holds "
                                       f"{data_bytes:,} bytes of data (truncated?)")
        if end - begin != nbytes:
            raise _weights_error(path, f"tensor {name[:80]!r} of shape {str(shape)[:60]} {dtype} needs {nbytes:,} "
                                       f"bytes, the header gives it {end - begin:,}")
        out[name] = (dtype, tuple(shape))
        spans.append((begin, end))
    spans.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:])):
        raise _weights_error(path, "tensors overlap in the file")
    return out


def load_weights(path: str | Path, expected: dict[str, tuple[int, ...]], against: str = CONFIG,
                 max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """Read a safetensors file whose tensors must have exactly the ``expected`` names and shapes.

    The header is checked first (read_safetensors_header), so nothing is allocated for a file
    that does not fit; then the tensors are read. Raises BundleError naming the file.
    """
    path = Path(path)
    check_weights_header(path, expected, against, max_bytes)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise BundleError(f"{path}: cannot read weights ({_short(e)})") from None


def check_weights_header(path: str | Path, expected: dict[str, tuple[int, ...]], against: str = CONFIG,
                         max_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """BundleError unless the safetensors file at ``path`` holds exactly the ``expected`` floating
    point tensors (names and shapes); reads the header only."""
    path = Path(path)
    header = read_safetensors_header(path, max_bytes)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    bad_shape = [k for k in expected if k in header and header[k][1] != tuple(expected[k])]
    if missing or unexpected or bad_shape:
        raise BundleError(f"{path}: weights do not match {against} (missing {missing[:3]}, unexpected "
                          f"{[u[:80] for u in unexpected[:3]]}, wrong shape {bad_shape[:3]})")
    not_float = [k for k, (dt, _) in header.items() if dt not in _FLOAT_DTYPES]
    if not_float:
        raise BundleError(f"{path}: tensors {not_float[:3]} are {header[not_float[0]][0]}, not floating point")


def _check_decoder_section(p: Path, dec: Any) -> None:
    """Types and ranges of config.json's decoder section, before anything is built from it."""
    if not isinstance(dec, dict) or not isinstance(dec.get("type"), str) or not isinstance(dec.get("config"), dict):
        raise BundleError(f"{p}: bad decoder section (needs a 'type' string and a 'config' object)")
    if dec["type"] not in DECODERS:
        raise BundleError(f"{p}: bad decoder section (unknown decoder {dec['type'][:40]!r}; "
                          f"valid: {', '.join(sorted(DECODERS))})")
    types = {f.name: str(f.type) for f in fields(DECODERS[dec["type"]][1])}
    for k, v in dec["config"].items():
        t = types.get(k)
        if t is None:
            raise BundleError(f"{p}: bad decoder section (unknown field {k[:40]!r})")
        if t == "int" and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM):
            raise BundleError(f"{p}: bad decoder section ({k} must be an integer from 1 to {MAX_DIM:,}, got {v!r:.40})")
        if t == "float" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
            raise BundleError(f"{p}: bad decoder section ({k} must be a number in [0, 1), got {v!r:.40})")
        if t == "bool" and not isinstance(v, bool):
            raise BundleError(f"{p}: bad decoder section ({k} must be true or false, got {v!r:.40})")


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
        # clone: tied weights (tie_weights) share memory, which safetensors refuses to write
        sd = {k: (v.half() if half and v.is_floating_point() else v).detach().clone() for k, v in decoder.state_dict().items()}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        # Keep files that are not ours (metrics.json, model card, curves) across re-saves.
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name not in (CONFIG, VOCAB, WEIGHTS) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name) if f.is_file() else shutil.copytree(f, tmp / f.name)
        swap_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_config(folder: str | Path) -> dict:
    """config.json of a bundle, with the types of every field loading relies on checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: model folder not found")
    p = folder / CONFIG
    if not p.is_file():
        raise BundleError(f"{p}: missing")
    cfg = read_json(p, "model config")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise BundleError(f"{p}: not a {FORMAT} config")
    version = cfg.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{p}: version must be an integer, got {version!r:.40}")
    if version > VERSION:
        raise BundleError(f"{p}: bundle version {version} is newer than this code reads ({VERSION})")
    for key in ("encoder", "decoder", "preprocessing", "vocab_size"):
        if key not in cfg:
            raise BundleError(f"{p}: missing field {key!r}")
    if not isinstance(cfg["encoder"], dict) or not isinstance(cfg["encoder"].get("name"), str):
        raise BundleError(f"{p}: encoder must be an object with a 'name' string")
    vs = cfg["vocab_size"]
    if isinstance(vs, bool) or not isinstance(vs, int) or not 4 <= vs <= MAX_DIM:
        raise BundleError(f"{p}: vocab_size must be an integer from 4 to {MAX_DIM:,}, got {vs!r:.40}")
    tg = cfg.get("tagger")
    if tg is not None and (not isinstance(tg, str) or not tg or tg in (".", "..") or any(c in tg for c in "/\\:")):
        # A folder beside this one (assets/models/tagger), never a path out of the models folder.
        raise BundleError(f"{p}: 'tagger' must name a folder beside the model's, got {tg!r:.60}")
    _check_decoder_section(p, cfg["decoder"])
    try:
        Preprocessing.from_dict(cfg["preprocessing"])
    except ValueError as e:
        raise BundleError(f"{p}: {e}") from None
    try:  # the decoding section is checked here, not at the first caption
        DecodeConfig.from_bundle(cfg)
    except ValueError as e:
        raise BundleError(f"{p}: {e}") from None
    return cfg


def load_bundle(folder: str | Path) -> tuple[Decoder, Vocab, dict]:
    """Rebuild a decoder (float32, eval mode) and its vocabulary from a bundle folder.

    Raises BundleError (one line, naming the file at fault) for anything that does not load.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    vp = folder / VOCAB
    if not vp.is_file():
        raise BundleError(f"{vp}: missing")
    try:
        vocab = Vocab.from_json(read_json(vp, "vocabulary"))
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{vp}: not a valid vocabulary ({_short(e)})") from None
    if len(vocab) != cfg["vocab_size"]:
        raise BundleError(f"{vp}: {len(vocab)} words but {CONFIG} says {cfg['vocab_size']}")
    dec_vocab = cfg["decoder"]["config"].get("vocab_size")
    if dec_vocab != len(vocab):
        # The decoder would predict ids the vocabulary has no word for (or never predict some).
        raise BundleError(f"{vp}: {len(vocab)} words but the decoder in {CONFIG} predicts {dec_vocab}")
    wp = folder / WEIGHTS
    if not wp.is_file():
        raise BundleError(f"{wp}: missing")
    try:
        # Shapes only: a config claiming enormous layers costs nothing here.
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_decoder(cfg["decoder"]["type"], cfg["decoder"]["config"])
                      .state_dict().items()}
    except Exception as e:  # noqa: BLE001 (whatever a bad section makes the constructor raise)
        raise BundleError(f"{folder / CONFIG}: bad decoder section ({_short(e)})") from None
    sd = load_weights(wp, shapes)  # checks the header against the file and these shapes first
    try:
        decoder = build_decoder(cfg["decoder"]["type"], cfg["decoder"]["config"])
        decoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    except (RuntimeError, ValueError, TypeError) as e:
        raise BundleError(f"{wp}: weights do not fit the decoder ({_short(e)})") from None
    decoder.eval()
    return decoder, vocab, cfg
