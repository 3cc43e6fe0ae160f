"""Is an attribution map faithful to the model? Two standard checks.

* Deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for
  Explanation of Black-box Models", BMVC, arXiv:1806.07421): blocks of pixels are removed
  from the image (deletion) or revealed on a blank canvas (insertion) in the order the map
  ranks them, and the word's probability is tracked. A faithful map makes the deletion curve
  fall fast (low area under the curve) and the insertion curve rise fast (high area). A
  random ordering of the same blocks (seeded) is the baseline every map must beat. As in the
  paper, deleted pixels become black and insertion starts from a blurred copy of the image.
* Model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps",
  NeurIPS, arXiv:1810.03292): if a map barely changes when the decoder's weights are
  replaced by random ones, it is not explaining what the model learnt. Similarity is the
  Spearman rank correlation of the two maps (scipy), raw and of absolute values.

Dimensions: S image side, B blocks (S/block)^2, K curve points (steps + 1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ._utils import PixelsLike, as_pixels
from .attribution import WordLogProb, attribute, make_baseline, word_scorer

SUBSTRATES = ("black", "mean", "blur")


@dataclass
class Curve:
    """A deletion or insertion curve.

    kind: "deletion" or "insertion". order: "map" or "random". fractions: (K,) share of blocks
    removed / revealed, 0..1. probs: (K,) the word's probability at each point. auc: area
    under probs over fractions (trapezoid), in [0, 1].
    """

    kind: str
    order: str
    fractions: np.ndarray
    probs: np.ndarray
    auc: float


@dataclass
class FaithfulnessResult:
    """Deletion and insertion for one word and map, with the seeded random-order baselines."""

    deletion: Curve
    insertion: Curve
    random_deletion: Curve
    random_insertion: Curve
    word: str
    prob: float

    def summary(self) -> dict[str, float]:
        return {"deletion_auc": self.deletion.auc, "insertion_auc": self.insertion.auc,
                "random_deletion_auc": self.random_deletion.auc, "random_insertion_auc": self.random_insertion.auc}


def auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Trapezoidal area under values (K,) over fractions (K,) from 0 to 1."""
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), np.asarray(fractions, dtype=np.float64)))


def block_scores(saliency: np.ndarray, block: int = 16) -> np.ndarray:
    """Mean of a (S, S) map over non-overlapping block x block tiles -> (S/block, S/block)."""
    m = np.asarray(saliency, dtype=np.float64)
    H, W = m.shape
    if H % block or W % block:
        raise ValueError(f"map size {H}x{W} is not a multiple of the block size {block}")
    return m.reshape(H // block, block, W // block, block).mean((1, 3))


def map_order(saliency: np.ndarray, block: int = 16, seed: int = 0) -> np.ndarray:
    """Block indices (row-major) from most to least salient; ties broken by a seeded shuffle
    (so a flat region is not removed top-left first).

    Returns:
        (B,) int array, a permutation of range(B).
    """
    s = block_scores(saliency, block).ravel()
    tie = np.random.default_rng(seed).permutation(s.size)
    return np.lexsort((tie, -s))


def random_order(n_blocks: int, seed: int = 0) -> np.ndarray:
    """A seeded random permutation of range(n_blocks)."""
    return np.random.default_rng(seed).permutation(n_blocks)


def _masks(order: np.ndarray, S: int, block: int, steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """(K, 1, S, S) bool: True where the first round(k/steps * B) blocks of ``order`` lie."""
    nb = S // block
    B = nb * nb
    rank = np.empty(B, dtype=np.int64)
    rank[order] = np.arange(B)
    counts = np.round(np.linspace(0, B, steps + 1)).astype(np.int64)  # blocks affected at each point
    rank_img = torch.from_numpy(rank.reshape(nb, nb)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    masks = rank_img[None] < torch.from_numpy(counts)[:, None, None]  # (K, S, S)
    return masks[:, None], counts / B


@torch.no_grad()
def perturbation_curve(scorer: WordLogProb, pixels: torch.Tensor, order: np.ndarray, kind: str = "deletion",
                       block: int = 16, steps: int = 24, substrate: Union[str, torch.Tensor, None] = None,
                       batch_size: int = 13, order_name: str = "map") -> Curve:
    """Delete or insert blocks in ``order`` and record the word's probability.

    Args:
        scorer: the word's ``WordLogProb`` module (pixels -> log-probability).
        pixels: normalised (1, 3, S, S).
        order: (B,) block indices, first = removed / revealed first.
        kind: "deletion" (image -> substrate) or "insertion" (substrate -> image).
        steps: the curve has steps + 1 points.
        substrate: what removed pixels become: "black", "mean", "blur" or a tensor; default
            "black" for deletion and "blur" for insertion (Petsiuk et al.).
        batch_size: images per forward pass.
    Returns:
        A ``Curve`` with K = steps + 1 points.
    """
    if kind not in ("deletion", "insertion"):
        raise ValueError(f"kind must be 'deletion' or 'insertion', not {kind!r}")
    S = pixels.shape[-1]
    substrate = substrate if substrate is not None else ("black" if kind == "deletion" else "blur")
    canvas = make_baseline(pixels, substrate)
    masks, fractions = _masks(np.asarray(order), S, block, steps)
    probs = []
    for i in range(0, masks.size(0), batch_size):
        m = masks[i:i + batch_size]
        x = torch.where(m, canvas, pixels) if kind == "deletion" else torch.where(m, pixels, canvas)
        probs.append(scorer(x).exp())
    p = torch.cat(probs).double().numpy()
    return Curve(kind, order_name, fractions, p, auc(fractions, p))


def deletion_insertion(captioner, image: PixelsLike, caption_tokens: Sequence[int], word_index: int,
                       saliency: np.ndarray, block: int = 16, steps: int = 24, seed: int = 0,
                       deletion_substrate: str = "black", insertion_substrate: str = "blur",
                       random_curves: Optional[tuple[Curve, Curve]] = None) -> FaithfulnessResult:
    """Deletion and insertion curves of one word for a map, and for a seeded random order.

    Args:
        captioner: a ``captioning.api.Captioner``.
        image: path / bytes / PIL image or normalised (3, S, S) / (1, 3, S, S) tensor.
        caption_tokens, word_index: the word, as for ``attribute``.
        saliency: (S, S) map (e.g. ``Attribution.map``); larger = more important.
        block: tile side in pixels (S must be a multiple). steps: curve points - 1.
        seed: seed of the random order and of tie-breaking.
        random_curves: (random deletion, random insertion) already computed for this word, to reuse.
    Returns:
        ``FaithfulnessResult``; every AUC is in [0, 1].
    """
    pixels = as_pixels(image, captioner.prep)
    S = pixels.shape[-1]
    if np.shape(saliency) != (S, S):
        raise ValueError(f"saliency map must be {S}x{S}, got {np.shape(saliency)}")
    scorer = word_scorer(captioner, caption_tokens, word_index)
    with torch.no_grad():
        prob = float(scorer(pixels).exp()[0])
    order = map_order(saliency, block, seed)
    dele = perturbation_curve(scorer, pixels, order, "deletion", block, steps, deletion_substrate)
    ins = perturbation_curve(scorer, pixels, order, "insertion", block, steps, insertion_substrate)
    if random_curves is None:
        random_curves = random_baselines(captioner, pixels, caption_tokens, word_index, block, steps, seed,
                                         deletion_substrate, insertion_substrate)
    word = captioner.vocab.itos[int(scorer.targets[scorer.word_index])]
    return FaithfulnessResult(dele, ins, random_curves[0], random_curves[1], word, prob)


def random_baselines(captioner, image: PixelsLike, caption_tokens: Sequence[int], word_index: int, block: int = 16,
                     steps: int = 24, seed: int = 0, deletion_substrate: str = "black",
                     insertion_substrate: str = "blur") -> tuple[Curve, Curve]:
    """Deletion and insertion curves for a seeded random block order (shared by all methods).

    Returns:
        (random deletion curve, random insertion curve).
    """
    pixels = as_pixels(image, captioner.prep)
    scorer = word_scorer(captioner, caption_tokens, word_index)
    order = random_order((pixels.shape[-1] // block) ** 2, seed)
    return (perturbation_curve(scorer, pixels, order, "deletion", block, steps, deletion_substrate, order_name="random"),
            perturbation_curve(scorer, pixels, order, "insertion", block, steps, insertion_substrate,
                               order_name="random"))


# --------------------------------------------------------------------------- randomisation check

@dataclass
class RandomisationResult:
    """Adebayo et al.'s model-randomisation check for one map.

    spearman: rank correlation of the original and randomised maps; spearman_abs: of their
    absolute values. Near 1 means the map ignores the weights (a failed check).
    """

    method: str
    target: str
    spearman: float
    spearman_abs: float
    original: np.ndarray
    randomised: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


def randomise_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A deep copy of ``module`` with every parameter re-initialised (``reset_parameters``),
    seeded; the original is untouched."""
    clone = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_parameters") and m is not clone:
                m.reset_parameters()
    clone.eval()
    return clone


def model_randomisation(captioner, image: PixelsLike, caption_tokens: Sequence[int], word_index: int,
                        method: str = "grad_cam", target: str = "decoder", seed: int = 0,
                        downsample: int = 4, **options: Any) -> RandomisationResult:
    """Recompute a word's map with randomly re-initialised weights and compare (Adebayo et al. 2018).

    Args:
        captioner: a ``captioning.api.Captioner`` (not modified: weights are randomised in copies).
        image, caption_tokens, word_index, method, **options: as for ``attribute``.
        target: "decoder", "encoder" or "both": which weights are randomised.
        downsample: maps are average-pooled by this factor before the rank correlation
            (bilinear upsampling makes neighbouring pixels near-duplicates).
    Returns:
        ``RandomisationResult`` with both (S, S) maps and the Spearman correlations.
    """
    from scipy.stats import spearmanr

    from captioning.api import Captioner

    if target not in ("decoder", "encoder", "both"):
        raise ValueError(f"target must be decoder, encoder or both, not {target!r}")
    pixels = as_pixels(image, captioner.prep)
    orig = attribute(captioner, pixels, caption_tokens, word_index, method, **options)
    enc = randomise_weights(captioner.encoder, seed) if target in ("encoder", "both") else captioner.encoder
    dec = randomise_weights(captioner.decoder, seed + 1) if target in ("decoder", "both") else captioner.decoder
    rand_cap = Captioner(enc, dec, captioner.vocab, captioner.prep, captioner.config)
    rand = attribute(rand_cap, pixels, caption_tokens, word_index, method, **options)

    def pool(m: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
        return torch.nn.functional.avg_pool2d(t, downsample)[0, 0].numpy().ravel() if downsample > 1 else m.ravel()

    a, b = pool(orig.map), pool(rand.map)
    rho = _spearman(spearmanr, a, b)
    rho_abs = _spearman(spearmanr, np.abs(a), np.abs(b))
    return RandomisationResult(method, target, rho, rho_abs, orig.map, rand.map,
                               {"word": orig.word, "logprob": orig.logprob, "randomised_logprob": rand.logprob})


def _spearman(fn, a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant map has no ranking
    return float(fn(a, b).statistic)
