"""Training and evaluating the concept tagger (captioning/tagger.py): label mining, the three
networks' training, threshold tuning, the tagger bundle and its test-split evaluation.

Labels. Concepts are mined from the training captions only: every word is mapped to its lemma
through ``Flickr8k.lemma.token.txt`` (the data set's own lemmatised captions, aligned word for
word with the raw ones; "dogs" -> "dog", "men" -> "man", "running" -> "run"; without that file a
plural "s" is dropped when the singular is also a word of the captions), stop words and words
that are not alphabetic are left out, and the ``n_concepts`` lemmas that are a positive label of
the most training photos are kept. A concept is a positive label of a photo when at least
``min_captions`` (2) of its captions use it.

Training (``train_tagger``): weighted BCE (positive weight ``(neg/pos) ** 0.5`` per concept,
capped at 30), Adam, the learning rate halved after ``lr_patience`` epochs without a better dev
micro-F1, early stopping after ``patience``, gradient clipping; seeded and resumable (a
checkpoint after every epoch, as the captioner's training, whose checkpoint code it reuses), a
training curve in ``metrics.csv``. Augmentation of the image networks: the 7x7 grid of cached
features is mirrored left to right (half the photos of every batch; "left" and "right" swap
their labels), which is cheaper than a second, mirrored feature cache and nearly the same thing
for a convolutional encoder. The text and joint networks read one of a photo's five reference
captions at random in training; on dev and test they read the default captioner's caption.

    python -m captioning train-tagger --network image --out runs/tagger
    python -m captioning train-tagger --network text --out runs/tagger
    python -m captioning train-tagger --network joint --out runs/tagger
    python -m captioning ship-tagger runs/tagger          # thresholds on dev, bundle, test metrics
    python -m captioning evaluate-tagger                  # the test table as JSON
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..bundle import DEFAULT_MODEL, recover_swap
from ..images import Preprocessing
from ..paths import REPO_ROOT
from ..tagger import (CONCEPTS, CONFIG, DEFAULT_TAGGER, FORMAT, KINDS, VERSION, VOCAB, ConceptSpace, Tagger,
                      average_precision, build_network, f1_scores, micro_f1_difference, positive_weights,
                      tune_thresholds, weighted_bce)
from ..vocab import Vocab, tokenize
from .data import CaptionDataset, load_dataset, resolve_data_dir
from .features import FeatureCache, find_cache
from .train import load_checkpoint, save_checkpoint

DEFAULT_FEATURES = REPO_ROOT / ".cache" / "features"
LEMMA_FILE, TOKEN_FILE = "Flickr8k.lemma.token.txt", "Flickr8k.token.txt"
CSV_FIELDS = ["epoch", "train_loss", "dev_micro_f1", "dev_threshold", "lr", "seconds"]

# Function words, auxiliaries, numbers and words that describe the caption rather than the photo.
STOP_WORDS = set("""
a an the and or but nor of in on at to from by with without into onto over under above below up down out off
through across along around near beside behind between against toward towards past via upon about after
before during while as than then so too very just only also there here where when what which who whom whose
why how this that these those it its itself he him his she her hers they them their theirs we us our you your
i me my mine one two three four five six seven eight nine ten several many some other another each both all
any few more most much such own same be is are was were been being am do does did have has had having
get gets got can could will would should may might must shall not no yes 's s n't ' 'll 're 'd 'm ve
something someone somebody thing things way lot kind sort type image picture photo photograph view scene shot
like look see seem appear go come make take use for front top side back together next end area middle
""".split())


# --- label mining --------------------------------------------------------------------------

def _read_token_lines(path: Path) -> dict[str, str]:
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, text = line.partition("\t")
        if text.strip():
            out[key.strip()] = text
    return out


def word_forms(raw: dict[str, str], lemma: dict[str, str]) -> dict[str, str]:
    """Surface word -> its most frequent lemma, from captions aligned word for word."""
    pairs: dict[str, Counter] = {}
    for key, text in raw.items():
        lt = lemma.get(key)
        if lt is None:
            continue
        a, b = tokenize(text), tokenize(lt)
        if len(a) != len(b):
            continue
        for w, l in zip(a, b):
            pairs.setdefault(w, Counter())[l] += 1
    return {w: c.most_common(1)[0][0] for w, c in pairs.items()}


def plural_forms(words: set[str]) -> dict[str, str]:
    """The fallback lemmatiser: "dogs" -> "dog" when "dog" is a word too."""
    return {w: w[:-1] for w in words if len(w) > 3 and w.endswith("s") and not w.endswith("ss") and w[:-1] in words}


def _concept_ok(w: str) -> bool:
    return w.isalpha() and len(w) >= 2 and w not in STOP_WORDS


def mine_concepts(ds: CaptionDataset, data_root: Optional[Path] = None, n_concepts: int = 300,
                  min_captions: int = 2) -> ConceptSpace:
    """The label space from the training split's captions (see the module docstring)."""
    train = ds.split("train")
    forms: dict[str, str] = {}
    if data_root is not None and (data_root / LEMMA_FILE).is_file():
        raw = _read_token_lines(data_root / TOKEN_FILE)
        lem = _read_token_lines(data_root / LEMMA_FILE)
        train_set = set(train)
        raw = {k: v for k, v in raw.items() if k.split("#")[0] in train_set}
        forms = word_forms(raw, lem)
    if not forms:
        forms = plural_forms({w for im in train for c in ds.captions[im] for w in tokenize(c)})
    space = ConceptSpace([], [], forms)
    counts: Counter = Counter()
    for im in train:
        per = Counter(c for cap in ds.captions[im] for c in {space.lemma(w) for w in tokenize(cap)})
        counts.update(c for c, k in per.items() if k >= min_captions and _concept_ok(c))
    chosen = sorted(counts, key=lambda c: (-counts[c], c))[:n_concepts]
    keep = set(chosen)
    return ConceptSpace(chosen, [counts[c] for c in chosen],
                        {w: l for w, l in forms.items() if l in keep and w != l})


def label_matrix(space: ConceptSpace, ds: CaptionDataset, images: list[str], min_captions: int = 2) -> np.ndarray:
    """(N, K) uint8: concept k is a positive label of photo i when >= min_captions captions name it."""
    y = np.zeros((len(images), len(space)), np.uint8)
    for i, im in enumerate(images):
        per = Counter(k for cap in ds.captions[im] for k in space.mentioned(cap))
        for k, n in per.items():
            if n >= min_captions:
                y[i, k] = 1
    return y


def caption_labels(space: ConceptSpace, captions: list[str]) -> np.ndarray:
    """(N, K) uint8: the concepts each caption names (the caption-words baseline)."""
    y = np.zeros((len(captions), len(space)), np.uint8)
    for i, c in enumerate(captions):
        y[i, sorted(space.mentioned(c))] = 1
    return y


# --- data -----------------------------------------------------------------------------------

@dataclass
class TagTrainConfig:
    network: str = "image"
    encoder: str = "efficientnet-lite0"
    n_concepts: int = 300
    min_captions: int = 2
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-3
    lr_factor: float = 0.5
    lr_patience: int = 2
    patience: int = 4
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    dropout: float = 0.3
    hidden_dim: int = 256  # the image network's region MLP
    embed_dim: int = 64  # text and joint networks: word embeddings, and the LSTM's size per direction
    joint_image_dim: int = 128  # the joint network's projection of the pooled image features
    pos_weight_power: float = 0.5
    pos_weight_cap: float = 30.0
    global_instance: bool = False  # image network: the pooled features as one more noisy-OR instance
    flip_prob: float = 0.5  # image networks: share of photos read with the feature grid mirrored
    min_count: int = 5  # text networks' vocabulary
    max_tokens: int = 32
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TagTrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def network_config(cfg: TagTrainConfig, n_concepts: int, feature_dim: int, vocab_size: int) -> dict:
    if cfg.network == "image":
        return dict(n_concepts=n_concepts, feature_dim=feature_dim, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                    global_instance=cfg.global_instance)
    if cfg.network == "text":
        return dict(n_concepts=n_concepts, vocab_size=vocab_size, embed_dim=cfg.embed_dim, hidden_dim=cfg.embed_dim,
                    dropout=cfg.dropout)
    return dict(n_concepts=n_concepts, vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim,
                hidden_dim=cfg.embed_dim, image_dim=cfg.joint_image_dim, dropout=cfg.dropout)


def encode_texts(vocab: Vocab, texts: list[str], max_tokens: int) -> np.ndarray:
    ids = [vocab.encode(t, add_special=False)[:max_tokens] or [vocab.unk] for t in texts]
    out = np.zeros((len(ids), max_tokens), np.int64)
    for i, t in enumerate(ids):
        out[i, :len(t)] = t
    return out


class TagData:
    """Everything training reads, in memory: grid features (N, P, C) fp16 per split, labels,
    reference captions as token ids, and the captioner's captions for dev/test."""

    def __init__(self, ds: CaptionDataset, cache: FeatureCache, space: ConceptSpace, vocab: Vocab,
                 cfg: TagTrainConfig, model_captions: dict[str, dict[str, str]]):
        self.space, self.vocab = space, vocab
        index = cache.index()
        self.names, self.grid, self.y, self.refs, self.model_caps = {}, {}, {}, {}, {}
        for split in ("train", "dev", "test"):
            names = ds.split(split)
            rows = np.asarray([index[n] for n in names])
            order = np.argsort(rows)
            g = np.empty((len(rows),) + cache.grid.shape[1:], np.float16)
            g[order] = cache.grid[rows[order]]
            self.names[split], self.grid[split] = names, torch.from_numpy(g)
            self.y[split] = torch.from_numpy(label_matrix(space, ds, names, cfg.min_captions))
            caps = [(ds.captions[n] * 5)[:5] for n in names]
            self.refs[split] = torch.from_numpy(encode_texts(vocab, [c for cs in caps for c in cs], cfg.max_tokens)
                                                ).view(len(names), 5, cfg.max_tokens)
            mc = model_captions.get(split)
            if mc:
                self.model_caps[split] = [mc.get(n, "") for n in names]
        side = int(round(cache.grid.shape[1] ** 0.5))
        self.side = side
        self.swap = [(space.index[a], space.index[b]) for a, b in (("left", "right"),)
                     if a in space.index and b in space.index]

    @classmethod
    def from_arrays(cls, space: ConceptSpace, vocab: Vocab, grid: dict, y: dict, refs: dict,
                    model_caps: Optional[dict] = None) -> "TagData":
        """Built from tensors directly ({split: (N, P, C)}, {split: (N, K)}, {split: (N, 5, T)}): for tests."""
        td = cls.__new__(cls)
        td.space, td.vocab, td.grid, td.y, td.refs = space, vocab, grid, y, refs
        td.model_caps = model_caps or {}
        td.names = {k: [f"{k}_{i}" for i in range(len(v))] for k, v in grid.items()}
        td.side = int(round(next(iter(grid.values())).shape[1] ** 0.5))
        td.swap = []
        return td

    def text_input(self, split: str) -> torch.Tensor:
        """The captions the text networks read on dev/test: the captioner's, else each photo's first reference."""
        if split in self.model_caps:
            return torch.from_numpy(encode_texts(self.vocab, self.model_caps[split], self.refs[split].shape[2]))
        return self.refs[split][:, 0]


def flip_grid(grid: torch.Tensor, side: int) -> torch.Tensor:
    """(B, P, C) grid mirrored left to right (P = side * side, row-major)."""
    b, p, c = grid.shape
    return grid.view(b, side, side, c).flip(2).reshape(b, p, c)


def _forward(net, grid: torch.Tensor, tokens: Optional[torch.Tensor]) -> torch.Tensor:
    g = grid.float()
    return net(g, g.mean(1), tokens)


@torch.no_grad()
def predict(net, data: TagData, split: str, batch: int = 256) -> np.ndarray:
    net.eval()
    tokens = data.text_input(split) if net.kind != "image" else None
    out = []
    for i in range(0, len(data.names[split]), batch):
        out.append(torch.sigmoid(_forward(net, data.grid[split][i:i + batch],
                                          tokens[i:i + batch] if tokens is not None else None)))
    return torch.cat(out).numpy()


def best_global_threshold(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    best = (0.0, 0.5)
    for t in np.round(np.arange(0.05, 0.951, 0.05), 2):
        f = f1_scores(probs >= t, y)["micro_f1"]
        if f > best[0]:
            best = (f, float(t))
    return best


MIN_POSITIVES = (10**9, 100, 50, 25, 10)  # 10**9: one threshold for every concept


def thresholds_for(probs: np.ndarray, y: np.ndarray, min_positives: int) -> np.ndarray:
    """The best global threshold (dev micro-F1) for every concept, replaced by the concept's own
    F1-best threshold where it has at least ``min_positives`` positives."""
    _, t = best_global_threshold(probs, y)
    out = np.full(probs.shape[1], t)
    own = y.sum(0) >= min_positives
    if own.any():
        out[own] = tune_thresholds(probs[:, own], y[:, own], default=t)
    return out


def choose_thresholds(probs: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Per-concept thresholds tuned on all of dev overfit rare concepts (tuned on dev, the image
    network lost 0.05 test micro-F1 to one global threshold). So how many dev positives a concept
    needs for a threshold of its own is chosen by 2-fold cross-validation on dev (tune on one half,
    micro-F1 on the other, both ways), then the thresholds are tuned on all of dev with that rule."""
    idx = np.random.default_rng(seed).permutation(len(y))
    halves = (idx[: len(y) // 2], idx[len(y) // 2:])
    cv = {}
    for m in MIN_POSITIVES:
        f = 0.0
        for a, b in (halves, halves[::-1]):
            t = thresholds_for(probs[a], y[a], max(1, m // 2))
            f += f1_scores(probs[b] >= t[None, :], y[b])["micro_f1"] / 2
        cv[m] = f
    best = max(MIN_POSITIVES, key=lambda m: (round(cv[m], 4), m))  # ties: the simpler rule
    rule = {"min_dev_positives": best if best < 10**9 else None,
            "cv_micro_f1": {("global" if m == 10**9 else str(m)): round(v, 4) for m, v in cv.items()}}
    return thresholds_for(probs, y, best), rule


# --- training -------------------------------------------------------------------------------

def prepare(data: Optional[str], features: str | Path, cfg: TagTrainConfig, out: Path,
            model_captions: Optional[dict[str, dict[str, str]]] = None) -> TagData:
    """Mine (or re-read) the concepts and the text vocabulary of ``out``, open the feature cache."""
    root = resolve_data_dir(data)
    ds = load_dataset(root)
    cfile, vfile = out / CONCEPTS, out / VOCAB
    if cfile.is_file():
        space = ConceptSpace.from_json(json.loads(cfile.read_text()))
    else:
        space = mine_concepts(ds, root if root.is_dir() else None, cfg.n_concepts, cfg.min_captions)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_text(cfile, json.dumps(space.to_json(), indent=1))
    if vfile.is_file():
        vocab = Vocab(json.loads(vfile.read_text())[4:])
    else:
        vocab = Vocab.build([c for im in ds.split("train") for c in ds.captions[im]], cfg.min_count)
        _atomic_text(vfile, json.dumps(vocab.itos))
    cache = FeatureCache.open(find_cache(features, cfg.encoder, Preprocessing(), sorted(ds.captions)))
    if model_captions is None and "dev" not in read_model_captions(out) and "dev" in ds.splits:
        caption_split(out, "dev", cache, ds.split("dev"))
    return TagData(ds, cache, space, vocab, cfg, model_captions or read_model_captions(out))


def read_model_captions(out: Path) -> dict[str, dict[str, str]]:
    """The captioner's dev/test captions (``captions_SPLIT.json`` in the run folder, else the
    default bundle's ``captions_test.json``), as {split: {image: caption}}."""
    res = {}
    for split in ("dev", "test"):
        for p in (out / f"captions_{split}.json", DEFAULT_MODEL / f"captions_{split}.json"):
            if p.is_file():
                res[split] = {r["image"]: r["caption"] for r in json.loads(p.read_text())}
                break
    return res


def caption_split(out: Path, split: str, cache: FeatureCache, names: list[str], model: str | Path = DEFAULT_MODEL,
                  batch: int = 100) -> Path:
    """The default captioner's captions of a split, from the feature cache, into OUT/captions_SPLIT.json
    (the text and joint networks read them on dev, as they read the shipped test captions on test)."""
    from ..api import Captioner

    cap = Captioner.from_pretrained(model)
    index = cache.index()
    res = []
    for i in range(0, len(names), batch):
        rows = np.asarray([index[n] for n in names[i:i + batch]])
        g, p = cache.batch(rows)
        for n, r in zip(names[i:i + batch], cap.caption_features(g, p)):
            res.append({"image": n, "caption": r.text})
    path = out / f"captions_{split}.json"
    _atomic_text(path, json.dumps(res, indent=1))
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_tagger(data: Optional[str], out: str | Path, cfg: TagTrainConfig, features: str | Path = DEFAULT_FEATURES,
                 resume: bool = False, progress: bool = True, tag_data: Optional[TagData] = None,
                 max_batches: Optional[int] = None) -> Path:
    """Train one network into ``OUT/NETWORK/`` (best.safetensors + best.json, metrics.csv, checkpoint/)."""
    out = Path(out)
    run = out / cfg.network
    ckpt = run / "checkpoint"
    run.mkdir(parents=True, exist_ok=True)
    if resume:
        recover_swap(ckpt)
        if (run / "config.json").is_file():
            cfg = TagTrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    td = tag_data or prepare(data, features, cfg, out)
    torch.manual_seed(cfg.seed)
    k = len(td.space)
    net = build_network(cfg.network, network_config(cfg, k, td.grid["train"].shape[2], len(td.vocab)))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ytr = td.y["train"]
    pw = positive_weights(ytr.sum(0).numpy(), len(ytr), cfg.pos_weight_power, cfg.pos_weight_cap)
    state = {"epoch": 0, "best": -1.0, "bad": 0, "since_lr": 0, "done": False}
    if resume and (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, net, opt)
    else:
        _atomic_text(run / "config.json", json.dumps(asdict(cfg), indent=2))
        if (run / "metrics.csv").exists():
            (run / "metrics.csv").unlink()
    n = len(ytr)
    while not state["done"] and state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        t0 = time.time()
        net.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = torch.from_numpy(rng.permutation(n))
        flips = torch.from_numpy(rng.random(n) < cfg.flip_prob)
        pick = torch.from_numpy(rng.integers(0, 5, n))
        total, seen = 0.0, 0
        for bi, s in enumerate(range(0, n, cfg.batch_size)):
            if max_batches is not None and bi >= max_batches:
                break
            idx = perm[s:s + cfg.batch_size]
            g = td.grid["train"][idx].float()
            y = td.y["train"][idx].float()
            tokens = td.refs["train"][idx, pick[idx]] if cfg.network != "image" else None
            if cfg.network != "text":
                f = flips[idx]
                if f.any():
                    g[f] = flip_grid(g[f], td.side)
                    for a, b in td.swap:
                        y[f, a], y[f, b] = y[f, b].clone(), y[f, a].clone()
            loss = weighted_bce(_forward(net, g, tokens), y, pw)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        dev_f1, thr = best_global_threshold(predict(net, td, "dev"), td.y["dev"].numpy())
        row = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 5), "dev_micro_f1": round(dev_f1, 5),
               "dev_threshold": thr, "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
        _append_csv(run / "metrics.csv", row)
        if progress:
            print(json.dumps(row), flush=True)
        if dev_f1 > state["best"]:
            state.update(best=dev_f1, bad=0, since_lr=0, best_epoch=epoch)
            save_file({k2: v.detach().clone().contiguous() for k2, v in net.state_dict().items()},
                      str(run / "best.safetensors.tmp"))
            os.replace(run / "best.safetensors.tmp", run / "best.safetensors")
            _atomic_text(run / "best.json", json.dumps({"kind": cfg.network, "config": net.config.to_dict(),
                                                        "epoch": epoch, "dev_micro_f1": dev_f1, "dev_threshold": thr}))
        else:
            state["bad"] += 1
            state["since_lr"] += 1
            if state["since_lr"] >= cfg.lr_patience:
                for gr in opt.param_groups:
                    gr["lr"] *= cfg.lr_factor
                state["since_lr"] = 0
            if state["bad"] >= cfg.patience:
                state["done"] = True
        state["epoch"] = epoch
        save_checkpoint(ckpt, net, opt, state)
    return run


def _append_csv(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def load_best(run: Path):
    meta = json.loads((run / "best.json").read_text())
    net = build_network(meta["kind"], meta["config"])
    net.load_state_dict(load_file(str(run / "best.safetensors")))
    return net.eval(), meta


# --- the bundle and its evaluation -----------------------------------------------------------

def write_bundle(dest: Path, space: ConceptSpace, vocab: Vocab, nets: dict, thresholds: dict[str, np.ndarray],
                 encoder: str, extra: Optional[dict] = None) -> Path:
    """Write a tagger bundle atomically (a temporary folder that replaces ``dest``); fp16 weights.
    Files that are not the bundle's own (README.md, metrics.json) are kept."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        cfg = {"format": FORMAT, "version": VERSION, "encoder": {"name": encoder},
               "preprocessing": Preprocessing().to_dict(), "networks": {}, **(extra or {})}
        for kind, net in nets.items():
            sd = {k: v.detach().half().clone().contiguous() for k, v in net.state_dict().items()}
            save_file(sd, str(tmp / f"{kind}.safetensors"), metadata={"format": "pt"})
            cfg["networks"][kind] = {"config": net.config.to_dict(), "weights": f"{kind}.safetensors",
                                     "thresholds": [round(float(t), 3) for t in thresholds[kind]]}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
        (tmp / CONCEPTS).write_text(json.dumps(space.to_json(), indent=1))
        if set(nets) - {"image"}:
            (tmp / VOCAB).write_text(json.dumps(vocab.itos))
        if dest.is_dir():
            for f in dest.iterdir():
                if not (tmp / f.name).exists() and f.is_file() and not f.name.endswith(".safetensors"):
                    shutil.copy2(f, tmp / f.name)
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def scores(probs: np.ndarray, pred: np.ndarray, y: np.ndarray) -> dict:
    f = f1_scores(pred, y)
    ap = average_precision(probs, y)
    return {"micro_f1": round(f["micro_f1"], 4), "macro_f1": round(f["macro_f1"], 4),
            "micro_precision": round(f["micro_precision"], 4), "micro_recall": round(f["micro_recall"], 4),
            "mAP": round(float(np.nanmean(ap)), 4), "_ap": ap, "_f1": f["per_concept_f1"]}


def evaluate_tagger(bundle: str | Path = DEFAULT_TAGGER, data: Optional[str] = None,
                    features: str | Path = DEFAULT_FEATURES, split: str = "test",
                    captions: Optional[str | Path] = None, sure: float = 0.9) -> dict:
    """Each network of the bundle and the caption-words baseline on a split: micro/macro F1,
    mAP, per-concept AP; and per concept how often the caption leaves out a concept the image
    network is sure of (probability >= ``sure``) and the photo's references confirm."""
    tagger = Tagger.from_pretrained(bundle, encoder=False)  # never builds an encoder: cached features
    root = resolve_data_dir(data)
    ds = load_dataset(root)
    enc = tagger.config.get("encoder", {}).get("name", "efficientnet-lite0")
    cache = FeatureCache.open(find_cache(features, enc, Preprocessing(), sorted(ds.captions)))
    names = ds.split(split)
    cpath = Path(captions) if captions else DEFAULT_MODEL / f"captions_{split}.json"
    model_caps = {r["image"]: r["caption"] for r in json.loads(cpath.read_text())} if cpath.is_file() else {}
    y = label_matrix(tagger.concepts, ds, names)
    index = cache.index()
    rows = np.asarray([index[n] for n in names])
    probs = {k: [] for k in tagger.networks}
    for i in range(0, len(names), 200):
        g, p = cache.batch(rows[i:i + 200])
        caps = [model_caps.get(n, "") for n in names[i:i + 200]]
        for kind in tagger.networks:
            if kind != "image" and not model_caps:
                continue
            probs[kind].append(tagger.probabilities(kind, g, p, caps if kind != "image" else None).numpy())
    table, per_concept = {}, {}
    for kind, ps in probs.items():
        if not ps:
            continue
        pr = np.concatenate(ps)
        s = scores(pr, pr >= tagger.thresholds[kind][None, :], y)
        per_concept[kind] = s.pop("_ap"), s.pop("_f1")
        table[kind] = s
    p_img = np.concatenate(probs["image"])
    if model_caps:
        base = caption_labels(tagger.concepts, [model_caps.get(n, "") for n in names])
        s = scores(base.astype(np.float64), base.astype(bool), y)
        per_concept["caption_words"] = s.pop("_ap"), s.pop("_f1")
        s["note"] = "mAP of 0/1 scores (the words of the captioner's caption, no ranking)"
        table["caption_words"] = s
        # How sure the image network's margin is: a paired bootstrap over the split's photos.
        n_boot = 2000
        d = micro_f1_difference(p_img >= tagger.thresholds["image"][None, :], base, y, n_boot=n_boot)
        margin = {"micro_f1_difference": round(d["difference"], 4),
                  "ci95": [round(v, 4) for v in d["ci95"]], "p_not_better": round(d["p_not_better"], 4),
                  "bootstrap_resamples": n_boot}
    concepts = []
    for k, name in enumerate(tagger.concepts.names):
        row = {"concept": name, "test_positives": int(y[:, k].sum()),
               **{f"AP_{kind}": (None if np.isnan(ap[k]) else round(float(ap[k]), 4)) for kind, (ap, _) in per_concept.items()}}
        if model_caps:
            sure_k = (p_img[:, k] >= sure) & (y[:, k] == 1)
            missed = sure_k & (base[:, k] == 0)
            row.update(tagger_sure=int(sure_k.sum()), caption_missed=int(missed.sum()),
                       caption_miss_rate=round(float(missed.sum() / sure_k.sum()), 3) if sure_k.any() else None)
        concepts.append(row)
    res = {"split": split, "n_images": len(names), "n_concepts": len(tagger.concepts),
           "captions": str(cpath) if model_caps else None, "metrics": table, "per_concept": concepts}
    if model_caps:
        res["image_vs_caption_words"] = margin
        sure_all = (p_img >= sure) & (y == 1)
        res["caption_misses"] = {
            "sure": sure, "tagger_sure_and_right": int(sure_all.sum()),
            "caption_missed": int((sure_all & (base == 0)).sum()),
            "rate": round(float((sure_all & (base == 0)).sum() / max(sure_all.sum(), 1)), 4)}
    return res


def ship_tagger(run: str | Path, dest: str | Path = DEFAULT_TAGGER, data: Optional[str] = None,
                features: str | Path = DEFAULT_FEATURES, commands: Optional[list[str]] = None) -> dict:
    """Best network of each kind in RUN -> per-concept thresholds on dev -> the bundle -> test metrics."""
    run = Path(run)
    nets = {}
    for kind in KINDS:
        if (run / kind / "best.json").is_file():
            nets[kind] = load_best(run / kind)[0]
    if "image" not in nets:
        raise FileNotFoundError(f"{run / 'image' / 'best.json'}: train the image network first")
    cfg = TagTrainConfig.from_dict(json.loads((run / "image" / "config.json").read_text()))
    td = prepare(data, features, cfg, run)
    thresholds, threshold_rules = {}, {}
    for k, n in nets.items():
        thresholds[k], threshold_rules[k] = choose_thresholds(predict(n, td, "dev"), td.y["dev"].numpy())
    training = {k: json.loads((run / k / "best.json").read_text()) for k in nets}
    for k in training:
        training[k].pop("config", None)
        training[k]["train_config"] = json.loads((run / k / "config.json").read_text())
    if commands is None:
        default = asdict(TagTrainConfig())
        commands = ["python -m captioning extract-features"]
        for k in nets:
            tc = training[k]["train_config"]
            opts = "".join(f" --{n.replace('_', '-')}" + ("" if v is True else f" {v}")
                           for n, v in tc.items() if n != "network" and default.get(n) != v)
            commands.append(f"python -m captioning train-tagger --network {k} --out {run}{opts}")
        commands.append(f"python -m captioning ship-tagger {run}")
    write_bundle(Path(dest), td.space, td.vocab, nets, thresholds, cfg.encoder,
                 {"training": training, "thresholds": threshold_rules})
    for k in nets:
        shutil.copy2(run / k / "metrics.csv", Path(dest) / f"metrics_{k}.csv")
    res = evaluate_tagger(dest, data, features, "test")
    (Path(dest) / "metrics.json").write_text(json.dumps(res, indent=1))
    write_card(Path(dest), res, training, commands)
    return res


TITLES = {"image": "image (noisy-OR MIL over the 7x7 grid)", "text": "caption (Bi-LSTM)",
          "joint": "image + caption (joint)", "caption_words": "baseline: the words of the default captioner's caption"}


def write_card(dest: Path, res: dict, training: dict, commands: list[str]) -> None:
    """README.md of the tagger bundle: what it is, its test metrics, and the commands that made it."""
    m = res["metrics"]
    lines = ["# Concept tagger (Flickr8k)", "",
             f"{res['n_concepts']} visual concepts mined from the Flickr8k training captions (`concepts.json`: each "
             "concept, how many training photos it labels, the word forms that name it); a concept is a label of a "
             "photo when at least 2 of its 5 captions use it. Networks on the frozen `efficientnet-lite0` features "
             "(see `docs/tagger.md`). Thresholds were chosen on the dev split: one global threshold, and a concept's "
             "own only where it has enough dev positives (`tagger.json` `thresholds`); fp16 safetensors.", "",
             f"## Test split ({res['n_images']} photos)", "",
             "| network | micro-F1 | macro-F1 | mAP | micro precision | micro recall |", "|---|---|---|---|---|---|"]
    for k, v in m.items():
        lines.append(f"| {TITLES.get(k, k)} | {v['micro_f1']:.3f} | {v['macro_f1']:.3f} | {v['mAP']:.3f} | "
                     f"{v['micro_precision']:.3f} | {v['micro_recall']:.3f} |")
    lines += ["", "The text and joint networks read the default captioner's own test caption, never a reference. "
              "The baseline's mAP ranks 0/1 scores (a caption either names a concept or not)."]
    cm = res.get("caption_misses")
    if cm:
        lines += ["", f"Of the {cm['tagger_sure_and_right']} (photo, concept) pairs where the image network is sure "
                  f"(p >= {cm['sure']}) and the references agree, the default caption leaves out "
                  f"{cm['caption_missed']} ({100 * cm['rate']:.1f}%); per concept in `metrics.json`."]
    lines += ["", "## Training", ""]
    for k, t in training.items():
        lines.append(f"- `{k}`: best dev micro-F1 {t['dev_micro_f1']:.3f} at epoch {t['epoch']} "
                     f"(curve: `metrics_{k}.csv`)")
    lines += ["", "## Commands", "", "```bash", *commands, "```", "",
              "Research use only, as the Flickr8k data it was trained on.", ""]
    (dest / "README.md").write_text("\n".join(lines))


# --- command line ---------------------------------------------------------------------------

def _cmd_tag(a) -> int:
    import sys

    from ..images import ImageError

    from ..cli import _err, _one_line

    if a.threshold is not None and not 0 <= a.threshold <= 1:
        _err(f"--threshold must be in [0, 1], got {a.threshold}")
        return 2
    tagger = Tagger.from_pretrained(a.model)
    captioner = None
    if a.caption:
        from ..api import Captioner

        captioner = Captioner.from_pretrained(a.captioner, encoder=tagger.encoder)
    results, failed = [], 0
    for path in a.images:
        try:
            if captioner is not None:
                grid, pooled, sizes = captioner.encode_images([path])
                cap = captioner.caption_features(grid, pooled, image_sizes=sizes)[0].text
                r = tagger.tag_features(grid, pooled, [cap], a.threshold)[0]
            else:
                r = tagger.tag(path, threshold=a.threshold)[0]
        except Exception as e:  # noqa: BLE001 (one bad photo costs only its own tags)
            msg = str(e) if isinstance(e, ImageError) else _one_line(e)
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            _err(msg)
            failed += 1
            results.append({"image": path, "error": msg})
            continue
        results.append({"image": path, **r.to_dict()})
        if not a.json:
            tags = ", ".join(f"{t.concept} {t.probability:.2f}" + ("" if t.in_caption is not False else "*")
                             for t in r.tags)
            print(f"{path}\t{tags}" + (f"\t({r.caption}; * not in the caption)" if r.caption else ""))
    if a.json:
        print(json.dumps({"model": str(a.model or DEFAULT_TAGGER), "results": results}, indent=2))
    sys.stdout.flush()
    return 1 if failed else 0


def _cmd_train(a) -> int:
    overrides = {f.name: getattr(a, f.name) for f in fields(TagTrainConfig) if getattr(a, f.name, None) is not None}
    run = train_tagger(a.data, a.out, TagTrainConfig(**overrides), a.features, resume=a.resume)
    print(f"run folder: {run}")
    return 0


def _cmd_ship(a) -> int:
    res = ship_tagger(a.run, a.dest, a.data, a.features)
    print(json.dumps(res["metrics"], indent=2))
    return 0


def _cmd_evaluate(a) -> int:
    res = evaluate_tagger(a.model or DEFAULT_TAGGER, a.data, a.features, a.split, a.captions)
    if not a.per_concept:
        res.pop("per_concept")
    print(json.dumps(res, indent=2))
    return 0


def add_commands(sub) -> None:
    """The tagger's subcommands of ``python -m captioning``."""
    t = sub.add_parser("tag", help="the visual concepts in image files (the concept tagger)")
    t.add_argument("images", nargs="+", metavar="IMAGE")
    t.add_argument("--model", default=None, help=f"tagger folder (default: {DEFAULT_TAGGER})")
    t.add_argument("--threshold", type=float, default=None,
                   help="one probability threshold for every concept (default: per-concept, tuned on dev)")
    t.add_argument("--caption", action="store_true",
                   help="also caption each photo (same encoder pass) and mark the concepts it leaves out")
    t.add_argument("--captioner", default=None, help="caption model folder for --caption (default: the default)")
    t.add_argument("--json", action="store_true", help="print one JSON document")
    t.set_defaults(fn=_cmd_tag)

    tr = sub.add_parser("train-tagger", help="train one concept-tagger network on cached features")
    tr.add_argument("--data", default=None)
    tr.add_argument("--out", required=True, help="run folder (one subfolder per network)")
    tr.add_argument("--features", default=str(DEFAULT_FEATURES))
    tr.add_argument("--resume", action="store_true")
    for f in fields(TagTrainConfig):
        if str(f.type) == "bool":
            tr.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_const", const=True, default=None)
            continue
        typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
        tr.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, default=None, help=f"default {f.default}")
    tr.set_defaults(fn=_cmd_train)

    s = sub.add_parser("ship-tagger", help="tune thresholds on dev, write the tagger bundle, score it on test")
    s.add_argument("run")
    s.add_argument("--dest", default=str(DEFAULT_TAGGER))
    s.add_argument("--data", default=None)
    s.add_argument("--features", default=str(DEFAULT_FEATURES))
    s.set_defaults(fn=_cmd_ship)

    e = sub.add_parser("evaluate-tagger", help="score the tagger and the caption-words baseline on a split (JSON)")
    e.add_argument("--model", default=None, help=f"tagger folder (default: {DEFAULT_TAGGER})")
    e.add_argument("--data", default=None)
    e.add_argument("--features", default=str(DEFAULT_FEATURES))
    e.add_argument("--split", default="test")
    e.add_argument("--captions", default=None,
                   help="the captioner's captions_SPLIT.json (default: the default model's)")
    e.add_argument("--per-concept", action="store_true", help="add every concept's AP and caption misses")
    e.set_defaults(fn=_cmd_evaluate)
