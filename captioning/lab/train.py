"""Training on cached encoder features, with validation, early stopping and exact resume.

Teacher forcing with optional scheduled sampling (Bengio et al. 2015), dropout (also on the cached
features, ``feature_dropout``), mirrored photos
as augmentation (``flip_prob``: a second feature cache of every photo flipped left to right,
with "left" and "right" swapped in its captions), Adam,
a reduce-on-plateau learning rate, gradient clipping, and for ``show_attend_tell`` the doubly
stochastic attention penalty (Xu et al. 2015). ``extra_captions`` adds captions for the train
images to the references, such as a teacher ensemble's beam-search captions (``evaluate --split
train``): sequence-level knowledge distillation (Kim & Rush 2016). With ``scst`` the decoder (usually one already
trained this way, given by ``init``) is fine-tuned on the CIDEr-D of its own samples instead
(self-critical sequence training, Rennie et al. 2017; see scst.py). The best bundle by
validation CIDEr (or BLEU-4) is kept in ``RUN/best``. Runs as one process or under ``torchrun`` (DistributedDataParallel;
gloo on CPU, NCCL on GPU); only rank 0 writes files.

Run folder:
  config.json          the TrainConfig
  metrics.csv          one row per epoch (the app plots it)
  checkpoint/          latest state (weights, Adam moments, RNG, position), replaced atomically
  best/                the best bundle so far
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..atomic import atomic_write, swap_folder
from ..bundle import VOCAB, BundleError, load_bundle, read_config, recover_swap, save_bundle
from .data import CaptionDataset, load_dataset
from ..decoders import DECODERS, Decoder, build_decoder
from ..decoding import SpecialIds, sample_decode
from .features import FeatureCache, extract_features, find_cache
from ..images import Preprocessing
from ..metrics import py_tokenize, score_captions
from .scst import EOS, CiderD, scst_loss
from ..paths import REPO_ROOT
from ..vocab import Vocab

DEFAULT_FEATURES = REPO_ROOT / ".cache" / "features"
CSV_FIELDS = ["epoch", "train_loss", "val_loss", "val_bleu4", "val_cider", "lr", "sample_prob", "seconds",
              "train_reward"]


@dataclass(frozen=True)
class DecoderOptions:
    """The decoder's own settings (decoders.py's configs, less what the data decides: the
    vocabulary size and the encoder's feature size). A decoder takes the fields its config class
    has, so a new decoder option needs no code here beyond its field."""

    embed_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    tie_weights: bool = False  # the output layer shares the input embedding (Press & Wolf 2017)
    attention_dim: int = 512  # show_attend_tell
    deep_output: bool = False  # show_attend_tell: predict from h, context and previous word (Xu et al. eq. 7)
    merge_dim: int = 512  # merge
    bidirectional: bool = False  # merge

    def decoder_config(self, kind: str, vocab_size: int, feature_dim: int) -> dict:
        """The config of a ``kind`` decoder (DECODERS) with these settings."""
        names = {f.name for f in fields(DECODERS[kind][1])}
        return {"vocab_size": vocab_size, "feature_dim": feature_dim,
                **{k: v for k, v in asdict(self).items() if k in names}}


DECODER_OPTIONS = frozenset(f.name for f in fields(DecoderOptions))


@dataclass
class TrainConfig:
    decoder: str = "show_attend_tell"
    encoder: str = "efficientnet-lite0"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    lr_factor: float = 0.5  # multiply the lr by this ...
    lr_patience: int = 1  # ... after this many epochs without a new best validation score
    patience: int = 4  # stop after this many epochs without a new best
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    model: DecoderOptions = field(default_factory=lambda: DecoderOptions())
    alpha_c: float = 1.0  # doubly stochastic attention weight (show_attend_tell)
    sample_prob_max: float = 0.0  # scheduled sampling: ramps linearly to this by the last epoch
    label_smoothing: float = 0.0
    flip_prob: float = 0.0  # chance that a training caption is read with its photo mirrored (not with scst)
    feature_dropout: float = 0.0  # dropout on the cached grid and pooled features while training (not with scst)
    image_size: int = 224  # encoder input side in pixels; lite0 at 288 gives a 9x9 grid
    min_count: int = 5
    max_tokens: int = 32  # longer training captions are cut (with <end> kept)
    select_metric: str = "cider"  # or "bleu4"
    val_limit: int = 0  # 0: all validation images
    val_split: str = "dev"
    checkpoint_every: int = 200  # batches between mid-epoch checkpoints
    seed: int = 0
    init: str = ""  # start from this bundle's weights and vocabulary (its decoder settings win)
    scst: bool = False  # self-critical training on CIDEr-D; batch_size then counts images
    scst_samples: int = 5  # captions sampled per image (leave-one-out baseline)
    scst_max_len: int = 16  # words per sampled caption
    extra_captions: str = ""  # JSON list of {"image", "caption"} for train images, read with the references

    def __init__(self, **settings):
        """Keyword arguments are the fields; the decoder's options may also come flat
        (``embed_dim=256``, as the CLI's flags and older records give them) and then update ``model``."""
        flat = {k: settings.pop(k) for k in list(settings) if k in DECODER_OPTIONS}
        model = settings.pop("model", None)
        model = DecoderOptions(**model) if isinstance(model, dict) else (model or DecoderOptions())
        unknown = set(settings) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        for f in fields(self):
            if f.name == "model":
                self.model = replace(model, **flat)
            elif f.name in settings:
                setattr(self, f.name, settings[f.name])
            else:
                setattr(self, f.name, f.default)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A record as ``to_dict`` writes it, or an older one; unknown keys are left out."""
        names = {f.name for f in fields(cls)} | DECODER_OPTIONS
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """Flat, the layout of every bundle's training record (config.json "training"), so that
        readers of old and new records read one form."""
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "model"}, **d["model"]}


def decoder_config(cfg: TrainConfig, vocab_size: int, feature_dim: int) -> dict:
    return cfg.model.decoder_config(cfg.decoder, vocab_size, feature_dim)


def encode_captions(captions: dict[str, list[str]], images: list[str], index: dict[str, int], vocab: Vocab,
                    max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """-> feature row (N,) and padded token ids (N, max_tokens) for every caption of ``images``."""
    rows, caps = [], []
    for name in images:
        for c in captions[name]:
            ids = vocab.encode(c)
            if len(ids) > max_tokens:
                ids = ids[: max_tokens - 1] + [vocab.end]
            rows.append(index[name])
            caps.append(ids + [vocab.pad] * (max_tokens - len(ids)))
    return np.asarray(rows, dtype=np.int64), np.asarray(caps, dtype=np.int64)


def read_extra_captions(path: str | Path, train_images: list[str]) -> dict[str, list[str]]:
    """More captions for training images, as ``evaluate`` writes them (captions_<split>.json: a
    list of {"image", "caption", ...}). An image outside ``train_images`` is refused: a teacher's
    captions of dev or test photos must never reach training."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
        pairs = [(str(it["image"]), str(it["caption"]).strip()) for it in items]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: extra captions file not found") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a list of {{\"image\", \"caption\"}} records ({type(e).__name__}: {e})") from None
    allowed = set(train_images)
    outside = sorted({im for im, _ in pairs if im not in allowed})
    if outside:
        raise ValueError(f"{path}: {len(outside)} images are not in the train split (first: {outside[0]})")
    extra: dict[str, list[str]] = {}
    for im, c in pairs:
        if c:
            extra.setdefault(im, []).append(c)
    return extra


def teacher_info(path: str | Path) -> Optional[dict]:
    """Who wrote an extra-captions file: the metrics file ``evaluate`` wrote beside it (models,
    beam size, length penalty, scores against the references), or None."""
    path = Path(path)
    meta = path.with_name(path.name.replace("captions_", "metrics_", 1))
    if meta == path or not meta.is_file():
        return None
    d = json.loads(meta.read_text())
    info = {k: d[k] for k in ("model", "split", "n_images", "beam_size", "length_penalty", "metrics") if k in d}
    # Each member's own training record, so the student's model card can still say how to remake
    # the teacher after the members' run folders are gone.
    members = info.get("model") or []
    records = {}
    for m in [members] if isinstance(members, str) else members:
        try:
            records[m] = read_config(m).get("training") or {}
        except BundleError:
            pass
    if records:
        info["members_training"] = records
    return info


MIRRORED_WORDS = (("left", "right"),)


def mirror_captions(caps: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Token ids (N, T) -> the same captions told of the mirrored photo: left <-> right."""
    table = np.arange(len(vocab))
    for a, b in MIRRORED_WORDS:
        if a in vocab.stoi and b in vocab.stoi:
            table[vocab.stoi[a]], table[vocab.stoi[b]] = vocab.stoi[b], vocab.stoi[a]
    return table[caps]


def read_views(caches: list[FeatureCache], rows: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (b,) read from ``caches[views[i]]`` -> grid (b, P, C), pooled (b, C)."""
    if len(caches) == 1 or not views.any():
        return caches[0].batch(rows)
    g = torch.empty((len(rows),) + caches[0].grid.shape[1:])
    p = torch.empty((len(rows), caches[0].pooled.shape[1]))
    for v, cache in enumerate(caches):
        sel = np.flatnonzero(views == v)
        if len(sel):
            g[sel], p[sel] = cache.batch(rows[sel])
    return g, p


def caption_loss(decoder: torch.nn.Module, grid, pooled, caps, alpha_c: float, sample_prob: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean NLL of the next word over non-pad positions (+ doubly stochastic attention term)."""
    T = int((caps != 0).sum(1).max())
    caps = caps[:, :T]  # (B, T)
    logp, alphas = decoder(grid, pooled, caps, sample_prob)  # (B, T-1, V), (B, T-1, P) | None
    target = caps[:, 1:]  # (B, T-1)
    mask = target != 0
    nll = F.nll_loss(logp.reshape(-1, logp.size(-1)), target.reshape(-1), reduction="none").view_as(target)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    loss = (nll * mask).sum() / mask.sum()
    if alphas is not None and alpha_c:
        # Xu et al. eq. 14: encourage every grid position to get ~1 unit of attention over the caption.
        att_sum = (alphas * mask.unsqueeze(2)).sum(1)  # (B, P)
        loss = loss + alpha_c * ((1.0 - att_sum) ** 2).mean()
    return loss


@torch.no_grad()
def validate(decoder: Decoder, cache: FeatureCache, ds: CaptionDataset, images: list[str], vocab: Vocab,
             cfg: TrainConfig) -> dict[str, float]:
    """Teacher-forced loss on the validation captions and greedy BLEU-4 / CIDEr."""
    decoder.eval()
    index = cache.index()
    rows, caps = encode_captions(ds.captions, images, index, vocab, cfg.max_tokens)
    losses, n = 0.0, 0
    for i in range(0, len(rows), 256):
        r = rows[i:i + 256]
        g, p = cache.batch(r)
        c = torch.from_numpy(caps[i:i + 256])
        losses += float(caption_loss(decoder, g, p, c, 0.0, 0.0)) * len(r)
        n += len(r)
    preds = {}
    ids = SpecialIds(vocab.pad, vocab.start, vocab.end, vocab.unk)
    for i in range(0, len(images), 250):
        names = images[i:i + 250]
        g, p = cache.batch(np.asarray([index[k] for k in names]))
        for k, h in zip(names, sample_decode(decoder, g, p, greedy=True, ids=ids)):
            preds[k] = vocab.decode(h.tokens)
    s = score_captions(preds, {k: ds.captions[k] for k in images}, use_java=False, metrics=("bleu", "cider"))
    decoder.train()
    return {"val_loss": losses / n, "val_bleu4": s.metrics["BLEU-4"], "val_cider": s.metrics["CIDEr"]}


# --- checkpoints -------------------------------------------------------------------------

def save_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Write the whole training state to ``folder`` atomically (temp folder, then rename)."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}  # clone: tied weights share memory
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = st[k].contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).reshape(1)
    tensors["rng.torch"] = torch.get_rng_state()
    state = dict(state, lrs=[g["lr"] for g in opt.param_groups])
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=folder.parent))
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    swap_folder(tmp, folder)


def load_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(folder / "state.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"], "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"],
                            "step": tensors[f"opt.{i}.step"].reshape(())}
    for g, lr in zip(opt.param_groups, state["lrs"]):
        g["lr"] = lr
    torch.set_rng_state(tensors["rng.torch"])
    return state


# --- the loop ----------------------------------------------------------------------------

def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train(data: Optional[str], out: str | Path, cfg: TrainConfig, features: str | Path = DEFAULT_FEATURES,
          resume: bool = False, progress: bool = True, max_batches: Optional[int] = None) -> Path:
    """Train a decoder; returns the run folder. ``max_batches`` stops early (for tests of resume)."""
    rank, world = _dist_info()
    out = Path(out)
    ckpt = out / "checkpoint"
    if resume:
        # A run killed while replacing its checkpoint or best bundle left the last complete one aside.
        for f in (ckpt, out / "best"):
            if recover_swap(f):
                print(f"note: {f} restored from the copy a killed run left")
    if resume and not (ckpt / "state.json").is_file():
        print(f"note: {ckpt} has no checkpoint; starting a new run")
        resume = False
    if resume:
        # A resumed run keeps its own settings, whatever this call says.
        cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    elif cfg.init:
        # The bundle decides the encoder, decoder and preprocessing; its own config the decoder's sizes.
        b = read_config(cfg.init)
        cfg = replace(cfg, encoder=b["encoder"]["name"], decoder=b["decoder"]["type"],
                      image_size=int(b["preprocessing"]["size"]))
    if cfg.model.deep_output and cfg.decoder != "show_attend_tell" and not cfg.init:
        raise ValueError(f"--deep-output is a show_attend_tell option (Xu et al. eq. 7), not {cfg.decoder}'s")
    if not 0.0 <= cfg.feature_dropout < 1.0:
        raise ValueError(f"--feature-dropout must be in [0, 1), got {cfg.feature_dropout}")
    if cfg.scst and cfg.extra_captions:
        raise ValueError("extra captions are for cross-entropy training; SCST scores samples against the references")
    ds = load_dataset(data)
    # Read now, so a bad file fails before feature extraction and before the run folder is written.
    extra = read_extra_captions(cfg.extra_captions, ds.split("train")) if cfg.extra_captions else {}
    teacher = teacher_info(cfg.extra_captions) if cfg.extra_captions else None
    prep = Preprocessing(size=cfg.image_size)
    images_all = sorted(ds.captions)
    cache_dir = find_cache(features, cfg.encoder, prep, images_all)
    if rank == 0:
        extract_features(ds, cfg.encoder, features, prep, progress=progress)  # no-op when the cache is complete
    if world > 1:
        dist.barrier()
    cache = FeatureCache.open(cache_dir)
    index = cache.index()
    train_imgs = ds.split("train")
    val_imgs = ds.split(cfg.val_split)
    if cfg.val_limit:
        val_imgs = val_imgs[: cfg.val_limit]

    if resume:
        vocab = Vocab.load(out / "vocab.json")
    else:
        if cfg.init:
            vocab = Vocab.load(Path(cfg.init) / VOCAB)  # load_bundle below checks it against the weights
        else:
            vocab = Vocab.build([c for k in train_imgs for c in ds.captions[k]], cfg.min_count)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            vocab.save(out / "vocab.json")
            with (out / "metrics.csv").open("w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)

    flip = cfg.flip_prob > 0 and not cfg.scst
    caches = [cache]
    if flip:
        if rank == 0:
            extract_features(ds, cfg.encoder, features, prep, progress=progress, flip=True)
        if world > 1:
            dist.barrier()
        caches.append(FeatureCache.open(find_cache(features, cfg.encoder, prep, images_all, flip=True)))

    torch.manual_seed(cfg.seed)
    init: Optional[tuple[Decoder, Vocab, dict]] = None  # (decoder, vocab, config) of cfg.init
    if cfg.init:
        init = load_bundle(cfg.init)
        decoder = init[0].train()
        if decoder.config.feature_dim != cache.meta["channels"]:
            raise ValueError(f"{cfg.init}: expects {decoder.config.feature_dim} feature channels, "
                             f"the cache has {cache.meta['channels']}")
    else:
        decoder = build_decoder(cfg.decoder, decoder_config(cfg, len(vocab), cache.meta["channels"]))
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "batch": 0, "best": -math.inf, "bad_epochs": 0, "lr_bad": 0, "train_loss_sum": 0.0,
             "train_loss_n": 0, "elapsed": 0.0, "done": False}
    if resume:
        state = load_checkpoint(ckpt, decoder, opt)
        print(f"resumed {out} at epoch {state['epoch'] + 1}, batch {state['batch']}")
    model: torch.nn.Module = decoder
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(decoder)
    if cfg.scst:
        # One row per image: each batch samples captions for images and scores them on their references.
        rows = np.asarray([index[k] for k in train_imgs], dtype=np.int64)
        names = np.asarray(train_imgs)
        refs = py_tokenize({k: ds.captions[k] for k in train_imgs})  # as the no-Java validation CIDEr
        cider = CiderD({k: [c.split() + [EOS] for c in v] for k, v in refs.items()})
    else:
        train_caps = {k: ds.captions[k] + extra.get(k, []) for k in train_imgs}
        rows, caps = encode_captions(train_caps, train_imgs, index, vocab, cfg.max_tokens)
        caps_mirrored = mirror_captions(caps, vocab) if flip else caps
    per_rank = len(rows) // world
    n_batches = math.ceil(per_rank / cfg.batch_size)
    batches_run = 0

    while state["epoch"] < cfg.epochs and not state["done"]:
        epoch = state["epoch"]
        # The order depends only on (seed, epoch): a resumed run sees the same batches.
        perm = np.random.default_rng(cfg.seed + epoch).permutation(len(rows))[: per_rank * world]
        perm = perm[rank::world]
        # Which captions see the mirrored photo this epoch: also a function of (seed, epoch) only.
        views = (np.random.default_rng([cfg.seed, epoch, 1]).random(len(rows)) < cfg.flip_prob).astype(np.int64) \
            if flip else np.zeros(len(rows), dtype=np.int64)
        sample_prob = cfg.sample_prob_max * epoch / max(1, cfg.epochs - 1)
        decoder.train()
        t0 = time.time()
        bar = tqdm(total=n_batches, initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank != 0, unit="batch", mininterval=15)
        for b in range(state["batch"], n_batches):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            g, p = read_views(caches, rows[idx], views[idx])
            if cfg.scst:
                loss, reward = scst_loss(decoder, g, p, names[idx].tolist(), cider,
                                         vocab.itos, cfg.scst_samples, cfg.scst_max_len)
                state["reward_sum"] = state.get("reward_sum", 0.0) + reward
            else:
                if cfg.feature_dropout:
                    # The frozen features are the decoder's whole view of the photo; dropping some (as
                    # ruotianluo's AttModel drops half of its embedded image features) keeps it from
                    # leaning on a few channels of 6,000 photos.
                    g, p = F.dropout(g, cfg.feature_dropout), F.dropout(p, cfg.feature_dropout)  # (b, P, C), (b, C)
                tok = np.where(views[idx, None] == 1, caps_mirrored[idx], caps[idx])  # (b, T)
                loss = caption_loss(model, g, p, torch.from_numpy(tok),
                                    cfg.alpha_c if decoder.has_attention else 0.0, sample_prob, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.scst and world > 1:
                # SCST steps the bare decoder (DDP only hooks forward), so average gradients by hand.
                for prm in decoder.parameters():
                    if prm.grad is None:
                        prm.grad = torch.zeros_like(prm)
                    dist.all_reduce(prm.grad)
                    prm.grad /= world
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
            opt.step()
            state["train_loss_sum"] += loss.item()
            state["train_loss_n"] += 1
            state["batch"] = b + 1
            bar.set_postfix(loss=f"{state['train_loss_sum'] / state['train_loss_n']:.3f}", refresh=False)
            bar.update(1)
            batches_run += 1
            stop_now = max_batches is not None and batches_run >= max_batches
            if rank == 0 and (stop_now or (cfg.checkpoint_every and state["batch"] % cfg.checkpoint_every == 0)):
                save_checkpoint(ckpt, decoder, opt, dict(state, elapsed=state["elapsed"] + time.time() - t0))
            if stop_now:
                bar.close()
                return out
        bar.close()
        state["elapsed"] += time.time() - t0
        secs = time.time() - t0
        if rank == 0:
            v = validate(decoder, cache, ds, val_imgs, vocab, cfg)
            score = v["val_cider"] if cfg.select_metric == "cider" else v["val_bleu4"]
            row = {"epoch": epoch + 1, "train_loss": state["train_loss_sum"] / max(1, state["train_loss_n"]), **v,
                   "lr": opt.param_groups[0]["lr"], "sample_prob": sample_prob, "seconds": round(secs, 1),
                   "train_reward": (state.get("reward_sum", 0.0) / max(1, state["train_loss_n"])) if cfg.scst else ""}
            _append_csv(out / "metrics.csv", row, epoch + 1)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            if score > state["best"]:
                state.update(best=score, bad_epochs=0, lr_bad=0)
                training = {"epoch": epoch + 1, f"val_{cfg.select_metric}": score, "config": cfg.to_dict()}
                if init:
                    # How the starting model was trained, so the model card can give both stages.
                    training["init_training"] = init[2].get("training")
                if cfg.extra_captions:
                    training["teacher"] = teacher
                save_bundle(out / "best", decoder, vocab, cfg.encoder, prep, extra={"training": training})
            else:
                state["bad_epochs"] += 1
                state["lr_bad"] += 1
                if state["lr_bad"] >= cfg.lr_patience:
                    for g in opt.param_groups:
                        g["lr"] *= cfg.lr_factor
                    state["lr_bad"] = 0
                if state["bad_epochs"] >= cfg.patience:
                    print(f"early stop: no better val {cfg.select_metric} for {cfg.patience} epochs")
                    state["done"] = True
        if world > 1:
            # Rank 0 decides the lr and whether to stop; everyone follows.
            sync = torch.tensor([opt.param_groups[0]["lr"], float(state["done"])], dtype=torch.float64)
            dist.broadcast(sync, 0)
            for g in opt.param_groups:
                g["lr"] = float(sync[0])
            state["done"] = bool(sync[1])
        state.update(epoch=epoch + 1, batch=0, train_loss_sum=0.0, train_loss_n=0, reward_sum=0.0)
        if rank == 0:
            save_checkpoint(ckpt, decoder, opt, state)
    return out


def _append_csv(path: Path, row: dict, epoch: int) -> None:
    """Append one epoch's row; rows from a killed run's later epochs are dropped first."""
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows + [row])

    atomic_write(path, write)
