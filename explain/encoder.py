"""Looking inside the frozen CNN encoder: activations, top channels, ImageNet predictions and
feature visualisation by optimisation.

Feature visualisation follows Olah, Mordvintsev & Schubert 2017, "Feature Visualization",
Distill (doi:10.23915/distill.00007), as implemented in Lucid: an image is optimised to
maximise one channel's mean activation, parameterised in a decorrelated colour space and in
the Fourier domain with a 1/f spectrum scaling (which acts as a preconditioner favouring
natural-image statistics), and every step sees a randomly jittered, scaled and rotated copy
(transformation robustness) so the result is not an adversarial high-frequency pattern.
The channel-activation view follows Zeiler & Fergus 2014 (arXiv:1311.2901) and Yosinski et
al. 2015, "Understanding Neural Networks Through Deep Visualization" (arXiv:1506.06579).

Dimensions: C channels of a layer, h x w its spatial size, S image side.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captioning.atomic import atomic_write
from captioning.encoders import Encoder, imagenet_topk
from captioning.images import Preprocessing

from ._utils import PixelsLike, as_pixels
from .maps import overlay


class _Stop(Exception):
    """Raised by a forward hook to skip the layers after the one we need."""


def list_layers(encoder: Encoder) -> list[str]:
    """The encoder's inspectable layers, input to output (e.g. "stem", "stage1.block0", ..., "head").

    Args:
        encoder: a ``captioning.encoders.Encoder``.
    Returns:
        Layer names, the keys of ``encoder.stages()``.
    """
    return list(encoder.stages().keys())


@dataclass(frozen=True)
class LayerInfo:
    name: str
    channels: int
    height: int
    width: int


def layer_info(encoder: Encoder, size: int = 224) -> list[LayerInfo]:
    """Channels and spatial size of every layer for a (1, 3, size, size) input (one forward pass).

    Returns:
        One ``LayerInfo`` per layer, in ``list_layers`` order.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def fn(_m, _i, out) -> None:  # must return None: a returned value would replace the output
            shapes.setdefault(name, tuple(out.shape))
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in encoder.stages().items()]
    try:
        with torch.no_grad():
            encoder.feature_map(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return [LayerInfo(n, s[1], s[2], s[3]) for n, s in ((n, shapes[n]) for n in list_layers(encoder))]


def _layer_module(encoder: Encoder, layer: str) -> torch.nn.Module:
    stages = encoder.stages()
    if layer not in stages:
        raise ValueError(f"unknown layer {layer!r}; valid: {', '.join(stages)}")
    return stages[layer]


def _run_to(encoder: Encoder, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Run the encoder on x (N, 3, S, S) only as far as ``layer``; returns its output (N, C, h, w)."""
    module = _layer_module(encoder, layer)
    box: list[torch.Tensor] = []

    def hook(_m, _i, out):
        if not box:  # a module used twice keeps its first output
            box.append(out)
            raise _Stop

    h = module.register_forward_hook(hook)
    try:
        encoder.feature_map(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError(f"layer {layer!r} was not run by the encoder's forward pass")
    return box[0]


def activations(encoder: Encoder, pixels: PixelsLike, layer: str) -> np.ndarray:
    """A layer's activations for one image, via a forward hook.

    Args:
        encoder: a ``captioning.encoders.Encoder``.
        pixels: normalised (3, S, S) or (1, 3, S, S) tensor, or an image (path, bytes, PIL).
        layer: a name from ``list_layers``.
    Returns:
        (C, h, w) float32 array.
    """
    with torch.no_grad():
        out = _run_to(encoder.eval(), as_pixels(pixels), layer)
    return out[0].float().numpy().copy()


def top_channels(acts: np.ndarray, k: int = 9) -> list[tuple[int, float]]:
    """The k channels with the highest mean activation.

    Args:
        acts: (C, h, w) activations.
        k: how many.
    Returns:
        [(channel, mean activation)], highest first (ties: lower channel first).
    """
    means = np.asarray(acts, dtype=np.float64).reshape(acts.shape[0], -1).mean(1)
    order = np.lexsort((np.arange(len(means)), -means))[:k]
    return [(int(c), float(means[c])) for c in order]


def channel_montage(image, acts: np.ndarray, channels: Sequence[int], alpha: float = 0.6,
                    cmap: str = "viridis") -> list[np.ndarray]:
    """Each channel's activation map upsampled and blended over the image. Inputs are not modified.

    Args:
        image: PIL image, (H, W, 3) array or normalised (3, S, S) tensor.
        acts: (C, h, w) activations (from ``activations``).
        channels: channel indices to show.
    Returns:
        One new (H, W, 3) float32 array in [0, 1] per channel (each map scaled on its own).
    """
    return [overlay(image, np.asarray(acts[c], dtype=np.float32), alpha=alpha, cmap=cmap) for c in channels]


def imagenet_top5(encoder: Encoder, pixels: PixelsLike, k: int = 5) -> list[tuple[str, float]]:
    """The backbone's own ImageNet classification.

    Args:
        pixels: normalised (3, S, S) / (1, 3, S, S) tensor or an image.
    Returns:
        [(label, probability)] for the top k classes, most likely first.
    """
    return imagenet_topk(encoder.eval(), as_pixels(pixels), k)


# --------------------------------------------------------------------------- feature visualisation

# Lucid's colour decorrelation: square root of the ImageNet colour covariance (via SVD).
_COLOR_SVD_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR = torch.from_numpy(_COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0)))

_MEMORY: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_MEMORY_MAX = 512


@dataclass
class FeatureVis:
    """A channel's feature visualisation.

    image: (size, size, 3) uint8. objective: the channel's mean activation reached (NaN when
    loaded from disk). seconds: time taken to produce it. source: "computed", "memory" or "disk".
    """

    image: np.ndarray
    layer: str
    channel: int
    objective: float
    seconds: float
    source: str


def default_cache_dir() -> Path:
    """$CAPTIONING_CACHE/featvis, else $XDG_CACHE_HOME/captioning/featvis, else ~/.cache/captioning/featvis."""
    if os.environ.get("CAPTIONING_CACHE"):
        return Path(os.environ["CAPTIONING_CACHE"]) / "featvis"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "captioning" / "featvis"


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def _fourier_scale(size: int, decay_power: float = 1.0) -> torch.Tensor:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)  # (size, size//2+1)
    scale = 1.0 / np.maximum(freqs, 1.0 / size) ** decay_power
    return torch.from_numpy(scale.astype(np.float32))


def _to_rgb(spectrum: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """Fourier parameters (1, 3, size, size//2+1, 2) -> image (1, 3, size, size) in (0, 1)."""
    z = torch.view_as_complex(spectrum * scale[None, None, :, :, None])
    img = torch.fft.irfftn(z, s=(size, size), norm="ortho") / 4.0  # Lucid's "magic" 4: less saturation
    img = torch.einsum("bchw,dc->bdhw", img, _COLOR)  # decorrelated -> RGB colour space
    return torch.sigmoid(img)


def _random_transform(img: torch.Tensor, gen: torch.Generator, pad: int, jitter: int,
                      scales: Sequence[float], degrees: int) -> torch.Tensor:
    """Pad (grey), jitter, scale and rotate an image (1, 3, S, S) with one affine resampling."""
    S = img.shape[-1]
    s = scales[int(torch.randint(len(scales), (1,), generator=gen))]
    a = math.radians(float(torch.randint(-degrees, degrees + 1, (1,), generator=gen)))
    tx, ty = (torch.randint(-jitter, jitter + 1, (2,), generator=gen).float() * 2 / (S + 2 * pad)).tolist()
    # Output covers the padded canvas; the image occupies its centre, grey elsewhere.
    k = (S + 2 * pad) / S / s
    theta = torch.tensor([[k * math.cos(a), -k * math.sin(a), tx], [k * math.sin(a), k * math.cos(a), ty]],
                         dtype=img.dtype)[None]
    grid = F.affine_grid(theta, [1, 3, S + 2 * pad, S + 2 * pad], align_corners=False)
    return F.grid_sample(img - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def feature_visualisation(encoder: Encoder, layer: str, channel: int, size: int = 128, steps: int = 128,
                          lr: float = 0.05, seed: int = 0, prep: Preprocessing = Preprocessing(),
                          cache_dir: Union[str, Path, None] = None, use_cache: bool = True) -> FeatureVis:
    """Optimise an image to maximise a channel's mean activation (Olah et al. 2017).

    Decorrelated-colour Fourier parameterisation (1/f scaled spectrum), Adam, and at every
    step a random transform: 12 px grey padding, +-12 px jitter, scale 0.9-1.1, rotation
    +-10 degrees. The forward pass stops at ``layer``, so early layers are cheaper, and runs on
    a copy of the encoder with BatchNorm folded into the convolutions (same function, faster).
    Results are cached in memory and as PNG under ``cache_dir`` (default
    ``default_cache_dir()``), keyed by (encoder name, layer, channel, size, steps, lr, seed).

    Args:
        encoder: a ``captioning.encoders.Encoder`` (frozen; it is not modified).
        layer: a name from ``list_layers``. channel: 0 <= channel < the layer's channels.
        size: image side in pixels. steps: optimisation steps. lr: Adam learning rate.
        seed: initialisation and transform seed (same seed, same image).
        use_cache: read and write the caches (False: always compute, store nothing).
    Returns:
        ``FeatureVis`` with image (size, size, 3) uint8.
    """
    _layer_module(encoder, layer)
    key = (encoder.name, layer, int(channel), size, steps, lr, seed)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / _safe(encoder.name) / _safe(layer) / f"c{int(channel)}_s{size}_n{steps}_lr{lr:g}_r{seed}.png"
    t0 = time.perf_counter()
    if use_cache:
        if key in _MEMORY:
            _MEMORY.move_to_end(key)
            return FeatureVis(_MEMORY[key].copy(), layer, int(channel), float("nan"), time.perf_counter() - t0, "memory")
        if path.is_file():
            try:
                img = np.asarray(Image.open(path).convert("RGB")).copy()
                _remember(key, img)
                return FeatureVis(img.copy(), layer, int(channel), float("nan"), time.perf_counter() - t0, "disk")
            except OSError:
                pass  # unreadable cache file: recompute and overwrite it
    img, objective = _optimise(encoder, layer, int(channel), size, steps, lr, seed, prep)
    if use_cache:
        _remember(key, img)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))
        except OSError:
            pass  # a read-only cache folder only costs recomputation
    return FeatureVis(img, layer, int(channel), objective, time.perf_counter() - t0, "computed")


def _remember(key: tuple, img: np.ndarray) -> None:
    _MEMORY[key] = img.copy()
    while len(_MEMORY) > _MEMORY_MAX:
        _MEMORY.popitem(last=False)


def clear_memory_cache() -> None:
    """Forget feature visualisations held in memory (the disk cache stays)."""
    _MEMORY.clear()


def _optimise(encoder: Encoder, layer: str, channel: int, size: int, steps: int, lr: float, seed: int,
              prep: Preprocessing) -> tuple[np.ndarray, float]:
    from ._utils import inference_encoder

    encoder = inference_encoder(encoder.eval())  # BatchNorm folded: same function, ~25% faster backward
    gen = torch.Generator().manual_seed(seed)
    scale = _fourier_scale(size)
    spectrum = (torch.randn(1, 3, size, size // 2 + 1, 2, generator=gen) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([spectrum], lr=lr)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    scales = [1 + (i - 5) / 50 for i in range(11)]
    with torch.enable_grad():
        for _ in range(steps):
            img = _random_transform(_to_rgb(spectrum, scale, size), gen, pad=12, jitter=12, scales=scales, degrees=10)
            acts = _run_to(encoder, (img - mean) / std, layer)
            if not 0 <= channel < acts.shape[1]:
                raise ValueError(f"channel {channel} out of range: layer {layer!r} has {acts.shape[1]} channels")
            loss = -acts[0, channel].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        img = _to_rgb(spectrum, scale, size)
        objective = float(_run_to(encoder, (img - mean) / std, layer)[0, channel].mean())
    arr = (img[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return arr, objective
