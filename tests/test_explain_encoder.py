"""Encoder inspection: layers, activations, top channels, ImageNet top-5, feature visualisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from captioning.images import preprocess
from explain.encoder import (activations, channel_montage, clear_memory_cache, feature_visualisation,
                             imagenet_top5, layer_info, list_layers, top_channels)
from toy import ToyEncoder, toy_image

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def enc():
    return ToyEncoder()


def test_layers_and_activations(enc):
    assert list_layers(enc) == ["block1", "block2"]
    info = layer_info(enc)
    assert [(i.name, i.channels, i.height, i.width) for i in info] == [("block1", 8, 28, 28), ("block2", 16, 7, 7)]
    img = toy_image("red", (1, 2))
    x = preprocess(img)
    a = activations(enc, x, "block2")
    assert a.shape == (16, 7, 7) and a.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(a, enc.feature_map(x[None])[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(activations(enc, img, "block1"), activations(enc, x[None], "block1"))
    with pytest.raises(ValueError, match="unknown layer"):
        activations(enc, x, "block9")


def test_top_channels_ranked_by_mean():
    acts = np.zeros((5, 2, 2), np.float32)
    acts[3] = 4
    acts[1] = 2
    acts[4, 0, 0] = 4  # mean 1
    assert top_channels(acts, 3) == [(3, 4.0), (1, 2.0), (4, 1.0)]
    assert len(top_channels(acts, 10)) == 5


def test_channel_montage_does_not_modify_inputs(enc):
    img = np.asarray(toy_image("blue", (3, 3)))
    acts = activations(enc, preprocess(toy_image("blue", (3, 3))), "block2")
    img0, acts0 = img.copy(), acts.copy()
    tiles = channel_montage(img, acts, [0, 5, 9])
    assert len(tiles) == 3 and all(t.shape == (224, 224, 3) for t in tiles)
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(acts, acts0)


def test_imagenet_top5_labels(enc):
    top = imagenet_top5(enc, preprocess(toy_image("red", (0, 0))))
    probs = [p for _, p in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    from captioning.encoders import imagenet_classes
    assert all(label in imagenet_classes() for label, _ in top)


def test_feature_visualisation_optimises_and_caches(enc, tmp_path):
    clear_memory_cache()
    # A channel alive on grey (a ReLU channel that is zero everywhere has no gradient to climb).
    ch = top_channels(activations(enc, torch.zeros(3, 64, 64), "block2"), 1)[0][0]
    kw = dict(size=64, steps=30, cache_dir=tmp_path)
    start = feature_visualisation(enc, "block2", ch, size=64, steps=0, use_cache=False)
    fv = feature_visualisation(enc, "block2", ch, **kw)
    assert fv.source == "computed" and fv.image.shape == (64, 64, 3) and fv.image.dtype == np.uint8
    assert fv.objective > start.objective, "optimisation must raise the channel's activation"
    pngs = list(tmp_path.rglob("*.png"))
    assert len(pngs) == 1 and "block2" in str(pngs[0])
    again = feature_visualisation(enc, "block2", ch, **kw)
    assert again.source == "memory"
    np.testing.assert_array_equal(again.image, fv.image)
    again.image[:] = 0  # a caller scribbling on its copy does not touch the cache
    clear_memory_cache()
    disk = feature_visualisation(enc, "block2", ch, **kw)
    assert disk.source == "disk"
    np.testing.assert_array_equal(disk.image, fv.image)
    fresh = feature_visualisation(enc, "block2", ch, size=64, steps=30, use_cache=False)
    np.testing.assert_array_equal(fresh.image, fv.image)  # same seed, same image
    other = feature_visualisation(enc, "block2", ch, size=64, steps=30, seed=1, use_cache=False)
    assert not np.array_equal(other.image, fv.image)
    with pytest.raises(ValueError, match="out of range"):
        feature_visualisation(enc, "block2", 99, size=32, steps=1, use_cache=False)


def test_real_encoder_layers_and_featvis(tmp_path):
    from captioning.encoders import EncoderUnavailable, build_encoder

    try:
        e = build_encoder("efficientnet-lite0")
    except EncoderUnavailable as err:
        pytest.skip(str(err))
    names = list_layers(e)
    assert names[0] == "stem" and names[-1] == "head" and len(names) == 18
    acts = activations(e, torch.zeros(3, 224, 224), "head")
    assert acts.shape == (1280, 7, 7)
    fv = feature_visualisation(e, "stage3.block4", 0, size=64, steps=3, cache_dir=tmp_path)
    assert fv.image.shape == (64, 64, 3)
    assert all(not p.requires_grad for p in e.parameters())
