"""Fitting the image-caption matcher (``captioning.matcher``) on a dataset's cached features:
contrastive training with CLIP's symmetric InfoNCE loss, chosen by dev recall."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..matcher import MATCHER_CONFIG, Matcher, MatcherConfig, load_matcher, retrieval_recall, save_matcher


def _info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (b, b) photo-caption logit matrix whose diagonal are the pairs."""
    y = torch.arange(logits.size(0))
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


def train_matcher(pooled: torch.Tensor, captions: Sequence[Sequence[Sequence[int]]], val_pooled: torch.Tensor,
                  val_captions: Sequence[Sequence[int]], config: MatcherConfig, epochs: int = 30,
                  batch_size: int = 128, lr: float = 2e-4, seed: int = 0, progress: bool = True,
                  grid: Optional[torch.Tensor] = None, val_grid: Optional[torch.Tensor] = None,
                  base: Optional[Matcher] = None) -> tuple[Matcher, list[dict]]:
    """Train with the symmetric InfoNCE loss (one per head); keep the epoch with the best
    validation R@5 (of the summed similarity).

    Args:
        pooled: (B, C) train photos. captions: per train photo, its captions as word-id lists
            (one is drawn per photo and epoch). val_pooled (B', C), val_captions: one per photo.
        grid, val_grid: (B, P, C) and (B', P, C), needed with ``config.regions``.
        base: with ``config.regions``, a trained matcher without regions whose weights are kept
            as they are (frozen); only the region head is trained.
    Returns:
        (best matcher in eval mode, one dict per epoch: loss, R@1/5/10, seconds).
    """
    if config.regions and (grid is None or val_grid is None):
        raise ValueError("a regions matcher trains on grid features: pass grid and val_grid")
    if base is not None and (not config.regions or base.config.regions):
        raise ValueError("base: a matcher without regions, to which a region head is added")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = Matcher(config)
    if base is not None:
        m.load_state_dict(base.state_dict(), strict=False)  # every weight but the region head's
        for prm in m.parameters():
            prm.requires_grad_(False)
        for prm in m.region_parameters():
            prm.requires_grad_(True)
    opt = torch.optim.Adam([prm for prm in m.parameters() if prm.requires_grad], lr)
    best, best_state, log = -1.0, None, []
    for epoch in range(epochs):
        m.train()
        t0, total, n = time.time(), 0.0, 0
        perm = rng.permutation(len(captions))
        for b in tqdm(range(0, len(perm), batch_size), desc=f"matcher epoch {epoch + 1}/{epochs}",
                      disable=not progress, unit="batch", mininterval=15):
            sel = perm[b:b + batch_size]
            tokens = m.pad([captions[i][rng.integers(len(captions[i]))] for i in sel])  # (b, T)
            loss = torch.zeros(())
            if base is None:
                loss = loss + _info_nce(m.logit_scale.exp().clamp(max=100) * m.image(pooled[sel]) @ m.text(tokens).T)
            if config.regions:
                loss = loss + _info_nce(m.region_score(m.regions(grid[sel]), *m.words(tokens)) / config.region_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        r = retrieval_recall(m, val_pooled, val_captions, grid=val_grid)
        log.append({"epoch": epoch + 1, "loss": total / max(1, n), **r, "seconds": round(time.time() - t0, 1)})
        if progress:
            print(f"matcher epoch {epoch + 1}: loss {total / max(1, n):.3f}  val R@1 {r['R@1']:.3f}  "
                  f"R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}", flush=True)
        if r["R@5"] > best:
            best, best_state = r["R@5"], {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(best_state)
    return m.eval(), log


def fit_matcher(model: str | Path, data: str | Path | None = None, features: str | Path | None = None,
                epochs: int = 30, seed: int = 0, progress: bool = True, regions: bool = False,
                batch_size: int = 128, region_dim: int = 512) -> dict:
    """Train a matcher for the bundle ``model`` (its vocabulary, its encoder's cached pooled
    features, and grid features with ``regions``) on the train split, chosen by dev R@5, and write
    it into the bundle folder.

    With ``regions``, a bundle whose matcher has no region head gets one added: that matcher's
    weights are kept and only the head is trained, and its record moves under "regions" in
    matcher.json beside the first training's. Otherwise both heads are trained together.

    Returns:
        this training's record in matcher.json: data, epochs run, batch size, best epoch, its dev
        recall, minutes, the per-epoch log.
    """
    from ..bundle import VOCAB, read_config
    from .data import load_dataset
    from .features import FeatureCache, find_cache
    from ..images import Preprocessing
    from .train import DEFAULT_FEATURES
    from ..vocab import Vocab

    model = Path(model)
    cfg = read_config(model)
    vocab = Vocab.load(model / VOCAB)
    ds = load_dataset(data)
    prep = Preprocessing.from_dict(cfg["preprocessing"])
    cache = FeatureCache.open(find_cache(features or DEFAULT_FEATURES, cfg["encoder"]["name"], prep,
                                         sorted(ds.captions)))
    index = cache.index()

    def split(name: str) -> tuple[torch.Tensor, Optional[torch.Tensor], list[list[list[int]]]]:
        names = ds.split(name)
        rows = [index[n] for n in names]
        pooled = torch.from_numpy(np.asarray(cache.pooled[rows], dtype=np.float32))  # (B, C)
        grid = torch.from_numpy(np.asarray(cache.grid[rows])) if regions else None  # (B, P, C) fp16, 0.75 GB for train
        return pooled, grid, [[vocab.encode(c, add_special=False) for c in ds.captions[n]] for n in names]

    base = load_matcher(model) if regions else None
    if base is not None and base.config.regions:
        raise ValueError(f"{model}: its matcher already has a region head")
    t0 = time.time()
    tr_pooled, tr_grid, tr_caps = split("train")
    dev_pooled, dev_grid, dev_caps = split("dev")
    mc = (MatcherConfig(**{**base.config.to_dict(), "regions": True, "region_dim": region_dim}) if base is not None
          else MatcherConfig(vocab_size=len(vocab), feature_dim=tr_pooled.size(1), regions=regions,
                             region_dim=region_dim))
    m, log = train_matcher(tr_pooled, tr_caps, dev_pooled, [c[0] for c in dev_caps], mc, epochs=epochs,
                           batch_size=batch_size, seed=seed, progress=progress, grid=tr_grid, val_grid=dev_grid,
                           base=base)
    best = max(log, key=lambda r: r["R@5"])
    record = {"trained_on": "train split, every reference caption", "epochs": epochs, "batch_size": batch_size,
              "best_epoch": best["epoch"],
              "dev_recall": {k: round(best[k], 4) for k in ("R@1", "R@5", "R@10")}, "seed": seed,
              "minutes": round((time.time() - t0) / 60, 1), "log": log}
    if base is not None:
        first = json.loads((model / MATCHER_CONFIG).read_text())
        first.pop("config", None)
        info = {**first, "regions": record}
    else:
        info = record
    save_matcher(model, m, info)
    return record
