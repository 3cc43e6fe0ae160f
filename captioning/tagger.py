"""Concept tagger: which of a few hundred visual concepts a photo shows, independently of its caption.

Three networks over the same label space (concepts mined from the Flickr8k training captions,
``captioning.lab.tagging``):

* ``image``: the frozen encoder's grid features (B, P, C) -> a small MLP scores every grid cell
  for every concept, and a noisy-OR over the cells gives the photo's probability (multiple-instance
  learning, Fang et al. 2015, "From Captions to Visual Concepts and Back"):
  ``P(concept) = 1 - prod_r (1 - p_r)``. The per-cell probabilities ``p_r`` are the concept's
  location map, for free.
* ``text``: a caption's words -> a Bi-LSTM, max-pooled over time -> concepts (the seed's text network).
* ``joint``: the pooled image features and the caption's Bi-LSTM state together.

A tagger bundle is a folder: ``tagger.json`` (format ``captioning-tagger``; per network its
dataclass config, weights file and per-concept thresholds tuned on dev), ``concepts.json`` (each
concept, its training frequency and the word forms that name it), ``vocab.json`` (the text
networks' words) and one fp16 safetensors file per network. Loading parses JSON and safetensors
only; every failure is a one-line ``BundleError`` naming the file.

The tagger shares the encoder's forward pass with the captioner::

    cap = Captioner.from_pretrained()
    tagger = Tagger.from_pretrained(encoder=cap.encoder)
    [(caption, tags)] = caption_and_tag(cap, tagger, ["photo.jpg"])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bundle import BundleError, load_weights, read_json
from .images import ImageInput, Preprocessing, load_image, preprocess
from .paths import MODELS_DIR
from .vocab import Vocab, tokenize

FORMAT = "captioning-tagger"
VERSION = 1
# Not config.json: the folder sits beside the caption bundles in assets/models, and the app and
# the bundle checks list every folder with a config.json as a caption model.
CONFIG, CONCEPTS, VOCAB = "tagger.json", "concepts.json", "vocab.json"
DEFAULT_TAGGER = MODELS_DIR / "tagger"
KINDS = ("image", "text", "joint")
MAX_DIM = 1 << 16


# --- configs -----------------------------------------------------------------------------

class _Config:
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        for k, v in d.items():
            t = str(names[k].type)
            if t == "int" and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM):
                raise ValueError(f"{k} must be an integer from 1 to {MAX_DIM}, got {v!r:.40}")
            if t == "float" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
                raise ValueError(f"{k} must be a number in [0, 1), got {v!r:.40}")
        return cls(**d)


@dataclass
class ImageTaggerConfig(_Config):
    n_concepts: int
    feature_dim: int = 1280
    hidden_dim: int = 512
    dropout: float = 0.3
    prior: float = 0.02  # initial photo-level probability of every concept (sets the output bias)
    global_instance: bool = False  # the pooled features are one more instance of the noisy-OR (the whole photo)


@dataclass
class TextTaggerConfig(_Config):
    n_concepts: int
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 256
    dropout: float = 0.3


@dataclass
class JointTaggerConfig(_Config):
    n_concepts: int
    vocab_size: int
    feature_dim: int = 1280
    embed_dim: int = 256
    hidden_dim: int = 256
    image_dim: int = 512
    dropout: float = 0.3


# --- networks ----------------------------------------------------------------------------

def noisy_or(region_logits: torch.Tensor) -> torch.Tensor:
    """(B, P, K) per-region logits -> (B, K) logits of ``1 - prod_r (1 - sigmoid(l_r))``.

    Computed in log space: ``log(1 - P) = -sum_r softplus(l_r) = -S``, so ``logit(P) = log(1 - e^-S) + S``.
    """
    s = F.softplus(region_logits).sum(1).clamp_min(1e-6)  # (B, K)
    return torch.log(-torch.expm1(-s)) + s


class ImageTagger(nn.Module):
    """Grid features (B, P, C) -> per-region concept logits (B, P, K); noisy-OR -> (B, K)."""

    kind = "image"

    def __init__(self, config: ImageTaggerConfig):
        super().__init__()
        self.config = config
        c = config
        self.hidden = nn.Linear(c.feature_dim, c.hidden_dim)
        self.drop = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.hidden_dim, c.n_concepts)
        # Start every photo-level probability near ``prior`` for a 7x7 grid: each of the 49 cells
        # gets q with 1 - (1 - q)^49 = prior.
        q = 1 - (1 - c.prior) ** (1 / 49)
        nn.init.constant_(self.out.bias, math.log(q / (1 - q)))

    def instances(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(F.relu(self.hidden(self.drop(x)))))

    def regions(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, P, C) -> (B, P, K) logits of the grid cells (the location maps)."""
        return self.instances(grid)

    def forward(self, grid: torch.Tensor, pooled: Optional[torch.Tensor] = None, tokens=None) -> torch.Tensor:
        if self.config.global_instance:
            # the whole photo as a 50th instance: scene-level concepts ("beach", "run") need not sit in one cell
            grid = torch.cat([grid, grid.mean(1, keepdim=True) if pooled is None else pooled[:, None]], 1)
        return noisy_or(self.instances(grid))


class CaptionEncoder(nn.Module):
    """Token ids (B, T) (0 = padding) -> Bi-LSTM, max-pooled over the real steps -> (B, 2H)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != 0).sum(1).clamp_min(1)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=tokens.shape[1])
        mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None])[:, :, None]
        return h.masked_fill(~mask, -1e4).max(1).values  # (B, 2H)


class TextTagger(nn.Module):
    kind = "text"

    def __init__(self, config: TextTaggerConfig):
        super().__init__()
        self.config = config
        self.caption = CaptionEncoder(config.vocab_size, config.embed_dim, config.hidden_dim)
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(2 * config.hidden_dim, config.n_concepts)

    def forward(self, grid=None, pooled=None, tokens: torch.Tensor = None) -> torch.Tensor:
        return self.out(self.drop(self.caption(tokens)))


class JointTagger(nn.Module):
    """Pooled image features (B, C) and a caption (B, T) -> concept logits (B, K)."""

    kind = "joint"

    def __init__(self, config: JointTaggerConfig):
        super().__init__()
        self.config = config
        c = config
        self.caption = CaptionEncoder(c.vocab_size, c.embed_dim, c.hidden_dim)
        self.image = nn.Linear(c.feature_dim, c.image_dim)
        self.drop = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.image_dim + 2 * c.hidden_dim, c.n_concepts)

    def forward(self, grid=None, pooled: torch.Tensor = None, tokens: torch.Tensor = None) -> torch.Tensor:
        if pooled is None:
            pooled = grid.mean(1)
        h = torch.cat([F.relu(self.image(self.drop(pooled))), self.caption(tokens)], 1)
        return self.out(self.drop(h))


NETWORKS = {"image": (ImageTagger, ImageTaggerConfig), "text": (TextTagger, TextTaggerConfig),
            "joint": (JointTagger, JointTaggerConfig)}


def build_network(kind: str, config: Union[dict, _Config]) -> nn.Module:
    if kind not in NETWORKS:
        raise ValueError(f"unknown tagger network {kind!r}; valid: {', '.join(KINDS)}")
    cls, cfg_cls = NETWORKS[kind]
    return cls(config if isinstance(config, cfg_cls) else cfg_cls.from_dict(config))


# --- the loss, thresholds and scores -----------------------------------------------------

def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean binary cross-entropy; ``pos_weight`` (K,) multiplies the loss of every positive label."""
    return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=pos_weight)


def positive_weights(label_counts: np.ndarray, n: int, power: float = 0.5, cap: float = 30.0) -> torch.Tensor:
    """(neg / pos) ** power per concept, capped: rare concepts' positives weigh more."""
    pos = np.maximum(np.asarray(label_counts, dtype=np.float64), 1.0)
    return torch.tensor(np.minimum(((n - pos) / pos) ** power, cap), dtype=torch.float32)


def f1_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Micro and macro F1 of binary (N, K) predictions; macro averages the concepts (a concept with
    no positives and no predictions counts as F1 0, as scikit-learn's zero_division=0)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = (pred & truth).sum(0).astype(np.float64)
    fp = (pred & ~truth).sum(0).astype(np.float64)
    fn = (~pred & truth).sum(0).astype(np.float64)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1e-12)
    denom = 2 * tp + fp + fn
    per = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    p = tp.sum() / max(tp.sum() + fp.sum(), 1e-12)
    r = tp.sum() / max(tp.sum() + fn.sum(), 1e-12)
    return {"micro_f1": float(micro), "macro_f1": float(per.mean()), "micro_precision": float(p),
            "micro_recall": float(r), "per_concept_f1": per}


def micro_f1_difference(pred_a: np.ndarray, pred_b: np.ndarray, truth: np.ndarray, n_boot: int = 2000,
                        seed: int = 0) -> dict:
    """Micro-F1 of A minus micro-F1 of B on the same photos, with a paired bootstrap over photos
    (Efron & Tibshirani 1993; the paired form as in Koehn 2004 for MT metrics): each resample
    draws N photos with replacement and scores both systems on them.

    Args:
        pred_a, pred_b, truth: (N, K) binary predictions of two systems and the labels.
    Returns:
        {"difference", "ci95": [low, high], "p_not_better": share of resamples where A <= B}.
    """
    pred_a, pred_b, truth = (np.asarray(x, bool) for x in (pred_a, pred_b, truth))

    def counts(pred):  # per photo: (true positives, false positives, false negatives)  # (N, 3)
        return np.stack([(pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)], 1).astype(np.float64)

    ca, cb = counts(pred_a), counts(pred_b)

    def f1(c):  # c: (..., 3) summed counts
        return 2 * c[..., 0] / np.maximum(2 * c[..., 0] + c[..., 1] + c[..., 2], 1e-12)

    idx = np.random.default_rng(seed).integers(0, len(truth), size=(n_boot, len(truth)))  # (R, N)
    diffs = f1(ca[idx].sum(1)) - f1(cb[idx].sum(1))  # (R,)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(f1(ca.sum(0)) - f1(cb.sum(0))), "ci95": [float(lo), float(hi)],
            "p_not_better": float((diffs <= 0).mean())}


def average_precision(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-concept average precision of (N, K) scores; NaN for a concept without positives."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        y = truth[:, k]
        if not y.any():
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        hits = y[order]
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        out[k] = prec[hits].mean()
    return out


def tune_thresholds(probs: np.ndarray, truth: np.ndarray, grid: Optional[Sequence[float]] = None,
                    default: float = 0.5) -> np.ndarray:
    """Per concept, the threshold (predict ``prob >= t``) with the best F1 on (probs, truth).

    Ties go to the highest threshold (fewest false alarms); a concept with no positives keeps
    ``default``."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth, bool)
    grid = np.asarray(grid if grid is not None else np.round(np.arange(0.05, 0.951, 0.025), 3))
    out = np.full(probs.shape[1], default)
    for k in range(probs.shape[1]):
        y = truth[:, k]
        if not y.any():
            continue
        pred = probs[:, k][:, None] >= grid[None, :]  # (N, T)
        tp = (pred & y[:, None]).sum(0)
        f1 = 2 * tp / np.maximum(pred.sum(0) + y.sum(), 1)
        best = np.flatnonzero(f1 == f1.max())[-1]
        out[k] = grid[best]
    return out


# --- concepts ------------------------------------------------------------------------------

@dataclass
class ConceptSpace:
    """The label space: concept names, training frequencies, and word form -> concept."""

    names: list[str]
    train_photos: list[int]  # training photos where the concept is a positive label
    forms: dict[str, str] = field(default_factory=dict)  # a word as written ("dogs") -> its concept ("dog")

    def __post_init__(self):
        self.index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def lemma(self, word: str) -> str:
        return self.forms.get(word, word)

    def mentioned(self, text: str) -> set[int]:
        """Indexes of the concepts a text names, through the word forms of the training captions."""
        return {self.index[c] for c in (self.lemma(w) for w in tokenize(text)) if c in self.index}

    def vocab_forms(self, words: Iterable[str]) -> dict[int, list[str]]:
        """Concept index -> its names and word forms that ``words`` (a caption vocabulary) holds;
        concepts with none are left out."""
        vocab = set(words)
        forms: dict[str, set[str]] = {c: {c} for c in self.names}
        for w, c in self.forms.items():
            forms.setdefault(c, {c}).add(w)
        return {k: sorted(forms[c] & vocab) for k, c in enumerate(self.names) if forms[c] & vocab}

    def to_json(self) -> list[dict]:
        by = {}
        for w, c in self.forms.items():
            by.setdefault(c, []).append(w)
        return [{"concept": n, "train_photos": int(f), "forms": sorted(by.get(n, []))}
                for n, f in zip(self.names, self.train_photos)]

    @classmethod
    def from_json(cls, items: list) -> "ConceptSpace":
        if not isinstance(items, list) or not items:
            raise ValueError("expected a non-empty list of concepts")
        names, freq, forms = [], [], {}
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("concept"), str) or not isinstance(it.get("forms", []), list):
                raise ValueError("each concept needs a 'concept' string and a 'forms' list")
            names.append(it["concept"])
            freq.append(int(it.get("train_photos", 0)))
            for w in it.get("forms", []):
                if isinstance(w, str):
                    forms[w] = it["concept"]
        if len(set(names)) != len(names):
            raise ValueError("duplicate concepts")
        return cls(names, freq, forms)


# --- inference ---------------------------------------------------------------------------

@dataclass
class Tag:
    concept: str
    probability: float
    in_caption: Optional[bool] = None  # None: no caption given

    def to_dict(self) -> dict:
        d = {"concept": self.concept, "probability": round(self.probability, 4)}
        if self.in_caption is not None:
            d["in_caption"] = self.in_caption
        return d


@dataclass
class TagResult:
    """One photo's tags (probability >= threshold, most probable first), every concept's
    probability (K,), the image network's noisy-OR region maps (K, side, side), and with a
    caption the joint network's tags and the concepts it left out."""

    tags: list[Tag]
    probabilities: np.ndarray
    maps: Optional[np.ndarray] = None
    caption: Optional[str] = None
    joint_tags: Optional[list[Tag]] = None
    joint_probabilities: Optional[np.ndarray] = None

    @property
    def concepts(self) -> list[str]:
        return [t.concept for t in self.tags]

    @property
    def missing(self) -> list[str]:
        """Tagged concepts the caption does not name (empty without a caption)."""
        return [t.concept for t in self.tags if t.in_caption is False]

    def to_dict(self) -> dict:
        d = {"tags": [t.to_dict() for t in self.tags]}
        if self.caption is not None:
            d["caption"] = self.caption
            d["missing_from_caption"] = self.missing
        if self.joint_tags is not None:
            d["joint_tags"] = [t.to_dict() for t in self.joint_tags]
        return d


def _check_thresholds(p: Path, t, k: int) -> np.ndarray:
    if not (isinstance(t, list) and len(t) == k and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          and 0 <= x <= 1 for x in t)):
        raise BundleError(f"{p}: thresholds must be a list of {k} numbers in [0, 1]")
    return np.asarray(t, dtype=np.float32)


class Tagger:
    """The tagger bundle's networks with the encoder they read (shared with a Captioner if given)."""

    def __init__(self, concepts: ConceptSpace, networks: dict[str, nn.Module], thresholds: dict[str, np.ndarray],
                 vocab: Optional[Vocab] = None, encoder=None, prep: Preprocessing = Preprocessing(),
                 config: Optional[dict] = None):
        self.concepts = concepts
        self.networks = {k: n.eval() for k, n in networks.items()}
        self.thresholds = thresholds
        self.vocab = vocab
        self._encoder = encoder
        self.prep = prep
        self.config = config or {}

    @property
    def encoder(self):
        if self._encoder is None:
            from .encoders import build_encoder

            self._encoder = build_encoder(self.config.get("encoder", {}).get("name", "efficientnet-lite0")).eval()
        return self._encoder

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path, None] = None, encoder=None) -> "Tagger":
        """Load a tagger bundle (default ``assets/models/tagger``). ``encoder``: an already loaded
        encoder to share (a Captioner's ``encoder``); it must be the one the bundle names."""
        folder = Path(folder or DEFAULT_TAGGER)
        if not folder.is_dir():
            raise BundleError(f"{folder}: tagger folder not found")
        cp = folder / CONFIG
        cfg = read_json(cp, "tagger config")
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise BundleError(f"{cp}: not a {FORMAT} config")
        if not isinstance(cfg.get("version"), int) or cfg["version"] > VERSION:
            raise BundleError(f"{cp}: unsupported version {cfg.get('version')!r:.20}")
        try:
            concepts = ConceptSpace.from_json(read_json(folder / CONCEPTS, "concept list"))
        except ValueError as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{folder / CONCEPTS}: {e}") from None
        nets_cfg = cfg.get("networks")
        if not isinstance(nets_cfg, dict) or "image" not in nets_cfg:
            raise BundleError(f"{cp}: needs a 'networks' object with at least the image network")
        vocab = None
        if set(nets_cfg) - {"image"}:
            words = read_json(folder / VOCAB, "vocabulary")
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise BundleError(f"{folder / VOCAB}: expected a list of words")
            vocab = Vocab(words)
        networks, thresholds = {}, {}
        for kind, sec in nets_cfg.items():
            if kind not in NETWORKS or not isinstance(sec, dict) or not isinstance(sec.get("config"), dict) \
                    or not isinstance(sec.get("weights"), str) or "/" in sec["weights"] or "\\" in sec["weights"]:
                raise BundleError(f"{cp}: bad network section {kind[:40]!r}")
            try:
                with torch.device("meta"):
                    shapes = {k: tuple(v.shape) for k, v in build_network(kind, sec["config"]).state_dict().items()}
            except (ValueError, TypeError) as e:
                raise BundleError(f"{cp}: bad {kind} network config ({e})") from None
            net = build_network(kind, sec["config"])
            if net.config.n_concepts != len(concepts):
                raise BundleError(f"{cp}: the {kind} network has {net.config.n_concepts} outputs for {len(concepts)} concepts")
            if vocab is not None and getattr(net.config, "vocab_size", len(vocab)) != len(vocab):
                raise BundleError(f"{cp}: the {kind} network's vocab_size does not match {VOCAB}")
            sd = load_weights(folder / sec["weights"], shapes, against=CONFIG)
            net.load_state_dict({k: v.float() for k, v in sd.items()})
            networks[kind] = net
            thresholds[kind] = _check_thresholds(cp, sec.get("thresholds"), len(concepts))
        try:
            prep = Preprocessing.from_dict(cfg.get("preprocessing", Preprocessing().to_dict()))
        except ValueError as e:
            raise BundleError(f"{cp}: {e}") from None
        return cls(concepts, networks, thresholds, vocab, encoder, prep, cfg)

    # -- inputs
    def encode_text(self, captions: Sequence[str], max_tokens: int = 32) -> torch.Tensor:
        """Captions -> padded token ids (B, T) in the tagger's vocabulary (no start/end)."""
        ids = [self.vocab.encode(c, add_special=False)[:max_tokens] or [self.vocab.unk] for c in captions]
        out = torch.zeros(len(ids), max(len(i) for i in ids), dtype=torch.long)
        for r, i in enumerate(ids):
            out[r, :len(i)] = torch.tensor(i)
        return out

    @torch.no_grad()
    def encode(self, images: Iterable[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([preprocess(load_image(im), self.prep) for im in images])
        return self.encoder(x)

    # -- outputs
    @torch.no_grad()
    def probabilities(self, kind: str, grid=None, pooled=None, captions: Optional[Sequence[str]] = None) -> torch.Tensor:
        net = self.networks[kind]
        tokens = self.encode_text(captions) if kind != "image" else None
        return torch.sigmoid(net(grid.float() if grid is not None else None,
                                 pooled.float() if pooled is not None else None, tokens))

    @torch.no_grad()
    def region_maps(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, P, C) -> (B, K, side, side): each cell's probability of showing each concept."""
        r = torch.sigmoid(self.networks["image"].regions(grid.float()))  # (B, P, K)
        side = int(round(r.shape[1] ** 0.5))
        return r.transpose(1, 2).reshape(r.shape[0], r.shape[2], side, side)

    def _tags(self, probs: np.ndarray, thr: np.ndarray, mentioned: Optional[set[int]]) -> list[Tag]:
        idx = [int(k) for k in np.argsort(-probs, kind="stable") if probs[k] >= thr[k]]
        return [Tag(self.concepts.names[k], float(probs[k]), None if mentioned is None else k in mentioned) for k in idx]

    @torch.no_grad()
    def tag_features(self, grid: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                     captions: Optional[Sequence[Optional[str]]] = None, threshold: Optional[float] = None,
                     maps: bool = False) -> list[TagResult]:
        """Tags from encoder output (grid (B, P, C), pooled (B, C)); one TagResult per photo.

        threshold: one threshold for every concept instead of the per-concept ones tuned on dev.
        captions: one caption (or None) per photo: marks which tags it names and, when the bundle
            has the joint network, adds the joint network's tags."""
        if pooled is None:
            pooled = grid.mean(1)
        p_img = self.probabilities("image", grid).numpy()
        regions = self.region_maps(grid).numpy() if maps else None
        p_joint = None
        if captions is not None and "joint" in self.networks and all(c for c in captions):
            p_joint = self.probabilities("joint", grid, pooled, list(captions)).numpy()
        out = []
        for b in range(grid.shape[0]):
            cap = captions[b] if captions is not None else None
            mentioned = self.concepts.mentioned(cap) if cap else None
            thr = np.full(len(self.concepts), threshold, np.float32) if threshold is not None else self.thresholds["image"]
            r = TagResult(self._tags(p_img[b], thr, mentioned), p_img[b], regions[b] if maps else None, cap)
            if p_joint is not None:
                jt = np.full(len(self.concepts), threshold, np.float32) if threshold is not None else self.thresholds["joint"]
                r.joint_tags = self._tags(p_joint[b], jt, mentioned)
                r.joint_probabilities = p_joint[b]
            out.append(r)
        return out

    def tag(self, images: Union[ImageInput, Sequence[ImageInput]], captions: Optional[Sequence[Optional[str]]] = None,
            threshold: Optional[float] = None, maps: bool = False) -> list[TagResult]:
        """Tag images (paths, bytes or PIL images). Raises ImageError for the first bad image."""
        if isinstance(images, (str, Path, bytes)) or hasattr(images, "size") and not isinstance(images, (list, tuple)):
            images = [images]
        grid, pooled = self.encode(images)
        return self.tag_features(grid, pooled, captions, threshold, maps)


def caption_and_tag(captioner, tagger: Tagger, images: Sequence[ImageInput], **caption_kw):
    """Caption and tag photos from one encoder pass: [(CaptionResult, TagResult)]. The tags mark
    which concepts the caption names; with the joint network, its tags read the caption too."""
    grid, pooled, sizes = captioner.encode_images(images)
    caps = captioner.caption_features(grid, pooled, image_sizes=sizes, **caption_kw)
    tags = tagger.tag_features(grid, pooled, captions=[c.text for c in caps], maps=False)
    return list(zip(caps, tags))
