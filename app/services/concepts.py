"""The concept tagger for the Concepts page: which visual concepts a photo shows, with the
probability of each, where each is (the noisy-OR region map, Grad-CAM or Integrated Gradients of
the tagger's output), and which of them the caption leaves out. No Streamlit here."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from captioning.tagger import CONFIG as TAGGER_CONFIG, DEFAULT_TAGGER, Tagger, TagResult

from app.services import COMPUTE_LOCK, NotAvailable
from app.services.registry import models_dir

METHOD_TITLES = {"mil": "region probabilities (noisy-OR)", "grad_cam": "Grad-CAM",
                 "integrated_gradients": "Integrated Gradients"}


def tagger_path() -> Optional[Path]:
    """The tagger bundle: ``tagger/`` in the models folder, else the shipped one; None if neither."""
    for p in (models_dir() / "tagger", DEFAULT_TAGGER):
        if (p / TAGGER_CONFIG).is_file():
            return p
    return None


def load_tagger(path: str, encoder=None, encoder_name: str = "") -> Tagger:
    """The tagger, sharing an already loaded encoder (the captioner's) when it is the one the tagger reads."""
    t = Tagger.from_pretrained(path)
    if encoder is not None and encoder_name == t.config.get("encoder", {}).get("name"):
        t._encoder = encoder
    return t


def tag(tagger: Tagger, image, caption: Optional[str]) -> TagResult:
    """Tags (with region maps) of one photo; ``caption`` marks which concepts it names and brings
    in the joint network when the bundle has one."""
    with COMPUTE_LOCK:
        grid, pooled = tagger.encode([image])
        return tagger.tag_features(grid, pooled, captions=[caption] if caption else None, maps=True)[0]


def rows(result: TagResult, tagger: Tagger, top: int = 25) -> list[dict]:
    """One row per concept, most probable first: the tagged ones, then the next most probable."""
    order = np.argsort(-result.probabilities, kind="stable")[:top]
    tagged = {t.concept for t in result.tags}
    joint = result.joint_probabilities
    mentioned = tagger.concepts.mentioned(result.caption) if result.caption else None
    out = []
    for k in order:
        name = tagger.concepts.names[int(k)]
        row = {"concept": name, "probability": float(result.probabilities[k]), "tagged": name in tagged}
        if mentioned is not None:
            row["in caption"] = int(k) in mentioned
        if joint is not None:
            row["with the caption (joint)"] = float(joint[k])
        out.append(row)
    return out


def concept_map(tagger: Tagger, image, concept: str, method: str) -> np.ndarray:
    from explain.concepts import concept_map as _map

    if "image" not in tagger.networks:
        raise NotAvailable("this tagger has no image network")
    with COMPUTE_LOCK:
        return _map(tagger, image, concept, method)
