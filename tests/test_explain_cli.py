"""``python -m explain faithfulness``: a tiny end-to-end run and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explain.cli import main, pick_words

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle_and_data(tmp_path_factory):
    from captioning.bundle import save_bundle
    from captioning.decoders import build_decoder
    from captioning.encoders import EncoderUnavailable, build_encoder
    from captioning.vocab import Vocab

    try:
        build_encoder("efficientnet-lite0")
    except EncoderUnavailable as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("cli")
    vocab = Vocab(["a", "dog", "runs", "on", "grass", "red"])
    torch.manual_seed(0)
    for kind in ("show_attend_tell", "show_tell"):
        cfg = {"vocab_size": len(vocab), "embed_dim": 8, "hidden_dim": 16}
        if kind == "show_attend_tell":
            cfg["attention_dim"] = 8
        save_bundle(root / kind, build_decoder(kind, cfg), vocab, "efficientnet-lite0")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = ["image,caption,split"]
    for i in range(2):
        Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(data / f"im{i}.jpg")
        rows.append(f"im{i}.jpg,a dog runs on grass,test")
    (data / "captions.csv").write_text("\n".join(rows) + "\n")
    return root, data


def test_faithfulness_json(bundle_and_data, capsys):
    root, data = bundle_and_data
    rc = main(["faithfulness", "--model", str(root / "show_attend_tell"), "--data", str(data), "--split", "test",
               "--limit", "1", "--method", "grad_cam,attention", "--steps", "4", "--max-words", "1", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    assert d["images"] == 1 and d["words"] == 1 and set(d["methods"]) == {"grad_cam", "attention"}
    for v in d["methods"].values():
        for k in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
            assert 0 <= v[k] <= 1


def test_faithfulness_table(bundle_and_data, capsys):
    root, data = bundle_and_data
    rc = main(["faithfulness", "--model", str(root / "show_tell"), "--data", str(data), "--limit", "1",
               "--steps", "2", "--max-words", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "grad_cam" in out and "deletion AUC" in out


@pytest.mark.parametrize("args, msg", [
    (["--model", "/nonexistent/model"], "model folder not found"),
    (["--data", "/nonexistent/data"], "no such file or folder"),
    (["--method", "attention"], "not available for this model"),
    (["--method", "lime"], "not available for this model"),
    (["--split", "train"], "no split 'train'"),
    (["--block", "15"], "--block must divide the model's input side 224"),
])
def test_errors_are_one_line(bundle_and_data, capsys, args, msg):
    root, data = bundle_and_data
    base = {"--model": str(root / "show_tell"), "--data": str(data)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["faithfulness"] + [x for kv in base.items() for x in kv] + ["--limit", "1"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_module_entry_point_without_model(tmp_path):
    # Run as a user would; no traceback whatever happens.
    r = subprocess.run([sys.executable, "-m", "explain", "faithfulness", "--model", str(tmp_path / "nope")],
                       cwd=REPO, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")


def test_pick_words():
    words = ["a", "dog", "runs", "on", "the", "grass"]
    assert pick_words(words, "content", 3) == [1, 2, 5]
    assert pick_words(words, "all", 0) == list(range(6))
    assert pick_words(["a", "the"], "content", 3) == [0, 1]


def test_project_writes_projection_into_the_bundle(tmp_path, capsys):
    import shutil

    from captioning.bundle import save_bundle
    from captioning.decoders import build_decoder
    from captioning.vocab import Vocab
    from explain.embeddings import load_projection

    vocab = Vocab([f"w{i}" for i in range(30)])
    save_bundle(tmp_path / "m", build_decoder("merge", {"vocab_size": len(vocab), "embed_dim": 8, "hidden_dim": 8,
                                                          "merge_dim": 8}), vocab, "efficientnet-lite0")
    assert main(["project", "--model", str(tmp_path / "m"), "--perplexity", "5", "--json", "--no-umap"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [i["space"] for i in info] == ["output", "input"]  # every space of the model
    proj = load_projection(tmp_path / "m", space="output")
    assert proj is not None and len(proj.words) == 30 == info[0]["words"]
    shutil.rmtree(tmp_path / "m")
    assert main(["project", "--model", str(tmp_path / "m")]) == 2
