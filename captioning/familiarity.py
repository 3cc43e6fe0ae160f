"""How familiar a photo is: how close its pooled encoder features lie to the training photos'.

A caption of a photo unlike any training photo is mostly a guess (the default model calls a
cat "a small child is playing in the snow"). The score is the mean cosine similarity to the
``k`` nearest training photos, after centring on the training mean (without centring every
photo looks alike: all share the mean direction) and a PCA to ``dims`` dimensions to keep the
shipped file small; it is then calibrated as a percentile of the Flickr8k dev photos' scores:
percentile 3 means only 3% of dev photos lie further from the training photos. This is the
deep k-nearest-neighbour idea of Papernot & McDaniel 2018 ("Deep k-Nearest Neighbors") and of
Sun et al. 2022 ("Out-of-Distribution Detection with Deep Nearest Neighbors"), on the encoder's
pooled features.

Files in a bundle folder: ``familiarity.safetensors`` (mean (C,) float32, components (D, C)
float16, train (N, D) float16, dev_scores (M,) float32, sorted) and ``familiarity.json``.

    python -m captioning.lab.familiarity_fit fit --model assets/models/show_attend_tell
    python -m captioning.lab.familiarity_fit measure --model assets/models/show_attend_tell \\
        --ood-captions runs/evaluate/show_attend_tell-coco-ood/captions_all.json --ood-data ../shared/data/coco-ood
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

FILE, META = "familiarity.safetensors", "familiarity.json"
# Below UNFAMILIAR the photo is further from the training photos than 95% of the dev photos.
UNFAMILIAR, LESS_FAMILIAR = 5.0, 25.0
MESSAGES = {
    "unfamiliar": "This photo is unlike the photos the model learned from; the caption is probably wrong.",
    "less familiar": "This photo is less like the photos the model learned from; the caption may be wrong.",
    "familiar": "This photo is like the photos the model learned from.",
}


@dataclass
class FamiliarityScore:
    """similarity: mean cosine to the k nearest training photos; percentile: of the dev photos'."""

    similarity: float
    percentile: float
    level: str  # "familiar", "less familiar" or "unfamiliar"

    @property
    def message(self) -> str:
        return MESSAGES[self.level]

    def to_dict(self) -> dict:
        return {"similarity": round(self.similarity, 4), "percentile": round(self.percentile, 1),
                "level": self.level, "message": self.message}


class Familiarity:
    def __init__(self, mean: torch.Tensor, components: torch.Tensor, train: torch.Tensor,
                 dev_scores: torch.Tensor, k: int = 5, unfamiliar: float = UNFAMILIAR,
                 less_familiar: float = LESS_FAMILIAR):
        self.mean = mean.float()  # (C,)
        self.components = components.float()  # (D, C)
        t = train.float()
        self.train = t / t.norm(dim=1, keepdim=True).clamp_min(1e-8)  # (N, D)
        self.dev_scores = dev_scores.float().sort().values  # (M,)
        self.k, self.unfamiliar, self.less_familiar = k, unfamiliar, less_familiar

    @property
    def feature_dim(self) -> int:
        return self.mean.shape[0]

    def similarity(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B,) mean cosine to the k nearest training photos."""
        z = (pooled.float() - self.mean) @ self.components.T  # (B, D)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return (z @ self.train.T).topk(self.k, dim=1).values.mean(1)

    def percentile(self, sims: torch.Tensor) -> torch.Tensor:
        """Share of dev photos (in %) whose similarity is at most each of ``sims``."""
        return torch.searchsorted(self.dev_scores, sims.float().contiguous(), right=True) * 100.0 / len(self.dev_scores)

    def score(self, pooled: torch.Tensor) -> list[FamiliarityScore]:
        sims = self.similarity(pooled)
        out = []
        for s, p in zip(sims.tolist(), self.percentile(sims).tolist()):
            level = "unfamiliar" if p < self.unfamiliar else "less familiar" if p < self.less_familiar else "familiar"
            out.append(FamiliarityScore(s, p, level))
        return out


def load_familiarity(folder: Union[str, Path]) -> Optional[Familiarity]:
    """The bundle's familiarity model, or None when it has none. A damaged file is a one-line ValueError."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / FILE).is_file():
        return None
    try:
        t = load_file(str(folder / FILE))
        meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
        fam = Familiarity(t["mean"], t["components"], t["train"], t["dev_scores"], int(meta.get("k", 5)),
                          float(meta.get("unfamiliar", UNFAMILIAR)), float(meta.get("less_familiar", LESS_FAMILIAR)))
        if fam.components.shape[1] != fam.mean.shape[0] or fam.train.shape[1] != fam.components.shape[0] \
                or fam.k > fam.train.shape[0] or len(fam.dev_scores) == 0:
            raise ValueError("shapes do not agree")
    except Exception as e:  # noqa: BLE001 (whatever a damaged file raises becomes one line)
        raise ValueError(f"{folder / FILE}: not a familiarity model ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return fam
