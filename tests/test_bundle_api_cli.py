"""Encoders, model bundles, the Captioner API and the command line, with a small untrained decoder."""
from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from captioning.api import Captioner
from captioning.bundle import CONFIG, VOCAB, WEIGHTS, BundleError, load_bundle, read_config, save_bundle
from captioning.cli import main
from captioning.decoders import build_decoder
from captioning.decoding import Ensemble
from captioning.encoders import ENCODERS, EncoderUnavailable, build_encoder, imagenet_classes
from captioning.images import ImageError, Preprocessing
from captioning.vocab import Vocab, detokenize

from conftest import KINDS, REPO_ROOT, draw

DIM = 24


def small_decoder(kind: str = "show_attend_tell", vocab_size: int = 20, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, feature_dim=1280, embed_dim=DIM, hidden_dim=DIM, dropout=0.5, **extra)
    if kind == "show_attend_tell":
        cfg.setdefault("attention_dim", DIM)
    if kind == "merge":
        cfg.setdefault("merge_dim", DIM)
    d = build_decoder(kind, cfg)
    with torch.no_grad():  # make the untrained decoder finish its captions now and then
        d.fc.bias[2] += 1.5
    return d.eval()


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab.build([c for caps in KINDS.values() for c in caps], min_count=1)


@pytest.fixture(scope="module")
def decoder(vocab):
    return small_decoder(vocab_size=len(vocab))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, decoder, vocab) -> Path:
    """A float32 bundle of the untrained decoder (read-only for the tests)."""
    return save_bundle(tmp_path_factory.mktemp("bundles") / "sat", decoder, vocab, "efficientnet-lite0", half=False)


@pytest.fixture
def bundle_copy(tmp_path, decoder, vocab) -> Path:
    """A fresh bundle a test may break."""
    return save_bundle(tmp_path / "model", decoder, vocab, "efficientnet-lite0", half=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("imgs")
    out = []
    for i, kind in enumerate(KINDS):
        p = d / f"{kind}.png"
        draw(kind, i, size=96).save(p)
        out.append(p)
    return out


def same_captions(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert [c.tokens for c in ra.captions] == [c.tokens for c in rb.captions]
        assert [c.text for c in ra.captions] == [c.text for c in rb.captions]
        assert np.allclose([c.logprob for c in ra.captions], [c.logprob for c in rb.captions], atol=1e-5)


# --- encoders -----------------------------------------------------------------------------------

def test_encoder_outputs(encoder):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        grid, pooled = encoder(x)
        logits = encoder.classify(x[:1])
    assert grid.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    assert torch.allclose(pooled, grid.mean(1), atol=1e-5)
    assert encoder.feature_dim == 1280 and encoder.name == "efficientnet-lite0"
    assert logits.shape == (1, 1000)
    assert len(imagenet_classes()) == 1000
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_encoder_stages(encoder):
    st = encoder.stages()
    names = list(st)
    assert names[0] == "stem" and names[-1] == "head"
    blocks = [n for n in names if n.startswith("stage")]
    assert len(blocks) == len(encoder.net._blocks)
    stage_nums = [int(n.split(".")[0][5:]) for n in blocks]
    assert stage_nums == sorted(stage_nums) and stage_nums[0] == 1 and stage_nums[-1] >= 6
    assert all(isinstance(m, torch.nn.Module) for m in st.values())


def test_encoder_classifies_a_real_photo(encoder, vocab, decoder):
    """The ImageNet head works: a plain red image and noise get different, confident-ish labels."""
    cap = Captioner(encoder, decoder, vocab)
    top = cap.classify(Image.new("RGB", (224, 224), (200, 30, 30)), k=5)
    assert len(top) == 5 and all(isinstance(n, str) for n, _ in top)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert cap.classify(Image.fromarray(noise), k=1)[0][0] != top[0][0]


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_pretrained_encoders_see_the_cat(name):
    """Both shipped-weight encoders give a 7x7x1280 grid at 224 px and recognise a real photo
    (scikit-image's Chelsea) as a cat: the ImageNet weights really loaded, with the right preprocessing."""
    from captioning.images import preprocess
    from captioning.samples import load_sample

    enc = build_encoder(name)
    x = preprocess(load_sample("chelsea (cat)"))[None]
    with torch.no_grad():
        grid, pooled = enc(x)
        top3 = [imagenet_classes()[i] for i in enc.classify(x).topk(3).indices[0]]
    assert grid.shape == (1, 49, 1280) and pooled.shape == (1, 1280)
    assert any(c in top3 for c in ("tabby", "tiger cat", "Egyptian cat")), top3


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(KeyError) as e:
        build_encoder("vgg16")
    for name in ENCODERS:
        assert name in str(e.value)


def test_resnet_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(EncoderUnavailable) as e:
        build_encoder("resnet50")
    assert str(tmp_path) in str(e.value) and "resnet50-0676ba61.pth" in str(e.value)


# --- bundles ------------------------------------------------------------------------------------

def test_bundle_layout(bundle, vocab):
    assert sorted(p.name for p in bundle.iterdir()) == sorted([CONFIG, VOCAB, WEIGHTS])
    cfg = json.loads((bundle / CONFIG).read_text())
    assert cfg["format"] == "captioning-bundle" and cfg["encoder"] == {"name": "efficientnet-lite0"}
    assert cfg["decoder"]["type"] == "show_attend_tell" and cfg["decoder"]["config"]["hidden_dim"] == DIM
    assert cfg["vocab_size"] == len(vocab) and cfg["dtype"] == "float32"
    assert Preprocessing.from_dict(cfg["preprocessing"]) == Preprocessing()
    assert read_config(bundle) == cfg
    # No temporary folders are left beside it.
    assert [p.name for p in bundle.parent.iterdir()] == ["sat"]


def test_round_trip_float32(bundle, decoder, vocab, encoder, images):
    dec, voc, cfg = load_bundle(bundle)
    assert voc.itos == vocab.itos
    assert not dec.training
    a, b = decoder.state_dict(), dec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    orig = Captioner(encoder, decoder, vocab).caption(images, beam_size=3, nbest=2)
    loaded = Captioner.from_pretrained(bundle, encoder=encoder).caption(images, beam_size=3, nbest=2)
    same_captions(orig, loaded)


def test_round_trip_half(tmp_path, decoder, vocab, encoder, images):
    folder = save_bundle(tmp_path / "half", decoder, vocab, "efficientnet-lite0")  # float16 by default
    sd = load_file(str(folder / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    assert json.loads((folder / CONFIG).read_text())["dtype"] == "float16"
    dec, _, _ = load_bundle(folder)
    rounded = small_decoder(vocab_size=len(vocab))
    rounded.load_state_dict({k: v.half().float() for k, v in decoder.state_dict().items()})
    for k, v in dec.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, rounded.state_dict()[k])
    same_captions(Captioner(encoder, rounded, vocab).caption(images), Captioner(encoder, dec, vocab).caption(images))


def test_resave_keeps_other_files(tmp_path, decoder, vocab):
    folder = save_bundle(tmp_path / "m", decoder, vocab, "efficientnet-lite0", half=False)
    (folder / "metrics.json").write_text('{"BLEU-4": 0.2}')
    (folder / "curves").mkdir()
    (folder / "curves" / "loss.csv").write_text("1,2\n")
    other = small_decoder(vocab_size=len(vocab), seed=5)
    save_bundle(folder, other, vocab, "efficientnet-lite0", half=False, extra={"training": {"epoch": 3}})
    assert (folder / "metrics.json").read_text() == '{"BLEU-4": 0.2}'
    assert (folder / "curves" / "loss.csv").is_file()
    dec, _, cfg = load_bundle(folder)
    assert cfg["training"] == {"epoch": 3}
    assert torch.equal(dec.fc.weight, other.fc.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("name", [CONFIG, VOCAB, WEIGHTS])
def test_missing_file(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert str(bundle_copy / name) in str(e.value) and "missing" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="model folder not found"):
        load_bundle(tmp_path / "nothing")


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("content,words", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else"}', "not a captioning-bundle config"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_corrupt_config(bundle_copy, content, words):
    p = bundle_copy / CONFIG
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    msg = _one_line(e)
    assert str(p) in msg and words in msg


def test_config_version_and_fields(bundle_copy):
    p = bundle_copy / CONFIG
    cfg = json.loads(p.read_text())
    p.write_text(json.dumps(dict(cfg, version=99)))
    with pytest.raises(BundleError, match="newer"):
        load_bundle(bundle_copy)
    p.write_text(json.dumps({k: v for k, v in cfg.items() if k != "decoder"}))
    with pytest.raises(BundleError, match="missing field 'decoder'"):
        load_bundle(bundle_copy)
    p.write_text(json.dumps(dict(cfg, decoder={"type": "transformer", "config": {}})))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert str(p) in _one_line(e) and "bad decoder section" in str(e.value)
    p.write_text(json.dumps(dict(cfg, decoder={"type": "merge", "config": {"vocab_size": 5, "colour": "red"}})))
    with pytest.raises(BundleError, match="bad decoder section"):
        load_bundle(bundle_copy)


def test_corrupt_vocab(bundle_copy):
    p = bundle_copy / VOCAB
    p.write_text("[1, 2")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert str(p) in _one_line(e)
    p.write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert str(p) in _one_line(e)


def test_vocab_size_mismatch(bundle_copy, vocab):
    Vocab(vocab.itos[4:] + ["extra"]).save(bundle_copy / VOCAB)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    msg = _one_line(e)
    assert str(bundle_copy / VOCAB) in msg and f"{len(vocab) + 1} words" in msg


def test_truncated_weights(bundle_copy):
    p = bundle_copy / WEIGHTS
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert str(p) in _one_line(e) and "cannot read weights" in str(e.value)
    p.write_bytes(b"")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert str(p) in _one_line(e)


def test_weights_do_not_match_config(bundle_copy, decoder):
    p = bundle_copy / CONFIG
    cfg = json.loads(p.read_text())
    cfg["decoder"]["config"]["hidden_dim"] = DIM * 2  # the weights are for DIM
    p.write_text(json.dumps(cfg))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    msg = _one_line(e)
    assert str(bundle_copy / WEIGHTS) in msg and "do not match" in msg and "wrong shape" in msg
    # A missing tensor is named too.
    p.write_text(json.dumps(dict(cfg, decoder={"type": "show_attend_tell", "config": decoder.config.to_dict()})))
    sd = {k: v.contiguous() for k, v in decoder.state_dict().items() if k != "fc.bias"}
    save_file(sd, str(bundle_copy / WEIGHTS))
    with pytest.raises(BundleError, match="fc.bias"):
        load_bundle(bundle_copy)
    # So is a decoder of another type.
    other = small_decoder("show_tell", vocab_size=decoder.config.vocab_size)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(bundle_copy / WEIGHTS))
    with pytest.raises(BundleError, match="unexpected"):
        load_bundle(bundle_copy)


class _Payload:
    """Unpickling this opens (creates) a file: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_disguised_as_safetensors_does_not_run(bundle_copy, tmp_path, how):
    marker = tmp_path / "pwned"
    proof = tmp_path / "proof"
    if how == "pickle":
        data = pickle.dumps({"fc.weight": _Payload(str(marker))})
        f = builtins.open(proof, "w")  # the payload works when unpickled ...
        f.close()
        proof.unlink()
        pickle.loads(pickle.dumps(_Payload(str(proof)))).close()
        assert proof.is_file()
        (bundle_copy / WEIGHTS).write_bytes(data)
    else:
        torch.save({"fc.weight": _Payload(str(marker))}, bundle_copy / WEIGHTS)
        torch.save(_Payload(str(proof)), tmp_path / "p.pt")
        torch.load(tmp_path / "p.pt", weights_only=False).close()
        assert proof.is_file()
    with pytest.raises(BundleError) as e:  # ... but loading the bundle does not unpickle it
        load_bundle(bundle_copy)
    assert str(bundle_copy / WEIGHTS) in _one_line(e)
    assert not marker.exists()


# --- the Captioner API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioner(bundle, encoder) -> Captioner:
    return Captioner.from_pretrained(bundle, encoder=encoder)


def test_caption_paths_pil_and_bytes(captioner, images):
    by_path = captioner.caption(images, beam_size=4, nbest=3)
    by_str = captioner.caption([str(p) for p in images], beam_size=4, nbest=3)
    by_pil = captioner.caption([Image.open(p) for p in images], beam_size=4, nbest=3)
    by_bytes = captioner.caption([p.read_bytes() for p in images], beam_size=4, nbest=3)
    assert len(by_path) == len(images)
    for r in (by_str, by_pil, by_bytes):
        same_captions(by_path, r)
    for r in by_path:
        assert len(r.captions) == 3
        scores = [c.score for c in r.captions]
        assert scores == sorted(scores, reverse=True)
        assert r.text == r.captions[0].text and r.tokens == r.captions[0].tokens
        for c in r.captions:
            assert c.words == [captioner.vocab.itos[i] for i in c.tokens]
            assert c.text == detokenize(c.words)
            assert all(i > 3 for i in c.tokens)  # no specials, no <unk>
            steps = len(c.tokens) + (1 if c.finished else 0)
            assert c.attention.shape == (steps, 7, 7)  # attention comes back as a 7x7 map per word
    # A single image (not in a list) gives a list of one result.
    one = captioner.caption(images[0], beam_size=4, nbest=3)
    assert len(one) == 1 and one[0].text == by_path[0].text
    one = captioner.caption(Image.open(images[1]), beam_size=4, nbest=3)
    assert len(one) == 1 and one[0].text == by_path[1].text


def test_caption_batches_give_the_same_result(captioner, images):
    all_at_once = captioner.caption(images, beam_size=3)
    in_twos = captioner.caption(images, beam_size=3, batch_size=2)
    same_captions(all_at_once, in_twos)


def test_caption_methods(captioner, images):
    greedy = captioner.caption(images, method="greedy")
    beam1 = captioner.caption(images, beam_size=1)
    for g, b in zip(greedy, beam1):
        assert len(g.captions) == 1
        assert g.tokens[: len(b.tokens)] == b.tokens  # one beam follows the greedy path
    s1 = captioner.caption(images, method="sample", seed=3, temperature=1.5)
    s2 = captioner.caption(images, method="sample", seed=3, temperature=1.5)
    assert [r.tokens for r in s1] == [r.tokens for r in s2]
    lat = captioner.caption(images[:2], beam_size=2, return_lattice=True)
    assert all(r.lattice and set(r.lattice[0]) == {"parent", "token", "logprob", "finished", "kept"} for r in lat)
    with pytest.raises(ValueError, match="nbest"):
        captioner.caption(images, beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="unknown method"):
        captioner.caption(images, method="telepathy")


def test_caption_features_matches_caption(captioner, images):
    grid, pooled = captioner.encode(captioner.pixels(images))
    assert grid.shape == (len(images), 49, 1280)
    same_captions(captioner.caption(images, beam_size=3, nbest=2),
                  captioner.caption_features(grid, pooled, beam_size=3, nbest=2))


def test_caption_bad_image_raises(captioner, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="bad.jpg"):
        captioner.caption(bad)


def test_ensemble_from_pretrained(tmp_path, bundle, vocab, encoder, images):
    other = save_bundle(tmp_path / "st", small_decoder("show_tell", vocab_size=len(vocab), seed=3), vocab,
                        "efficientnet-lite0", half=False)
    ens = Captioner.from_pretrained([bundle, other], encoder=encoder)
    assert isinstance(ens.decoder, Ensemble) and len(ens.decoder.members) == 2
    res = ens.caption(images, beam_size=3, nbest=2)
    assert all(len(r.captions) == 2 for r in res)
    # Ensembling a model with itself changes nothing.
    self_ens = Captioner.from_pretrained([bundle, bundle], encoder=encoder)
    same_captions(Captioner.from_pretrained(bundle, encoder=encoder).caption(images), self_ens.caption(images))
    # Members must share a vocabulary.
    v2 = Vocab(vocab.itos[5:] + [vocab.itos[4]])
    odd = save_bundle(tmp_path / "odd", small_decoder(vocab_size=len(v2)), v2, "efficientnet-lite0")
    with pytest.raises(ValueError, match="vocabulary differs"):
        Captioner.from_pretrained([bundle, odd], encoder=encoder)


# --- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("bad") / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return p


def test_cli_json_good_and_bad(bundle, images, bad_image, capsys):
    rc = main(["caption", str(images[0]), str(bad_image), str(images[1]), "--model", str(bundle), "--json",
               "--nbest", "2"])
    out, err = capsys.readouterr()
    assert rc != 0
    doc = json.loads(out)
    assert doc["model"] == str(bundle)
    res = doc["results"]
    assert [r["image"] for r in res] == [str(images[0]), str(bad_image), str(images[1])]
    for r in (res[0], res[2]):
        assert "error" not in r and len(r["captions"]) == 2
        assert {"text", "logprob", "score", "finished"} <= set(r["captions"][0])
    assert "captions" not in res[1] and "broken.jpg" in res[1]["error"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.jpg" in lines[0]
    assert "Traceback" not in err
    # The same captions as the API gives.
    cap = Captioner.from_pretrained(bundle)
    assert res[0]["captions"][0]["text"] == cap.caption(images[0], beam_size=3, nbest=2)[0].text


def test_cli_text_output(bundle, images, capsys):
    assert main(["caption", *map(str, images[:2]), "--model", str(bundle)]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images[0]}\t")
    assert main(["caption", str(images[0]), "--model", str(bundle), "--nbest", "3", "--beam", "3"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == str(images[0]) and len(out.strip().splitlines()) == 4


def test_cli_missing_model(tmp_path, images, capsys):
    rc = main(["caption", str(images[0]), "--model", str(tmp_path / "no-model")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model folder not found" in lines[0] and "Traceback" not in err


def test_cli_corrupt_model(bundle_copy, images, capsys):
    (bundle_copy / WEIGHTS).write_bytes(pickle.dumps({"a": 1}))
    rc = main(["caption", str(images[0]), "--model", str(bundle_copy)])
    _, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and WEIGHTS in err


@pytest.fixture(scope="module")
def fails_inside_decoding(tmp_path_factory) -> list[Path]:
    """Files whose header reads fine and whose decoding fails: a half-cut JPEG, a PNG cut in its
    pixel data, and the corrupt GIF the fuzzer found (IndexError inside Pillow's GIF reader)."""
    import io

    d = tmp_path_factory.mktemp("inside")
    a = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    out = []
    for fmt, name in (("JPEG", "half.jpg"), ("PNG", "cut.png")):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        Image.open(io.BytesIO(data)).size  # the header alone is fine
        (d / name).write_bytes(data)
        out.append(d / name)
    gif = d / "bad.gif"
    gif.write_bytes((Path(__file__).parent / "data" / "crashes" / "gif_n_frames_indexerror.gif").read_bytes())
    out.append(gif)
    return out


def test_cli_subprocess(bundle, images, bad_image, fails_inside_decoding, tmp_path):
    """The real entry point: exit code, one JSON document on stdout, one line on stderr per bad
    file, and every good file captioned whatever comes before or after it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    bad_gif, half_jpg, cut_png = fails_inside_decoding[2], fails_inside_decoding[0], fails_inside_decoding[1]
    order = [bad_gif, images[2], bad_image, half_jpg, images[0], cut_png]
    p = subprocess.run([sys.executable, "-m", "captioning", "caption", *map(str, order),
                        "--model", str(bundle), "--json"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    doc = json.loads(p.stdout)
    res = {r["image"]: r for r in doc["results"]}
    assert [r["image"] for r in doc["results"]] == [str(x) for x in order]
    for good in (images[2], images[0]):
        assert res[str(good)]["captions"][0]["text"]
    for bad in (bad_gif, bad_image, half_jpg, cut_png):
        assert bad.name in res[str(bad)]["error"] and "captions" not in res[str(bad)]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 4 and all(ln.startswith("error: ") for ln in lines), p.stderr
    assert [next(b.name for b in (bad_gif, bad_image, half_jpg, cut_png) if b.name in ln) for ln in lines] == \
        ["bad.gif", "broken.jpg", "half.jpg", "cut.png"]
    assert "IndexError" in lines[0]  # the reason travels with the file name


def test_cli_text_mode_goes_on_after_bad_files(bundle, images, fails_inside_decoding, capsys):
    rc = main(["caption", str(fails_inside_decoding[2]), str(images[1]), str(fails_inside_decoding[0]),
               str(images[3]), "--model", str(bundle)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert [ln.split("\t")[0] for ln in out.strip().splitlines()] == [str(images[1]), str(images[3])]
    assert len(err.strip().splitlines()) == 2 and "Traceback" not in err


def test_cli_isolates_failures_after_decoding(bundle, images, capsys, monkeypatch):
    """A failure at a later stage (encoder, beam search) for one image costs only that image."""
    real = Captioner.caption_features
    calls = {"n": 0}

    def flaky(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory\n(pretend)")
        return real(self, *args, **kw)

    monkeypatch.setattr(Captioner, "caption_features", flaky)
    rc = main(["caption", *map(str, images[:3]), "--model", str(bundle), "--json"])
    out, err = capsys.readouterr()
    assert rc == 1
    res = json.loads(out)["results"]
    assert "captions" in res[0] and "captions" in res[2]
    assert "RuntimeError" in res[1]["error"] and str(images[1]) in res[1]["error"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(images[1]) in lines[0] and "out of memory (pretend)" in lines[0]


def test_cli_bad_settings_fail_once_before_any_image(bundle, images, capsys):
    rc = main(["caption", *map(str, images[:3]), "--model", str(bundle), "--beam", "2", "--nbest", "3"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--nbest" in err


def test_bundle_decoding_default(tmp_path, decoder, vocab, encoder, images):
    """A bundle's recorded length penalty is what caption() and evaluate use unless told otherwise;
    an ensemble (whose members may disagree) uses none."""
    from captioning.lab.modelcard import set_decoding

    folder = save_bundle(tmp_path / "m", decoder, vocab, "efficientnet-lite0", half=False)
    assert Captioner.from_pretrained(folder, encoder=encoder).default_length_penalty == 0.0
    set_decoding(folder, 3, 2.0)
    cap = Captioner.from_pretrained(folder, encoder=encoder)
    assert cap.default_length_penalty == 2.0 and read_config(folder)["decoding"] == {"beam_size": 3, "length_penalty": 2.0}
    plain = cap.caption(images, beam_size=3, nbest=3)
    same_captions(plain, cap.caption(images, beam_size=3, nbest=3, length_penalty=2.0))
    # A penalty of 2 favours long captions strongly enough to change some ranking here.
    zero = cap.caption(images, beam_size=3, nbest=3, length_penalty=0.0)
    assert [[c.score for c in r.captions] for r in zero] != [[c.score for c in r.captions] for r in plain]
    assert Captioner.from_pretrained([folder, folder], encoder=encoder).default_length_penalty == 0.0


def test_shipped_models_load_and_fit_the_weight_budget():
    """Every folder in assets/models loads (decoder and any matcher) from JSON + safetensors only,
    and all shipped weights together stay within the 60 MB budget (issue 3)."""
    from captioning.bundle import MODELS_DIR
    from captioning.matcher import load_matcher

    folders = sorted(p for p in MODELS_DIR.iterdir() if (p / CONFIG).is_file())
    assert {p.name for p in folders} >= {"show_attend_tell", "show_tell", "merge"}
    total = 0
    for f in folders:
        load_bundle(f)
        load_matcher(f)
        weights = [p for p in f.iterdir() if p.suffix not in (".json", ".md", ".csv")]
        assert all(p.suffix == ".safetensors" for p in weights), weights
        total += sum(p.stat().st_size for p in weights)
    assert total <= 60e6, f"shipped weights {total / 1e6:.1f} MB"
