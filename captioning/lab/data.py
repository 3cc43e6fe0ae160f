"""Caption dataset readers: the original Flickr8k release, Karpathy-style JSON, plain CSV, and a
``{file: [captions]}`` JSON (``captions.json``, as the COCO dev set ships).

Every reader returns a CaptionDataset. Lines that name a missing image, carry an empty caption
or a malformed id are counted, reported once (one line on stderr) and skipped.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import REPO_ROOT

SPLITS = ("train", "dev", "test")


class DataError(ValueError):
    """A data folder or file that cannot be read; the message names it."""


@dataclass
class CaptionDataset:
    image_dir: Path
    captions: dict[str, list[str]]  # image file name -> its reference captions
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> image file names
    skipped: Counter = field(default_factory=Counter)  # reason -> lines skipped

    def split(self, name: str) -> list[str]:
        if name == "all":
            return sorted(self.captions)
        if name not in self.splits:
            raise DataError(f"no split {name!r}; this dataset has: {', '.join(self.splits) or 'none'}")
        return self.splits[name]

    def path(self, image: str) -> Path:
        return self.image_dir / image

    def report(self, source: str) -> None:
        if self.skipped:
            parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            print(f"warning: {source}: skipped {sum(self.skipped.values())} lines ({parts})", file=sys.stderr)


def default_data_dir() -> Path | None:
    """$CAPTIONING_DATA, else ../shared/data/flickr8k beside the repository, if it exists."""
    env = os.environ.get("CAPTIONING_DATA")
    for cand in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data" / "flickr8k"]:
        if cand.is_dir():
            return cand
    return None


def resolve_data_dir(data: str | Path | None) -> Path:
    if data is None:
        d = default_data_dir()
        if d is None:
            raise DataError("no data folder given and ../shared/data/flickr8k does not exist; pass --data DIR")
        return d
    p = Path(data)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    return p


_FLICKR_ID = re.compile(r"^(?P<img>[^#\s]+\.(?:jpg|jpeg|png))#(?P<n>\d+)$", re.IGNORECASE)


def read_flickr8k(root: str | Path, token_file: str = "Flickr8k.token.txt") -> CaptionDataset:
    """The original release: ``Images/``, ``Flickr8k.token.txt``, ``Flickr_8k.{train,dev,test}Images.txt``."""
    root = Path(root)
    tok = root / token_file
    image_dir = root / "Images" if (root / "Images").is_dir() else root / "Flicker8k_Dataset"
    if not tok.is_file():
        raise DataError(f"{tok}: Flickr8k token file not found")
    if not image_dir.is_dir():
        raise DataError(f"{root}: no Images/ folder")
    present = set(os.listdir(image_dir))
    ds = CaptionDataset(image_dir=image_dir, captions={})
    for line in tok.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        key, _, text = line.partition("\t")
        m = _FLICKR_ID.match(key.strip())
        if not m:
            ds.skipped["malformed ids"] += 1
            continue
        _add(ds, m["img"], text, present)
    for split in SPLITS:
        f = root / f"Flickr_8k.{split}Images.txt"
        if f.is_file():
            names = [n.strip() for n in f.read_text().split() if n.strip()]
            ds.splits[split] = [n for n in names if n in ds.captions]
            if len(ds.splits[split]) < len(names):
                ds.skipped[f"{split}-split images without captions"] += len(names) - len(ds.splits[split])
    ds.report(str(tok))
    return ds


def read_karpathy_json(path: str | Path, image_dir: str | Path | None = None) -> CaptionDataset:
    """Karpathy's ``dataset_flickr8k.json`` / ``dataset_coco.json`` format."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        images = d["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a Karpathy-style caption JSON ({e})") from None
    image_dir = Path(image_dir) if image_dir else path.parent / "Images"
    listings: dict[str, set[str]] = {}  # subfolder ("" for image_dir itself) -> its file names

    def present_in(sub: str) -> set[str]:
        if sub not in listings:
            d = image_dir / sub
            listings[sub] = set(os.listdir(d)) if d.is_dir() else set()
        return listings[sub]

    ds = CaptionDataset(image_dir=image_dir, captions={}, splits={s: [] for s in SPLITS})
    split_map = {"train": "train", "restval": "train", "val": "dev", "dev": "dev", "test": "test"}
    for im in images:
        name = im.get("filename") if isinstance(im, dict) else None
        if not name:
            ds.skipped["malformed ids"] += 1
            continue
        sub = im.get("filepath") or ""
        rel = str(Path(sub) / name) if sub else name
        for s in im.get("sentences", []):
            raw = s.get("raw") or " ".join(s.get("tokens", []))
            # COCO-style entries live in IMAGE_DIR/filepath/filename: look for them there.
            _add(ds, rel, raw, present_in(sub), check=name)
        split = split_map.get(im.get("split", "train"))
        if rel in ds.captions and split:
            ds.splits[split].append(rel)
    ds.splits = {k: v for k, v in ds.splits.items() if v}
    ds.report(str(path))
    return ds


def read_csv(path: str | Path, image_dir: str | Path | None = None) -> CaptionDataset:
    """A CSV with header ``image,caption`` (and an optional ``split`` column)."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir else path.parent
    present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    ds = CaptionDataset(image_dir=image_dir, captions={})
    splits: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{path}: CSV needs a header with columns image,caption")
        for row in reader:
            img = (row.get("image") or "").strip()
            if not img:
                ds.skipped["malformed ids"] += 1
                continue
            if _add(ds, img, row.get("caption") or "", present) and row.get("split"):
                s = row["split"].strip()
                if img not in splits.setdefault(s, []):
                    splits[s].append(img)
    ds.splits = splits
    ds.report(str(path))
    return ds


def read_captions_json(path: str | Path, image_dir: str | Path | None = None) -> CaptionDataset:
    """A ``{file: [captions]}`` JSON (the COCO dev set's ``captions.json``); photos in ``images/``
    beside it, else beside the file. It names no splits: ``split("all")`` reads every photo."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a caption JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise DataError(f"{path}: expected {{file: [captions]}}")
    if image_dir is None:
        image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_dir = Path(image_dir)
    present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    ds = CaptionDataset(image_dir=image_dir, captions={})
    for img, caps in d.items():
        if not str(img).strip():
            ds.skipped["malformed ids"] += 1
            continue
        for c in caps:
            _add(ds, str(img), c if isinstance(c, str) else "", present)
    ds.report(str(path))
    return ds


def _is_captions_map(path: Path) -> bool:
    """True for ``{file: [captions]}``; False for Karpathy's ``{"images": [...]}``."""
    try:
        d = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "images" not in d and all(isinstance(v, list) for v in d.values())


def _add(ds: CaptionDataset, image: str, text: str, present: set[str], check: str | None = None) -> bool:
    text = " ".join(text.split())
    if (check or image) not in present:
        ds.skipped["captions of missing images"] += 1
        return False
    if not any(c.isalnum() for c in text):
        ds.skipped["empty captions"] += 1
        return False
    ds.captions.setdefault(image, []).append(text)
    return True


def load_dataset(data: str | Path | None = None) -> CaptionDataset:
    """Read a dataset from a Flickr8k folder, a Karpathy JSON or a CSV (detected by its form)."""
    p = resolve_data_dir(data)
    if p.is_dir():
        if (p / "Flickr8k.token.txt").is_file():
            return read_flickr8k(p)
        for name in ("dataset_flickr8k.json", "dataset_coco.json", "captions.json"):
            if (p / name).is_file():
                if _is_captions_map(p / name):
                    return read_captions_json(p / name)
                return read_karpathy_json(p / name)
        if (p / "captions.csv").is_file():
            return read_csv(p / "captions.csv")
        raise DataError(f"{p}: no Flickr8k.token.txt, Karpathy JSON or captions.csv inside")
    if p.suffix.lower() == ".json":
        return read_captions_json(p) if _is_captions_map(p) else read_karpathy_json(p)
    if p.suffix.lower() == ".csv":
        return read_csv(p)
    raise DataError(f"{p}: expected a data folder, a .json or a .csv file")
