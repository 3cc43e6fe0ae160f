"""Familiarity (captioning/familiarity.py): nearest-training-photo similarity, calibrated on dev photos."""
import json
import shutil

import numpy as np
import pytest
import torch

from captioning.api import Captioner
from captioning.bundle import DEFAULT_MODEL, BundleError
from captioning.cli import main
from captioning.familiarity import FILE, Familiarity, load_familiarity
from captioning.lab.familiarity_fit import fit_familiarity


def _toy(k=3):
    g = torch.Generator().manual_seed(0)
    # Training photos around two directions; dev photos like them.
    centres = torch.zeros(2, 8)
    centres[0, 0], centres[1, 1] = 5.0, 5.0
    train = torch.cat([centres[i] + 0.3 * torch.randn(50, 8, generator=g) for i in range(2)])
    dev = torch.cat([centres[i] + 0.3 * torch.randn(20, 8, generator=g) for i in range(2)])
    mean = train.mean(0)
    fam = Familiarity(mean, torch.eye(8), train - mean, torch.zeros(1), k)
    fam.dev_scores = fam.similarity(dev).sort().values
    fam.raw_train = train
    return fam, centres, mean


def test_near_training_photos_is_familiar_far_from_them_is_not():
    fam, centres, mean = _toy()
    far = torch.zeros(1, 8)
    far[0, 5] = 5.0  # a direction no training photo has
    near, away = fam.score(torch.stack([centres[0]])), fam.score(far)
    assert near[0].level == "familiar" and near[0].percentile > 25
    assert away[0].level == "unfamiliar" and away[0].percentile < 5
    assert "probably wrong" in away[0].message and away[0].to_dict()["level"] == "unfamiliar"
    # Percentiles rise with similarity.
    sims = torch.linspace(-1, 1, 21)
    p = fam.percentile(sims)
    assert torch.all(p[1:] >= p[:-1]) and p[0] == 0 and p[-1] == 100


def test_the_mean_is_taken_off_before_the_cosine():
    """Without centring every photo shares the mean direction, and far photos look near."""
    fam, centres, mean = _toy()
    far = (mean + torch.tensor([0, 0, 0, 0, 0, 3.0, 0, 0]))[None]
    uncentred = Familiarity(torch.zeros(8), torch.eye(8), fam.raw_train, fam.dev_scores, fam.k)
    assert fam.similarity(far)[0] < 0.3 < uncentred.similarity(far)[0] - 0.2


def test_fit_writes_a_small_model_that_loads(synth, features_dir, tmp_path):
    from captioning.lab.data import load_dataset
    from captioning.lab.features import extract_features

    extract_features(load_dataset(synth.root), "efficientnet-lite0", features_dir, progress=False)
    model = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("familiarity.*", "*.safetensors"))
    meta = fit_familiarity(model, synth.root, features_dir, dims=4, k=2)
    assert meta["n_train"] == len(synth.splits["train"]) and meta["n_dev"] == len(synth.splits["dev"])
    fam = load_familiarity(model)
    assert fam.components.shape == (4, 1280) and fam.train.shape == (meta["n_train"], 4)
    assert torch.all(fam.dev_scores[1:] >= fam.dev_scores[:-1])


def test_shipped_default_flags_the_coffee_photo_and_reports_in_api_and_cli(capsys):
    from captioning.samples import load_sample

    cap = Captioner.from_pretrained()
    assert cap.familiarity is not None
    r = cap.caption(load_sample("coffee"))[0]
    assert r.familiarity.level == "unfamiliar" and r.familiarity.percentile < 5
    assert r.recognised[0].label == "espresso" and "coffee" in r.recognised[0].words
    assert main(["caption", "--sample", "coffee", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["familiarity"]["message"].startswith("This photo is unlike the photos the model learned from")
    assert res["recognised"][0]["label"] == "espresso"


def test_a_damaged_familiarity_file_is_a_one_line_bundle_error(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL, model)
    (model / FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(BundleError, match=FILE) as e:
        Captioner.from_pretrained(model)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_familiarity_tracks_caption_quality_on_flickr8k_test(flickr8k_dir):
    """Measured: Spearman 0.33 over the 1,000 test photos (0.37 with the COCO set; docs/ood.md)."""
    from scipy.stats import spearmanr

    from captioning.lab.data import load_dataset
    from captioning.lab.familiarity_fit import _open_cache, _pooled

    from captioning.lab.train import DEFAULT_FEATURES

    try:
        cache = _open_cache(DEFAULT_MODEL, load_dataset(flickr8k_dir), DEFAULT_FEATURES)
    except (FileNotFoundError, RuntimeError):
        pytest.skip("no Flickr8k feature cache (python -m captioning extract-features)")
    caps = json.loads((DEFAULT_MODEL / "captions_test.json").read_text())
    fam = load_familiarity(DEFAULT_MODEL)
    sims = fam.similarity(torch.from_numpy(_pooled(cache, [c["image"] for c in caps]))).numpy()
    rho = spearmanr(sims, np.array([c["CIDEr"] for c in caps]))[0]
    assert rho > 0.25
