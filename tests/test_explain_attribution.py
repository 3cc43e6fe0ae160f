"""Attribution: real properties on a toy captioner whose evidence is known, plus the real encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from explain.attribution import (METHODS, Attribution, attribute, attribute_caption,
                                 available_methods, grad_cam_all_words, heatmap, make_baseline, normalize_map,
                                 overlay, word_scorer)
from toy import ToyEncoder, cached_toy_captioner, toy_image, toy_mask

torch.set_num_threads(1)
KINDS = ("show_attend_tell", "show_tell", "merge")


def _case(kind: str, colour: str = "red", cell=(2, 5), seed: int = 7):
    cap = cached_toy_captioner(kind)
    img = toy_image(colour, cell, seed=seed)
    tokens = cap.vocab.encode(f"a {colour} square", add_special=False)
    return cap, img, tokens


def _peak_cell(m: np.ndarray) -> tuple[int, int]:
    blocks = m.reshape(7, 32, 7, 32).mean((1, 3))
    r, c = np.unravel_index(int(blocks.argmax()), blocks.shape)
    return int(r), int(c)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["grad_cam", "integrated_gradients", "occlusion", "gradient_shap"])
def test_colour_word_map_peaks_on_the_square(kind, method):
    # Toy encoder: feature cell (i, j) sees only pixel block (i, j); only the square carries the colour.
    # (SmoothGrad is left out: |gradient| measures sensitivity, not evidence, and on the pooled
    # show_tell decoder it legitimately peaks elsewhere.)
    for colour, cell in [("red", (2, 5)), ("blue", (5, 1))]:
        cap, img, tokens = _case(kind, colour, cell)
        a = attribute(cap, img, tokens, 1, method)
        assert a.word == colour and a.map.shape == (224, 224)
        assert a.logprob > np.log(0.5), "the toy model should be confident of the colour"
        assert _peak_cell(a.map) == cell, f"{method} on {kind} does not peak on the {colour} square"


def test_attention_peaks_on_the_square():
    cap, img, tokens = _case("show_attend_tell")
    a = attribute(cap, img, tokens, 1, "attention")
    assert _peak_cell(a.map) == (2, 5)
    assert a.raw.shape == (7, 7) and abs(a.raw.sum() - 1) < 1e-5  # softmax over the grid


def test_integrated_gradients_completeness():
    cap, img, tokens = _case("show_attend_tell")
    a = attribute(cap, img, tokens, 1, "integrated_gradients", n_steps=64)
    scorer = word_scorer(cap, tokens, 1)
    x = cap.pixels([img])
    with torch.no_grad():
        fx = float(scorer(x)[0])
        fb = float(scorer(make_baseline(x, "black"))[0])
    assert a.logprob == pytest.approx(fx, abs=1e-6)
    assert a.metadata["baseline_logprob"] == pytest.approx(fb, abs=1e-6)
    delta = a.metadata["convergence_delta"]
    total = float(a.raw.sum())
    assert abs(total - (fx - fb)) <= delta + 1e-4  # Captum's delta is exactly this gap
    assert delta < 0.02 * abs(fx - fb) + 1e-3, "64 steps should make the integral accurate"
    assert float(a.map.sum()) == pytest.approx(total, rel=1e-4)  # channel sum keeps completeness
    assert np.abs(a.map[toy_mask((2, 5))]).sum() > 0.5 * np.abs(a.map).sum()


def test_word_logprobs_add_up_to_the_beam_caption_logprob():
    for kind in KINDS:
        cap = cached_toy_captioner(kind)
        img = toy_image("blue", (3, 3), seed=3)
        res = cap.caption(img, beam_size=3)[0]
        assert res.best.finished
        scorer = word_scorer(cap, res.tokens, 0)
        with torch.no_grad():
            lps = scorer.all_logprobs(cap.pixels([img]))[0]
        assert float(lps.sum()) == pytest.approx(res.logprob, abs=1e-4)
        for t in range(len(res.tokens) + 1):  # the prefix-truncated forward agrees
            with torch.no_grad():
                assert float(word_scorer(cap, res.tokens, t)(cap.pixels([img]))[0]) == pytest.approx(float(lps[t]), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_cam_all_words_equals_word_by_word(kind):
    cap, img, tokens = _case(kind)
    fast = grad_cam_all_words(cap, img, tokens)
    assert [a.word for a in fast] == ["a", "red", "square", "<end>"]
    for t, f in enumerate(fast):
        slow = attribute(cap, img, tokens, t, "grad_cam")
        np.testing.assert_allclose(f.map, slow.map, atol=1e-6, rtol=1e-4)
        assert f.logprob == pytest.approx(slow.logprob, abs=1e-5)


def test_hirescam_is_grad_cam_when_the_decoder_sees_only_the_pooled_grid():
    # Draelos & Carin 2020: averaging the gradient over the grid (Grad-CAM) loses nothing when
    # it is the same at every cell, as for show_tell, which reads only the mean of the grid; it
    # does lose where an attention decoder looked.
    def raw(kind: str, gradients: str) -> np.ndarray:
        cap, img, tokens = _case(kind)
        return attribute(cap, img, tokens, 1, "grad_cam", layer="features", gradients=gradients, relu=False).raw

    np.testing.assert_allclose(raw("show_tell", "elementwise"), raw("show_tell", "mean"), rtol=1e-4, atol=1e-7)
    sat = raw("show_attend_tell", "elementwise"), raw("show_attend_tell", "mean")
    assert not np.allclose(*sat, rtol=0.1)


def test_attribute_caption_fast_paths_match():
    cap, img, tokens = _case("show_attend_tell")
    att = attribute_caption(cap, img, tokens, "attention")
    assert len(att) == 4
    for t, a in enumerate(att):
        np.testing.assert_allclose(a.map, attribute(cap, img, tokens, t, "attention").map, atol=1e-6)
    sg = attribute_caption(cap, img, tokens, "smoothgrad", include_end=False, nt_samples=2)
    assert [a.word for a in sg] == ["a", "red", "square"]


def test_end_token_and_index_errors():
    cap, img, tokens = _case("merge")
    a = attribute(cap, img, tokens, len(tokens), "grad_cam")
    assert a.word == "<end>" and a.token == cap.vocab.end
    assert attribute(cap, img, tokens, -1, "grad_cam").word_index == len(tokens)
    with pytest.raises(ValueError, match="out of range"):
        attribute(cap, img, tokens, len(tokens) + 1, "grad_cam")
    with pytest.raises(ValueError, match="unknown method"):
        attribute(cap, img, tokens, 0, "lime")
    with pytest.raises(ValueError, match="unknown option"):
        attribute(cap, img, tokens, 0, "integrated_gradients", steps=3)
    with pytest.raises(ValueError, match="attention"):
        attribute(cap, img, tokens, 0, "attention")
    assert "attention" not in available_methods(cap)
    assert available_methods(cached_toy_captioner("show_attend_tell")) == list(METHODS)


def test_other_methods_and_baselines_run():
    cap, img, tokens = _case("show_attend_tell")
    g = attribute(cap, img, tokens, 1, "gradient_shap", n_samples=4)
    assert np.isfinite(g.map).all() and "convergence_delta" in g.metadata
    x = cap.pixels([img])
    before = x.clone()
    for b in ("black", "mean", "blur"):
        a = attribute(cap, x[0], tokens, 1, "integrated_gradients", n_steps=4, baseline=b)
        assert np.isfinite(a.map).all()
    assert torch.equal(x, before), "attribute must not modify the caller's tensor"
    black = make_baseline(x, "black")
    from captioning.images import unnormalize
    assert unnormalize(black[0]).max() < 1e-6  # black in pixel space


def test_smoothgrad_is_seeded():
    cap, img, tokens = _case("show_tell")
    a = attribute(cap, img, tokens, 1, "smoothgrad", nt_samples=4)
    b = attribute(cap, img, tokens, 1, "smoothgrad", nt_samples=4)
    np.testing.assert_array_equal(a.map, b.map)


def test_gradient_shap_is_seeded():
    cap, img, tokens = _case("show_attend_tell")
    np.random.seed(123)
    outside = np.random.random()
    np.random.seed(123)
    a = attribute(cap, img, tokens, 1, "gradient_shap", n_samples=4)
    assert np.random.random() == outside, "the caller's numpy random stream must be left alone"
    b = attribute(cap, img, tokens, 1, "gradient_shap", n_samples=4)
    np.testing.assert_array_equal(a.map, b.map)
    c = attribute(cap, img, tokens, 1, "gradient_shap", n_samples=4, seed=1)
    assert not np.array_equal(a.map, c.map)


def test_overlays_do_not_modify_inputs():
    rng = np.random.default_rng(0)
    img_u8 = (rng.random((100, 150, 3)) * 255).astype(np.uint8)
    img_f = rng.random((224, 224, 3)).astype(np.float32)
    m = rng.normal(size=(224, 224)).astype(np.float32)
    copies = [img_u8.copy(), img_f.copy(), m.copy()]
    out1 = overlay(img_u8, m)
    out2 = overlay(img_f, m, signed=True)
    out3 = overlay(Image.fromarray(img_u8), m)
    h = heatmap(m)
    n = normalize_map(m, signed=True)
    for orig, now in zip(copies, [img_u8, img_f, m]):
        np.testing.assert_array_equal(orig, now)
    assert out1.shape == (100, 150, 3) and out2.shape == (224, 224, 3) and h.shape == (224, 224, 3)
    np.testing.assert_allclose(out1, out3)
    for o in (out1, out2, h):
        assert o.dtype == np.float32 and o.min() >= 0 and o.max() <= 1
    assert n.min() >= -1 and n.max() <= 1
    assert not np.shares_memory(out2, img_f)
    assert normalize_map(np.zeros((4, 4))).max() == 0


# --------------------------------------------------------------------------- the real encoder

@pytest.fixture(scope="module")
def real_captioner():
    from captioning.api import Captioner
    from captioning.decoders import build_decoder
    from captioning.encoders import EncoderUnavailable, build_encoder
    from captioning.vocab import Vocab

    try:
        enc = build_encoder("efficientnet-lite0")
    except EncoderUnavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    vocab = Vocab(["a", "dog", "runs", "on", "grass"])
    dec = build_decoder("show_attend_tell", {"vocab_size": len(vocab), "embed_dim": 16, "hidden_dim": 32,
                                             "attention_dim": 16}).eval()
    return Captioner(enc, dec, vocab)


def _photo():
    rng = np.random.default_rng(1)
    a = np.zeros((224, 224, 3), np.float32) + np.linspace(0, 1, 224)[None, :, None] * [0.2, 0.6, 0.3]
    a[60:160, 80:180] = [0.8, 0.5, 0.2]
    return Image.fromarray(((a + rng.normal(0, 0.05, a.shape)).clip(0, 1) * 255).astype(np.uint8))


def test_real_encoder_batch_of_one_gradients_are_right(real_captioner):
    # Regression: PyTorch's CPU eval BatchNorm2d backward is wrong for batch 1 with the
    # channels-last-strided gradient coming back through the grid transpose.
    cap = real_captioner
    scorer = word_scorer(cap, [4, 5, 6], 2)
    x = cap.pixels([_photo()])
    other = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    g1, = torch.autograd.grad(scorer(x1).sum(), x1)
    x2 = torch.cat([x, other]).requires_grad_()
    g2, = torch.autograd.grad(scorer(x2)[0], x2)
    torch.testing.assert_close(g1[0], g2[0], atol=1e-6, rtol=1e-4)


def test_real_encoder_ig_and_grad_cam(real_captioner):
    cap = real_captioner
    img = _photo()
    tokens = [4, 5, 6]
    a = attribute(cap, img, tokens, 1, "integrated_gradients", n_steps=16, internal_batch_size=16)
    assert isinstance(a, Attribution) and a.map.shape == (224, 224) and a.raw.shape == (3, 224, 224)
    gap = a.logprob - a.metadata["baseline_logprob"]
    assert abs(float(a.raw.sum()) - gap) <= a.metadata["convergence_delta"] + 1e-4
    g = attribute(cap, img, tokens, 1, "grad_cam")
    assert g.metadata["layer"] == "stage5.block10"  # the last stride-16 stage of EfficientNet-Lite0
    assert g.raw.shape == (14, 14) and g.map.min() >= 0
    classic = attribute(cap, img, tokens, 1, "grad_cam", layer="features", gradients="mean")
    assert classic.raw.shape == (7, 7) and classic.metadata["layer"] == "features"
    assert all(not p.requires_grad for p in cap.encoder.parameters())
    assert not cap.encoder.training
    with pytest.raises(ValueError, match="grad_cam layer"):
        attribute(cap, img, tokens, 1, "grad_cam", layer="stage9")
    with pytest.raises(ValueError, match="grad_cam gradients"):
        attribute(cap, img, tokens, 1, "grad_cam", gradients="max")


def test_real_encoder_grad_cam_all_words_equals_word_by_word(real_captioner):
    # The batched path runs only the stages after the CAM layer on one copy per word.
    cap = real_captioner
    img = _photo()
    tokens = [4, 5, 6]
    for opts in ({}, {"gradients": "mean", "relu": False}, {"layer": "features"}):
        fast = grad_cam_all_words(cap, img, tokens, **opts)
        for t in range(len(tokens) + 1):
            slow = attribute(cap, img, tokens, t, "grad_cam", **opts)
            np.testing.assert_allclose(fast[t].raw, slow.raw, atol=1e-5 * float(np.abs(slow.raw).max()) + 1e-9)
            assert fast[t].metadata["layer"] == slow.metadata["layer"]



def test_inference_encoder_folds_batchnorm_without_changing_the_function(real_captioner):
    from explain._utils import inference_encoder

    enc = real_captioner.encoder
    fused = inference_encoder(enc)
    assert fused is not enc and inference_encoder(enc) is fused  # cached
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = real_captioner.pixels([_photo()])
    with torch.no_grad():
        a, b = enc.feature_map(x), fused.feature_map(x)
    torch.testing.assert_close(a, b, atol=1e-4 * float(a.abs().max()), rtol=1e-3)
    toy = ToyEncoder()
    assert inference_encoder(toy) is toy  # nothing to fold


def test_ensemble_of_decoders():
    from captioning.api import Captioner
    from captioning.decoding import Ensemble

    a, b = cached_toy_captioner("show_tell"), cached_toy_captioner("merge")
    cap = Captioner(a.encoder, Ensemble([a.decoder, b.decoder]), a.vocab)
    img = toy_image("red", (2, 5), seed=7)
    res = cap.caption(img)[0]
    scorer = word_scorer(cap, res.tokens, 0)
    with torch.no_grad():
        assert float(scorer.all_logprobs(cap.pixels([img]))[0].sum()) == pytest.approx(res.logprob, abs=1e-4)
    fast = grad_cam_all_words(cap, img, res.tokens)
    for t in (0, len(res.tokens)):
        np.testing.assert_allclose(fast[t].map, attribute(cap, img, res.tokens, t, "grad_cam").map, atol=1e-6)


_REFAULT_PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from captioning.api import Captioner
from captioning.decoders import build_decoder
from captioning.encoders import build_encoder
from captioning.vocab import Vocab
from explain import _utils
from explain.attribution import attribute
if sys.argv[1] == "default":
    _utils._MALLOC_TUNED = False  # as on a C library other than glibc: malloc left alone
torch.manual_seed(0)
vocab = Vocab([f"w{i}" for i in range(20)])
dec = build_decoder("show_attend_tell", {"vocab_size": len(vocab), "embed_dim": 16, "hidden_dim": 16,
                                         "attention_dim": 16}).eval()
cap = Captioner(build_encoder("efficientnet-lite0"), dec, vocab)
x = torch.randn(3, 224, 224)
run = lambda: attribute(cap, x, [4, 5, 6], 1, "integrated_gradients", n_steps=16, internal_batch_size=8)
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_attribution_reuses_its_buffers_instead_of_faulting_them_in_again():
    """explain._utils.keep_freed_memory: the second IG call on the real encoder reuses the memory
    of the first instead of page-faulting fresh memory in (about 160k faults by glibc's default)."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc tuning is glibc-only")
    faults = {mode: int(subprocess.run([sys.executable, "-c", _REFAULT_PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1])
              for mode in ("default", "tuned")}
    assert faults["default"] > 20000, faults  # the probe sees what it should
    assert faults["tuned"] < 0.05 * faults["default"], faults
