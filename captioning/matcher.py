"""An image-caption matcher that re-ranks beam search's n-best list.

Beam search ranks captions by how likely the decoder finds them, which favours safe, generic
wording; the finished beams often hold a caption that fits the photo better (on Flickr8k dev, the
best of the beam-5 list by CIDEr-D scores 0.69 against 0.50 for the top one). A joint embedding
of photos and captions, trained contrastively on the train split like VSE (Kiros et al. 2014,
"Unifying Visual-Semantic Embeddings with Multimodal Neural Language Models") with CLIP's
symmetric InfoNCE loss (Radford et al. 2021), scores how well each caption fits its photo;
``rerank`` adds ``weight * cosine`` to each beam's length-normalised score. This is the
discriminative re-ranking of the n-best list that Fang et al. 2015 ("From Captions to Visual
Concepts and Back", their DMSM) used for COCO.

The matcher reads the pooled encoder features (which captioning computes anyway) and the
decoder's vocabulary, so it lives in the decoder's bundle folder as ``matcher.safetensors`` +
``matcher.json``.

Dimensions: B images, N captions, T tokens, C encoder channels, E word embedding, D joint space.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

MATCHER_WEIGHTS, MATCHER_CONFIG = "matcher.safetensors", "matcher.json"


@dataclass
class MatcherConfig:
    vocab_size: int
    feature_dim: int = 1280
    embed_dim: int = 300
    joint_dim: int = 512
    dropout: float = 0.2
    max_tokens: int = 24

    def to_dict(self) -> dict:
        return asdict(self)


class Matcher(nn.Module):
    """Photo (pooled features) and caption (word ids) into one unit-length space."""

    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = config
        D = config.joint_dim
        self.image_proj = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, D))
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.gru = nn.GRU(config.embed_dim, D, batch_first=True, bidirectional=True)
        self.text_proj = nn.Linear(2 * D, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, C) -> (B, D), unit length."""
        return F.normalize(self.image_proj(pooled), dim=-1)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T) word ids, 0-padded, no <start>/<end> -> (N, D), unit length."""
        mask = (tokens != 0).float()  # (N, T)
        h, _ = self.gru(self.embed(tokens))  # (N, T, 2D)
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (N, 2D) mean over words
        return F.normalize(self.text_proj(h), dim=-1)

    def pad(self, captions: Sequence[Sequence[int]]) -> torch.Tensor:
        """Lists of word ids -> (N, T) cut to max_tokens and 0-padded."""
        T = max(1, min(self.config.max_tokens, max((len(c) for c in captions), default=1)))
        out = torch.zeros(len(captions), T, dtype=torch.long)
        for i, c in enumerate(captions):
            c = list(c)[:T]
            if c:
                out[i, :len(c)] = torch.tensor(c)
        return out

    @torch.no_grad()
    def similarity(self, pooled: torch.Tensor, captions: Sequence[Sequence[int]]) -> torch.Tensor:
        """Cosine between one photo's pooled features (C,) and each caption -> (N,)."""
        return self.text(self.pad(captions)) @ self.image(pooled[None].float())[0]


def save_matcher(folder: str | Path, matcher: Matcher, extra: Optional[dict] = None) -> None:
    """Write matcher.safetensors (fp16) and matcher.json into ``folder``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in matcher.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".matcher.", suffix=".tmp")
    os.close(fd)
    save_file(sd, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MATCHER_WEIGHTS)
    cfg_tmp = folder / f".{MATCHER_CONFIG}.tmp"
    cfg_tmp.write_text(json.dumps({"config": matcher.config.to_dict(), **(extra or {})}, indent=2))
    os.replace(cfg_tmp, folder / MATCHER_CONFIG)


def load_matcher(folder: str | Path) -> Optional[Matcher]:
    """The matcher of a bundle folder, or None when it has none. Reads JSON and safetensors only.

    Raises:
        ValueError naming the file when one is present but unreadable.
    """
    folder = Path(folder)
    cp, wp = folder / MATCHER_CONFIG, folder / MATCHER_WEIGHTS
    if not cp.is_file() and not wp.is_file():
        return None
    try:
        cfg = MatcherConfig(**json.loads(cp.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cp}: not a valid matcher config ({e})") from None
    m = Matcher(cfg)
    try:
        m.load_state_dict({k: v.float() for k, v in load_file(str(wp)).items()})
    except (OSError, SafetensorError, RuntimeError) as e:
        raise ValueError(f"{wp}: not valid matcher weights ({str(e).splitlines()[0]})") from None
    return m.eval()


def retrieval_recall(matcher: Matcher, pooled: torch.Tensor, captions: Sequence[Sequence[int]],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-caption recall@k with one caption per image (caption i belongs to image i)."""
    matcher.eval()
    with torch.no_grad():
        s = matcher.image(pooled) @ matcher.text(matcher.pad(captions)).T  # (B, B)
    rank = (s > s.diag()[:, None]).sum(1)  # (B,) captions scored above the right one
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def train_matcher(pooled: torch.Tensor, captions: Sequence[Sequence[Sequence[int]]], val_pooled: torch.Tensor,
                  val_captions: Sequence[Sequence[int]], config: MatcherConfig, epochs: int = 30,
                  batch_size: int = 128, lr: float = 2e-4, seed: int = 0, progress: bool = True
                  ) -> tuple[Matcher, list[dict]]:
    """Train with the symmetric InfoNCE loss; keep the epoch with the best validation R@5.

    Args:
        pooled: (B, C) train photos. captions: per train photo, its captions as word-id lists
            (one is drawn per photo and epoch). val_pooled (B', C), val_captions: one per photo.
    Returns:
        (best matcher in eval mode, one dict per epoch: loss, R@1/5/10, seconds).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m = Matcher(config)
    opt = torch.optim.Adam(m.parameters(), lr)
    best, best_state, log = -1.0, None, []
    for epoch in range(epochs):
        m.train()
        t0, total, n = time.time(), 0.0, 0
        perm = rng.permutation(len(captions))
        for b in tqdm(range(0, len(perm), batch_size), desc=f"matcher epoch {epoch + 1}/{epochs}",
                      disable=not progress, unit="batch", mininterval=15):
            sel = perm[b:b + batch_size]
            caps = [captions[i][rng.integers(len(captions[i]))] for i in sel]
            img, txt = m.image(pooled[sel]), m.text(m.pad(caps))  # (b, D) each
            logits = m.logit_scale.exp().clamp(max=100) * img @ txt.T  # (b, b)
            y = torch.arange(len(sel))
            loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        r = retrieval_recall(m, val_pooled, val_captions)
        log.append({"epoch": epoch + 1, "loss": total / max(1, n), **r, "seconds": round(time.time() - t0, 1)})
        if progress:
            print(f"matcher epoch {epoch + 1}: loss {total / max(1, n):.3f}  val R@1 {r['R@1']:.3f}  "
                  f"R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}", flush=True)
        if r["R@5"] > best:
            best, best_state = r["R@5"], {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(best_state)
    return m.eval(), log


def fit_matcher(model: str | Path, data: str | Path | None = None, features: str | Path | None = None,
                epochs: int = 30, seed: int = 0, progress: bool = True) -> dict:
    """Train a matcher for the bundle ``model`` (its vocabulary, its encoder's cached pooled
    features) on the train split, chosen by dev R@5, and write it into the bundle folder.

    Returns:
        what matcher.json records besides the config: data, epochs run, best epoch, its dev recall.
    """
    from .bundle import VOCAB, read_config
    from .data import load_dataset
    from .features import FeatureCache, find_cache
    from .images import Preprocessing
    from .train import DEFAULT_FEATURES
    from .vocab import Vocab

    model = Path(model)
    cfg = read_config(model)
    vocab = Vocab.load(model / VOCAB)
    ds = load_dataset(data)
    prep = Preprocessing.from_dict(cfg["preprocessing"])
    cache = FeatureCache.open(find_cache(features or DEFAULT_FEATURES, cfg["encoder"]["name"], prep,
                                         sorted(ds.captions)))
    index = cache.index()

    def split(name: str) -> tuple[torch.Tensor, list[list[list[int]]]]:
        names = ds.split(name)
        pooled = torch.from_numpy(np.asarray(cache.pooled[[index[n] for n in names]], dtype=np.float32))  # (B, C)
        return pooled, [[vocab.encode(c, add_special=False) for c in ds.captions[n]] for n in names]

    t0 = time.time()
    tr_pooled, tr_caps = split("train")
    dev_pooled, dev_caps = split("dev")
    mc = MatcherConfig(vocab_size=len(vocab), feature_dim=tr_pooled.size(1))
    m, log = train_matcher(tr_pooled, tr_caps, dev_pooled, [c[0] for c in dev_caps], mc, epochs=epochs,
                           seed=seed, progress=progress)
    best = max(log, key=lambda r: r["R@5"])
    info = {"trained_on": "train split, every reference caption", "epochs": epochs, "best_epoch": best["epoch"],
            "dev_recall": {k: round(best[k], 4) for k in ("R@1", "R@5", "R@10")}, "seed": seed,
            "minutes": round((time.time() - t0) / 60, 1), "log": log}
    save_matcher(model, m, info)
    return info
