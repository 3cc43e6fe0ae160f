"""Adapters from the app to ``explain``: per-word attribution maps, the deletion/insertion and
model-randomisation checks, each word's probability, and the encoder's views (ImageNet top-k,
layers, top channels, feature visualisation)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from captioning.images import preprocess
from explain import attribution, encoder as enc, faithfulness as faith
from explain.encoder import FeatureVis, LayerInfo
from explain.faithfulness import RandomisationResult

from app.services import COMPUTE_LOCK
from app.services.figures import CMAP, to_uint8


def model_pixels(captioner, image: Image.Image) -> torch.Tensor:
    """The normalised (3, S, S) tensor the model sees, with the bundle's own preprocessing."""
    return preprocess(image, captioner.prep)


def word_probs(captioner, image: Image.Image, tokens: Sequence[int]) -> list[float]:
    """p(word | photo, words before it) for every word of a caption (teacher-forced, one forward pass)."""
    scorer = attribution.word_scorer(captioner, list(tokens), 0)
    with COMPUTE_LOCK, torch.no_grad():
        lp = scorer.all_logprobs(model_pixels(captioner, image)[None])[0]
    return [float(math.exp(v)) for v in lp[: len(tokens)].tolist()]


def methods_for(captioner) -> list[str]:
    return list(attribution.available_methods(captioner))


METHOD_TITLES = {"grad_cam": "Grad-CAM (HiResCAM)", "integrated_gradients": "Integrated Gradients",
                 "smoothgrad": "SmoothGrad (sensitivity)", "gradient_shap": "GradientSHAP", "occlusion": "Occlusion",
                 "attention": "Decoder attention (weights)"}
#: Attention is where the decoder looked, not why it said the word (Jain & Wallace 2019), and on the
#: shipped default it barely beats a random order at deleting the word, so the app shows it as the
#: decoder's weights with that measured score. Deletion AUC / random-order deletion AUC, measured
#: in docs/faithfulness.md.
ATTENTION_SCORE = {"attention": 0.90, "grad_cam": 0.75, "words": 90}
ATTENTION_NOTE = ("Decoder attention is the decoder's own weights over the image grid, not an explanation of the "
                  "word: over {words} Flickr8k test words of the default model, deleting pixels in its order lowers "
                  "the word's probability with a deletion area {attention:.2f}× a random order's (Grad-CAM "
                  "{grad_cam:.2f}×; lower is better).").format(**ATTENTION_SCORE)
#: SmoothGrad's |gradient| map is mostly the frozen encoder's sensitivity: re-initialising the
#: decoder barely changes it (Adebayo et al. 2018's check; Spearman of the two maps, mean over the
#: words in docs/faithfulness.md, at the app's settings).
SMOOTHGRAD_SCORE = {"smoothgrad": 0.87, "grad_cam": 0.13, "words": 32}
SMOOTHGRAD_NOTE = ("SmoothGrad shows how sensitive the word is to each pixel, not evidence for it, and fails the "
                   "model-randomisation check (Adebayo et al. 2018): with the decoder's weights re-initialised its "
                   "map keeps a rank correlation of {smoothgrad:.2f} with the trained model's (mean over {words} "
                   "Flickr8k test words; Grad-CAM {grad_cam:.2f}). It is not an explanation.").format(**SMOOTHGRAD_SCORE)
#: Maps the app offers for comparison but never as an explanation, with what to say about them.
NOT_EXPLANATIONS = {"attention": ATTENTION_NOTE, "smoothgrad": SMOOTHGRAD_NOTE}


def explanation_methods(captioner) -> list[str]:
    """The attribution methods the app offers as explanations (tested against random deletion and
    weight randomisation on the shipped default, tests/test_explain_faithfulness.py)."""
    return [m for m in methods_for(captioner) if m not in NOT_EXPLANATIONS]


#: Cheaper settings than the library defaults, so a CPU answers in seconds.
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"nt_samples": 8},
    # 8 samples deleted at 0.87x random over 24 test words, 32 at 0.79x (docs/faithfulness.md).
    "gradient_shap": {"n_samples": 32},
    "occlusion": {"window": 32, "stride": 32},
}


def grad_cam_all(captioner, image: Image.Image, tokens: Sequence[int]) -> list[np.ndarray]:
    """Grad-CAM maps (S, S) for every word of a caption and its <end>, in one backward pass."""
    with COMPUTE_LOCK:
        return [a.map for a in attribution.grad_cam_all_words(captioner, image, list(tokens))]


def attribution_map(captioner, image: Image.Image, tokens: Sequence[int], t: int, method: str,
                    fast: bool = True) -> np.ndarray:
    """One word's (S, S) map for one method (the app's FAST_OPTIONS unless ``fast`` is off)."""
    opts = dict(FAST_OPTIONS.get(method, {})) if fast else {}
    with COMPUTE_LOCK:
        a = attribution.attribute(captioner, image, list(tokens), int(t), method, **opts)
    return np.asarray(a.map, dtype=np.float32)


#: Seeded random block orders averaged for the baseline: one order over 16 steps is noisy enough
#: to flip a verdict, so a map counts only outside their band (mean ± 1 standard deviation).
RANDOM_SEEDS = 5


@dataclass
class Faithfulness:
    """Deletion / insertion AUCs of one map against the random-order baseline.

    random_*_auc: the mean over the seeded random orders; random_*_band: their mean ± 1 standard
    deviation (equal to the mean when there was one order)."""

    method: str
    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    random_deletion_band: Optional[tuple[float, float]] = None
    random_insertion_band: Optional[tuple[float, float]] = None
    seeds: int = 1

    def __post_init__(self):
        if self.random_deletion_band is None:
            self.random_deletion_band = (self.random_deletion_auc, self.random_deletion_auc)
        if self.random_insertion_band is None:
            self.random_insertion_band = (self.random_insertion_auc, self.random_insertion_auc)

    @property
    def beats_random(self) -> bool:
        """Deletion AUC below the random band and insertion AUC above it: a map inside the band
        is not evidence of anything."""
        return (self.deletion_auc < self.random_deletion_band[0]
                and self.insertion_auc > self.random_insertion_band[1])

    @property
    def verdict(self) -> str:
        """"faithful", "worse than random" (outside the band on the wrong side of either curve)
        or "inside the random band"."""
        if self.beats_random:
            return "faithful"
        if self.deletion_auc > self.random_deletion_band[1] or self.insertion_auc < self.random_insertion_band[0]:
            return "worse than random"
        return "inside the random band"


#: The badge colour of each verdict (Caption page, Explain page gallery).
VERDICT_COLOUR = {"faithful": "green", "inside the random band": "orange", "worse than random": "red"}


def faithfulness(captioner, image: Image.Image, tokens: Sequence[int], t: int, maps: dict[str, np.ndarray],
                 steps: int = 16, seeds: int = RANDOM_SEEDS) -> list[Faithfulness]:
    """Deletion/insertion for several maps of one word against ``seeds`` seeded random orders
    (computed once, shared by every map). The curves hold the random mean and its band
    ("random deletion low"/"high": the pointwise mean ∓ 1 standard deviation of the orders)."""
    out = []
    seeds = max(1, int(seeds))

    def xy(c):
        return list(map(float, c.fractions)), list(map(float, c.probs))

    with COMPUTE_LOCK:
        pixels = model_pixels(captioner, image)
        rands = [faith.random_baselines(captioner, pixels, list(tokens), int(t), steps=steps, seed=s)
                 for s in range(seeds)]
        band = {}
        for i, kind in enumerate(("deletion", "insertion")):
            x = list(map(float, rands[0][i].fractions))
            ys = np.array([c[i].probs for c in rands], dtype=np.float64)
            aucs = np.array([float(c[i].auc) for c in rands])
            mu, sd = float(aucs.mean()), float(aucs.std())
            band[kind] = (mu, (mu - sd, mu + sd),
                          {f"random {kind}": (x, ys.mean(0).tolist()),
                           f"random {kind} low": (x, (ys.mean(0) - ys.std(0)).tolist()),
                           f"random {kind} high": (x, (ys.mean(0) + ys.std(0)).tolist())})
        for method, m in maps.items():
            r = faith.deletion_insertion(captioner, pixels, list(tokens), int(t), m, steps=steps,
                                         random_curves=rands[0])
            curves = {"deletion": xy(r.deletion), "insertion": xy(r.insertion), **band["deletion"][2],
                      **band["insertion"][2]}
            out.append(Faithfulness(method, r.deletion.auc, r.insertion.auc, band["deletion"][0], band["insertion"][0],
                                    curves, band["deletion"][1], band["insertion"][1], seeds))
    return out


#: Said beside every faithfulness verdict: the check is about the map, not the caption.
FAITHFUL_IS_NOT_CORRECT = ("A faithful map is not a correct caption: it shows why the model said the word, right or "
                           "wrong (a wrong “dog” in a kitchen can have a faithful map).")


#: Adebayo et al.'s model-randomisation check passes when the map's rank correlation with the map
#: of a decoder with re-initialised weights is below this (the threshold the slow tests use on
#: the shipped default, tests/test_explain_faithfulness.py).
RANDOMISATION_MAX_RHO = 0.4


def randomisation_check(captioner, image: Image.Image, tokens: Sequence[int], t: int,
                        method: str) -> RandomisationResult:
    """The model-randomisation check for one word and method, at the app's FAST_OPTIONS.

    The decoder's weights are re-initialised (in a copy) and the map recomputed; a map that
    barely changes does not depend on what the model learned (Adebayo et al. 2018)."""
    opts = dict(FAST_OPTIONS.get(method, {}))
    with COMPUTE_LOCK:
        return faith.model_randomisation(captioner, model_pixels(captioner, image), list(tokens), int(t),
                                         method=method, target="decoder", **opts)


def passes_randomisation(r: RandomisationResult) -> bool:
    return bool(np.isfinite(r.spearman) and r.spearman < RANDOMISATION_MAX_RHO)


# --------------------------------------------------------------------------- encoder

def imagenet_top5(captioner, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
    with COMPUTE_LOCK:
        return captioner.classify(image, k)


def encoder_layers(captioner) -> list[LayerInfo]:
    """The encoder's inspectable layers (name, channels, height, width)."""
    with COMPUTE_LOCK:
        return enc.layer_info(captioner.encoder, captioner.prep.size)


def top_channel_maps(captioner, image: Image.Image, layer: str, k: int = 8) -> list[dict]:
    """The layer's k most active channels: [{channel, mean, overlay (H, W, 3) uint8}]."""
    with COMPUTE_LOCK:
        acts = enc.activations(captioner.encoder, model_pixels(captioner, image), layer)
    top = enc.top_channels(acts, k)
    views = enc.channel_montage(image, acts, [c for c, _ in top], cmap=CMAP)  # the app's one colour map
    return [{"channel": c, "mean": m, "overlay": to_uint8(v)} for (c, m), v in zip(top, views)]


def feature_vis(captioner, layer: str, channel: int, steps: int = 64, size: int = 128) -> FeatureVis:
    with COMPUTE_LOCK:
        return enc.feature_visualisation(captioner.encoder, layer, int(channel), size=size, steps=steps,
                                         prep=captioner.prep)
