"""`captioning caption` over many photos: folders (recursive), globs, --out FILE.jsonl / FILE.csv
written as it goes, a rerun that skips what the file already has, and a progress bar."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from captioning.cli import PROGRESS_FROM, expand_inputs, main
from test_bundle_api_cli import bundle, decoder, images, vocab  # noqa: F401 (fixtures)


@pytest.fixture
def tree(tmp_path, images):
    """photos/a.png, photos/sub/b.png, photos/sub/deeper/c.png and a text file to ignore."""
    root = tmp_path / "photos"
    for dest in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(images[0], root / "a.png")
    shutil.copy(images[1], root / "sub" / "b.png")
    shutil.copy(images[2], root / "sub" / "deeper" / "c.png")
    (root / "notes.txt").write_text("not a photo")
    return root


def test_folders_and_globs_expand(tree):
    files, errors = expand_inputs([str(tree)])
    assert [f.replace(str(tree) + "/", "") for f in files] == ["a.png", "sub/b.png", "sub/deeper/c.png"] and not errors
    files, errors = expand_inputs([str(tree / "**" / "*.png"), str(tree / "a.png")])
    assert len(files) == 3 and not errors  # a photo named twice is captioned once
    files, errors = expand_inputs([str(tree / "*.jpg"), str(tree / "missing.png")])
    assert files == [str(tree / "missing.png")] and len(errors) == 1 and "*.jpg" in errors[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_out_file_and_resume(tree, bundle, tmp_path, capsys, suffix):
    out = tmp_path / f"captions{suffix}"
    assert main(["caption", str(tree / "a.png"), "--model", str(bundle), "--out", str(out)]) == 0
    first = out.read_text()
    assert main(["caption", str(tree), "--model", str(bundle), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 captioned, 0 failed, 1 already there" in err
    assert out.read_text().startswith(first)  # appended, never rewritten
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["image"] for r in rows] == [str(tree / p) for p in ("a.png", "sub/b.png", "sub/deeper/c.png")]
        assert all(r["captions"][0]["text"] for r in rows)
    else:
        rows = list(csv.DictReader(out.open()))
        assert [r["image"] for r in rows] == [str(tree / p) for p in ("a.png", "sub/b.png", "sub/deeper/c.png")]
        assert all(r["rank"] == "1" and r["caption"] for r in rows)
    # A third run has nothing left to do.
    assert main(["caption", str(tree), "--model", str(bundle), "--out", str(out)]) == 0
    assert "0 captioned, 0 failed, 3 already there" in capsys.readouterr().err


def test_resume_after_a_kill_mid_line_and_retries_failures(tree, bundle, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    (tree / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["caption", str(tree), "--model", str(bundle), "--out", str(out)]) == 1
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and sum("error" in json.loads(x) for x in lines) == 1
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed while writing the third
    (tree / "broken.jpg").unlink()
    assert main(["caption", str(tree), "--model", str(bundle), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    good = [r["image"] for r in rows if "error" not in r]
    assert sorted(good) == sorted(expand_inputs([str(tree)])[0])


def test_out_needs_a_known_format_and_progress_shows_on_long_runs(tree, bundle, tmp_path, capsys):
    assert main(["caption", str(tree), "--model", str(bundle), "--out", str(tmp_path / "c.txt")]) == 2
    assert ".jsonl or .csv" in capsys.readouterr().err
    many = tmp_path / "many"
    many.mkdir()
    for i in range(PROGRESS_FROM):
        shutil.copy(tree / "a.png", many / f"{i:02d}.png")
    assert main(["caption", str(many), "--model", str(bundle), "--beam", "1", "--out", str(tmp_path / "m.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "captioning" in err and f"{PROGRESS_FROM}/{PROGRESS_FROM}" in err


def test_a_glob_that_matches_nothing_is_an_error(tree, bundle, capsys):
    assert main(["caption", str(tree / "*.gif"), "--model", str(bundle)]) == 1
    assert "no image files match" in capsys.readouterr().err
