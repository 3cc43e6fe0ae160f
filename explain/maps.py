"""Maps over photos: scaling a map for display, colouring it, resizing it and blending it over the
photo. Attribution maps, attention maps and encoder channel activations are all shown through
these, so ``explain.attribution`` and ``explain.encoder`` both import this module and not each
other."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from PIL import Image

from captioning.images import Preprocessing


def image_array(image: Union[Image.Image, np.ndarray, torch.Tensor], prep: Preprocessing = Preprocessing()
                ) -> np.ndarray:
    """PIL image, (H, W, 3) array (uint8 or float in [0, 1]) or normalised (3, S, S) tensor
    -> a new float32 (H, W, 3) array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        from captioning.images import unnormalize

        x = image.detach()
        return unnormalize(x[0] if x.dim() == 4 else x, prep).astype(np.float32)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, 2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image array, got shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D float map to (height, width); returns a new float32 array."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == (height, width):
        return m.copy()
    t = torch.from_numpy(np.ascontiguousarray(m))[None, None]
    return torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear",
                                           align_corners=False)[0, 0].numpy().copy()


def normalize_map(m: np.ndarray, signed: bool = False, percentile: float = 99.5) -> np.ndarray:
    """Scale a map for display; returns a new float32 array.

    Args:
        m: (H, W) map.
        signed: keep the sign: result in [-1, 1] (divided by the ``percentile`` of |m|);
            otherwise negative values are clipped and the result is in [0, 1].
        percentile: robust maximum, so a few extreme pixels do not wash the map out.
    Returns:
        (H, W) float32.
    """
    a = np.asarray(m, dtype=np.float32)
    v = np.abs(a) if signed else np.clip(a, 0, None)
    top = float(np.percentile(v, percentile)) if v.size else 0.0
    if top <= 0:
        top = float(v.max()) if v.size else 0.0
    if top <= 0:
        return np.zeros_like(a)
    return np.clip(a / top, -1.0 if signed else 0.0, 1.0).astype(np.float32)


def heatmap(m: np.ndarray, cmap: str = "jet", signed: bool = False) -> np.ndarray:
    """A map -> colours. Args: m (H, W). Returns: new (H, W, 3) float32 RGB in [0, 1].
    With ``signed`` a diverging colormap ("bwr" unless given) is centred on zero."""
    from matplotlib import colormaps

    n = normalize_map(m, signed=signed)
    if signed:
        cm = colormaps["bwr" if cmap == "jet" else cmap]
        return cm((n + 1) / 2)[..., :3].astype(np.float32)
    return colormaps[cmap](n)[..., :3].astype(np.float32)


def overlay(image, m: np.ndarray, alpha: float = 0.5, cmap: str = "jet", signed: bool = False) -> np.ndarray:
    """Blend a heat map over an image. Inputs are never modified.

    Args:
        image: PIL image, (H, W, 3) array (uint8 or float in [0, 1]) or normalised (3, S, S) tensor.
        m: (h, w) map at any size; it is resized (bilinear) to the image's (H, W).
        alpha: heat-map opacity, scaled per pixel by the map's normalised strength so that
            cold regions show the image.
    Returns:
        A new (H, W, 3) float32 array in [0, 1].
    """
    img = image_array(image)
    H, W = img.shape[:2]
    mm = resize_map(np.asarray(m, dtype=np.float32), H, W)
    heat = heatmap(mm, cmap=cmap, signed=signed)
    strength = np.abs(normalize_map(mm, signed=signed))[..., None]
    a = float(alpha) * (0.3 + 0.7 * strength)
    return np.clip((1 - a) * img + a * heat, 0.0, 1.0).astype(np.float32)
