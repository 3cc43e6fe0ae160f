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

    python -m captioning.familiarity fit --model assets/models/show_attend_tell
    python -m captioning.familiarity measure --model assets/models/show_attend_tell \\
        --ood-captions runs/evaluate/show_attend_tell-coco-ood/captions_all.json --ood-data ../shared/data/coco-ood
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
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


def _pooled(cache, names: list[str]) -> np.ndarray:
    ix = cache.index()
    rows = np.asarray([ix[n] for n in names])
    order = np.argsort(rows)
    out = np.empty((len(rows), cache.pooled.shape[1]), dtype=np.float32)
    out[order] = cache.pooled[rows[order]]
    return out


def _open_cache(model: Path, ds, features: Union[str, Path]):
    from .bundle import read_config
    from .features import FeatureCache, find_cache
    from .images import Preprocessing

    cfg = read_config(model)
    return FeatureCache.open(find_cache(features, cfg["encoder"]["name"], Preprocessing.from_dict(cfg["preprocessing"]),
                                        sorted(ds.captions)))


def fit_familiarity(model: Union[str, Path], data=None, features=None, dims: int = 128, k: int = 5) -> dict:
    """Fit on the training split's cached pooled features, calibrate on the dev split's; write
    familiarity.safetensors and familiarity.json into ``model``."""
    from safetensors.torch import save_file

    from .data import load_dataset
    from .train import DEFAULT_FEATURES

    model = Path(model)
    ds = load_dataset(data)
    cache = _open_cache(model, ds, features or DEFAULT_FEATURES)
    train = _pooled(cache, ds.split("train"))
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    comps = vt[:dims].astype(np.float16)
    z = ((train - mean) @ comps.astype(np.float32).T).astype(np.float16)
    fam = Familiarity(torch.from_numpy(mean), torch.from_numpy(comps), torch.from_numpy(z), torch.zeros(1), k)
    dev = fam.similarity(torch.from_numpy(_pooled(cache, ds.split("dev")))).sort().values
    save_file({"mean": torch.from_numpy(mean).float(), "components": torch.from_numpy(comps),
               "train": torch.from_numpy(z), "dev_scores": dev.contiguous()}, str(model / FILE))
    meta = {"k": k, "dims": dims, "n_train": len(train), "n_dev": len(dev), "unfamiliar": UNFAMILIAR,
            "less_familiar": LESS_FAMILIAR, "encoder_features": "pooled",
            "command": f"python -m captioning.familiarity fit --model {model} --dims {dims} --k {k}"}
    (model / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def measure(model: Union[str, Path], ood_captions: Union[str, Path], ood_data: Union[str, Path], data=None,
            features=None) -> dict:
    """Spearman's rho between familiarity and per-photo CIDEr-D over Flickr8k test (the model's
    captions_test.json) plus another photo set (a captions file ``evaluate --data`` wrote), and
    the risk-coverage table: mean CIDEr-D of the most familiar X% of those photos."""
    from scipy.stats import spearmanr

    from .data import load_dataset
    from .train import DEFAULT_FEATURES

    model = Path(model)
    fam = load_familiarity(model)
    if fam is None:
        raise ValueError(f"{model}: no {FILE}; run `python -m captioning.familiarity fit` first")
    features = features or DEFAULT_FEATURES
    rows = []
    for caps_file, d in ((model / "captions_test.json", data), (Path(ood_captions), ood_data)):
        ds = load_dataset(d)
        caps = json.loads(Path(caps_file).read_text())
        pooled = torch.from_numpy(_pooled(_open_cache(model, ds, features), [c["image"] for c in caps]))
        for c, s in zip(caps, fam.score(pooled)):
            rows.append((s.similarity, s.percentile, float(c["CIDEr"]), Path(caps_file).parent.name, s.level))
    sims = np.array([r[0] for r in rows])
    cider = np.array([r[2] for r in rows])
    src = np.array([r[3] for r in rows])
    res = {"n": len(rows), "spearman": round(float(spearmanr(sims, cider)[0]), 3), "per_set": {}, "coverage": []}
    for name in dict.fromkeys(src):
        m = src == name
        res["per_set"][name] = {"n": int(m.sum()), "spearman": round(float(spearmanr(sims[m], cider[m])[0]), 3),
                                "mean_cider": round(float(cider[m].mean()), 3),
                                "unfamiliar": round(float(np.mean([r[4] == "unfamiliar" for r, mm in zip(rows, m) if mm])), 3)}
    order = np.argsort(-sims)
    for cov in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100):
        top = order[: max(1, round(len(order) * cov / 100))]
        res["coverage"].append({"coverage": cov, "mean_cider": round(float(cider[top].mean()), 3),
                                "ood_share": round(float(np.mean(src[top] != src[0])), 3)})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m captioning.familiarity", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--model", required=True)
    f.add_argument("--data", default=None)
    f.add_argument("--features", default=None)
    f.add_argument("--dims", type=int, default=128)
    f.add_argument("--k", type=int, default=5)
    m = sub.add_parser("measure")
    m.add_argument("--model", required=True)
    m.add_argument("--ood-captions", required=True)
    m.add_argument("--ood-data", required=True)
    m.add_argument("--data", default=None)
    m.add_argument("--features", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "fit":
        print(json.dumps(fit_familiarity(a.model, a.data, a.features, a.dims, a.k), indent=2))
    else:
        print(json.dumps(measure(a.model, a.ood_captions, a.ood_data, a.data, a.features), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
