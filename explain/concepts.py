"""Maps of the concept tagger's image network (captioning/tagger.py) over the pixels.

Three maps of one concept in one photo:
  * ``mil``: the noisy-OR's own per-cell probabilities (7x7), which the network's output is made
    of: a location for free (Fang et al. 2015);
  * ``grad_cam``: Grad-CAM (Captum ``LayerGradCam``, ReLU) of the concept's logit at the encoder's
    output feature map, as explain.attribution does it for caption words;
  * ``integrated_gradients``: Integrated Gradients of the concept's logit from a black image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import as_pixels, contiguous_grad, fmap_to_grid
from .attribution import _cam, make_baseline

CONCEPT_METHODS = ("mil", "grad_cam", "integrated_gradients")


class ConceptLogit(nn.Module):
    """pixels (N, 3, S, S) -> (N,) the image network's logit for concept ``k``. ``feature`` is an
    identity on the encoder's feature map, the layer Grad-CAM hooks."""

    def __init__(self, encoder: nn.Module, net: nn.Module, k: int):
        super().__init__()
        self.encoder, self.net, self.k = encoder.eval(), net.eval(), int(k)
        self.feature = nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid, pooled = fmap_to_grid(self.feature(contiguous_grad(self.encoder.feature_map(pixels))))
        return self.net(grid, pooled, None)[:, self.k]


def concept_map(tagger, image: Any, concept: str, method: str = "mil", n_steps: int = 32) -> np.ndarray:
    """(S, S) float32 map of ``concept`` over the preprocessed image (larger: more of the concept).

    Raises ValueError for an unknown concept or method."""
    if method not in CONCEPT_METHODS:
        raise ValueError(f"unknown concept map method {method!r}; valid: {', '.join(CONCEPT_METHODS)}")
    if concept not in tagger.concepts.index:
        raise ValueError(f"unknown concept {concept!r}")
    k = tagger.concepts.index[concept]
    pixels = as_pixels(image, tagger.prep)
    S = pixels.shape[-1]
    net = tagger.networks["image"]
    if method == "mil":
        with torch.no_grad():
            grid, _ = tagger.encoder(pixels)
            m = tagger.region_maps(grid)[:, k:k + 1]  # (1, 1, side, side)
        return F.interpolate(m, (S, S), mode="bilinear", align_corners=False)[0, 0].numpy().astype(np.float32)
    scorer = ConceptLogit(tagger.encoder, net, k)
    if method == "grad_cam":
        cam = _cam(scorer, scorer.feature, pixels, None, "mean", True)  # (1, 1, h, w)
        return F.interpolate(cam, (S, S), mode="bilinear", align_corners=False)[0, 0].numpy().astype(np.float32)
    from captum.attr import IntegratedGradients

    base = make_baseline(pixels, "black", tagger.prep)
    attr = IntegratedGradients(scorer).attribute(pixels, baselines=base, n_steps=int(n_steps), internal_batch_size=8)
    return attr[0].detach().sum(0).numpy().astype(np.float32)
