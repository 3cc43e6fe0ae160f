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

With ``regions`` on, it also matches each word to the photo's grid cells, the text-to-image
stacked cross attention of SCAN (Lee et al. 2018, "Stacked Cross Attention for Image-Text
Matching"): each word attends over the cells, and the similarity adds the mean over words of
cos(word, attended cells) to the sentence-level cosine. A caption that names something in one
corner of the photo then scores above a generic one, which the pooled features blur. The region
head has its own word embeddings and GRU: sharing the sentence head's whole word encoder, or only
its embeddings, re-ranked worse on Flickr8k dev. ``fit_matcher(regions=True)`` adds the head to a
bundle's trained matcher and leaves the rest of it as it was.

Dimensions: B images, N captions, T tokens, P grid cells, C encoder channels, E word embedding,
D joint space.
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
    regions: bool = False  # also match each word to the grid cells (SCAN text-to-image)
    region_dim: int = 512  # the word-region space
    region_sharpness: float = 9.0  # SCAN's lambda_1: inverse temperature of a word's attention over cells
    region_temperature: float = 0.05  # InfoNCE temperature of the word-region similarity
    # The GRUs read each caption's own words only (packed sequences). Matchers trained before this
    # existed read the padding too, so a caption's score depended on the longest caption scored
    # beside it; load_matcher keeps their behaviour (packed False) for the weights they learned.
    packed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class Matcher(nn.Module):
    """Photo (pooled features) and caption (word ids) into one unit-length space; with
    ``config.regions``, also each word against the photo's grid cells."""

    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = config
        D = config.joint_dim
        self.image_proj = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, D))
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.gru = nn.GRU(config.embed_dim, D, batch_first=True, bidirectional=True)
        self.text_proj = nn.Linear(2 * D, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if config.regions:
            R = config.region_dim
            self.region_proj = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, R))
            self.region_embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
            self.region_gru = nn.GRU(config.embed_dim, R, batch_first=True, bidirectional=True)

    def region_parameters(self) -> list[nn.Parameter]:
        """The word-region head's own parameters (none without ``regions``)."""
        if not self.config.regions:
            return []
        return [*self.region_proj.parameters(), *self.region_embed.parameters(), *self.region_gru.parameters()]

    def image(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, C) -> (B, D), unit length."""
        return F.normalize(self.image_proj(pooled), dim=-1)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T) word ids, 0-padded, no <start>/<end> -> (N, D), unit length."""
        mask = (tokens != 0).float()  # (N, T)
        h = self._encode(self.gru, self.embed(tokens), tokens)  # (N, T, 2D)
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (N, 2D) mean over words
        return F.normalize(self.text_proj(h), dim=-1)

    def _encode(self, gru: nn.GRU, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """emb (N, T, E) of tokens (N, T) -> the bidirectional GRU's states (N, T, 2H), 0 at padding
        when ``packed``."""
        if not self.config.packed:
            return gru(emb)[0]
        lengths = (tokens != 0).sum(1).clamp(min=1).cpu()  # (N,) an empty caption reads one pad
        h, _ = gru(nn.utils.rnn.pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False))
        return nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=tokens.size(1))[0]

    def words(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, T) -> each word for the region head (N, T, R), unit length, and the mask (N, T)."""
        h = self._encode(self.region_gru, self.region_embed(tokens), tokens)  # (N, T, 2R)
        R = h.size(-1) // 2
        return F.normalize((h[..., :R] + h[..., R:]) / 2, dim=-1), (tokens != 0).float()  # the directions averaged, as SCAN

    def regions(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, P, C) -> (B, P, R), unit length."""
        return F.normalize(self.region_proj(grid.float()), dim=-1)

    def region_score(self, regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SCAN text-to-image similarity: regions (B, P, R), words (N, T, R), mask (N, T) -> (B, N),
        the mean over a caption's words of cos(word, the attention-weighted sum of cells)."""
        cos = torch.einsum("ntr,bpr->nbtp", words, regions)  # (N, B, T, P)
        att = F.softmax(self.config.region_sharpness * F.leaky_relu(cos, 0.1), dim=-1)  # (N, B, T, P)
        # word . sum_p att_p cell_p = sum_p att_p cos_p, and |sum_p att_p cell_p|^2 = att' G att with
        # the cells' Gram matrix G: no (N, B, T, R) tensor, and P^2 instead of P * R work per word.
        gram = regions @ regions.transpose(1, 2)  # (B, P, P)
        norm = (torch.einsum("nbtp,bpq->nbtq", att, gram) * att).sum(-1).clamp(min=1e-24).sqrt()  # (N, B, T)
        per_word = (att * cos).sum(-1) / norm  # (N, B, T)
        return ((per_word * mask[:, None]).sum(-1) / mask.sum(-1, keepdim=True).clamp(min=1)).T  # (B, N)

    def scores(self, pooled: torch.Tensor, grid: Optional[torch.Tensor], tokens: torch.Tensor,
               chunk: int = 64) -> torch.Tensor:
        """Similarity of every photo to every caption: pooled (B, C), grid (B, P, C) or None
        without regions, tokens (N, T) -> (B, N): the cosine, plus the word-region score with
        ``regions``. Captions go through in chunks to bound the (N, B, T, P) attention."""
        img = self.image(pooled.float())  # (B, D)
        reg = self._grid_regions(grid)
        out = []
        for i in range(0, tokens.size(0), chunk):
            t = tokens[i:i + chunk]
            s = img @ self.text(t).T  # (B, n)
            if reg is not None:
                s = s + self.region_score(reg, *self.words(t))
            out.append(s)
        return torch.cat(out, 1)

    def _grid_regions(self, grid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not self.config.regions:
            return None
        if grid is None:
            raise ValueError("this matcher matches words to grid cells (regions): pass the photo's grid features")
        return self.regions(grid)

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
    def similarity(self, pooled: torch.Tensor, captions: Sequence[Sequence[int]],
                   grid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """How well each caption fits one photo -> (N,): the cosine with its pooled features (C,),
        plus, with ``regions``, the word-region score against its grid (P, C)."""
        return self.scores(pooled[None], None if grid is None else grid[None], self.pad(captions))[0]


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
        cfg = MatcherConfig(**{"packed": False, **json.loads(cp.read_text())["config"]})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cp}: not a valid matcher config ({e})") from None
    m = Matcher(cfg)
    try:
        m.load_state_dict({k: v.float() for k, v in load_file(str(wp)).items()})
    except (OSError, SafetensorError, RuntimeError) as e:
        raise ValueError(f"{wp}: not valid matcher weights ({str(e).splitlines()[0]})") from None
    return m.eval()


def retrieval_recall(matcher: Matcher, pooled: torch.Tensor, captions: Sequence[Sequence[int]],
                     ks: Sequence[int] = (1, 5, 10), grid: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Image-to-caption recall@k with one caption per image (caption i belongs to image i);
    grid (B, P, C) is needed with ``regions``."""
    matcher.eval()
    with torch.no_grad():
        s = matcher.scores(pooled, grid, matcher.pad(captions))  # (B, B)
    rank = (s > s.diag()[:, None]).sum(1)  # (B,) captions scored above the right one
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


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
