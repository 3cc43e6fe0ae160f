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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write, atomic_write_json

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
    atomic_write(folder / MATCHER_WEIGHTS, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(folder / MATCHER_CONFIG, {"config": matcher.config.to_dict(), **(extra or {})})


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
