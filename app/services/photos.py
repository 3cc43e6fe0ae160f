"""Photos: uploads (checked before decoding, one-line errors), display and model-size copies,
the package's sample photos, and the Flickr8k test photos with their references when the
data folder exists."""
from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from typing import Optional

from PIL import Image

from captioning.images import MAX_PIXELS, ImageError, load_image

#: Largest upload accepted (also ``server.maxUploadSize`` in .streamlit/config.toml).
MAX_UPLOAD_MB = 20
#: Images are shown (and overlays drawn) at most this many pixels on their long side.
DISPLAY_SIDE = 512
#: The model is given the photo at most this large (it is stretched to its input square anyway, and a
#: 50-megapixel photo should not sit in the per-image cache).
MODEL_SIDE = 1024


def digest(data: bytes) -> str:
    """The cache key of an image: sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def check_upload(data: Optional[bytes], max_mb: float = MAX_UPLOAD_MB) -> None:
    """Refuse empty or oversized files before any decoding. Raises ImageError."""
    if not data:
        raise ImageError("the file is empty")
    if len(data) > max_mb * 1024 * 1024:
        raise ImageError(f"the file is {len(data) / 2 ** 20:.2f} MB, over the {max_mb:g} MB limit")


def image_error_message(label: str, e: Exception) -> str:
    """"name: what is wrong" for an image that cannot be used (one line)."""
    if not isinstance(e, ImageError):
        # Anything else a file provoked deep in a decoder ("IndexError: list index out of range")
        # says nothing to a user: say what is wrong with the file in words instead.
        msg = ("the file could not be read as an image: it may be damaged, cut short, or in a format the app "
               "cannot read (JPEG, PNG, WebP, BMP, GIF and TIFF work)")
    else:
        msg = (str(e).splitlines() or [""])[0] or "the file could not be read as an image"
        if msg.startswith("image: "):  # load_image's name for raw bytes
            msg = msg[len("image: "):]
    return f"{label}: {msg}" if label and not msg.startswith(label) else msg


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> upright 8-bit RGB (any mode, EXIF rotation, first frame). Raises ImageError."""
    check_upload(data)
    return load_image(bytes(data), max_pixels=max_pixels)


def display_copy(im: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """A copy no larger than ``side`` on its long side (for showing and for overlays)."""
    im = im.copy()
    if max(im.size) > side:
        im.thumbnail((side, side), Image.BICUBIC)
    return im


def image_note(im: Image.Image, data: bytes) -> str:
    """One line about the original file: format, mode, size (for the caption under the photo)."""
    try:
        with Image.open(io.BytesIO(data)) as raw:
            fmt, mode, (w, h) = raw.format or "?", raw.mode, raw.size
    except Exception:  # noqa: BLE001 - the note is cosmetic
        fmt, mode, (w, h) = "?", "?", im.size
    return f"{fmt} {mode} {w}x{h}" + (f" (shown upright, {im.size[0]}x{im.size[1]})" if (w, h) != im.size else "")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=16)
def sample_bytes(name: str) -> bytes:
    """A sample photo (captioning.samples) as PNG bytes, so it goes the same way as an upload."""
    from captioning.samples import load_sample

    return png_bytes(load_sample(name))


def sample_names() -> list[str]:
    from captioning.samples import sample_names as names

    return names()


# --------------------------------------------------------------------------- Flickr8k

@lru_cache(maxsize=2)
def load_flickr(data_dir: str):
    import contextlib

    from captioning.lab.data import load_dataset

    with contextlib.redirect_stderr(io.StringIO()):  # the reader's skip report is not for app users
        return load_dataset(data_dir)


def flickr_dataset():
    """The Flickr8k dataset when its folder exists (never copied into the repo), else None."""
    from captioning.lab.data import DataError, default_data_dir

    d = default_data_dir()
    if d is None:
        return None
    try:
        return load_flickr(str(d))
    except (DataError, OSError):
        return None


def flickr_test_photos() -> list[str]:
    ds = flickr_dataset()
    if ds is None:
        return []
    try:
        return list(ds.split("test"))
    except Exception:  # noqa: BLE001 - a dataset without a test split
        return []


def flickr_references(name: str) -> list[str]:
    ds = flickr_dataset()
    return list(ds.captions.get(name, [])) if ds is not None else []


def flickr_bytes(name: str) -> bytes:
    ds = flickr_dataset()
    if ds is None:
        raise ImageError("the Flickr8k data folder is not available")
    p = ds.path(name)
    if not p.is_file():
        raise ImageError(f"{name}: not found in the Flickr8k folder")
    return p.read_bytes()


def find_photos_mentioning(word: str, split: str = "test", min_refs: int = 5) -> list[str]:
    """Flickr8k photos whose references (at least ``min_refs`` of them) contain ``word``."""
    ds = flickr_dataset()
    if ds is None:
        return []
    w = word.lower()
    return [n for n in ds.split(split) if sum(w in c.lower().split() or w in c.lower() for c in ds.captions[n]) >= min_refs]

