"""Image loading and the one preprocessing function used everywhere (training, CLI, app).

The Flickr8k copy we train on was *stretched* to 224x224, not cropped, so inference does
the same plain resize: cropping would show the model a framing it never saw in training.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, Path, bytes, Image.Image]

#: Images with more pixels than this are refused before their pixels are decoded
#: (decompression bombs: a tiny PNG can claim 100k x 100k pixels).
MAX_PIXELS = 50_000_000

# Our own limit is checked first; PIL's warning above its own limit is noise for us.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """A file that is not a usable image. The message is one line, fit to show a user."""


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the encoder's input; saved in every model bundle."""

    size: int = 224
    resize: str = "stretch"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), resize=str(d.get("resize", "stretch")),
                   mean=tuple(d["mean"]), std=tuple(d["std"]))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels are composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        im = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def load_image(src: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image and return it as upright RGB.

    Handles EXIF orientation, grayscale, palette, alpha, CMYK and 16-bit images, and the
    first frame of animations. Raises ImageError (one line) for anything unusable.
    """
    name = getattr(src, "filename", None) or (str(src) if isinstance(src, (str, Path)) else "image")
    try:
        if isinstance(src, Image.Image):
            im = src
        elif isinstance(src, (bytes, bytearray)):
            if len(src) == 0:
                raise ImageError("the file is empty")
            im = Image.open(io.BytesIO(bytes(src)))
        else:
            p = Path(src)
            if not p.is_file():
                raise ImageError(f"{p}: no such file")
            if p.stat().st_size == 0:
                raise ImageError(f"{p}: the file is empty")
            im = Image.open(p)
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(f"{name}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
        if w < 1 or h < 1:
            raise ImageError(f"{name}: the image has no pixels")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            im = ImageOps.exif_transpose(im) or im
        return _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{name}: cannot decode the image ({msg})") from None


def preprocess(image: Image.Image, prep: Preprocessing = Preprocessing()) -> torch.Tensor:
    """RGB PIL image -> normalised tensor (3, S, S), S = prep.size (plain resize, no crop)."""
    im = image if image.mode == "RGB" else _to_rgb(image)
    im = im.resize((prep.size, prep.size), Image.BICUBIC)
    x = torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (x - mean) / std


def unnormalize(x: torch.Tensor, prep: Preprocessing = Preprocessing()) -> np.ndarray:
    """Inverse of preprocess for display: (3, S, S) tensor -> (S, S, 3) float array in [0, 1]."""
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (x.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
