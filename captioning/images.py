"""Image loading and the one preprocessing function used everywhere (training, CLI, app).

The Flickr8k copy we train on was *stretched* to 224x224, not cropped, so inference does
the same plain resize: cropping would show the model a framing it never saw in training.
"""
from __future__ import annotations

import io
import math
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

# Pillow's own check runs inside Image.open and the plugins, on every frame and tile, before they
# allocate: a GIF can put a frame of billions of pixels on a 16x16 canvas, and the plugin fills a
# buffer that size while the file is being opened, before our check on the canvas size could run.
# Pillow refuses above twice this setting (and only warns below that, which we silence).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


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
        """Raises ValueError (one line) for a section of the wrong shape or types: it comes from
        a model's config.json, and a bad one must fail here, not as a tensor error mid-caption."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be an object, got {type(d).__name__}")
        size = d.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
            raise ValueError(f"preprocessing size must be an integer from 8 to 4096, got {size!r:.40}")
        resize = d.get("resize", "stretch")
        if resize != "stretch":
            raise ValueError(f"preprocessing resize {resize!r:.40} is not supported (only 'stretch')")
        stats = {}
        for key in ("mean", "std"):
            v = d.get(key)
            ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not ok or (key == "std" and min(v) <= 0):
                raise ValueError(f"preprocessing {key} must be three finite numbers"
                                 f"{' above 0' if key == 'std' else ''}, got {v!r:.60}")
            stats[key] = tuple(float(x) for x in v)
        return cls(size=size, resize=resize, mean=stats["mean"], std=stats["std"])


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


def _source_name(src: ImageInput) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return getattr(src, "filename", None) or "image"


def _reason(e: BaseException) -> str:
    """An exception as a short one-line reason: plugin messages can be long or multi-line."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_image(src: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image and return it as upright RGB.

    Handles EXIF orientation, grayscale, palette, alpha, CMYK and 16-bit images, and the
    first frame of animations.

    Raises:
        ImageError (a ValueError): for anything that does not give a usable RGB image: a
            missing or empty file, a format Pillow cannot read, more than ``max_pixels`` pixels
            (or, in any frame or tile, more than MAX_PIXELS, which Pillow itself checks), and *any*
            exception raised while decoding (Pillow's plugins raise IndexError, TypeError,
            struct.error, ... on corrupt files). The message is one line and names the file.
        Nothing else, except KeyboardInterrupt and similar BaseExceptions.
    """
    name = _source_name(src)
    opened = None
    try:
        # Pillow warns (and some plugins print) about damaged metadata; the outcome is what counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(src, Image.Image):
                im = src
            elif isinstance(src, (bytes, bytearray, memoryview)):
                if len(src) == 0:
                    raise ImageError("the file is empty")
                im = opened = Image.open(io.BytesIO(bytes(src)))
            elif isinstance(src, (str, Path)):
                p = Path(src)
                if not p.is_file():
                    raise ImageError(f"{p}: no such file")
                if p.stat().st_size == 0:
                    raise ImageError(f"{p}: the file is empty")
                im = opened = Image.open(p)
            else:
                raise ImageError(f"{name}: expected a path, bytes or a PIL image, got {type(src).__name__}")
            return _decode(im, name, max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels, over the limit of {MAX_PIXELS:,} pixels ({_reason(e)})") from None
    # The decode boundary: whatever a plugin raises on a corrupt file (IndexError while counting
    # GIF frames, TypeError from a TIFF without dimensions, struct.error, MemoryError, ...) is the
    # file's fault, and callers must be able to rely on ImageError alone.
    except Exception as e:
        raise ImageError(f"{name}: cannot decode the image ({_reason(e)})") from None
    finally:
        if opened is not None:
            opened.close()


def upright_size(path: Union[str, Path]) -> tuple[int, int]:
    """(width, height) of an image file as ``load_image`` returns it (EXIF rotation applied), from
    its header alone. Raises ImageError (one line, naming the file) where the header cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise ImageError(f"{path}: cannot read the image's size ({_reason(e)})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # the rotations by 90 degrees


def _decode(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Checks on the header, then the pixels: a loaded, upright RGB copy of ``im``."""
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: the image has no pixels")
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    out = _to_rgb(ImageOps.exif_transpose(im) or im)
    # The checks after decoding: what the model is given must be what the header promised.
    if out.mode != "RGB" or out.width < 1 or out.height < 1 or out.width * out.height > max_pixels:
        raise ImageError(f"{name}: decoding gave a {out.mode} image of {out.width}x{out.height} pixels")
    return out  # a new image (convert copies): closing the opened file cannot touch it


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
