"""Deletion / insertion curves and the model-randomisation check."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from explain.attribution import attribute, grad_cam_all_words, word_scorer
from explain.faithfulness import (auc, block_scores, deletion_insertion, map_order, model_randomisation,
                                  perturbation_curve, random_baselines, random_order, randomise_weights)
from toy import cached_toy_captioner, toy_image, toy_mask

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def _case(colour="red", cell=(3, 4)):
    cap = cached_toy_captioner("show_attend_tell")
    img = toy_image(colour, cell, seed=11)
    return cap, img, cap.vocab.encode(f"a {colour} square", add_special=False)


def test_auc_and_orders():
    f = np.linspace(0, 1, 5)
    assert auc(f, np.ones(5)) == pytest.approx(1.0)
    assert auc(f, f) == pytest.approx(0.5)
    o = random_order(196, seed=3)
    assert sorted(o) == list(range(196))
    np.testing.assert_array_equal(o, random_order(196, seed=3))
    m = np.zeros((224, 224))
    m[32:48, 16:32] = 5.0  # block (2, 1) -> index 2 * 14 + 1
    assert map_order(m, 16)[0] == 29
    assert block_scores(m, 16).shape == (14, 14)
    with pytest.raises(ValueError):
        block_scores(np.zeros((224, 224)), 15)


def test_oracle_map_beats_random_and_curves_are_sane():
    cap, img, tokens = _case()
    oracle = toy_mask((3, 4)).astype(np.float32)  # the square, known to carry the colour
    r = deletion_insertion(cap, img, tokens, 1, oracle, steps=20)
    for c in (r.deletion, r.insertion, r.random_deletion, r.random_insertion):
        assert c.fractions.shape == c.probs.shape == (21,)
        assert c.fractions[0] == 0 and c.fractions[-1] == 1
        assert 0.0 <= c.auc <= 1.0
        assert ((c.probs >= 0) & (c.probs <= 1)).all()
    # Both deletion curves start at the image and end at the fully black image; insertion
    # curves end at the image.
    assert r.deletion.probs[0] == pytest.approx(r.prob, abs=1e-5)
    assert r.insertion.probs[-1] == pytest.approx(r.prob, abs=1e-5)
    assert r.deletion.probs[-1] == pytest.approx(r.random_deletion.probs[-1], abs=1e-5)
    # Monotone-ish: deleting evidence lowers the probability, revealing it raises it.
    assert r.deletion.probs[-1] < r.deletion.probs[0] - 0.3
    assert r.insertion.probs[-1] > r.insertion.probs[0]
    rises = [r.deletion.probs[k] - r.deletion.probs[:k].min() for k in range(1, 21)]
    assert max(rises) < 0.05, "deletion should not bring the word back"
    # The square is 4 of 196 blocks: removing it first kills the word at once.
    assert r.deletion.auc < r.random_deletion.auc - 0.1
    assert r.insertion.auc > r.random_insertion.auc  # (the blurred canvas already hints at the colour)


def test_grad_cam_and_ig_beat_random_deletion_on_the_toy():
    cap, img, tokens = _case("blue", (1, 1))
    for method in ("grad_cam", "integrated_gradients"):
        a = attribute(cap, img, tokens, 1, method)
        r = deletion_insertion(cap, img, tokens, 1, a.map, steps=12)
        assert r.deletion.auc < r.random_deletion.auc, method


def test_perturbation_curve_batches_and_substrates():
    cap, img, tokens = _case()
    scorer = word_scorer(cap, tokens, 1)
    x = cap.pixels([img])
    order = random_order(196, 0)
    a = perturbation_curve(scorer, x, order, "deletion", steps=8, batch_size=1)
    b = perturbation_curve(scorer, x, order, "deletion", steps=8, batch_size=9)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    for sub in ("black", "mean", "blur"):
        c = perturbation_curve(scorer, x, order, "insertion", steps=4, substrate=sub)
        assert c.probs[-1] == pytest.approx(a.probs[0], abs=1e-5)
    with pytest.raises(ValueError):
        perturbation_curve(scorer, x, order, "swap")


def test_model_randomisation_changes_the_map_and_leaves_the_model_alone():
    cap, img, tokens = _case()
    before = {k: v.clone() for k, v in cap.decoder.state_dict().items()}
    res = model_randomisation(cap, img, tokens, 1, "integrated_gradients", n_steps=8)
    assert -1 <= res.spearman <= 1 and -1 <= res.spearman_abs <= 1
    assert res.spearman < 0.9, "a map that survives weight randomisation explains nothing"
    assert res.original.shape == res.randomised.shape == (224, 224)
    assert res.metadata["randomised_logprob"] != pytest.approx(res.metadata["logprob"])
    for k, v in cap.decoder.state_dict().items():
        assert torch.equal(v, before[k])
    r1 = randomise_weights(cap.decoder, seed=5)
    r2 = randomise_weights(cap.decoder, seed=5)
    for (k, v1), v2 in zip(r1.state_dict().items(), r2.state_dict().values()):
        assert torch.equal(v1, v2), k
    with pytest.raises(ValueError):
        model_randomisation(cap, img, tokens, 1, target="everything")


def test_block_scores_rejects_either_side_off_the_grid():
    for shape in ((224, 230), (230, 224)):
        with pytest.raises(ValueError, match="multiple of the block size"):
            block_scores(np.zeros(shape), 16)


def test_map_order_breaks_ties_by_its_seed():
    flat = np.zeros((224, 224))
    a, b = map_order(flat, 16, seed=4), map_order(flat, 16, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, map_order(flat, 16, seed=5))
    assert not np.array_equal(a, np.arange(196))  # a flat map is not removed top-left first


def test_deletion_insertion_uses_its_seed_and_substrates():
    """Against the curves built by hand from the same pieces, with non-default settings, so that
    a setting that is dropped on the way (and falls back to its default) shows."""
    cap, img, tokens = _case()
    sal = np.zeros((224, 224))  # ties: most blocks are 0, and only the seed orders them
    sal[:64] = np.random.default_rng(2).random((64, 224))
    r = deletion_insertion(cap, img, tokens, 1, sal, block=32, steps=6, seed=3, deletion_substrate="mean",
                           insertion_substrate="black")
    scorer = word_scorer(cap, tokens, 1)
    x = cap.pixels([img])
    expect = {
        "deletion": perturbation_curve(scorer, x, map_order(sal, 32, 3), "deletion", 32, 6, "mean"),
        "insertion": perturbation_curve(scorer, x, map_order(sal, 32, 3), "insertion", 32, 6, "black"),
        "random_deletion": perturbation_curve(scorer, x, random_order(49, 3), "deletion", 32, 6, "mean"),
        "random_insertion": perturbation_curve(scorer, x, random_order(49, 3), "insertion", 32, 6, "black"),
    }
    for name, c in expect.items():
        got = getattr(r, name)
        np.testing.assert_allclose(got.probs, c.probs, atol=1e-6, err_msg=name)
        assert got.kind == c.kind and got.order == ("random" if name.startswith("random") else "map"), name
    assert r.word == "red"
    assert r.summary() == {"deletion_auc": r.deletion.auc, "insertion_auc": r.insertion.auc,
                           "random_deletion_auc": r.random_deletion.auc,
                           "random_insertion_auc": r.random_insertion.auc}
    with pytest.raises(ValueError, match="saliency map must be 224x224"):
        deletion_insertion(cap, img, tokens, 1, np.zeros((7, 7)))


def test_defaults_the_app_and_cli_rely_on():
    cap, img, tokens = _case()
    m = np.zeros((224, 224))
    m[32:48, 16:32] = 5.0
    assert map_order(m)[0] == 29  # 16-pixel blocks
    np.testing.assert_array_equal(map_order(np.zeros((224, 224))), map_order(np.zeros((224, 224)), 16, 0))
    np.testing.assert_array_equal(random_order(196), random_order(196, 0))
    rd, ri = random_baselines(cap, img, tokens, 1)
    scorer = word_scorer(cap, tokens, 1)
    x = cap.pixels([img])
    assert len(rd.probs) == len(ri.probs) == 25 and rd.order == ri.order == "random"
    np.testing.assert_allclose(rd.probs, perturbation_curve(scorer, x, random_order(196, 0), "deletion", 16, 24,
                                                            "black").probs, atol=1e-5)
    # 1e-5: the baselines score their steps in other batch sizes, and a convolution's float
    # rounding depends on the batch (differences of 2e-6 seen); a wrong default moves them by far more.
    np.testing.assert_allclose(ri.probs, perturbation_curve(scorer, x, random_order(196, 0), "insertion", 16, 24,
                                                            "blur").probs, atol=1e-5)
    res = model_randomisation(cap, img, tokens, 1)
    assert res.method == "grad_cam" and res.target == "decoder"
    with pytest.raises(ValueError, match="target must be decoder, encoder or both"):
        model_randomisation(cap, img, tokens, 1, target="weights")


def test_a_constant_map_has_no_rank_correlation():
    # Grad-CAM's ReLU can zero a whole map (say under random weights): that is nan, not an error.
    from scipy.stats import spearmanr

    from explain.faithfulness import _spearman

    assert np.isnan(_spearman(spearmanr, np.zeros(9), np.arange(9.0)))
    assert np.isnan(_spearman(spearmanr, np.arange(9.0), np.full(9, 2.0)))
    unit = np.array([0.0, 0.25, 1.0])  # a range of exactly 1 is not constant
    assert _spearman(spearmanr, unit, unit) == pytest.approx(1.0)
    assert _spearman(spearmanr, unit, -unit) == pytest.approx(-1.0)


def test_model_randomisation_randomises_only_its_target(monkeypatch):
    import explain.faithfulness as F

    cap, img, tokens = _case()
    seen = []
    real = F.randomise_weights

    def spy(module, seed=0):
        seen.append(module)
        return real(module, seed)

    monkeypatch.setattr(F, "randomise_weights", spy)
    for target, expect in (("decoder", [cap.decoder]), ("encoder", [cap.encoder]),
                           ("both", [cap.encoder, cap.decoder])):
        seen.clear()
        res = model_randomisation(cap, img, tokens, 1, "grad_cam", target=target)
        assert seen == expect, target
        assert res.target == target and res.method == "grad_cam" and res.metadata["word"] == "red"


def test_model_randomisation_spearman_is_of_the_pooled_maps():
    """Recomputed independently: 4x4 block means of both maps, then scipy's rank correlation;
    the options reach both the original and the randomised map."""
    from scipy.stats import spearmanr

    cap, img, tokens = _case()
    res = model_randomisation(cap, img, tokens, 1, "integrated_gradients", n_steps=4)
    a = attribute(cap, img, tokens, 1, "integrated_gradients", n_steps=4)
    np.testing.assert_array_equal(res.original, a.map)

    def pool(m):
        return m.reshape(56, 4, 56, 4).mean((1, 3)).ravel()

    p, q = pool(res.original), pool(res.randomised)
    assert res.spearman == pytest.approx(spearmanr(p, q).statistic, abs=1e-6)
    assert res.spearman_abs == pytest.approx(spearmanr(np.abs(p), np.abs(q)).statistic, abs=1e-6)
    full = model_randomisation(cap, img, tokens, 1, "integrated_gradients", downsample=1, n_steps=4)
    assert full.spearman == pytest.approx(spearmanr(full.original.ravel(), full.randomised.ravel()).statistic,
                                          abs=1e-6)
    n8 = model_randomisation(cap, img, tokens, 1, "integrated_gradients", n_steps=8)
    assert not np.allclose(n8.randomised, res.randomised), "n_steps must reach the randomised map too"


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "grad_cam",
                                    "attention"])
def test_every_map_changes_when_the_toy_decoder_is_randomised(method):
    # Measured on this case (decoder re-initialised, seed 1): Spearman raw / of |map| IG 0.45 / 0.29,
    # SmoothGrad 0.16, GradientSHAP 0.44 / 0.26, occlusion -0.25 / 0.01, Grad-CAM 0.14, attention
    # -0.10. 0.6 leaves room for numerical drift but fails a map that mostly ignores the weights.
    cap, img, tokens = _case()
    res = model_randomisation(cap, img, tokens, 1, method)
    assert res.spearman < 0.6 and res.spearman_abs < 0.6, (res.spearman, res.spearman_abs)


def _trained_model() -> Path | None:
    for cand in (REPO / "assets" / "models" / "show_attend_tell",):
        if (cand / "model.safetensors").is_file() and (cand / "config.json").is_file():
            return cand
    return None


def _data_dir() -> Path | None:
    env = os.environ.get("CAPTIONING_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "flickr8k"]:
        if (cand / "Flickr8k.token.txt").is_file():
            return cand
    return None


#: The app's explanation methods must delete the word with at most this share of a random order's
#: deletion AUC (mean over the fixed words below). A random map scores about 1.
MARGIN = 0.85
#: ...and keep less than this Spearman correlation (mean over the words) with their map under
#: re-initialised decoder weights, raw and of absolute values (Adebayo et al. 2018).
RANDOMISED_SPEARMAN, RANDOMISED_SPEARMAN_ABS = 0.4, 0.6


@pytest.fixture(scope="module")
def shipped_words():
    """The shipped default and its fixed test words: the first 12 Flickr8k test images, each
    captioned as shipped, and the first 2 content words of each caption (24 words), as
    (pixels (1, 3, S, S), caption tokens, word index, word)."""
    if _trained_model() is None:
        pytest.skip("needs a trained bundle: assets/models/show_attend_tell")
    if _data_dir() is None:
        pytest.skip("needs the Flickr8k data in ../shared/data/flickr8k")
    from captioning.api import Captioner
    from captioning.lab.data import load_dataset
    from captioning.images import load_image, preprocess
    from explain.cli import pick_words

    cap = Captioner.from_pretrained(_trained_model())
    ds = load_dataset(_data_dir())
    words = []
    for name in ds.split("test")[:12]:
        x = preprocess(load_image(ds.path(name)), cap.prep)[None]
        res = cap.caption_features(*cap.encode(x))[0]
        words += [(x, res.tokens, t, res.words[t]) for t in pick_words(res.words, "content", 2)]
    return cap, words


def _deletion(cap, x, tokens, t, order) -> float:
    return perturbation_curve(word_scorer(cap, tokens, t), x, order, "deletion", steps=10).auc


def _random_deletion(cap, x, tokens, t) -> float:
    """Mean deletion AUC of 3 seeded random block orders: one order alone is noisy."""
    return float(np.mean([_deletion(cap, x, tokens, t, random_order((x.size(-1) // 16) ** 2, seed=s))
                          for s in range(3)]))


@pytest.fixture(scope="module")
def random_deletion_aucs(shipped_words) -> list[float]:
    cap, words = shipped_words
    return [_random_deletion(cap, x, tokens, t) for x, tokens, t, _ in words]


@pytest.fixture(scope="module")
def trained_deletion_aucs(shipped_words, random_deletion_aucs) -> dict[str, float]:
    """Mean deletion AUC over 24 words (12 test images x 2 content words) of the shipped model:
    Grad-CAM order, random order (mean of 3 seeded orders per word), least-salient-first.
    Single words vary a lot (AUC 0.02 to 0.7), so fewer words make this a coin toss."""
    cap, words = shipped_words
    cam, inv, cams = [], [], {}
    for x, tokens, t, _ in words:
        key = (id(x), tuple(tokens))
        if key not in cams:
            cams[key] = grad_cam_all_words(cap, x, tokens, include_end=False)
        m = cams[key][t].map
        cam.append(_deletion(cap, x, tokens, t, map_order(m)))
        inv.append(_deletion(cap, x, tokens, t, map_order(-m)))  # least salient first
    out = {"grad_cam": float(np.mean(cam)), "random": float(np.mean(random_deletion_aucs)),
           "least_salient_first": float(np.mean(inv))}
    print(f"deletion AUC over {len(cam)} words: {out}")
    return out


@pytest.mark.slow
def test_grad_cam_ranking_carries_information_on_trained_model(trained_deletion_aucs):
    a = trained_deletion_aucs
    assert a["grad_cam"] < a["least_salient_first"] - 0.05, a


@pytest.mark.slow
def test_grad_cam_deletion_auc_below_random_on_trained_model(trained_deletion_aucs):
    # grad_cam's default (HiResCAM at the stride-16 stage, see explain.attribution). Classic
    # Grad-CAM on the 7x7 grid is no better than random here (0.265 vs 0.264 on these words).
    a = trained_deletion_aucs
    assert a["grad_cam"] < a["random"], a
    assert a["grad_cam"] <= MARGIN * a["random"], a


def _app_methods(cap) -> list[str]:
    from app.services import explanations

    methods = explanations.explanation_methods(cap)
    assert {"integrated_gradients", "gradient_shap", "occlusion", "grad_cam"} <= set(methods), methods
    return methods


def _app_map(cap, x, tokens, t, method) -> np.ndarray:
    """The map the app shows: its own options (app.services.explanations.FAST_OPTIONS)."""
    from app.services import explanations

    return attribute(cap, x, tokens, t, method, **explanations.FAST_OPTIONS.get(method, {})).map


@pytest.mark.slow
def test_every_app_explanation_beats_random_deletion_on_the_shipped_model(shipped_words, random_deletion_aucs):
    """Every method the app offers as an explanation, at the app's settings, over the first 16 of
    the fixed words (8 images): mean deletion AUC at most MARGIN x the random orders'.
    Measured (this machine, torch 2.14.1): IG 0.82x, GradientSHAP (32 samples) 0.79x on 24 words,
    occlusion 0.77x, Grad-CAM 0.71x; SmoothGrad 0.86x and attention 0.91x are not offered as
    explanations (see the randomisation test and docs/faithfulness.md)."""
    cap, words = shipped_words
    n = 16
    rnd = float(np.mean(random_deletion_aucs[:n]))
    ratios = {}
    for method in _app_methods(cap):
        aucs = [_deletion(cap, x, tokens, t, map_order(_app_map(cap, x, tokens, t, method)))
                for x, tokens, t, _ in words[:n]]
        ratios[method] = float(np.mean(aucs)) / rnd
    print(f"deletion AUC / random over {n} words (random {rnd:.3f}): {ratios}")
    assert all(r <= MARGIN for r in ratios.values()), ratios


@pytest.mark.slow
def test_every_app_explanation_passes_model_randomisation_on_the_shipped_model(shipped_words):
    """Adebayo et al. 2018: re-initialise the decoder (the weights this project trained) and the
    map must change. Spearman of the two maps, mean over the first 4 fixed words. Measured:
    IG 0.01 / |map| 0.41, GradientSHAP 0.02 / 0.29, occlusion 0.14 / 0.27, Grad-CAM 0.21,
    attention 0.15; SmoothGrad 0.94, which is why the app does not offer it as an explanation."""
    from app.services import explanations

    cap, words = shipped_words
    out = {}
    for method in _app_methods(cap):
        rs = [model_randomisation(cap, x, tokens, t, method, **explanations.FAST_OPTIONS.get(method, {}))
              for x, tokens, t, _ in words[:4]]
        out[method] = (float(np.mean([r.spearman for r in rs])), float(np.mean([r.spearman_abs for r in rs])))
    print(f"Spearman with randomised decoder (raw, abs) over 4 words: {out}")
    assert all(r < RANDOMISED_SPEARMAN and a < RANDOMISED_SPEARMAN_ABS for r, a in out.values()), out
