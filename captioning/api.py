"""The public API: ``Captioner.from_pretrained(path).caption(images)``.

What it raises, all ValueError subclasses with a one-line message fit to show a user:
  * ``BundleError`` (captioning.bundle) from ``from_pretrained``: a model folder that cannot be
    loaded (missing, truncated or hostile files, wrong types, vocabulary and weights that do not
    match); the message names the file at fault.
  * ``ImageError`` (captioning.images) from ``caption``, ``pixels``, ``classify`` and ``load``: an
    image that cannot be decoded, whatever the decoder raised inside; the message names the file.
  * ``ValueError`` for settings out of range (``nbest > beam_size``, an unknown ``method``, ...).
``caption`` on a list raises for the first bad image; to keep going past bad images, caption
them one at a time (as the command line does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .bundle import DEFAULT_MODEL, BundleError, check_weights_header, load_bundle, read_json
from .decoders import Decoder
from .decoding import Ensemble, Hypothesis, Lattice, SpecialIds, beam_search, rerank_candidates, sample_decode
from .encoders import Encoder, build_encoder
from .images import ImageInput, Preprocessing, load_image, preprocess
from .familiarity import Familiarity, FamiliarityScore, load_familiarity
from .decode_config import DecodeConfig
from .guidance import GuideSettings, plan as plan_guide
from .matcher import Matcher, load_matcher
from .recognition import Recognition, head_log_probs, recognise
from .vocab import Vocab, detokenize


@dataclass
class Caption:
    """One hypothesis in words. attention: (len(words) [+1 for <end>], 7, 7) or None."""

    text: str
    words: list[str]
    tokens: list[int]
    logprob: float
    score: float
    finished: bool
    attention: Optional[np.ndarray] = None
    match: Optional[float] = None  # the matcher's cosine with the photo, when the beams were re-ranked


@dataclass
class CaptionResult:
    """All hypotheses for one image, best first; ``text``/``words``/... are the best one's."""

    captions: list[Caption]
    lattice: Optional[list[dict]] = None
    # How close the photo is to the training photos (familiarity.py; None without a familiarity
    # model in the bundle) and what the encoder's ImageNet head recognises, with caption words.
    familiarity: Optional[FamiliarityScore] = None
    recognised: Optional[list[Recognition]] = None
    # Guided decoding (guidance.py): the words one of which the caption was made to contain
    # ([] when nothing was recognised confidently enough); None when guidance was off.
    guided: Optional[list[str]] = None

    @property
    def best(self) -> Caption:
        return self.captions[0]

    @property
    def text(self) -> str:
        return self.best.text

    @property
    def words(self) -> list[str]:
        return self.best.words

    @property
    def tokens(self) -> list[int]:
        return self.best.tokens

    @property
    def logprob(self) -> float:
        return self.best.logprob

    @property
    def attention(self) -> Optional[np.ndarray]:
        return self.best.attention


def _load_matcher_checked(folder: Union[str, Path]) -> Optional[Matcher]:
    """load_matcher, after the checks load_bundle makes of the decoder: the matcher's sizes are
    built on the meta device and compared with its weights' header, so a matcher.json claiming
    enormous layers allocates nothing. Raises BundleError naming the file."""
    from .matcher import MATCHER_CONFIG, MATCHER_WEIGHTS, MatcherConfig

    folder = Path(folder)
    cp, wp = folder / MATCHER_CONFIG, folder / MATCHER_WEIGHTS
    if cp.is_file() and wp.is_file():
        doc = read_json(cp, "matcher config")
        try:
            cfg = MatcherConfig(**{"packed": False, **doc["config"]})
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in Matcher(cfg).state_dict().items()}
        except Exception as e:  # noqa: BLE001 (whatever a bad config makes the constructor raise)
            raise BundleError(f"{cp}: not a valid matcher config ({type(e).__name__}: {e})"[:400]) from None
        check_weights_header(wp, shapes, against=MATCHER_CONFIG)
    try:
        return load_matcher(folder)
    except ValueError as e:
        raise BundleError(str(e).splitlines()[0] if str(e) else f"{folder}: bad matcher") from None


def load_bundle_tagger(folder: Path, config: dict, encoder: Encoder):
    """The concept tagger a bundle's ``config.json`` names under ``tagger``, sharing the
    captioner's encoder; None when it names none. The name is a folder beside the bundle's
    (``"tagger"`` for assets/models/tagger; a symlinked bundle looks beside its target), or else
    among the shipped models. Raises BundleError, in one line, for a tagger that is in neither
    place, cannot be loaded or reads another encoder."""
    name = config.get("tagger")  # its shape is checked with the rest of config.json (bundle.read_config)
    if name is None:
        return None
    cp = folder / "config.json"
    from .paths import MODELS_DIR
    from .tagger import Tagger

    beside = Path(folder).resolve().parent / name
    tagger = Tagger.from_pretrained(beside if beside.is_dir() or not (MODELS_DIR / name).is_dir() else MODELS_DIR / name,
                                    encoder=encoder)
    want = tagger.config.get("encoder", {}).get("name")
    if want is not None and want != config["encoder"]["name"]:
        raise BundleError(f"{cp}: its tagger {name!r} reads {want}, not this model's {config['encoder']['name']}")
    return tagger


class Captioner:
    """A frozen encoder plus one decoder (or an ensemble of decoders sharing a vocabulary)."""

    def __init__(self, encoder: Encoder, decoder: Union[Decoder, Ensemble], vocab: Vocab,
                 prep: Preprocessing = Preprocessing(), config: Optional[dict] = None,
                 matcher: Optional[Matcher] = None):
        self.encoder = encoder.eval()
        self.decoder = decoder.eval()
        self.matcher = matcher
        self.familiarity: Optional[Familiarity] = None
        # The concept tagger guidance's ``absent`` penalty reads (config.json ``tagger``; None: none).
        self.tagger = None
        self.vocab = vocab
        self.prep = prep
        self.config = config or {}
        self.ids = SpecialIds(vocab.pad, vocab.start, vocab.end, vocab.unk)

    @property
    def grid_side(self) -> int:
        """Side of the feature grid the decoder attends over (7 for a 224 px input)."""
        return self.encoder.grid_side(self.prep.size)

    @property
    def decoding(self) -> DecodeConfig:
        """The settings the bundle recommends (config.json ``decoding``, chosen on the dev split;
        every None resolved). An ensemble's length penalty is 0 (its members' choices need not
        agree), and so is the re-ranking weight without a matcher."""
        d = DecodeConfig.from_bundle(self.config)
        if isinstance(self.decoder, Ensemble):
            d = d.replace(length_penalty=0.0)
        if self.matcher is None:
            d = d.replace(rerank=0.0)
        return d

    @property
    def default_length_penalty(self) -> float:
        return self.decoding.length_penalty

    @property
    def default_rerank(self) -> float:
        return self.decoding.rerank

    @property
    def default_rerank_pool(self) -> int:
        """0 means ``beam_size``."""
        return self.decoding.rerank_pool

    @property
    def default_guide(self) -> bool:
        return bool(self.decoding.guide)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path, Sequence[Union[str, Path]], None] = None,
                        encoder: Optional[Encoder] = None) -> "Captioner":
        """Load a bundle folder (default: the shipped default model). A list of folders makes
        an ensemble; its members must share encoder, preprocessing and vocabulary.

        Raises BundleError (one line, naming the file) for a folder that cannot be loaded."""
        paths = [DEFAULT_MODEL] if path is None else ([path] if isinstance(path, (str, Path)) else list(path))
        loaded = [load_bundle(p) for p in paths]
        dec0, vocab, cfg = loaded[0]
        for p, (_, v, c) in zip(paths[1:], loaded[1:]):
            if v.itos != vocab.itos:
                raise BundleError(f"{p}: vocabulary differs from {paths[0]}; an ensemble needs one vocabulary")
            if c["encoder"] != cfg["encoder"] or c["preprocessing"] != cfg["preprocessing"]:
                raise BundleError(f"{p}: encoder or preprocessing differs from {paths[0]}")
        enc = encoder or build_encoder(cfg["encoder"]["name"])
        decoder = dec0 if len(loaded) == 1 else Ensemble([d for d, _, _ in loaded])
        # An ensemble's beams are not re-ranked: its members' matchers could disagree.
        matcher = _load_matcher_checked(paths[0]) if len(loaded) == 1 else None
        cap = cls(enc, decoder, vocab, Preprocessing.from_dict(cfg["preprocessing"]), cfg, matcher)
        try:  # it reads the encoder's features, which an ensemble's members share
            cap.familiarity = load_familiarity(paths[0])
        except ValueError as e:
            raise BundleError(str(e)) from None
        cap.tagger = load_bundle_tagger(Path(paths[0]), cfg, enc)
        return cap

    def load(self, image: ImageInput):
        """An image as upright RGB; raises ImageError (one line, naming it) if it cannot be decoded."""
        return load_image(image)

    def pixels(self, images: Iterable[ImageInput]) -> torch.Tensor:
        """Images -> normalised batch (B, 3, S, S). Raises ImageError for the first bad image."""
        return torch.stack([preprocess(load_image(im), self.prep) for im in images])

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> grid (B, P, C), pooled (B, C)."""
        return self.encoder(pixels)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Images -> grid (B, P, C) and pooled (B, C) of the stretched photos, and each photo's
        (width, height) before the stretch (``caption_features``' ``image_sizes``). Raises
        ImageError for the first bad image."""
        ims = [load_image(im) for im in images]
        grid, pooled = self.encode(torch.stack([preprocess(im, self.prep) for im in ims]))
        return grid, pooled, [im.size for im in ims]

    @torch.no_grad()
    def classify(self, image: ImageInput, k: int = 5) -> list[tuple[str, float]]:
        """The encoder's own ImageNet top-k (label, probability) for an image, read as guidance
        and ``CaptionResult.recognised`` read it (recognition.head_log_probs)."""
        grid, pooled, sizes = self.encode_images([image])
        return [(r.label, r.prob) for r in self.recognise(pooled, k, grid=grid, sizes=sizes)[0]]

    @torch.no_grad()
    def caption(self, images: Union[ImageInput, Sequence[ImageInput]], decode: Optional[DecodeConfig] = None, *,
                return_lattice: bool = False, batch_size: int = 64, seed: Optional[int] = None,
                **settings) -> list[CaptionResult]:
        """Caption images (paths, bytes or PIL images; one or a list).

        Args:
            decode: the decoding settings (DecodeConfig; default: its defaults, which leave the
                length penalty, re-ranking and guidance to the bundle).
            **settings: DecodeConfig fields that override ``decode``'s, e.g. ``beam_size=5``,
                ``method="sample"``, ``guide=True``:
                method: "beam" (default), "greedy" or "sample" (temperature, top_k, seed).
                beam_size, nbest, length_penalty, no_repeat_ngram, min_len, max_len: beam search
                    settings; length_penalty None is the bundle's ``default_length_penalty``.
                allow_unk: let the model say <unk> (off: it is masked out).
                rerank: beam search only: re-rank the finished captions by score + rerank * the
                    matcher's cosine with the photo (matcher.py); None is the bundle's
                    ``default_rerank``, 0 turns it off.
                rerank_pool: how many finished captions the search keeps for re-ranking (at least
                    ``beam_size``): the best by score of all that ended while the ``beam_size``
                    live beams were searched (the live beams are the same whatever the pool).
                    None is the bundle's ``default_rerank_pool``.
                guide: guided decoding (guidance.py; beam search only): a word the encoder's
                    ImageNet head is confident about must appear in the caption, and words its
                    recognition rules out are penalised. None is the bundle's ``default_guide``,
                    True/False turn it on/off, a dict or GuideSettings sets its strengths.
            return_lattice: keep what beam search considered at each step.
        Returns:
            One CaptionResult per image, in order.
        Raises:
            ImageError: an image that cannot be decoded (any failure inside the decoder, named
                and in one line); with a list, the first bad image stops the whole call.
            ValueError: settings out of range (nbest > beam_size, unknown method, rerank
                without a matcher, negative rerank_pool).
            TypeError: a setting DecodeConfig does not have.
        """
        cfg = (decode or DecodeConfig()).replace(**settings)
        if isinstance(images, (str, Path, bytes)) or hasattr(images, "size") and not isinstance(images, (list, tuple)):
            images = [images]
        if cfg.nbest > cfg.beam_size and cfg.method == "beam":
            raise ValueError(f"nbest ({cfg.nbest}) cannot exceed beam_size ({cfg.beam_size})")
        out: list[CaptionResult] = []
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for i in range(0, len(images), batch_size):
            grid, pooled, sizes = self.encode_images(images[i:i + batch_size])
            out += self.caption_features(grid, pooled, cfg, return_lattice=return_lattice, generator=gen,
                                         image_sizes=sizes)
        return out

    @torch.no_grad()
    def caption_features(self, grid: torch.Tensor, pooled: torch.Tensor, decode: Optional[DecodeConfig] = None, *,
                         return_lattice: bool = False, generator: Optional[torch.Generator] = None,
                         image_sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None,
                         **settings) -> list[CaptionResult]:
        """Like ``caption`` but from encoder output: grid (B, P, C), pooled (B, C).

        ``image_sizes``: each photo's (width, height) before the stretch to a square, so that the
        ImageNet head (guidance, ``recognised``) also reads the central square of a photo that is
        not square, as ``caption`` does (recognition.head_log_probs); None: the stretched view only.
        """
        req = (decode or DecodeConfig()).replace(**settings)
        bundle = self.decoding
        length_penalty = bundle.length_penalty if req.length_penalty is None else req.length_penalty
        rerank = bundle.rerank if req.rerank is None else req.rerank
        if rerank and self.matcher is None:
            raise ValueError("re-ranking needs a matcher in the model folder (python -m captioning train-matcher)")
        rerank_pool = bundle.rerank_pool if req.rerank_pool is None else req.rerank_pool
        if rerank_pool < 0:
            raise ValueError(f"rerank_pool must be >= 0, got {rerank_pool}")
        method, nbest, beam_size = req.method, req.nbest, req.beam_size
        pool = rerank_candidates(beam_size, rerank_pool, nbest) if rerank else nbest
        common = dict(max_len=req.max_len, min_len=req.min_len, no_repeat_ngram=req.no_repeat_ngram,
                      allow_unk=req.allow_unk, ids=self.ids)
        settings = req.guide_for(bundle)
        if settings is not None and method != "beam":
            if req.guide is not None:  # asked for explicitly; the bundle's default just does not apply
                raise ValueError(f"guided decoding needs method='beam', not {method!r}")
            settings = None
        if method == "beam":
            lat = Lattice() if return_lattice else None
            plan, chosen = self._guide(grid, pooled, settings, image_sizes)
            hyps = beam_search(self.decoder, grid, pooled, beam_size=beam_size,
                               nbest=pool, length_penalty=length_penalty, lattice=lat, guide=plan,
                               **common)
            out = []
            for b, hs in enumerate(hyps):
                caps = [self._words(h) for h in hs]
                if rerank:
                    # A caption cut off at max_len competes only when too few captions ended.
                    done = [c for c in caps if c.finished]
                    caps = done if len(done) >= nbest else done + [c for c in caps if not c.finished][:nbest - len(done)]
                    sims = self.matcher.similarity(pooled[b], [c.tokens for c in caps], grid[b])  # (K,)
                    for c, m in zip(caps, sims.tolist()):
                        c.match, c.score = m, c.score + rerank * m
                    caps.sort(key=lambda c: -c.score)
                out.append(CaptionResult(caps[:nbest], lat.steps[b] if lat else None,
                                         guided=chosen[b] if chosen is not None else None))
            return self._annotate(out, grid, pooled, image_sizes)
        if method in ("greedy", "sample"):
            hyps = sample_decode(self.decoder, grid, pooled, greedy=method == "greedy", temperature=req.temperature,
                                 top_k=req.top_k, generator=generator, **common)
            return self._annotate([CaptionResult([self._words(h)]) for h in hyps], grid, pooled, image_sizes)
        raise ValueError(f"unknown method {method!r}; valid: beam, greedy, sample")

    @torch.no_grad()
    def recognise(self, pooled: torch.Tensor, k: int = 5, grid: Optional[torch.Tensor] = None,
                  sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> list[list[Recognition]]:
        """The encoder's ImageNet top-k from pooled features (B, C), with caption words
        (recognition.py): the head reads the pooled features, so this costs one linear layer.
        With the grid (B, P, C) and the photos' (width, height), a photo that is not square is
        also read in its central square (recognition.head_log_probs)."""
        return recognise(self._head_log_probs(grid, pooled, sizes), k)

    def _head_log_probs(self, grid, pooled, sizes) -> torch.Tensor:
        """(B, 1000) ImageNet log-probabilities of the bundle's own view (an ensemble whose members
        read different views gives lists; the first is the bundle's). Raises NotImplementedError
        for an encoder without an ImageNet head."""
        p = pooled[0] if isinstance(pooled, (list, tuple)) else pooled
        g = grid[0] if isinstance(grid, (list, tuple)) else grid
        if g is None or g.shape[-1] != p.shape[-1]:
            g, sizes = p[:, None, :], None
        return head_log_probs(self.encoder.head, g, p, sizes)

    def _own_view(self, pooled) -> bool:
        p = pooled[0] if isinstance(pooled, (list, tuple)) else pooled
        return p.shape[-1] == getattr(self.encoder, "feature_dim", p.shape[-1])

    def _guide(self, grid, pooled, settings: Optional[GuideSettings], sizes=None):
        """(Guide for beam_search, constraint words per image), or (None, None) when guidance is
        off or the encoder has no ImageNet head to guide with."""
        if settings is None or not self._own_view(pooled):
            return None, None
        try:
            logits = self._head_log_probs(grid, pooled, sizes)
        except NotImplementedError:
            return None, None
        concepts = None
        if settings.absent and self.tagger is not None:
            g = grid[0] if isinstance(grid, (list, tuple)) else grid
            concepts = (self.tagger.probabilities("image", g), self.tagger.concepts.vocab_forms(self.vocab.itos))
        return plan_guide(logits, self.vocab.itos, settings, concepts)

    def _annotate(self, results: list[CaptionResult], grid, pooled, sizes=None) -> list[CaptionResult]:
        if not self._own_view(pooled):
            return results
        p = pooled[0] if isinstance(pooled, (list, tuple)) else pooled
        fam = self.familiarity.score(p) if self.familiarity is not None and self.familiarity.feature_dim == p.shape[-1] else None
        try:
            rec = recognise(self._head_log_probs(grid, pooled, sizes))
        except NotImplementedError:  # an encoder without an ImageNet head
            rec = None
        for i, r in enumerate(results):
            r.familiarity = fam[i] if fam else None
            r.recognised = rec[i] if rec else None
        return results

    def _words(self, h: Hypothesis) -> Caption:
        words = [self.vocab.itos[i] for i in h.tokens]
        att = h.attention
        if att is not None:
            side = int(round(att.shape[-1] ** 0.5))
            att = att.reshape(att.shape[0], side, side) if side * side == att.shape[-1] else att
        return Caption(detokenize(words), words, list(h.tokens), h.logprob, h.score, h.finished, att)
