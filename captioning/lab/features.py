"""Feature cache: run the frozen encoder over a dataset once, store grid + pooled features.

Layout of a cache folder ``OUT/<encoder>-<key>/``:
  meta.json      encoder, preprocessing, shapes, image list and the key they hash to
  grid.f16       (N, P, C) float16, memory-mapped
  pooled.f16     (N, C) float16
  progress.json  how many images are done; written atomically after each chunk
The key covers the encoder name, the preprocessing, the image list and the view (the photos as
they are, or mirrored left to right for training-time augmentation), so a cache made with other
settings is never read by mistake. A killed run resumes at the first unfinished chunk.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import CaptionDataset
from ..atomic import atomic_write_text
from ..encoders import build_encoder
from ..images import Preprocessing, load_image, preprocess

CHUNK = 64


def cache_key(encoder: str, prep: Preprocessing, images: list[str], flip: bool = False) -> str:
    # The plain view keeps the key it had before mirrored views existed, so old caches stay valid.
    h = hashlib.sha1(json.dumps([encoder, prep.to_dict(), images] + (["hflip"] if flip else [])).encode())
    return h.hexdigest()[:12]


@dataclass
class FeatureCache:
    """Read side of a finished cache: ``grid[i]`` (P, C) and ``pooled[i]`` (C,) for image i."""

    folder: Path
    images: list[str]
    grid: np.memmap  # (N, P, C) float16
    pooled: np.memmap  # (N, C) float16
    meta: dict

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.images)}

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows -> float32 grid (b, P, C) and pooled (b, C), read in file order (faster on a memmap)."""
        order = np.argsort(rows)
        g = np.empty((len(rows),) + self.grid.shape[1:], dtype=np.float16)
        p = np.empty((len(rows), self.pooled.shape[1]), dtype=np.float16)
        g[order] = self.grid[rows[order]]
        p[order] = self.pooled[rows[order]]
        return torch.from_numpy(g).float(), torch.from_numpy(p).float()

    @classmethod
    def open(cls, folder: str | Path) -> "FeatureCache":
        folder = Path(folder)
        meta_p = folder / "meta.json"
        if not meta_p.is_file():
            raise FileNotFoundError(f"{meta_p}: no feature cache here; run `python -m captioning extract-features`")
        meta = json.loads(meta_p.read_text())
        done = json.loads((folder / "progress.json").read_text())["done"] if (folder / "progress.json").is_file() else 0
        n, p, c = meta["n"], meta["positions"], meta["channels"]
        if done < n:
            raise RuntimeError(f"{folder}: feature cache is incomplete ({done}/{n}); run extract-features again to finish it")
        for name, shape in (("grid.f16", (n, p, c)), ("pooled.f16", (n, c))):
            want = int(np.prod(shape)) * 2
            size = (folder / name).stat().st_size if (folder / name).is_file() else -1
            if size != want:  # a cut copy, or files from another run: never read as complete
                raise RuntimeError(f"{folder / name}: {size} bytes, expected {want} for {shape}; "
                                   "delete the folder and run extract-features again")
        grid = np.memmap(folder / "grid.f16", dtype=np.float16, mode="r", shape=(n, p, c))
        pooled = np.memmap(folder / "pooled.f16", dtype=np.float16, mode="r", shape=(n, c))
        return cls(folder, meta["images"], grid, pooled, meta)


def find_cache(root: str | Path, encoder: str, prep: Preprocessing, images: list[str], flip: bool = False) -> Path:
    return Path(root) / f"{encoder}{'-hflip' if flip else ''}-{cache_key(encoder, prep, images, flip)}"


@torch.no_grad()
def extract_features(ds: CaptionDataset, encoder_name: str, out_root: str | Path,
                     prep: Preprocessing = Preprocessing(), progress: bool = True, flip: bool = False) -> Path:
    """Fill (or finish) the cache for every image of ``ds``; returns the cache folder.

    With ``flip`` every photo is mirrored left to right first: a second view of the training set.
    """
    images = sorted(ds.captions)
    folder = find_cache(out_root, encoder_name, prep, images, flip)
    prog = folder / "progress.json"
    if prog.is_file() and json.loads(prog.read_text())["done"] >= len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    enc = build_encoder(encoder_name)
    x = torch.zeros(1, 3, prep.size, prep.size)
    p, c = enc(x)[0].shape[1:]
    n = len(images)
    meta = {"encoder": encoder_name, "preprocessing": prep.to_dict(), "n": n, "positions": p, "channels": c,
            "key": cache_key(encoder_name, prep, images, flip), "flip": flip, "images": images}
    if not (folder / "meta.json").is_file():
        atomic_write_text(folder / "meta.json", json.dumps(meta))
    sizes = {"grid.f16": n * p * c * 2, "pooled.f16": n * c * 2}
    # Resume only into files of the right size; anything else (a kill before both files existed,
    # a stray copy) starts over: rows are only trusted up to progress.json's count.
    resumable = all((folder / f).is_file() and (folder / f).stat().st_size == b for f, b in sizes.items())
    mode = "r+" if resumable else "w+"
    grid = np.memmap(folder / "grid.f16", dtype=np.float16, mode=mode, shape=(n, p, c))
    pooled = np.memmap(folder / "pooled.f16", dtype=np.float16, mode=mode, shape=(n, c))
    done = json.loads(prog.read_text())["done"] if prog.is_file() and resumable else 0

    def load(i: int) -> torch.Tensor:
        x = preprocess(load_image(ds.path(images[i])), prep)  # (3, S, S)
        return x.flip(-1) if flip else x

    bar = tqdm(total=n, initial=done, unit="img", desc=f"features {encoder_name}{' (mirrored)' if flip else ''}",
               disable=not progress)
    with ThreadPoolExecutor(max_workers=2) as pool:
        nxt = pool.map(load, range(done, min(done + CHUNK, n)))
        for start in range(done, n, CHUNK):
            end = min(start + CHUNK, n)
            batch = torch.stack(list(nxt))  # (b, 3, S, S)
            if end < n:  # decode the next chunk while the encoder runs on this one
                nxt = pool.map(load, range(end, min(end + CHUNK, n)))
            g, pl = enc(batch)  # (b, P, C), (b, C)
            grid[start:end] = g.numpy().astype(np.float16)
            pooled[start:end] = pl.numpy().astype(np.float16)
            grid.flush()
            pooled.flush()
            atomic_write_text(prog, json.dumps({"done": end}))
            bar.update(end - start)
    bar.close()
    return folder
