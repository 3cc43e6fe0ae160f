"""Hostile model folders: truncated, oversized or lying safetensors files, configs of the wrong
types, vocabularies that do not fit the weights. Each must give a one-line BundleError naming
the file at fault, and none may allocate what the files claim (issue 21)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from captioning.bundle import (CONFIG, MAX_WEIGHTS_BYTES, VOCAB, WEIGHTS, BundleError, load_bundle,
                               read_safetensors_header, save_bundle)
from captioning.cli import main
from captioning.decoders import build_decoder
from captioning.vocab import Vocab

from conftest import REPO_ROOT

DIM = 16
WORDS = ["a", "red", "square", "blue", "circle", "on", "white"]


def make_bundle(folder: Path, kind: str = "show_attend_tell") -> Path:
    torch.manual_seed(0)
    vocab = Vocab(WORDS)
    cfg = dict(vocab_size=len(vocab), feature_dim=1280, embed_dim=DIM, hidden_dim=DIM, dropout=0.1)
    if kind == "show_attend_tell":
        cfg["attention_dim"] = DIM
    return save_bundle(folder, build_decoder(kind, cfg), vocab, "efficientnet-lite0", half=False)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "model")


def one_line_error(folder: Path, names: Path, *words: str) -> str:
    with pytest.raises(BundleError) as e:
        load_bundle(folder)
    msg = str(e.value)
    assert msg and "\n" not in msg, repr(msg)
    assert str(names) in msg, (names, msg)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert len(msg) < 600
    return msg


def st_file(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def test_the_fixture_bundle_loads(bundle):
    dec, vocab, cfg = load_bundle(bundle)
    assert len(vocab) == len(WORDS) + 4 and dec.config.hidden_dim == DIM


# --- safetensors: truncation, size, lying headers --------------------------------------------

@pytest.mark.parametrize("keep", [0, 1, 7, 8, 9, 40, 0.5, -1])
def test_truncated_weights_at_every_depth(bundle, keep):
    p = bundle / WEIGHTS
    data = p.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    p.write_bytes(data[:cut])
    one_line_error(bundle, p, "cannot read weights")


def test_trailing_bytes_after_the_tensors(bundle):
    p = bundle / WEIGHTS
    p.write_bytes(p.read_bytes() + b"\0" * 100)
    one_line_error(bundle, p, "cannot read weights")


def test_oversized_weights_file_is_refused_unread(bundle):
    """A 3 GB file (sparse: no disk used) is refused from its size, before anything is read."""
    p = bundle / WEIGHTS
    with p.open("r+b") as f:
        f.truncate(MAX_WEIGHTS_BYTES + (1 << 30))
    one_line_error(bundle, p, "over the limit")


@pytest.mark.parametrize("header, why", [
    ({"embed.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}, "claims bytes"),
    ({"embed.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, "needs"),
    ({"embed.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, "overlap"),
    ({"embed.weight": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, "malformed"),
    ({"embed.weight": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, "malformed"),
    ({"embed.weight": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}, "malformed"),
    ({"embed.weight": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 4]}}, "malformed"),
    ({"embed.weight": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "claims bytes"),
    ({"embed.weight": [1, 2, 3]}, "malformed"),
    ({"embed.weight": {"dtype": {"F32": 1}, "shape": [4], "data_offsets": [0, 16]}}, "malformed"),  # bench/fuzz.py
    ({"embed.weight": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, "malformed"),
    ([1, 2, 3], "not an object"),
])
def test_lying_headers(bundle, header, why):
    p = bundle / WEIGHTS
    p.write_bytes(st_file(header, b"\0" * 32))
    one_line_error(bundle, p, "cannot read weights", why)


@pytest.mark.parametrize("header_len", [2 ** 64 - 1, 2 ** 40, 10 ** 6, 101 << 20])
def test_header_length_larger_than_the_file(bundle, header_len):
    p = bundle / WEIGHTS
    p.write_bytes(st_file({}, b"\0" * 64, header_len=header_len))
    one_line_error(bundle, p, "the header claims")


def test_header_that_is_not_json(bundle):
    p = bundle / WEIGHTS
    raw = b"\xff\xfe not json at all"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    one_line_error(bundle, p, "not a safetensors file")
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than the parser's stack
    p.write_bytes(struct.pack("<Q", len(nested)) + nested)
    one_line_error(bundle, p, "not a safetensors file")


def test_integer_tensors_are_refused(bundle):
    dec, _, _ = load_bundle(bundle)
    sd = {k: v.to(torch.int32) for k, v in dec.state_dict().items()}
    save_file(sd, str(bundle / WEIGHTS))
    one_line_error(bundle, bundle / WEIGHTS, "not floating point")


def test_header_reader_agrees_with_safetensors(bundle):
    dec, _, _ = load_bundle(bundle)
    header = read_safetensors_header(bundle / WEIGHTS)
    assert {k: s for k, (_, s) in header.items()} == {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert {dt for dt, _ in header.values()} == {"F32"}


# --- config.json of the wrong types ---------------------------------------------------------

def edit_config(bundle: Path, fn) -> Path:
    p = bundle / CONFIG
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(version="2"), "version"),
    (lambda c: c.update(version=None), "version"),
    (lambda c: c.update(vocab_size="11"), "vocab_size"),
    (lambda c: c.update(vocab_size=True), "vocab_size"),
    (lambda c: c.update(vocab_size=10 ** 12), "vocab_size"),
    (lambda c: c.update(encoder="efficientnet-lite0"), "encoder"),
    (lambda c: c.update(encoder={"name": 5}), "encoder"),
    (lambda c: c.update(decoder=[]), "decoder"),
    (lambda c: c.update(decoder={"type": 5, "config": {}}), "decoder"),
    (lambda c: c.update(decoder={"type": "transformer", "config": {}}), "unknown decoder"),
    (lambda c: c["decoder"].update(config="big"), "decoder"),
    (lambda c: c["decoder"]["config"].update(hidden_dim="16"), "hidden_dim"),
    (lambda c: c["decoder"]["config"].update(hidden_dim=16.0), "hidden_dim"),
    (lambda c: c["decoder"]["config"].update(hidden_dim=-1), "hidden_dim"),
    (lambda c: c["decoder"]["config"].update(hidden_dim=10 ** 9), "hidden_dim"),
    (lambda c: c["decoder"]["config"].update(dropout="0.1"), "dropout"),
    (lambda c: c["decoder"]["config"].update(dropout=7), "dropout"),
    (lambda c: c["decoder"]["config"].update(deep_output="yes"), "deep_output"),
    (lambda c: c["decoder"]["config"].update(layers=3), "unknown field"),
    (lambda c: c.update(preprocessing={"size": "224"}), "size"),
    (lambda c: c.update(preprocessing=None), "preprocessing"),
    (lambda c: c["preprocessing"].update(mean=[0.5, 0.5]), "mean"),
    (lambda c: c.update(decoding={"length_penalty": "high"}), "decoding"),
    (lambda c: c.update(decoding=[1]), "decoding"),
    (lambda c: c.update(decoding={"rerank_pool": -3}), "decoding"),
    (lambda c: c.update(decoding={"beam_size": 2.5}), "decoding.beam_size"),
    (lambda c: c.update(decoding={"guide": [1]}), "guide settings"),
    (lambda c: c.update(decoding={"guide": {"on": True, "treshold": 0.3}}), "unknown setting(s) treshold"),
    (lambda c: c.update(decoding={"guide": {"on": "yes"}}), "guide.on"),
    (lambda c: c.update(decoding={"guide": {"conflict": -1}}), "guide.conflict"),
    (lambda c: c.pop("vocab_size"), "vocab_size"),
    (lambda c: c.update(tagger="../../etc"), "tagger"),
    (lambda c: c.update(tagger=["tagger"]), "tagger"),
])
def test_config_of_wrong_types(bundle, edit, words):
    p = edit_config(bundle, edit)
    one_line_error(bundle, p, words)


def test_the_tagger_a_model_names_must_be_there_and_read_its_encoder(bundle):
    """config.json ``tagger`` names a folder beside the model's, or else among the shipped models;
    in neither place, or a tagger trained on another encoder's features, the model does not load
    (one line, naming the file)."""
    import shutil

    from captioning.api import Captioner
    from captioning.paths import MODELS_DIR

    edit_config(bundle, lambda c: c.update(tagger="no-such-tagger"))
    with pytest.raises(BundleError) as e:
        Captioner.from_pretrained(bundle)
    assert "no-such-tagger: tagger folder not found" in str(e.value) and "\n" not in str(e.value)
    edit_config(bundle, lambda c: c.update(tagger="tagger"))
    assert Captioner.from_pretrained(bundle).tagger.concepts.names  # none beside it: the shipped one
    shutil.copytree(MODELS_DIR / "tagger", bundle.parent / "tagger")
    tj = bundle.parent / "tagger" / "tagger.json"
    tj.write_text(tj.read_text().replace('"efficientnet-lite0"', '"efficientnet-lite2"'))
    with pytest.raises(BundleError, match="reads efficientnet-lite2"):  # the one beside it comes first
        Captioner.from_pretrained(bundle)


def test_config_claiming_enormous_layers_allocates_nothing(bundle):
    """Sizes within the per-field limit whose product is terabytes: refused by comparing shapes
    built on the meta device with the weights' header, so nothing is allocated."""
    big = 1 << 20

    def edit(c):
        c["decoder"]["config"].update(embed_dim=big, hidden_dim=big, attention_dim=big)
    edit_config(bundle, edit)
    one_line_error(bundle, bundle / WEIGHTS, "do not match")


def test_config_that_is_not_json_or_too_big(bundle):
    p = bundle / CONFIG
    p.write_bytes(b"[" * 200_000)
    one_line_error(bundle, p, "not valid JSON")
    p.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(bundle, p, "not valid JSON")
    with p.open("r+b") as f:  # sparse: 64 MB of nothing on disk
        f.truncate(64 << 20)
    one_line_error(bundle, p, "over the limit")


# --- vocabularies that do not fit --------------------------------------------------------------

def test_vocab_shorter_than_the_weights(bundle):
    """vocab.json and config.json agree with each other but not with the decoder's output layer."""
    v = json.loads((bundle / VOCAB).read_text())
    v["itos"] = v["itos"][:-2]
    (bundle / VOCAB).write_text(json.dumps(v))
    edit_config(bundle, lambda c: c.update(vocab_size=len(v["itos"])))
    one_line_error(bundle, bundle / VOCAB, "predicts")


def test_vocab_and_weights_both_longer_than_config_says(bundle):
    v = json.loads((bundle / VOCAB).read_text())
    v["itos"].append("extra")
    (bundle / VOCAB).write_text(json.dumps(v))
    one_line_error(bundle, bundle / VOCAB, "words but")


@pytest.mark.parametrize("doc, words", [
    ({"itos": "abc"}, "itos"),
    ([1, 2], "itos"),
    ({"itos": ["<pad>", "<start>", "<end>", "<unk>", 5, "a", "b", "c", "d", "e", "f"]}, "string"),
    ({"itos": ["<pad>", "<start>", "<end>", "<unk>", "a", "a", "b", "c", "d", "e", "f"]}, "duplicate"),
    ({"itos": ["<pad>", "<start>", "<end>", "<unk>", "", "a", "b", "c", "d", "e", "f"]}, "string"),
    ({"itos": ["<pad>", "<start>", "<end>", "<unk>", "<end>", "a", "b", "c", "d", "e", "f"]}, "distinct"),
    ({"itos": ["a", "<start>", "<end>", "<unk>", "x", "a", "b", "c", "d", "e", "f"]}, "start with"),
])
def test_vocab_of_wrong_types(bundle, doc, words):
    (bundle / VOCAB).write_text(json.dumps(doc))
    one_line_error(bundle, bundle / VOCAB, words)


# --- the command line, and memory ---------------------------------------------------------------

def test_cli_hostile_model_one_line(bundle, tmp_path, capsys):
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    (bundle / WEIGHTS).write_bytes(st_file({"fc.weight": {"dtype": "F32", "shape": [1 << 30, 1 << 30],
                                                           "data_offsets": [0, 1 << 62]}}))
    rc = main(["caption", str(img), "--model", str(bundle)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and WEIGHTS in lines[0] and "Traceback" not in err


def test_hostile_bundles_stay_within_memory(tmp_path):
    """In a fresh process with a 3 GB cap on its data segment (a bug would get MemoryError, not
    OOM-kill CI): load a dozen hostile bundles; each must be a BundleError, and the process's
    peak memory must grow by well under the gigabytes the files claim."""
    script = textwrap.dedent(f"""
        import json, resource, struct, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})
        from test_hostile_bundles import make_bundle, st_file
        from captioning.bundle import load_bundle, BundleError, CONFIG, WEIGHTS
        root = Path(sys.argv[1])
        good = make_bundle(root / "good")
        load_bundle(good)
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cases = []
        for i, dims in enumerate([dict(hidden_dim=20000, embed_dim=20000), dict(vocab_size=1 << 20, embed_dim=4096),
                                  dict(attention_dim=1 << 20, feature_dim=1 << 20)]):
            b = make_bundle(root / f"big{{i}}")
            c = json.loads((b / CONFIG).read_text()); c["decoder"]["config"].update(dims)
            if "vocab_size" in dims:
                c["vocab_size"] = dims["vocab_size"]
                v = json.loads((b / "vocab.json").read_text())
                v["itos"] += [f"w{{k}}" for k in range(dims["vocab_size"] - len(v["itos"]))]
                (b / "vocab.json").write_text(json.dumps(v))
            (b / CONFIG).write_text(json.dumps(c))
            cases.append(b)
        for i, h in enumerate([{{"embed.weight": {{"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}}},
                               {{"embed.weight": {{"dtype": "F64", "shape": [1 << 16, 1 << 16], "data_offsets": [0, 32 << 30]}}}}]):
            b = make_bundle(root / f"hdr{{i}}")
            (b / WEIGHTS).write_bytes(st_file(h, b"\\0" * 4096))
            cases.append(b)
        b = make_bundle(root / "hugehdr")
        (b / WEIGHTS).write_bytes(struct.pack("<Q", 2 ** 63) + b"{{}}")
        cases.append(b)
        errors = 0
        for b in cases:
            try:
                load_bundle(b)
            except BundleError as e:
                errors += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"cases": len(cases), "errors": errors, "grew_mb": (peak - base) / 1024}}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(res)
    assert res["errors"] == res["cases"] == 6, res
    assert res["grew_mb"] < 300, res


def test_matcher_claiming_enormous_layers_allocates_nothing(bundle):
    """The matcher in a model folder is checked like the decoder: its sizes, built on the meta
    device, against its weights' header, before it is built for real."""
    from captioning.api import Captioner
    from captioning.encoders import build_encoder
    from captioning.matcher import MATCHER_CONFIG, MATCHER_WEIGHTS, Matcher, MatcherConfig, save_matcher

    torch.manual_seed(0)
    save_matcher(bundle, Matcher(MatcherConfig(vocab_size=len(WORDS) + 4, feature_dim=1280, embed_dim=8, joint_dim=8)))
    enc = build_encoder("efficientnet-lite0")
    assert Captioner.from_pretrained(bundle, encoder=enc).matcher is not None
    cp = bundle / MATCHER_CONFIG
    doc = json.loads(cp.read_text())
    doc["config"].update(embed_dim=1 << 20, joint_dim=1 << 20)  # terabytes, if built
    cp.write_text(json.dumps(doc))
    with pytest.raises(BundleError) as e:
        Captioner.from_pretrained(bundle, encoder=enc)
    assert str(bundle / MATCHER_WEIGHTS) in str(e.value) and "do not match" in str(e.value)
    doc["config"]["embed_dim"] = "eight"
    cp.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="matcher config"):
        Captioner.from_pretrained(bundle, encoder=enc)
