"""Photos anyone can try without Flickr8k: they ship inside installed packages
(scikit-image's data module and matplotlib's sample data), so none is copied into this repo."""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        a = getattr(skimage.data, name)()
        if isinstance(a, tuple):  # stereo pairs: take the left view
            a = a[0]
        return Image.fromarray(np.asarray(a)).convert("RGB")

    return load


def _grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


SAMPLES: dict[str, Callable[[], Image.Image]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea (cat)": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "grace hopper": _grace_hopper,
}


def sample_names() -> list[str]:
    return list(SAMPLES)


def load_sample(name: str) -> Image.Image:
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; valid: {', '.join(SAMPLES)}")
    return SAMPLES[name]()
