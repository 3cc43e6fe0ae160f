"""A toy captioner whose evidence is known, for checking explanation methods.

Images are 224x224 dim grey noise with one 32x32 coloured square in one cell of the 7x7
grid, captioned "a {red|blue} square", or noise alone, captioned "a grey square". The encoder is a tiny frozen CNN whose 7x7 feature
cells each see exactly their own 32x32 block of pixels, so the colour word can only come from
the square's block: a faithful attribution of the colour word must peak there. This is the
"known ground truth" style of check used by Adebayo et al. 2018 ("Sanity Checks for Saliency
Maps", arXiv:1810.03292) and Yang & Kim 2019 ("Benchmarking Attribution Methods with Relative
Feature Importance", arXiv:1907.09701).

Training a decoder on it takes about a second on one CPU thread.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from captioning.decoders import build_decoder
from captioning.encoders import Encoder
from captioning.images import Preprocessing, preprocess
from captioning.vocab import Vocab

SIZE, CELL = 224, 32
COLOURS = {"red": (1.0, 0.1, 0.1), "blue": (0.1, 0.2, 1.0)}
WORDS = ["a", "red", "blue", "grey", "square"]


class ToyEncoder(Encoder):
    """(B, 3, 224, 224) -> feature map (B, 16, 7, 7); cell (i, j) sees only pixels of block (i, j)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.name = "toy"
        self.feature_dim = 16
        g = torch.Generator().manual_seed(seed)
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU())  # 224 -> 28
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 4, stride=4), nn.ReLU())  # 28 -> 7
        self.fc = nn.Linear(16, 1000)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.05))
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(fmap.mean((2, 3)))

    def stages(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict(block1=self.block1, block2=self.block2)


def toy_image(colour: str, cell: tuple[int, int], seed: int = 0) -> Image.Image:
    """A 224x224 RGB image: grey noise in [0.2, 0.5] with a 32x32 ``colour`` square at grid
    ``cell`` (row, col); colour "grey" draws no square."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 0.5, size=(SIZE, SIZE, 1)).repeat(3, 2)
    r, c = cell
    if colour != "grey":
        a[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = COLOURS[colour]
    return Image.fromarray((a * 255).round().astype(np.uint8))


def toy_mask(cell: tuple[int, int]) -> np.ndarray:
    """(224, 224) bool mask of a grid cell."""
    m = np.zeros((SIZE, SIZE), dtype=bool)
    r, c = cell
    m[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = True
    return m


def _holes(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() >= 0.5:
        return im
    a = np.array(im)
    for _ in range(int(rng.integers(1, 25))):
        k = int(rng.choice([16, 32]))
        r, c = rng.integers(0, SIZE // 16, 2) * 16
        if a[r:r + k, c:c + k].max() <= 0.5 * 255 or rng.random() < 0.5:  # spare the square half the time
            a[r:r + k, c:c + k] = 0
    return Image.fromarray(a)


def toy_vocab() -> Vocab:
    return Vocab(WORDS)


def train_toy_captioner(kind: str = "show_attend_tell", seed: int = 0, steps: Optional[int] = None, n_images: int = 96,
                        encoder: Optional[ToyEncoder] = None):
    """Train a small decoder of ``kind`` on toy images; returns a ``Captioner`` that says "a red square"
    or "a blue square" for the square's colour, wherever it is, and "a grey square" without one.
    Half of the training images also have random cells blacked out, so that deleting
    pixels (faithfulness.py) stays within what the model has seen."""
    from captioning.api import Captioner

    steps = steps or (200 if kind == "show_attend_tell" else 600)  # pooled-feature decoders learn slower
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = encoder or ToyEncoder(seed)
    vocab = toy_vocab()
    prep = Preprocessing()
    colours = list(COLOURS) + ["grey"]
    labels = rng.integers(0, 3, n_images)
    cells = rng.integers(0, 7, (n_images, 2))
    x = torch.stack([preprocess(_holes(toy_image(colours[k], tuple(c), seed=1000 * seed + i), rng), prep)
                     for i, (k, c) in enumerate(zip(labels, cells))])
    with torch.no_grad():
        grid, pooled = enc(x)
    caps = torch.tensor([vocab.encode(f"a {colours[k]} square") for k in labels])  # (N, 5)
    cfg = {"vocab_size": len(vocab), "feature_dim": enc.feature_dim, "embed_dim": 16, "hidden_dim": 32,
           "dropout": 0.0}
    if kind == "show_attend_tell":
        cfg["attention_dim"] = 16
    elif kind == "merge":
        cfg["merge_dim"] = 32
    dec = build_decoder(kind, cfg)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    dec.train()
    for i in range(steps):
        idx = torch.from_numpy(rng.integers(0, n_images, 32))
        logp, _ = dec(grid[idx], pooled[idx], caps[idx])
        loss = -logp.gather(2, caps[idx, 1:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    return Captioner(enc, dec, vocab, prep)


@functools.lru_cache(maxsize=8)
def cached_toy_captioner(kind: str = "show_attend_tell", seed: int = 0):
    """``train_toy_captioner(kind, seed)``, trained once per process (shared by tests; do not modify it)."""
    return train_toy_captioner(kind, seed)
