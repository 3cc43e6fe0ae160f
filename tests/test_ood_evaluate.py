"""`evaluate --data FOLDER` on a folder of photos with captions.json ({file: [captions]}), and
consensus-word recall."""
import json

import pytest

from captioning.lab import evaluate as ev
from captioning.bundle import DEFAULT_MODEL
from captioning.cli import main
from captioning.lab.data import DataError, load_dataset, read_captions_json
from captioning.lab.evaluate import consensus_recall, unsupported_rate
from conftest import draw

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "dogs", "cat", "runs", "on", "the", "grass", "red", "ball"]


def _folder(root, images_sub=True):
    img_dir = root / "images" if images_sub else root
    img_dir.mkdir(parents=True, exist_ok=True)
    draw("red_square", 0, 64).save(img_dir / "a.jpg")
    draw("blue_circle", 1, 64).save(img_dir / "b.png")
    caps = {"a.jpg": ["a red square", "a red box on white", "red square", "a square", "a red shape"],
            "b.png": ["a blue circle", "a blue ball", "blue circle on white", "a circle", "a blue disc"],
            "missing.jpg": ["not here"]}
    (root / "captions.json").write_text(json.dumps(caps))
    return root


def test_captions_json_folder_reads_images_beside_or_in_images(tmp_path):
    for sub in (True, False):
        root = _folder(tmp_path / f"s{sub}", images_sub=sub)
        ds = load_dataset(root)
        assert sorted(ds.captions) == ["a.jpg", "b.png"]  # the missing photo is skipped and reported
        assert ds.skipped["captions of missing images"] == 1
        assert ds.splits == {} and ds.split("all") == ["a.jpg", "b.png"]
        assert len(ds.captions["a.jpg"]) == 5
        assert load_dataset(root / "captions.json").captions == ds.captions


def test_bad_captions_json_is_a_one_line_error(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text('{"a.jpg": "one caption, not a list"}')
    with pytest.raises(DataError, match=r"expected \{file: \[captions\]\}"):
        read_captions_json(p)
    p.write_text("{broken")
    with pytest.raises(DataError, match="not a caption JSON") as e:
        read_captions_json(p)
    assert "\n" not in str(e.value)


def test_consensus_recall_counts_words_most_references_share():
    refs = {"x": ["a dog runs on the grass", "the dog runs", "two dogs on grass", "a dog", "a cat"],
            "y": ["a cat", "the red ball", "a dog", "grass", "runs"]}  # no word reaches 3 of 5
    # "x": dog (4, "dogs" counts as "dog"), grass (2: no), runs (2: no) -> consensus {dog}.
    mean, per = consensus_recall({"x": "the dogs on the grass", "y": "a cat"}, refs, VOCAB)
    assert per == {"x": 1.0} and mean == 1.0
    refs["x"] += ["grass and a dog runs"]  # grass 3, runs 3 -> consensus {dog, grass, runs}
    mean, per = consensus_recall({"x": "a cat on the grass"}, refs, VOCAB)
    assert per["x"] == pytest.approx(1 / 3)
    # Function words never count, however many references use them ("a", "the", "on").
    mean, per = consensus_recall({"x": "a the on"}, {"x": ["a the on dog"] * 5}, VOCAB)
    assert per["x"] == 0.0


def test_unsupported_rate_counts_caption_words_no_reference_uses():
    refs = {"x": ["a dog runs on the grass", "two dogs", "a dog", "a dog", "a dog"],
            "y": ["a cat", "a cat", "a cat", "a cat", "a cat"]}
    # "x": dogs -> dog (used), grass (used), ball (no reference): 1 of 3; function words never count.
    mean, per = unsupported_rate({"x": "the dogs on the grass with a ball", "y": "a red cat"}, refs, VOCAB)
    assert per["x"] == pytest.approx(1 / 3) and per["y"] == pytest.approx(1 / 2)
    assert mean == pytest.approx((1 / 3 + 1 / 2) / 2)
    mean, per = unsupported_rate({"x": "a the on", "z": "a dog"}, refs, VOCAB)
    assert per == {} and mean == 0.0  # no content word; a photo without references is left out


def test_evaluate_data_folder_scores_and_leaves_the_shipped_bundle_alone(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path / "photos")
    monkeypatch.setattr(ev, "REPO_ROOT", tmp_path / "repo")
    before = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}
    assert main(["evaluate", "--data", str(root), "--beam", "2", "--features", str(tmp_path / "nofeatures"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "all" and res["n_images"] == 2
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "consensus_recall"} <= set(res["metrics"]) or \
        {"BLEU-4", "ROUGE-L", "CIDEr", "consensus_recall"} <= set(res["metrics"])  # METEOR needs Java
    out = tmp_path / "repo" / "runs" / "evaluate" / f"{DEFAULT_MODEL.name}-photos"
    assert res["out"] == str(out)
    caps = json.loads((out / "captions_all.json").read_text())
    assert [c["image"] for c in caps] == ["a.jpg", "b.png"] and all("consensus_recall" in c for c in caps)
    assert {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()} == before


def test_evaluate_bad_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "captions.json").write_text("[1, 2]")
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_paired_bootstrap_of_two_evaluate_runs(tmp_path, capsys):
    import json

    import numpy as np

    from captioning.lab.tools.paired_bootstrap import main, paired_bootstrap

    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, 100)
    better = paired_bootstrap(a, a + rng.uniform(0.01, 0.1, 100))
    assert better["difference"] > 0 and better["ci95"][0] > 0 and better["b_ahead"] == 1.0
    worse = paired_bootstrap(a + 0.05, a)
    assert worse["difference"] == pytest.approx(-0.05) and worse["ci95"][1] < 0 and worse["b_ahead"] == 0.0
    same = paired_bootstrap(a, a.copy())
    assert same["difference"] == 0 and same["ci95"] == (0.0, 0.0)
    # A margin that rests on one photo of 30 is not one the interval can tell from nothing.
    one = np.zeros(30)
    one[7] = 3.0
    lucky = paired_bootstrap(np.zeros(30), one)
    assert lucky["difference"] == pytest.approx(0.1) and lucky["ci95"][0] == 0.0 < lucky["b_ahead"] < 1
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:10])
    # Through the command line, on two evaluate caption files that share only some photos.
    for name, rows in (("a.json", [("p1", 0.2), ("p2", 0.4), ("p3", 0.1)]), ("b.json", [("p1", 0.3), ("p2", 0.6)])):
        (tmp_path / name).write_text(json.dumps([{"image": i, "caption": "x", "CIDEr": s} for i, s in rows]))
    main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--metrics", "CIDEr"])
    out = capsys.readouterr().out
    assert "| CIDEr | 2 | 0.3000 | 0.4500 | +0.1500 |" in out
    with pytest.raises(SystemExit, match="no such file"):
        main([str(tmp_path / "missing.json"), str(tmp_path / "b.json")])
