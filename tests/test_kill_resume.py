"""Kill tests (issue 21): a real process SIGKILLed in the middle of `extract-features` and in the
middle of a training epoch, then resumed. The features come out byte-identical to an
uninterrupted run, training loses at most the epoch it was in (and ends exactly where an
uninterrupted run ends), and no partial file is ever read as a complete one.

The killed processes run on the tiny synthetic dataset (conftest.py), slowed down by a wrapper
so that the kill lands mid-way; the slowing changes timing only, never what is computed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from captioning.lab import features as feat
from captioning.bundle import load_bundle, recover_swap, save_bundle
from captioning.lab.data import load_dataset
from captioning.lab.features import FeatureCache, extract_features, find_cache
from captioning.images import Preprocessing
from captioning.lab.train import TrainConfig, save_checkpoint, train

from conftest import REPO_ROOT

SMALL = dict(embed_dim=32, hidden_dim=32, attention_dim=32, merge_dim=32, min_count=1, batch_size=8,
             patience=100, lr_patience=100)
CHUNK = 4  # images per feature chunk in these tests: 24 images -> 6 chunks, so a kill lands mid-way


def start(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ends or times out first."""
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the process ended (rc {proc.returncode}) before it could be killed:\n{err[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the process never reached the point where it should be killed")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


# --- extract-features ------------------------------------------------------------------------

EXTRACT = """
    import sys, time
    import captioning.lab.features as feat
    from captioning.cli import main
    feat.CHUNK = int(sys.argv[3])
    load_image = feat.load_image
    def slow(path):  # timing only: a photo takes 0.1 s longer to read
        time.sleep(0.1)
        return load_image(path)
    feat.load_image = slow
    sys.exit(main(["extract-features", "--data", sys.argv[1], "--out", sys.argv[2]]))
"""


def _progress(folder: Path) -> int:
    try:
        return json.loads((folder / "progress.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def assert_same_bytes(a: Path, b: Path) -> None:
    """Byte-for-byte equality, reported as the first differing offset rather than a dump of both."""
    x, y = a.read_bytes(), b.read_bytes()
    if x != y:
        first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        pytest.fail(f"{a.name}: {len(x)} vs {len(y)} bytes, first difference at byte {first}")


@pytest.fixture
def one_thread():
    """This process computes on one thread, as the killed one does: a convolution's rounding
    depends on how many threads split it, and the comparison is byte for byte."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_extract_features_killed_and_resumed_is_identical(synth, tmp_path, monkeypatch, one_thread):
    ds = load_dataset(str(synth.root))
    images = sorted(ds.captions)
    n = len(images)
    assert n == 24
    killed_root = tmp_path / "killed"
    folder = find_cache(killed_root, "efficientnet-lite0", Preprocessing(), images)

    # 1. Killed after at least two chunks were written, before the last.
    proc = start(EXTRACT, str(synth.root), str(killed_root), str(CHUNK))
    kill_when(proc, lambda: 2 * CHUNK <= _progress(folder) < n - CHUNK)
    done = _progress(folder)
    assert 2 * CHUNK <= done < n and done % CHUNK == 0

    # 2. What the kill left is never taken for a complete cache.
    with pytest.raises(RuntimeError, match="incomplete"):
        FeatureCache.open(folder)

    # 3. Resumed (same chunking) it finishes from where it was, not from the start.
    monkeypatch.setattr(feat, "CHUNK", CHUNK)
    seen = []
    real_load = feat.load_image
    monkeypatch.setattr(feat, "load_image", lambda p: seen.append(Path(p).name) or real_load(p))
    assert extract_features(ds, "efficientnet-lite0", killed_root, progress=False) == folder
    assert sorted(seen) == sorted(images[done:])  # each remaining photo read once, none before `done`

    # 4. Byte for byte what one uninterrupted run writes.
    monkeypatch.setattr(feat, "load_image", real_load)
    whole = extract_features(ds, "efficientnet-lite0", tmp_path / "whole", progress=False)
    for name in ("grid.f16", "pooled.f16", "meta.json"):
        assert_same_bytes(folder / name, whole / name)
    a, b = FeatureCache.open(folder), FeatureCache.open(whole)
    assert a.images == b.images and np.array_equal(a.grid, b.grid) and np.abs(np.asarray(a.pooled)).sum() > 0


def test_cut_feature_files_are_not_read_as_complete(synth, tmp_path, monkeypatch):
    """progress.json says done, but a feature file is short (a cut copy): refused, then redone."""
    ds = load_dataset(str(synth.root))
    monkeypatch.setattr(feat, "CHUNK", 64)
    folder = extract_features(ds, "efficientnet-lite0", tmp_path / "f", progress=False)
    good = tmp_path / "good.f16"
    good.write_bytes((folder / "grid.f16").read_bytes())
    (folder / "grid.f16").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(RuntimeError, match="grid.f16"):
        FeatureCache.open(folder)
    (folder / "progress.json").unlink()  # extract-features resumes; wrong-sized files start over
    extract_features(ds, "efficientnet-lite0", tmp_path / "f", progress=False)
    assert_same_bytes(folder / "grid.f16", good)


# --- training ------------------------------------------------------------------------------------

TRAIN = """
    import json, sys, time
    import captioning.lab.train as tr
    real = tr.caption_loss
    def slow(*a, **k):  # timing only: a batch takes 0.15 s longer
        time.sleep(0.15)
        return real(*a, **k)
    if sys.argv[5] == "slow":
        tr.caption_loss = slow
    cfg = tr.TrainConfig(**json.loads(sys.argv[3]))
    tr.train(sys.argv[1], sys.argv[2], cfg, features=sys.argv[4], progress=False, resume=sys.argv[6] == "resume")
"""


def train_in_process(*args: str) -> None:
    """Training run to its end in a process like the killed one (one thread), so that the runs
    compared do the same arithmetic: a BLAS picks kernels by thread count."""
    proc = start(TRAIN, *args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _metric_rows(run: Path) -> int:
    try:
        return max(0, len((run / "metrics.csv").read_text().strip().splitlines()) - 1)
    except OSError:
        return 0


def _ckpt_state(run: Path) -> dict:
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_training_killed_mid_epoch_loses_at_most_that_epoch(synth, features_dir, tmp_path):
    cfg = TrainConfig(decoder="show_attend_tell", epochs=3, lr=3e-3, dropout=0.3, seed=3, checkpoint_every=4, **SMALL)
    # Features first, so that the killed process only trains.
    extract_features(load_dataset(str(synth.root)), cfg.encoder, features_dir, progress=False)
    run = tmp_path / "killed"
    proc = start(TRAIN, str(synth.root), str(run), json.dumps(cfg.to_dict()), str(features_dir), "slow", "new")
    # Killed inside epoch 2: epoch 1 validated and saved, then about 3 of epoch 2's 6 batches
    # (0.15 s each at least), around its mid-epoch checkpoint at batch 4.
    since = []

    def mid_epoch_2() -> bool:
        if not since and _metric_rows(run) == 1 and _ckpt_state(run).get("epoch") == 1 \
                and (run / "best" / "model.safetensors").is_file():
            since.append(time.time())
        return bool(since) and time.time() - since[0] > 0.5

    kill_when(proc, mid_epoch_2, timeout=240)

    # What survived: the whole first epoch, never a partial file.
    st = _ckpt_state(run)
    assert st["epoch"] == 1 and st["batch"] in (0, 4), st  # killed inside epoch 2: it alone is lost
    assert _metric_rows(run) == 1
    load_file(str(run / "checkpoint" / "state.safetensors"))  # complete, readable
    load_bundle(run / "best")
    assert not (run / "checkpoint.tmp").exists()

    # Resumed, the run ends where one that was never killed ends. All three runs train in the
    # same kind of process; weights are still compared to float precision (a BLAS may round a
    # product differently with the buffers' alignment), the random state and the optimiser's
    # step count exactly. A resume that lost the random state, the optimiser's moments or the
    # batch position is off by orders of magnitude more.
    args = (str(synth.root), json.dumps(cfg.to_dict()), str(features_dir), "fast")
    train_in_process(args[0], str(run), *args[1:], "resume")
    whole = tmp_path / "whole"
    train_in_process(args[0], str(whole), *args[1:], "new")
    a = load_file(str(run / "checkpoint" / "state.safetensors"))
    b = load_file(str(whole / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k == "rng.torch" or k.endswith(".step"):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert _metric_rows(run) == _metric_rows(whole) == 3
    da, _, _ = load_bundle(run / "best")
    db, _, _ = load_bundle(whole / "best")
    for k, v in da.state_dict().items():
        torch.testing.assert_close(v, db.state_dict()[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("which", ["checkpoint", "best"])
def test_killed_between_the_two_renames_of_a_swap(synth, features_dir, tmp_path, monkeypatch, which):
    """The one moment a folder swap leaves no folder at all: the old copy is aside, the new one
    not yet in place. A resumed run restores the old copy instead of starting from scratch."""
    cfg = TrainConfig(decoder="show_tell", epochs=2, seed=1, checkpoint_every=0, **SMALL)
    run = train(str(synth.root), tmp_path / "run", cfg, features=features_dir, progress=False, max_batches=6 + 3)
    assert (_ckpt_state(run)["epoch"], _ckpt_state(run)["batch"]) == (1, 3) and (run / "best").is_dir()
    before = load_file(str(run / "checkpoint" / "state.safetensors"))

    import captioning.bundle as bundle_mod
    import captioning.lab.train as train_mod

    mod = train_mod if which == "checkpoint" else bundle_mod
    real_replace = os.replace
    calls = []

    class Killed(BaseException):
        pass

    def replace(src, dst):
        calls.append((src, dst))
        if Path(dst).name == (".checkpoint.old" if which == "checkpoint" else ".best.old"):
            real_replace(src, dst)
            raise Killed  # dead right after the first rename: nothing else runs
        return real_replace(src, dst)

    monkeypatch.setattr(mod.os, "replace", replace)
    with pytest.raises(Killed):
        if which == "checkpoint":
            dec, _, _ = load_bundle(run / "best")
            save_checkpoint(run / "checkpoint", dec, torch.optim.Adam(dec.parameters()), {"epoch": 99})
        else:
            dec, vocab, _ = load_bundle(run / "best")
            save_bundle(run / "best", dec, vocab, cfg.encoder)
    monkeypatch.setattr(mod.os, "replace", real_replace)
    assert not (run / which).exists() and (run / f".{which}.old").is_dir()

    # Resuming restores the aside copy and carries on from it.
    train(str(synth.root), run, cfg, features=features_dir, progress=False, resume=True, max_batches=1)
    assert (run / "checkpoint").is_dir() and (run / "best").is_dir()
    st = _ckpt_state(run)
    assert (st["epoch"], st["batch"]) == (1, 4), st  # went on from the restored state, one more batch
    if which == "checkpoint":
        assert not torch.equal(before["model.fc.weight"], load_file(str(run / "checkpoint" / "state.safetensors"))["model.fc.weight"])
    load_bundle(run / "best")


def test_recover_swap_leaves_complete_folders_alone(tmp_path):
    f = tmp_path / "best"
    f.mkdir()
    (tmp_path / ".best.old").mkdir()
    assert not recover_swap(f) and f.is_dir()
    f.rmdir()
    (tmp_path / ".best.old" / "x").write_text("1")
    assert recover_swap(f) and (f / "x").read_text() == "1" and not (tmp_path / ".best.old").exists()
    assert not recover_swap(tmp_path / "nothing")
