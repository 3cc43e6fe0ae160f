"""Tokenizer, vocabulary and the three dataset readers (plus the real Flickr8k when present)."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from captioning.lab.data import DataError, load_dataset, read_csv, read_flickr8k, read_karpathy_json
from captioning.vocab import END, PAD, SPECIALS, START, UNK, Vocab, detokenize, tokenize

from conftest import EXPECTED_SKIPS

# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenize_examples():
    assert tokenize("A dog, running.") == ["a", "dog", ",", "running", "."]
    assert tokenize("Don't wear a T-shirt!") == ["don't", "wear", "a", "t-shirt", "!"]
    assert tokenize("  Two   dogs\tplay ") == ["two", "dogs", "play"]
    assert tokenize("3 kids (ages 5-7) play") == ["3", "kids", "(", "ages", "5-7", ")", "play"]
    assert tokenize("") == []
    # a hyphen or apostrophe only counts inside a word
    assert tokenize("dogs' toys - 'fun'") == ["dogs", "'", "toys", "-", "'", "fun", "'"]


@pytest.mark.parametrize("text", [
    "a dog, running.",
    "a man in a t-shirt doesn't smile!",
    "two dogs play in the snow .",
    "what is this? a cat; maybe: a dog",
])
def test_detokenize_inverts_tokenize(text):
    toks = tokenize(text)
    out = detokenize(toks)
    assert tokenize(out) == toks
    if " ." not in text:
        assert out == text  # ordinary spacing comes back exactly


def test_detokenize_spacing():
    assert detokenize(["a", "dog", ",", "running", "."]) == "a dog, running."
    assert detokenize([]) == ""
    assert detokenize(["hello"]) == "hello"


# --- vocabulary --------------------------------------------------------------------------------

CAPS = ["A dog runs.", "a dog jumps", "A cat runs", "the dog, the cat", "zebra"]


def test_specials_at_fixed_ids():
    v = Vocab.build(CAPS, min_count=1)
    assert v.itos[:4] == list(SPECIALS) == [PAD, START, END, UNK]
    assert (v.pad, v.start, v.end, v.unk) == (0, 1, 2, 3)
    assert [v.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]


def test_build_min_count_and_order():
    v = Vocab.build(CAPS, min_count=2)
    # counts: a 3, dog 3, cat 2, runs 2, the 2; jumps/zebra 1; punctuation dropped.
    # Most frequent first, ties alphabetical.
    assert v.itos[4:] == ["a", "dog", "cat", "runs", "the"]
    assert "zebra" not in v and "," not in v and "." not in v
    v1 = Vocab.build(CAPS, min_count=1)
    assert {"jumps", "zebra"} <= set(v1.itos)
    assert len(v1) == 4 + 7
    assert len(Vocab.build(CAPS, min_count=4)) == 4  # nothing is that frequent
    kept = Vocab.build(CAPS, min_count=1, drop_punct=False)
    assert "," in kept and "." in kept


def test_encode_decode_round_trip():
    v = Vocab.build(CAPS, min_count=1)
    ids = v.encode("A dog runs.")
    assert ids[0] == v.start and ids[-1] == v.end
    assert ids[1:-1] == [v.stoi["a"], v.stoi["dog"], v.stoi["runs"]]  # "." dropped
    assert v.decode(ids) == "a dog runs"
    assert v.encode("a dog", add_special=False) == [v.stoi["a"], v.stoi["dog"]]
    for c in CAPS:
        assert v.decode(v.encode(c)) == " ".join(t for t in tokenize(c) if t.isalnum())
    # unknown words map to <unk> and come back as <unk>
    ids = v.encode("a purple dog")
    assert ids[2] == v.unk
    assert v.decode(ids) == "a <unk> dog"


def test_decode_stops_at_end_and_skips_pad_start():
    v = Vocab.build(CAPS, min_count=1)
    d, c = v.stoi["dog"], v.stoi["cat"]
    assert v.decode_tokens([v.start, d, v.pad, c, v.end, d, d]) == ["dog", "cat"]
    assert v.decode([d, c]) == "dog cat"  # no <end>: everything
    assert v.decode([v.end, d]) == ""


def test_json_save_load(tmp_path):
    v = Vocab.build(CAPS, min_count=1)
    p = tmp_path / "vocab.json"
    v.save(p)
    assert json.loads(p.read_text())["itos"] == v.itos
    w = Vocab.load(p)
    assert w.itos == v.itos and w.stoi == v.stoi and len(w) == len(v)
    assert w.encode("the cat runs") == v.encode("the cat runs")


def test_load_rejects_bad_vocab(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"itos": ["dog", "<pad>", "<start>", "<end>", "<unk>"]}))
    with pytest.raises(ValueError, match="bad.json"):
        Vocab.load(p)
    p.write_text(json.dumps({"itos": list(SPECIALS) + ["dog", "dog"]}))
    with pytest.raises(ValueError, match="duplicate"):
        Vocab.load(p)


def test_unicode_survives_save_load(tmp_path):
    v = Vocab(["café", "naïve"])
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").itos == v.itos


# --- Flickr8k reader on the synthetic folder ----------------------------------------------

def test_read_flickr8k_synthetic(synth, capsys):
    ds = read_flickr8k(synth.root)
    err = capsys.readouterr().err
    assert dict(ds.skipped) == EXPECTED_SKIPS
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "skipped 3 lines" in lines[0] and "Flickr8k.token.txt" in lines[0]
    assert ds.image_dir == synth.image_dir
    assert ds.captions == synth.captions  # the empty caption of red_square_00 is not among them
    assert ds.splits == synth.splits
    assert sorted(ds.split("all")) == sorted(synth.captions)
    assert all(ds.path(n).is_file() for n in ds.captions)
    assert "missing_image_99.png" not in ds.captions
    with pytest.raises(DataError, match="no split 'val'"):
        ds.split("val")


def test_flickr8k_split_listing_unknown_image(tmp_path, synth):
    root = tmp_path / "f8k"
    (root / "Images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "Images" / "a.jpg")
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\na.jpg#1\ta black dog\n")
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\nghost.jpg\n")
    ds = read_flickr8k(root)
    assert ds.splits == {"train": ["a.jpg"]}
    assert ds.skipped == {"train-split images without captions": 1}
    assert ds.captions == {"a.jpg": ["a dog", "a black dog"]}


def test_flickr8k_errors_name_the_place(tmp_path):
    with pytest.raises(DataError, match="Flickr8k.token.txt"):
        read_flickr8k(tmp_path)
    (tmp_path / "Flickr8k.token.txt").write_text("")
    with pytest.raises(DataError, match="Images"):
        read_flickr8k(tmp_path)


def test_load_dataset_detects_flickr8k(synth):
    ds = load_dataset(synth.root)
    assert ds.captions == synth.captions


# --- Karpathy JSON -----------------------------------------------------------------------------

def _karpathy(tmp_path, filepath: str | None = None):
    img_dir = tmp_path / "Images"
    (img_dir / (filepath or "")).mkdir(parents=True, exist_ok=True)
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    for n in names:
        Image.new("RGB", (4, 4)).save(img_dir / (filepath or "") / n)
    splits = ["train", "restval", "val", "test", "train"]
    images = []
    for i, (n, s) in enumerate(zip(names, splits)):
        entry = {"filename": n, "split": s, "imgid": i,
                 "sentences": [{"raw": f"Caption {i} one.", "tokens": ["caption", str(i), "one"]},
                               {"tokens": ["tokens", "only", str(i)]}]}
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
    images.append({"filename": "ghost.jpg", "split": "train", "sentences": [{"raw": "not there"}]})
    images.append({"split": "train", "sentences": [{"raw": "no file name"}]})
    Image.new("RGB", (4, 4)).save(img_dir / (filepath or "") / "f.jpg")
    images.append({"filename": "f.jpg", "split": "train", "sentences": [{"raw": "   "}], **(
        {"filepath": filepath} if filepath else {})})
    p = tmp_path / "dataset_flickr8k.json"
    p.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return p


def test_read_karpathy_json(tmp_path):
    p = _karpathy(tmp_path)
    ds = read_karpathy_json(p)
    assert ds.image_dir == tmp_path / "Images"
    assert ds.splits == {"train": ["a.jpg", "b.jpg", "e.jpg"], "dev": ["c.jpg"], "test": ["d.jpg"]}
    assert ds.captions["b.jpg"] == ["Caption 1 one.", "tokens only 1"]
    assert len(ds.captions) == 5
    assert ds.skipped == {"captions of missing images": 1, "malformed ids": 1, "empty captions": 1}
    assert load_dataset(tmp_path).captions == ds.captions  # detected inside a folder
    assert load_dataset(p).splits == ds.splits  # or given as the file


def test_read_karpathy_json_with_filepath(tmp_path):
    """COCO-style entries carry a ``filepath`` subfolder; the images live in IMAGE_DIR/filepath/."""
    p = _karpathy(tmp_path, filepath="val2014")
    ds = read_karpathy_json(p)
    assert sorted(ds.captions) == [f"val2014/{n}" for n in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]]
    assert all(ds.path(n).is_file() for n in ds.captions)
    assert ds.splits["dev"] == ["val2014/c.jpg"]


def test_read_karpathy_json_bad_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="x.json"):
        read_karpathy_json(p)
    p.write_text(json.dumps({"no_images": []}))
    with pytest.raises(DataError, match="Karpathy"):
        read_karpathy_json(p)


# --- CSV -------------------------------------------------------------------------------------

def _csv(path, rows, header):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_read_csv_with_split(tmp_path):
    for n in ("x.png", "y.png", "z.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / n)
    p = tmp_path / "captions.csv"
    _csv(p, [["x.png", "a red thing, really", "train"], ["x.png", "a second caption", "train"],
             ["y.png", "a blue thing", "dev"], ["z.png", "a green thing", "test"],
             ["missing.png", "nothing", "train"], ["", "no image", "train"], ["z.png", "", "test"]],
         ["image", "caption", "split"])
    ds = read_csv(p)
    assert ds.captions == {"x.png": ["a red thing, really", "a second caption"], "y.png": ["a blue thing"],
                           "z.png": ["a green thing"]}
    assert ds.splits == {"train": ["x.png"], "dev": ["y.png"], "test": ["z.png"]}
    assert ds.skipped == {"captions of missing images": 1, "malformed ids": 1, "empty captions": 1}
    assert load_dataset(tmp_path).captions == ds.captions
    assert load_dataset(p).splits == ds.splits


def test_read_csv_without_split(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (4, 4)).save(img_dir / "x.png")
    p = tmp_path / "c.csv"
    _csv(p, [["x.png", "one caption"], ["x.png", "  two   spaced  caption "]], ["image", "caption"])
    ds = read_csv(p, image_dir=img_dir)
    assert ds.captions == {"x.png": ["one caption", "two spaced caption"]}
    assert ds.splits == {}
    assert ds.split("all") == ["x.png"]
    with pytest.raises(DataError, match="none"):
        ds.split("train")


def test_read_csv_needs_header(tmp_path):
    p = tmp_path / "c.csv"
    _csv(p, [["x.png", "a"]], ["file", "text"])
    with pytest.raises(DataError, match="image,caption"):
        read_csv(p)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no such"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="captions.csv"):
        load_dataset(tmp_path)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match="x.txt"):
        load_dataset(tmp_path / "x.txt")


# --- the real Flickr8k ------------------------------------------------------------------------

@pytest.mark.slow
def test_real_flickr8k(flickr8k_dir, capsys):
    ds = read_flickr8k(flickr8k_dir)
    assert len(ds.captions) == 8091
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert dict(ds.skipped) == {"malformed ids": 5}
    assert sum(len(c) for c in ds.captions.values()) == 8091 * 5
    assert not set(ds.splits["train"]) & set(ds.splits["test"])
    assert not set(ds.splits["dev"]) & set(ds.splits["test"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 5 lines" in err[0]
    # Every split image has captions and a file.
    some = ds.splits["test"][:20]
    assert all(ds.path(n).is_file() and len(ds.captions[n]) == 5 for n in some)
    v = Vocab.build([c for n in ds.splits["train"] for c in ds.captions[n]], min_count=5)
    assert 2000 < len(v) < 4000  # the usual Flickr8k vocabulary size at min-count 5
