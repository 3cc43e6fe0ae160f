"""Sequence-level distillation (Kim & Rush 2016): an ensemble whose members read different inputs
captions the train split, and ``train --extra-captions`` learns from those captions."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from captioning.bundle import load_bundle
from captioning.cli import main
from captioning.decoding import Ensemble
from captioning.lab.evaluate import evaluate, load_members
from captioning.lab.features import FeatureCache, find_cache
from captioning.images import Preprocessing
from captioning.lab.train import TrainConfig, read_extra_captions, train
from captioning.vocab import Vocab

from test_train import SMALL, greedy_bleu, read_metrics

COLOUR_SWAP = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green"}


@pytest.fixture(scope="module")
def two_views(synth, features_dir, tmp_path_factory):
    """A 224 px show_attend_tell (with the deep output layer) and a 288 px show_tell (with feature
    dropout) trained on the synthetic set."""
    root = tmp_path_factory.mktemp("views")
    a = train(str(synth.root), root / "sat224", TrainConfig(decoder="show_attend_tell", epochs=3, lr=1e-2,
                                                           deep_output=True, **SMALL),
              features=features_dir, progress=False)
    b = train(str(synth.root), root / "st288", TrainConfig(decoder="show_tell", epochs=3, lr=1e-2, image_size=288,
                                                          feature_dropout=0.1, **SMALL),
              features=features_dir, progress=False)
    return a / "best", b / "best"


def test_ensemble_members_read_their_own_inputs(synth, two_views):
    """Each member decodes from its own grid (7x7 and 9x9 here); the ensemble's next-word
    distribution is the renormalised mean of the members'; the attention is the attending member's."""
    members = load_members(list(two_views))
    paths = [synth.image_dir / n for n in synth.splits["test"][:3]]
    feats = [m.encode(m.pixels(paths)) for m in members]
    assert [f[0].shape[1] for f in feats] == [49, 81]
    ens = Ensemble([m.decoder for m in members]).eval()
    tokens = torch.full((3,), members[0].vocab.start)
    with torch.no_grad():
        state, fs = ens.start([f[0] for f in feats], [f[1] for f in feats])
        logp, _, att = ens.step(tokens, state, fs)
        own = []
        for m, (g, p) in zip(members, feats):
            s, f = m.decoder.start(g, p)
            own.append(m.decoder.step(tokens, s, f)[0])
    assert torch.allclose(logp, torch.log_softmax((own[0] + own[1]) / 2, -1), atol=1e-6)
    assert att.shape == (3, 49)  # show_tell has none
    with pytest.raises(ValueError, match="features for 1"):
        ens.start([feats[0][0]], [feats[0][1]])


def test_teacher_captions_cache_and_pixels_agree(synth, features_dir, two_views, tmp_path):
    """``evaluate`` of a mixed ensemble on the train split: the cached features of both sizes give
    the same captions as running the encoder at each member's size."""
    cached = evaluate(list(two_views), synth.root, split="train", features=features_dir, out=tmp_path / "c",
                      use_java=False, progress=False)
    pixels = evaluate(list(two_views), synth.root, split="train", features=None, out=tmp_path / "p",
                      use_java=False, progress=False)
    assert cached["features_from_cache"] and not pixels["features_from_cache"]
    a = json.loads((tmp_path / "c" / "captions_train.json").read_text())
    b = json.loads((tmp_path / "p" / "captions_train.json").read_text())
    assert [r["image"] for r in a] == synth.splits["train"]
    assert [r["caption"] for r in a] == [r["caption"] for r in b]
    meta = json.loads((tmp_path / "c" / "metrics_train.json").read_text())
    assert meta["model"] == [str(p) for p in two_views] and meta["split"] == "train"


def test_extra_captions_reach_training(synth, features_dir, tmp_path):
    """Four extra captions per train image that name the other colour outvote the three
    references: the trained model names the swapped colour. The vocabulary still comes from the
    references alone."""
    extra = []
    for n in synth.splits["train"]:
        colour, shape = synth.kind[n].split("_")
        extra += [{"image": n, "caption": f"a {COLOUR_SWAP[colour]} {shape} on a white background"}] * 4
    path = tmp_path / "captions_train.json"
    path.write_text(json.dumps(extra))
    cfg = TrainConfig(decoder="show_tell", epochs=8, lr=1e-2, dropout=0.2, extra_captions=str(path), **SMALL)
    run = train(str(synth.root), tmp_path / "run", cfg, features=features_dir, progress=False)
    vocab = Vocab.load(run / "vocab.json")
    refs = Vocab.build([c for n in synth.splits["train"] for c in synth.captions[n]], 1)
    assert vocab.itos == refs.itos
    # The last epoch's weights: the best bundle is chosen by CIDEr on the dev references.
    decoder, _, _ = load_bundle(run / "best")
    sd = load_file(str(run / "checkpoint" / "state.safetensors"))
    decoder.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    cache = FeatureCache.open(find_cache(features_dir, cfg.encoder, Preprocessing(), sorted(synth.captions)))
    _, preds = greedy_bleu(decoder, cache, {n: synth.captions[n] for n in synth.splits["train"]}, vocab)
    swapped = sum(COLOUR_SWAP[synth.kind[n].split("_")[0]] in preds[n].split() for n in preds)
    assert swapped >= 0.75 * len(preds), preds


def test_extra_captions_must_be_train_images(synth, tmp_path):
    bad = tmp_path / "captions_dev.json"
    dev = synth.splits["dev"][0]
    bad.write_text(json.dumps([{"image": dev, "caption": "a red square"}]))
    with pytest.raises(ValueError, match=f"not in the train split .*{dev}"):
        read_extra_captions(bad, synth.splits["train"])
    (tmp_path / "dev.json").write_text(bad.read_text())
    bad.write_text('{"image": "x"}')
    with pytest.raises(ValueError, match="not a list"):
        read_extra_captions(bad, synth.splits["train"])
    with pytest.raises(FileNotFoundError, match="not found"):
        read_extra_captions(tmp_path / "nothing.json", synth.splits["train"])
    # A bad file stops train() before it writes the run folder.
    with pytest.raises(ValueError, match="not in the train split"):
        train(str(synth.root), tmp_path / "bad_run", TrainConfig(extra_captions=str(tmp_path / "dev.json"), **SMALL))
    assert not (tmp_path / "bad_run").exists()
    with pytest.raises(ValueError, match="SCST"):
        train(str(synth.root), tmp_path / "r", TrainConfig(scst=True, extra_captions=str(bad), **SMALL))


def test_ship_a_distilled_run(synth, features_dir, two_views, tmp_path):
    """The whole recipe from the CLI, twice: teacher captions, a student fine-tuned from one teacher
    member on them; then a second round whose teacher includes that student. The shipped card
    names the teacher and gives every command, each run once, in an order that works."""
    args = ["--data", str(synth.root), "--features", str(features_dir)]

    def distill(members, teacher, student):
        assert main(["evaluate", "--model", *map(str, members), "--split", "train", "--beam", "2",
                     "--length-penalty", "0.5", "--out", str(tmp_path / teacher), *args]) == 0
        assert main(["train", "--init", str(two_views[0]), "--extra-captions",
                     str(tmp_path / teacher / "captions_train.json"), "--out", str(tmp_path / student),
                     "--epochs", "1", "--lr", "1e-3", "--batch-size", "8", "--checkpoint-every", "0", *args]) == 0
        return tmp_path / student

    run = distill(two_views, "teacher", "student")
    _, _, cfg = load_bundle(run / "best")
    assert cfg["training"]["teacher"]["model"] == [str(p) for p in two_views]
    assert cfg["training"]["teacher"]["beam_size"] == 2
    run2 = distill([run / "best", two_views[1]], "teacher2", "student2")
    for r, name in ((run, "sat"), (run2, "sat2")):
        assert main(["ship", str(r), "--name", name, "--dest", str(tmp_path / "models"), *args]) == 0
    dest = tmp_path / "models" / "sat"
    start = cfg["training"]["init_training"]["epoch"]
    assert [r["stage"] for r in read_metrics(dest)] == ["xe"] * start + ["distill"]
    card = (dest / "MODEL_CARD.md").read_text()
    assert "Sequence-level distillation" in card

    def commands(model):
        return (tmp_path / "models" / model / "MODEL_CARD.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()

    # Every setting the runs were trained with that is not TrainConfig's default, read from the
    # records: the decoders' sizes, the batch size, the learning rate.
    xe224 = ("python -m captioning train --decoder show_attend_tell --out runs/sat224 --epochs 3 --batch-size 8 "
             "--lr 0.01 --lr-patience 100 --patience 100 --min-count 1 --checkpoint-every 0 --embed-dim 32 "
             "--hidden-dim 32 --attention-dim 32 --deep-output")
    xe288 = ("python -m captioning train --decoder show_tell --out runs/st288 --epochs 3 --batch-size 8 --lr 0.01 "
             "--lr-patience 100 --patience 100 --feature-dropout 0.1 --image-size 288 --min-count 1 "
             "--checkpoint-every 0 --embed-dim 32 --hidden-dim 32")
    round1 = ["python -m captioning evaluate --model runs/sat224/best runs/st288/best --split train --beam 2 "
              "--length-penalty 0.5 --out runs/teacher",
              "python -m captioning train --init runs/sat224/best --extra-captions runs/teacher/captions_train.json "
              "--out runs/student --epochs 1 --batch-size 8 --lr 0.001 --checkpoint-every 0"]
    assert commands("sat") == ["python -m captioning extract-features --image-size 288", xe224, xe288, *round1,
                               "python -m captioning ship runs/student --name sat --beam 3 --length-penalty 0.0"]
    assert commands("sat2") == [
        "python -m captioning extract-features --image-size 288", xe224, xe288, *round1,
        "python -m captioning evaluate --model runs/student/best runs/st288/best --split train --beam 2 "
        "--length-penalty 0.5 --out runs/teacher2",
        "python -m captioning train --init runs/sat224/best --extra-captions runs/teacher2/captions_train.json "
        "--out runs/student2 --epochs 1 --batch-size 8 --lr 0.001 --checkpoint-every 0",
        "python -m captioning ship runs/student2 --name sat2 --beam 3 --length-penalty 0.0"]


def test_card_outlives_the_teachers_run_folder(synth, features_dir, two_views, tmp_path):
    """The student records each teacher member's training, so `ship` can still write the member's
    command after that member's run folder is deleted."""
    args = ["--data", str(synth.root), "--features", str(features_dir)]
    member = tmp_path / "st288" / "best"
    shutil.copytree(two_views[1], member)
    assert main(["evaluate", "--model", str(two_views[0]), str(member), "--split", "train", "--beam", "2",
                 "--out", str(tmp_path / "teacher"), *args]) == 0
    assert main(["train", "--init", str(two_views[0]), "--extra-captions", str(tmp_path / "teacher" / "captions_train.json"),
                 "--out", str(tmp_path / "student"), "--epochs", "1", "--lr", "1e-3", "--batch-size", "8",
                 "--checkpoint-every", "0", *args]) == 0
    shutil.rmtree(tmp_path / "st288")
    assert main(["ship", str(tmp_path / "student"), "--name", "sat", "--dest", str(tmp_path / "models"), *args]) == 0
    card = (tmp_path / "models" / "sat" / "MODEL_CARD.md").read_text()
    assert ("python -m captioning train --decoder show_tell --out runs/st288 --epochs 3 --batch-size 8 --lr 0.01 "
            "--lr-patience 100 --patience 100 --feature-dropout 0.1 --image-size 288 --min-count 1 "
            "--checkpoint-every 0 --embed-dim 32 --hidden-dim 32") in card
