"""Fitting and measuring the familiarity score (``captioning.familiarity``) on a dataset's cached
pooled features.

    python -m captioning.lab.familiarity_fit fit --model assets/models/show_attend_tell
    python -m captioning.lab.familiarity_fit measure --model assets/models/show_attend_tell \\
        --ood-captions runs/evaluate/show_attend_tell-coco-ood/captions_all.json --ood-data ../shared/data/coco-ood
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..familiarity import FILE, LESS_FAMILIAR, META, UNFAMILIAR, Familiarity, load_familiarity


def _pooled(cache, names: list[str]) -> np.ndarray:
    ix = cache.index()
    rows = np.asarray([ix[n] for n in names])
    order = np.argsort(rows)
    out = np.empty((len(rows), cache.pooled.shape[1]), dtype=np.float32)
    out[order] = cache.pooled[rows[order]]
    return out


def _open_cache(model: Path, ds, features: Union[str, Path]):
    from ..bundle import read_config
    from .features import FeatureCache, find_cache
    from ..images import Preprocessing

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
            "command": f"python -m captioning.lab.familiarity_fit fit --model {model} --dims {dims} --k {k}"}
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
        raise ValueError(f"{model}: no {FILE}; run `python -m captioning.lab.familiarity_fit fit` first")
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
    ap = argparse.ArgumentParser(prog="python -m captioning.lab.familiarity_fit", description=__doc__.splitlines()[0])
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
