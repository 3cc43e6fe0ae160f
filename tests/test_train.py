"""Training on the synthetic dataset: learning, exact resume, DDP, and the metrics it reports."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from captioning.api import Captioner
from captioning.bundle import load_bundle
from captioning.lab.data import load_dataset
from captioning.decoders import build_decoder
from captioning.decoding import SpecialIds, sample_decode
from captioning.lab.features import FeatureCache, find_cache
from captioning.images import Preprocessing, load_image, preprocess
from captioning.metrics import score_captions
from captioning.lab.train import TrainConfig, caption_loss, decoder_config, mirror_captions, train, validate
from captioning.vocab import Vocab

from conftest import KINDS, REPO_ROOT

SMALL = dict(embed_dim=32, hidden_dim=32, attention_dim=32, merge_dim=32, min_count=1, batch_size=8,
             patience=100, lr_patience=100, checkpoint_every=0)


def read_metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def greedy_bleu(decoder, cache: FeatureCache, captions: dict[str, list[str]], vocab: Vocab) -> tuple[float, dict]:
    idx = cache.index()
    names = sorted(captions)
    rows = [idx[n] for n in names]
    grid = torch.from_numpy(np.asarray(cache.grid[rows])).float()
    pooled = torch.from_numpy(np.asarray(cache.pooled[rows])).float()
    decoder.eval()
    ids = SpecialIds(vocab.pad, vocab.start, vocab.end, vocab.unk)
    preds = {n: vocab.decode(h.tokens) for n, h in zip(names, sample_decode(decoder, grid, pooled, ids=ids))}
    return score_captions(preds, captions, use_java=False, metrics=("bleu",)).metrics["BLEU-4"], preds


@pytest.mark.parametrize("deep_output", [False, True])
def test_training_learns_the_synthetic_captions(synth, features_dir, tmp_path, encoder, deep_output):
    cfg = TrainConfig(decoder="show_attend_tell", epochs=8, lr=1e-2, dropout=0.2, deep_output=deep_output, **SMALL)
    run = train(str(synth.root), tmp_path / "run", cfg, features=features_dir, progress=False)
    assert run == tmp_path / "run"

    # The run folder: config, vocabulary, one metrics row per epoch, a final checkpoint, a best bundle.
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg
    vocab = Vocab.load(run / "vocab.json")
    assert set(vocab.itos[4:]) == {w for caps in KINDS.values() for c in caps for w in c.split()}
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    train_loss = [float(r["train_loss"]) for r in rows]
    val_loss = [float(r["val_loss"]) for r in rows]
    assert train_loss[-1] < 0.6 * train_loss[0] and val_loss[-1] < 0.5 * val_loss[0]
    assert float(rows[-1]["val_bleu4"]) > 0.5
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 8 and state["batch"] == 0

    # Greedy BLEU-4 on the training images, before (same seed, same init) and after training.
    cache = FeatureCache.open(find_cache(features_dir, cfg.encoder, Preprocessing(), sorted(synth.captions)))
    train_caps = {n: synth.captions[n] for n in synth.splits["train"]}
    torch.manual_seed(cfg.seed)
    untrained = build_decoder(cfg.decoder, decoder_config(cfg, len(vocab), 1280))
    trained = build_decoder(cfg.decoder, decoder_config(cfg, len(vocab), 1280))
    sd = load_file(str(run / "checkpoint" / "state.safetensors"))
    trained.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    before, _ = greedy_bleu(untrained, cache, train_caps, vocab)
    after, preds = greedy_bleu(trained, cache, train_caps, vocab)
    assert before < 0.1 and after > 0.6, (before, after, preds)

    # The teacher-forced loss on the training captions fell too.
    idx = cache.index()
    names = synth.splits["train"]
    ids = [vocab.encode(c) for n in names for c in synth.captions[n]]
    rows_ = [idx[n] for n in names for _ in synth.captions[n]]
    T = max(map(len, ids))
    caps = torch.tensor([i + [0] * (T - len(i)) for i in ids])
    g = torch.from_numpy(np.asarray(cache.grid[rows_])).float()
    p = torch.from_numpy(np.asarray(cache.pooled[rows_])).float()
    with torch.no_grad():
        l0 = float(caption_loss(untrained.eval(), g, p, caps, 0.0, 0.0))
        l1 = float(caption_loss(trained.eval(), g, p, caps, 0.0, 0.0))
    assert l1 < 0.3 * l0

    # End to end from pixels: the best bundle names colour and shape of unseen test images.
    cap = Captioner.from_pretrained(run / "best", encoder=encoder)
    assert cap.decoder.config.deep_output == deep_output
    test_imgs = synth.splits["test"]
    res = cap.caption([synth.root / "Images" / n for n in test_imgs], beam_size=3)
    right = 0
    for n, r in zip(test_imgs, res):
        colour, shape = synth.kind[n].split("_")
        right += colour in r.words and (shape in r.words or shape.rstrip("s") in r.words)
    assert right >= 3, [(n, r.text) for n, r in zip(test_imgs, res)]


@pytest.mark.parametrize("options, message", [
    (dict(decoder="merge", deep_output=True), "show_attend_tell option"),
    (dict(feature_dropout=-0.1), "feature-dropout must be in"),
    (dict(feature_dropout=1.0), "feature-dropout must be in"),
])
def test_bad_options_are_refused_before_the_run_folder(synth, features_dir, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        train(str(synth.root), tmp_path / "run", TrainConfig(**options, **SMALL), features=features_dir, progress=False)
    assert not (tmp_path / "run").exists()


def test_feature_dropout_changes_training_only(synth, features_dir, tmp_path):
    """Dropout on the cached features perturbs the training batches (other weights after one epoch)
    but not validation: the same weights validate to the same loss whatever the setting."""
    runs = {}
    for p in (0.0, 0.5):
        cfg = TrainConfig(decoder="show_attend_tell", epochs=1, lr=3e-3, feature_dropout=p, **SMALL)
        runs[p] = train(str(synth.root), tmp_path / f"run{p}", cfg, features=features_dir, progress=False)
    a, _ = _checkpoint(runs[0.0])
    b, _ = _checkpoint(runs[0.5])
    assert not torch.equal(a["model.fc.weight"], b["model.fc.weight"])
    ds = load_dataset(str(synth.root))
    dec, vocab, _ = load_bundle(runs[0.5] / "best")
    cache = FeatureCache.open(find_cache(features_dir, "efficientnet-lite0", Preprocessing(), sorted(synth.captions)))
    val = [validate(dec, cache, ds, ds.split("dev"), vocab, TrainConfig(feature_dropout=p, **SMALL))
           for p in (0.0, 0.5)]
    assert val[0] == val[1]


def _checkpoint(run: Path) -> tuple[dict, dict]:
    return load_file(str(run / "checkpoint" / "state.safetensors")), json.loads((run / "checkpoint" / "state.json").read_text())


@pytest.mark.parametrize("decoder", ["show_attend_tell", "merge"])
def test_resume_is_exact(synth, features_dir, tmp_path, decoder, capsys):
    """Interrupted twice (once at an epoch's last batch, once mid-epoch) and resumed, a run ends with
    exactly the weights, Adam moments and RNG state of one that ran straight through."""
    cfg = TrainConfig(decoder=decoder, epochs=3, lr=3e-3, dropout=0.5, sample_prob_max=0.5, flip_prob=0.5,
                      feature_dropout=0.3, seed=7, **SMALL)
    whole = train(str(synth.root), tmp_path / "whole", cfg, features=features_dir, progress=False)
    n_batches = math.ceil(sum(len(synth.captions[n]) for n in synth.splits["train"]) / cfg.batch_size)
    assert n_batches == 6

    part = tmp_path / "part"
    train(str(synth.root), part, cfg, features=features_dir, progress=False, max_batches=n_batches)
    st = json.loads((part / "checkpoint" / "state.json").read_text())
    assert (st["epoch"], st["batch"]) == (0, n_batches)  # stopped before the epoch's validation
    assert len(read_metrics(part)) == 0
    # The resumed run reads its settings from the run folder, not from the config it is given.
    other = TrainConfig(decoder="show_tell", epochs=1, lr=1.0, seed=99)
    train(str(synth.root), part, other, features=features_dir, progress=False, resume=True, max_batches=5)
    st = json.loads((part / "checkpoint" / "state.json").read_text())
    assert (st["epoch"], st["batch"]) == (1, 5)
    train(str(synth.root), part, other, features=features_dir, progress=False, resume=True)
    assert "resumed" in capsys.readouterr().out

    a, sa = _checkpoint(whole)
    b, sb = _checkpoint(part)
    assert a.keys() == b.keys()
    assert any(k.startswith("opt.") for k in a) and "rng.torch" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for s in (sa, sb):
        s.pop("elapsed")
    assert sa == sb
    ra, rb = read_metrics(whole), read_metrics(part)
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):
        x.pop("seconds"), y.pop("seconds")
        assert x == y
    da, _, _ = load_bundle(whole / "best")
    db, _, _ = load_bundle(part / "best")
    assert all(torch.equal(v, db.state_dict()[k]) for k, v in da.state_dict().items())


def test_mirrored_view_is_the_encoder_on_flipped_photos(synth, features_dir, tmp_path, encoder):
    """``flip_prob`` trains on a second cache: every photo mirrored left to right, encoded."""
    cfg = TrainConfig(decoder="show_tell", epochs=1, flip_prob=0.5, **SMALL)
    train(str(synth.root), tmp_path / "r", cfg, features=features_dir, progress=False, max_batches=1)
    images = sorted(synth.captions)
    plain = FeatureCache.open(find_cache(features_dir, cfg.encoder, Preprocessing(), images))
    mirrored = FeatureCache.open(find_cache(features_dir, cfg.encoder, Preprocessing(), images, flip=True))
    assert mirrored.folder != plain.folder and mirrored.images == plain.images and mirrored.meta["flip"]
    names = [images[0], images[7]]
    rows = np.asarray([mirrored.index()[n] for n in names])
    pix = torch.stack([preprocess(load_image(synth.image_dir / n)) for n in names])  # (2, 3, S, S)
    with torch.no_grad():
        want_g, want_p = encoder(pix.flip(-1))
        plain_g, _ = encoder(pix)
    g, p = mirrored.batch(rows)
    assert torch.allclose(g, want_g, atol=0.02, rtol=0.01) and torch.allclose(p, want_p, atol=0.02, rtol=0.01)
    assert not torch.allclose(g, plain_g, atol=0.1)  # a different view, not a copy


def test_mirrored_captions_swap_left_and_right():
    vocab = Vocab.build(["a dog on the left of a man", "a man on the right"], min_count=1)
    ids = [vocab.encode("a dog on the left of a man"), vocab.encode("the right man on the left")]
    T = max(map(len, ids))
    caps = np.asarray([i + [0] * (T - len(i)) for i in ids])
    out = mirror_captions(caps, vocab)
    assert [vocab.decode(r) for r in out] == ["a dog on the right of a man", "the left man on the right"]
    assert (mirror_captions(out, vocab) == caps).all()
    no_sides = Vocab.build(["a dog"], min_count=1)
    row = np.asarray([no_sides.encode("a dog")])
    assert (mirror_captions(row, no_sides) == row).all()  # a vocabulary without the words: unchanged


def test_image_size_sets_the_grid_and_travels_with_the_model(synth, features_dir, tmp_path, encoder):
    """``image_size`` 288 gives Lite0 a 9x9 grid; the bundle records it, so captioning from pixels
    and a resumed run (given a 224 config) both use 288."""
    cfg = TrainConfig(decoder="show_attend_tell", epochs=2, image_size=288, **SMALL)
    run = tmp_path / "r"
    train(str(synth.root), run, cfg, features=features_dir, progress=False, max_batches=2)
    train(str(synth.root), run, TrainConfig(decoder="show_attend_tell", **SMALL), features=features_dir,
          progress=False, resume=True)
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())).image_size == 288
    cache = FeatureCache.open(find_cache(features_dir, cfg.encoder, Preprocessing(size=288), sorted(synth.captions)))
    assert cache.grid.shape[1:] == (81, 1280)
    _, _, bundle_cfg = load_bundle(run / "best")
    assert bundle_cfg["preprocessing"]["size"] == 288
    cap = Captioner.from_pretrained(run / "best", encoder=encoder)
    assert cap.grid_side == 9 and encoder.grid_side(224) == 7
    res = cap.caption(synth.root / "Images" / synth.splits["test"][0], beam_size=2)[0]
    assert res.attention.shape == (len(res.words) + res.best.finished, 9, 9)


def test_resume_without_checkpoint_starts_fresh(synth, features_dir, tmp_path, capsys):
    cfg = TrainConfig(decoder="show_tell", epochs=1, **SMALL)
    run = train(str(synth.root), tmp_path / "r", cfg, features=features_dir, progress=False, resume=True)
    assert "no checkpoint" in capsys.readouterr().out
    assert len(read_metrics(run)) == 1


def test_seed_changes_the_result(synth, features_dir, tmp_path):
    base = dict(decoder="show_tell", epochs=1, **SMALL)
    a = train(str(synth.root), tmp_path / "a", TrainConfig(seed=1, **base), features=features_dir, progress=False,
              max_batches=2)
    b = train(str(synth.root), tmp_path / "b", TrainConfig(seed=2, **base), features=features_dir, progress=False,
              max_batches=2)
    wa, wb = _checkpoint(a)[0], _checkpoint(b)[0]
    assert not torch.equal(wa["model.fc.weight"], wb["model.fc.weight"])


# --- DDP --------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    import captioning.lab.train as T

    made, opts = [], []
    build, Adam = T.build_decoder, torch.optim.Adam

    def spy(*a, **k):  # keep a handle on the decoder train() builds ...
        d = build(*a, **k)
        made.append(d)
        return d

    class SpyAdam(Adam):  # ... and on its optimizer
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opts.append(self)

    T.build_decoder = spy
    load = T.load_bundle

    def spy_load(*a, **k):  # a run that starts from a bundle (--init) loads its decoder instead
        d = load(*a, **k)
        made.append(d[0])
        return d

    T.load_bundle = spy_load
    torch.optim.Adam = SpyAdam
    data, out, features, cfg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    T.train(data, out, T.TrainConfig(**cfg), features=features, progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    save_file({k: v.detach().contiguous() for k, v in made[0].state_dict().items()},
              f"{out}/rank{rank}.safetensors",
              metadata={"world": str(world), "lr": repr(opts[0].param_groups[0]["lr"])})
    dist.barrier()
    dist.destroy_process_group()
""")


def run_ddp(synth, features_dir, out: Path, cfg: dict) -> tuple[dict, dict, dict, dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip(f"{torchrun} not found")
    # Fill the feature cache first (the script would too, on rank 0, while rank 1 waits).
    train(str(synth.root), out.with_name(out.name + "-warm"), TrainConfig(decoder="show_tell", epochs=1, **SMALL),
          features=features_dir, progress=False, max_batches=1)
    script = out.with_name("ddp_train.py")
    script.write_text(DDP_SCRIPT)
    # CPU and gloo even on a GPU machine: two ranks cannot share one GPU under NCCL.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(synth.root), str(out),
           str(features_dir), json.dumps(cfg)]
    # Its own process group, so that a hung rank can be cleaned up with its launcher.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("torchrun did not finish in 240 s: a rank is probably waiting on the other")
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    w, meta = [], []
    for r in (0, 1):
        f = out / f"rank{r}.safetensors"
        w.append(load_file(str(f)))
        with safe_open(str(f), "pt") as h:
            meta.append(h.metadata())
    assert meta[0]["world"] == meta[1]["world"] == "2"
    return w[0], w[1], meta[0], meta[1]


def test_ddp_two_ranks_end_identical(synth, features_dir, tmp_path):
    out = tmp_path / "ddp"
    cfg = dict(decoder="show_attend_tell", epochs=1, lr=3e-3, dropout=0.5, seed=3, **SMALL)
    w0, w1, _, _ = run_ddp(synth, features_dir, out, cfg)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # They trained (and moved away from the common initialisation) ...
    torch.manual_seed(cfg["seed"])
    vocab = Vocab.load(out / "vocab.json")
    init = build_decoder("show_attend_tell", decoder_config(TrainConfig(**cfg), len(vocab), 1280)).state_dict()
    assert not torch.equal(init["fc.weight"], w0["fc.weight"])
    # ... each on half the batches: 48 captions / 2 ranks / 8 per batch = 3 steps of Adam.
    ck, st = _checkpoint(out)
    assert st["epoch"] == 1 and float(ck["opt.0.step"]) == 3
    for k in w0:
        assert torch.equal(ck[f"model.{k}"], w0[k]), k
    assert len(read_metrics(out)) == 1  # only rank 0 writes


def test_ddp_ranks_follow_rank0_decisions(synth, features_dir, tmp_path):
    """Rank 0 alone validates; its lr cut and early stop must reach rank 1 (else rank 1 would go on
    training alone and hang). A learning rate too small to change any caption forces both."""
    out = tmp_path / "ddp"
    cfg = dict(SMALL, decoder="show_tell", epochs=4, lr=1e-9, lr_factor=0.5, lr_patience=1, patience=1, seed=4)
    w0, w1, m0, m1 = run_ddp(synth, features_dir, out, cfg)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    st = json.loads((out / "checkpoint" / "state.json").read_text())
    assert st["done"] and st["epoch"] == 2  # the second epoch brought no better validation score
    assert float(m0["lr"]) == float(m1["lr"]) == 0.5e-9
    assert len(read_metrics(out)) == 2


# --- metrics ------------------------------------------------------------------------------------

def test_bleu_by_hand():
    refs = {"x": ["The cat sat on the mat."]}
    s = score_captions({"x": "A cat sat on the mat"}, refs, use_java=False, metrics=("bleu",)).metrics
    # unigrams 5/6 (only "a" misses), bigrams 4/5, trigrams 3/4, 4-grams 2/3; equal lengths: no brevity penalty
    assert math.isclose(s["BLEU-1"], 5 / 6, abs_tol=1e-6)
    assert math.isclose(s["BLEU-2"], math.sqrt(5 / 6 * 4 / 5), abs_tol=1e-6)
    assert math.isclose(s["BLEU-3"], (5 / 6 * 4 / 5 * 3 / 4) ** (1 / 3), abs_tol=1e-6)
    assert math.isclose(s["BLEU-4"], (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** (1 / 4), abs_tol=1e-6)
    # brevity penalty: 2 words against a 6-word reference -> exp(1 - 6/2)
    s = score_captions({"x": "the cat"}, refs, use_java=False, metrics=("bleu",)).metrics
    assert math.isclose(s["BLEU-1"], math.exp(-2), abs_tol=1e-6)
    # clipping: "the" counts at most twice, as often as in the reference
    s = score_captions({"x": "the the the the the the"}, refs, use_java=False, metrics=("bleu",)).metrics
    assert math.isclose(s["BLEU-1"], 2 / 6, abs_tol=1e-6)
    # corpus level: counts are summed over images before dividing
    s = score_captions({"x": "a cat sat on the mat", "y": "the the the the"},
                       {"x": refs["x"], "y": ["the dog", "the cat"]}, use_java=False, metrics=("bleu",)).metrics
    assert math.isclose(s["BLEU-1"], (5 + 1) / (6 + 4), abs_tol=1e-6)


def test_scores_without_java():
    preds = {"a": "a red square on white", "b": "a blue circle", "c": ""}
    refs = {"a": ["a red square on a white background", "a red square on white"],
            "b": ["a blue circle on a white background"], "c": ["green stripes"], "unused": ["x"]}
    s = score_captions(preds, refs, use_java=False, per_image=True)
    assert s.tokenizer == "python"
    assert "METEOR" not in s.metrics
    assert any("METEOR" in n and "Java" in n for n in s.notes)
    assert set(s.metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert all(0 <= v <= 1 for k, v in s.metrics.items() if k != "CIDEr")
    assert set(s.per_image) == {"a", "b", "c"}
    assert s.per_image["a"]["BLEU-4"] > 0.9 and s.per_image["c"]["BLEU-4"] < 1e-6  # exact match vs empty
    assert s.per_image["a"]["CIDEr"] > s.per_image["b"]["CIDEr"] > s.per_image["c"]["CIDEr"] == 0
    only = score_captions(preds, refs, use_java=False, metrics=("bleu", "cider"))
    assert set(only.metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"} and not only.notes
    with pytest.raises(ValueError, match="no predicted caption"):
        score_captions({"q": "x"}, refs, use_java=False)


def test_python_tokenizer_ignores_case_and_punctuation():
    a = score_captions({"x": "A Red square, on white."}, {"x": ["a red square on white"]}, use_java=False,
                       metrics=("bleu",)).metrics
    assert math.isclose(a["BLEU-4"], 1.0, abs_tol=1e-6)


def _captions_file(path: Path, captions: dict[str, str]) -> Path:
    path.write_text(json.dumps([{"image": k, "caption": c} for k, c in captions.items()]))
    return path


def test_human_baseline_scores_each_reference_against_the_others(synth, tmp_path, capsys):
    from captioning.cli import main
    from captioning.lab.evaluate import human_baseline

    dev = synth.splits["dev"]  # one image of each kind, three captions each
    people = human_baseline(synth.root, "dev", use_java=False)
    assert people["n_images"] == 4 and people["references"] == 2 and "model" not in people
    # No held-out caption is word for word one of the other two; scored against itself it would get 1.0.
    assert 0.2 < people["people"]["BLEU-4"] < 0.9

    # A model that repeats the first person: it ties with them when they are held out and
    # quotes a reference otherwise, so it must score above people; wrong-kind captions far below.
    parrot = human_baseline(synth.root, "dev", _captions_file(tmp_path / "parrot.json", {k: synth.captions[k][0] for k in dev}),
                            use_java=False)
    assert parrot["people"] == people["people"]
    assert parrot["model"]["BLEU-4"] > people["people"]["BLEU-4"] and parrot["model"]["CIDEr"] > people["people"]["CIDEr"]
    shifted = {k: synth.captions[dev[(i + 1) % len(dev)]][0] for i, k in enumerate(dev)}
    wrong = human_baseline(synth.root, "dev", _captions_file(tmp_path / "wrong.json", shifted), use_java=False)
    assert wrong["model"]["CIDEr"] < 0.5 * people["people"]["CIDEr"]

    # A file for some of the images: people are scored on the same images.
    part = human_baseline(synth.root, "dev", _captions_file(tmp_path / "part.json", {k: shifted[k] for k in dev[:2]}),
                          use_java=False)
    assert part["n_images"] == 2 and part["people"] != people["people"]

    test_only = _captions_file(tmp_path / "test.json", {k: "a caption" for k in synth.splits["test"]})
    with pytest.raises(ValueError, match="no caption for any image of the dev split"):
        human_baseline(synth.root, "dev", test_only, use_java=False)
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    capsys.readouterr()
    for bad, message in ((tmp_path / "missing.json", "captions file not found"), (tmp_path / "bad.json", "not a list")):
        assert main(["human-baseline", "--data", str(synth.root), "--captions", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
