"""The concept tagger (captioning/tagger.py, captioning/lab/tagging.py): label mining, the loss,
threshold tuning, F1 / AP, the noisy-OR networks learning a planted concept, resume, the bundle,
the command line, and the shipped tagger on a real Flickr8k photo."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from captioning.bundle import BundleError
from captioning.lab.data import load_dataset
from captioning.lab.tagging import (TagData, TagTrainConfig, caption_labels, flip_grid, label_matrix, load_best,
                                    mine_concepts, plural_forms, predict, train_tagger, write_bundle)
from captioning.tagger import (DEFAULT_TAGGER, ConceptSpace, ImageTagger, ImageTaggerConfig, Tagger,
                               average_precision, f1_scores, noisy_or, positive_weights, tune_thresholds,
                               weighted_bce)
from captioning.vocab import Vocab

REPO = Path(__file__).resolve().parent.parent
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"


# --- metrics, loss, thresholds --------------------------------------------------------------

def test_f1_against_a_hand_computation():
    truth = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    pred = np.array([[1, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]])
    # concept 0: tp 2, fp 1, fn 1 -> F1 4/6; concept 1: tp 1 -> 1; concept 2: tp 1, fp 1, fn 1 -> 2/4
    f = f1_scores(pred, truth)
    assert f["per_concept_f1"] == pytest.approx([4 / 6, 1.0, 0.5])
    assert f["macro_f1"] == pytest.approx((4 / 6 + 1 + 0.5) / 3)
    # micro: tp 4, fp 2, fn 2 -> 8 / 12
    assert f["micro_f1"] == pytest.approx(8 / 12)
    assert f["micro_precision"] == pytest.approx(4 / 6) and f["micro_recall"] == pytest.approx(4 / 6)


def test_average_precision_by_hand():
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    truth = np.array([[1], [0], [1], [0]])
    # ranks 1 and 3 are positives: precision 1 and 2/3
    assert average_precision(scores, truth)[0] == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(average_precision(scores, np.zeros((4, 1)))[0])


def test_weighted_loss_raises_the_cost_of_missed_positives_only():
    missed_pos = (torch.tensor([[-3.0]]), torch.tensor([[1.0]]))
    false_alarm = (torch.tensor([[3.0]]), torch.tensor([[0.0]]))
    w = torch.tensor([5.0])
    assert float(weighted_bce(*missed_pos, w)) == pytest.approx(5 * float(weighted_bce(*missed_pos)))
    assert float(weighted_bce(*false_alarm, w)) == pytest.approx(float(weighted_bce(*false_alarm)))
    # weights from label frequency: rarer concepts weigh more, capped
    pw = positive_weights(np.array([50, 10, 0]), 100, power=1.0, cap=30)
    assert pw.tolist() == pytest.approx([1.0, 9.0, 30.0])


def test_threshold_tuning_picks_the_f1_optimal_threshold():
    probs = np.array([[0.95], [0.8], [0.6], [0.55], [0.3], [0.2]])
    truth = np.array([[1], [1], [0], [1], [0], [0]])
    # >= 0.55 catches all 3 positives with one false alarm (F1 6/7); >= 0.8: F1 0.8; >= 0.3: 0.75
    t = tune_thresholds(probs, truth, grid=[0.2, 0.3, 0.5, 0.55, 0.7, 0.8, 0.9])
    assert t[0] == pytest.approx(0.55)
    assert tune_thresholds(probs, np.zeros_like(truth), default=0.4)[0] == 0.4


# --- noisy-OR ---------------------------------------------------------------------------------

def test_noisy_or_matches_its_definition():
    l = torch.randn(3, 49, 4)
    p = torch.sigmoid(l)
    want = 1 - (1 - p).prod(1)
    assert torch.sigmoid(noisy_or(l)) == pytest.approx(want, abs=1e-5)
    assert torch.isfinite(noisy_or(torch.full((1, 49, 1), -40.0))).all()


def _planted(n: int, seed: int, c: int = 16, side: int = 7):
    """Random grids; concept 0 is present in half the photos, always in one cell (row 2, col 5)
    where a fixed direction is added; concept 1 is noise (never learnable)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(n, side * side, c, generator=g)
    direction = torch.zeros(c)
    direction[0] = 8.0
    y = torch.zeros(n, 2, dtype=torch.uint8)
    y[: n // 2, 0] = 1
    grid[: n // 2, 2 * side + 5] += direction
    y[:, 1] = (torch.rand(n, generator=g) < 0.3).to(torch.uint8)
    return grid.half(), y


def _synthetic_data():
    space = ConceptSpace(["planted", "noise"], [100, 60])
    vocab = Vocab(["planted", "noise"])
    grids, ys = {}, {}
    for i, split in enumerate(("train", "dev", "test")):
        grids[split], ys[split] = _planted(200 if split == "train" else 80, i)
    refs = {s: torch.ones(len(g), 5, 4, dtype=torch.long) * 4 for s, g in grids.items()}
    return TagData.from_arrays(space, vocab, grids, ys, refs)


def test_image_tagger_learns_a_planted_concept_and_its_map_peaks_there(tmp_path):
    td = _synthetic_data()
    cfg = TagTrainConfig(network="image", epochs=12, batch_size=32, lr=1e-2, hidden_dim=32, dropout=0.0,
                         flip_prob=0.0, patience=12)
    run = train_tagger(None, tmp_path, cfg, tag_data=td, progress=False)
    net, meta = load_best(run)
    probs = predict(net, td, "test")
    y = td.y["test"].numpy()
    assert f1_scores(probs[:, :1] >= 0.5, y[:, :1])["micro_f1"] > 0.95
    assert average_precision(probs, y)[0] > 0.98
    # the region map: the planted cell is the most probable one on every photo with the concept
    with torch.no_grad():
        r = torch.sigmoid(net.regions(td.grid["test"][:40].float()))[:, :, 0]  # (40, 49)
    assert (r.argmax(1) == 2 * 7 + 5).all()
    # the training curve and best model
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,dev_micro_f1") and len(rows) >= 3
    assert meta["dev_micro_f1"] > 0.5


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    td = _synthetic_data()
    cfg = TagTrainConfig(network="image", epochs=3, batch_size=50, hidden_dim=8, dropout=0.0, patience=9)
    a = train_tagger(None, tmp_path / "a", cfg, tag_data=td, progress=False)
    train_tagger(None, tmp_path / "b", TagTrainConfig(**{**cfg.__dict__, "epochs": 1}), tag_data=td, progress=False)
    # continue the killed-after-one-epoch run with the full config
    (tmp_path / "b" / "image" / "config.json").write_text(json.dumps(cfg.__dict__))
    b = train_tagger(None, tmp_path / "b", cfg, tag_data=td, progress=False, resume=True)
    la = (a / "metrics.csv").read_text().splitlines()
    lb = (b / "metrics.csv").read_text().splitlines()
    assert len(la) == len(lb) == 4
    strip = lambda rows: [",".join(r.split(",")[:4]) for r in rows]  # noqa: E731 (seconds differ)
    assert strip(la) == strip(lb)


def test_flip_grid_mirrors_columns():
    g = torch.arange(2 * 9 * 1, dtype=torch.float32).view(2, 9, 1)
    f = flip_grid(g, 3)
    assert f[0, :3, 0].tolist() == [2.0, 1.0, 0.0] and torch.equal(flip_grid(f, 3), g)


# --- labels -----------------------------------------------------------------------------------

def test_concepts_mined_from_training_captions(synth):
    ds = load_dataset(synth.root)
    space = mine_concepts(ds, synth.root, n_concepts=50)
    for w in ("red", "square", "blue", "circle", "stripes", "yellow", "triangle", "white", "background"):
        assert w in space.names, w
    assert not {"a", "on", "of", "and"} & set(space.names)
    # no lemma file here: the fallback merges a plural only with a singular the captions use
    assert plural_forms({"dogs", "dog", "stripes", "grass"}) == {"dogs": "dog"}
    y = label_matrix(space, ds, ds.split("test"))
    names = ds.split("test")
    red = space.index["red"]
    assert [bool(y[i, red]) for i in range(len(names))] == [synth.kind[n] == "red_square" for n in names]
    # "small" is in only one of the red square's captions: below the 2-caption rule
    assert "small" not in space.names
    assert caption_labels(space, ["Two red squares"])[0, red] == 1


def test_concept_space_round_trips_through_json():
    space = ConceptSpace(["dog", "run"], [10, 5], {"dogs": "dog", "running": "run"})
    back = ConceptSpace.from_json(json.loads(json.dumps(space.to_json())))
    assert back.names == space.names and back.forms == space.forms
    assert back.mentioned("The dogs are running.") == {0, 1}


# --- the bundle and the command line ------------------------------------------------------------

def _tiny_bundle(tmp_path):
    space = ConceptSpace([f"c{i}" for i in range(5)], [5] * 5)
    net = ImageTagger(ImageTaggerConfig(n_concepts=5, feature_dim=1280, hidden_dim=8))
    return write_bundle(tmp_path / "tagger", space, Vocab([]), {"image": net}, {"image": np.full(5, 0.5)},
                        "efficientnet-lite0")


def test_bundle_round_trip_and_damaged_files(tmp_path):
    folder = _tiny_bundle(tmp_path)
    t = Tagger.from_pretrained(folder, encoder=False)
    assert t.concepts.names[0] == "c0" and t.thresholds["image"].shape == (5,)
    grid = torch.randn(2, 49, 1280)
    r = t.tag_features(grid, maps=True, captions=["c1 and c2", None], threshold=0.0)
    assert len(r[0].tags) == 5 and r[0].maps.shape == (5, 7, 7)
    assert set(r[0].missing) == {"c0", "c3", "c4"} and r[1].missing == []
    cfg = json.loads((folder / "tagger.json").read_text())
    cfg["networks"]["image"]["thresholds"] = [0.5] * 4
    (folder / "tagger.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="thresholds"):
        Tagger.from_pretrained(folder, encoder=False)
    (folder / "image.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(BundleError, match="image.safetensors"):
        Tagger.from_pretrained(folder, encoder=False)


def test_tag_command_reports_a_bad_image_and_tags_the_others(tmp_path, capsys):
    from captioning.cli import main

    from conftest import draw

    folder = _tiny_bundle(tmp_path)
    good = tmp_path / "good.png"
    draw("red_square", 0).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    rc = main(["tag", str(bad), str(good), "--model", str(folder), "--json", "--threshold", "0"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "bad.jpg" in err
    res = json.loads(out)["results"]
    assert "error" in res[0] and len(res[1]["tags"]) == 5


@pytest.mark.skipif(not (FLICKR8K / "Images").is_dir(), reason="Flickr8k not found at ../shared/data/flickr8k")
@pytest.mark.skipif(not (DEFAULT_TAGGER / "tagger.json").is_file(), reason="no shipped tagger in assets/models/tagger")  # noqa: E501
def test_shipped_tagger_tags_a_flickr8k_dog_photo():
    # test split; its five captions all name a dog
    photo = FLICKR8K / "Images" / "3385593926_d3e9c21170.jpg"
    t = Tagger.from_pretrained()
    r = t.tag(photo, maps=True)[0]
    assert "dog" in r.concepts
    k = t.concepts.index["dog"]
    assert r.probabilities[k] > 0.9 and r.maps.shape[1:] == (7, 7)


def test_shipped_models_with_the_tagger_fit_the_weight_budget():
    """All weights under assets/models, the tagger's included, stay within 60 MB (issue 3's budget);
    the tagger folder has no config.json, so nothing takes it for a caption model."""
    models = REPO / "assets" / "models"
    total = sum(p.stat().st_size for p in models.rglob("*.safetensors"))
    assert total <= 60e6, f"shipped weights {total / 1e6:.2f} MB"
    assert not (DEFAULT_TAGGER / "config.json").exists()


# --- the app's Concepts page ---------------------------------------------------------------------

def test_concepts_page(tmp_path, monkeypatch):
    """The page tags the sample photo, lists concepts with probabilities, marks those the caption
    leaves out, and draws each map method without an exception (a tiny untrained tagger and captioner)."""
    import sys

    from streamlit.testing.v1 import AppTest

    from captioning.bundle import save_bundle
    from captioning.decoders import build_decoder

    torch.manual_seed(0)
    vocab = Vocab(["a", "dog", "runs", "on", "grass"])
    dec = build_decoder("show_tell", {"vocab_size": len(vocab), "feature_dim": 1280, "embed_dim": 8,
                                      "hidden_dim": 8, "dropout": 0.0})
    save_bundle(tmp_path / "show_tell", dec.eval(), vocab, "efficientnet-lite0")
    _tiny_bundle(tmp_path)  # tmp_path / "tagger"
    monkeypatch.setenv("CAPTIONING_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / "cache"))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=120)
    at.run()
    at.switch_page("views/concepts.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Concepts"
    table = at.dataframe[0].value
    assert len(table) == 5 and table["probability"].is_monotonic_decreasing
    assert "in caption" in table.columns
    assert any(i.captions and "region probabilities" in i.captions[0] for i in at.image)
    at.radio(key="concept_method").set_value("grad_cam").run()
    at.selectbox(key="concept_pick").set_value("c3").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(i.captions and i.captions[0] == "c3 · Grad-CAM" for i in at.image)


def test_concept_maps_point_at_the_concept(tmp_path):
    """Every map method of explain.concepts runs through the real encoder on a tiny untrained
    tagger: (S, S) maps, finite and not flat; an unknown concept is a ValueError."""
    from explain.concepts import concept_map

    from conftest import draw

    t = Tagger.from_pretrained(_tiny_bundle(tmp_path), encoder=False)
    from captioning.encoders import build_encoder

    t._encoder = build_encoder("efficientnet-lite0")
    im = draw("red_square", 0)
    for method in ("mil", "grad_cam", "integrated_gradients"):
        m = concept_map(t, im, "c0", method, n_steps=4) if method == "integrated_gradients" else concept_map(t, im, "c0", method)
        assert m.shape == (224, 224) and np.isfinite(m).all() and m.std() > 0, method
    with pytest.raises(ValueError, match="unknown concept"):
        concept_map(t, im, "nope")


def test_thresholds_fall_back_to_one_global_threshold_for_rare_concepts():
    from captioning.lab.tagging import choose_thresholds, thresholds_for

    rng = np.random.default_rng(0)
    y = np.zeros((200, 2), np.uint8)
    y[:100, 0] = 1  # common concept
    y[:3, 1] = 1  # rare concept: 3 positives
    probs = np.clip(y * 0.5 + rng.random((200, 2)) * 0.5, 0, 1)
    t = thresholds_for(probs, y, min_positives=50)
    g = thresholds_for(probs, y, min_positives=10**9)
    assert g[0] == g[1]  # one global threshold
    assert t[1] == g[1]  # the rare concept keeps the global one
    thr, rule = choose_thresholds(probs, y)
    assert thr.shape == (2,) and "global" in rule["cv_micro_f1"]


def test_tagger_guidance_constraint_words():
    """The dev experiment's constraints (captioning/lab/tools/tagger_guidance.py): the surest
    concept in every vocabulary form, only at or above the threshold; and the surest concept the
    unguided caption leaves out, skipping the ones it names."""
    from types import SimpleNamespace

    from captioning.lab.tools.tagger_guidance import guide_from_words, missing_words, tagger_words
    from captioning.tagger import ConceptSpace

    tagger = SimpleNamespace(concepts=ConceptSpace(["dog", "grass", "cat"], [9, 5, 2], {"dogs": "dog"}))
    itos = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "dogs", "grass", "runs"]
    probs = torch.tensor([[0.95, 0.60, 0.10], [0.30, 0.20, 0.10]])
    assert tagger_words(tagger, probs, itos, 0.9) == [["dog", "dogs"], []]
    assert tagger_words(tagger, probs, itos, 0.96) == [[], []]
    caps = ["a dog runs", "a dog runs"]
    assert missing_words(tagger, probs, itos, 0.5, caps) == [["grass"], []]
    assert missing_words(tagger, probs, itos, 0.7, caps) == [[], []]  # dog is named, grass below 0.7
    assert missing_words(tagger, probs, itos, 0.5, ["two dogs", "x"]) == [["grass"], []]  # a plural names it
    g = guide_from_words([["dog", "dogs"], []], itos)
    assert g.words.shape == (2, len(itos)) and g.words[0].nonzero().flatten().tolist() == [5, 6] and not g.words[1].any()


def test_paired_bootstrap_of_the_micro_f1_difference():
    """The difference is the plain micro-F1 difference; a system better on many photos is never
    'not better' in a resample; two identical systems differ by exactly 0; and a margin that
    rests on one photo of 30 is not significant."""
    from captioning.tagger import f1_scores, micro_f1_difference

    rng = np.random.default_rng(1)
    y = rng.random((300, 20)) < 0.2
    good = y.copy()
    good[:, :3] = False  # misses three concepts
    bad = good.copy()
    bad[:, 3:6] = False  # misses three more
    d = micro_f1_difference(good, bad, y)
    assert d["difference"] == pytest.approx(f1_scores(good, y)["micro_f1"] - f1_scores(bad, y)["micro_f1"])
    assert d["difference"] > 0 and 0 < d["ci95"][0] <= d["difference"] <= d["ci95"][1] and d["p_not_better"] == 0
    same = micro_f1_difference(good, good, y)
    assert same["difference"] == 0 and same["ci95"] == [0, 0] and same["p_not_better"] == 1
    # Better on one photo of 30 only: about a third of the resamples leave that photo out.
    y30 = rng.random((30, 20)) < 0.2
    a, b = y30.copy(), y30.copy()
    b[0] = ~y30[0]
    d = micro_f1_difference(a, b, y30)
    assert d["difference"] > 0 and d["ci95"][0] == 0 and 0.2 < d["p_not_better"] < 0.5
