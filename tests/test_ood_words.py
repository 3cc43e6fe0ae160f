"""ImageNet class -> caption words: the shipped table (assets/imagenet_words.json), its reader
(captioning/recognition.py) and the WordNet climb that built it (captioning/lab/tools/imagenet_words.py)."""
import json

import pytest
import torch

from captioning import recognition
from captioning.encoders import imagenet_classes
from captioning.recognition import centre_weights, class_words, head_log_probs, recognise, word_evidence, words_for
from captioning.lab.tools.imagenet_words import WordNet, class_words as climb, inflections

VOCAB = set(json.loads(open("assets/models/show_attend_tell/vocab.json").read())["itos"])


def test_table_is_in_the_encoders_class_order_and_only_holds_vocabulary_words():
    names, words = class_words()
    assert list(names) == imagenet_classes()
    assert all(w in VOCAB for ws in words for w in ws)
    # Enough classes map to something for the table to matter, and many map to nothing.
    n = sum(bool(ws) for ws in words)
    assert 500 < n < 900


@pytest.mark.parametrize("label,must", [
    ("Egyptian cat", {"cat"}), ("tabby", {"cat"}), ("espresso", {"coffee", "cup"}), ("missile", {"rocket"}),
    ("space shuttle", {"rocket"}), ("mountain bike", {"bike", "bicycle"}), ("moped", {"motorcycle"}),
    ("golden retriever", {"dog"}), ("sports car", {"car"}), ("school bus", {"bus"}), ("airliner", {"plane"}),
    ("pizza", {"pizza"}), ("African elephant", {"elephant"}), ("canoe", {"boat"}),
])
def test_spot_checks(label, must):
    assert must <= set(words_for(label))


def test_every_dog_breed_says_dog_and_misleading_second_senses_do_not_appear():
    names, words = class_words()
    breeds = names[151:269]  # ILSVRC's dog breeds: Chihuahua .. Mexican hairless
    assert breeds[0] == "Chihuahua" and breeds[-1] == "Mexican hairless"
    assert all("dog" in words[names.index(b)] for b in breeds)
    assert "toy" not in words_for("Chihuahua")  # WordNet: toy dog, "toy"
    assert words_for("hotdog") == [] or "dog" not in words_for("hotdog")
    assert "dog" not in words_for("sea lion") and "lion" not in words_for("sea lion")
    assert words_for("drilling platform") == []
    with pytest.raises(KeyError):
        words_for("no such class")


def test_recognise_and_word_evidence_on_known_logits():
    names, _ = class_words()
    logits = torch.full((2, 1000), -20.0)
    cat, tiger, tabby, esp = (names.index(n) for n in ("Egyptian cat", "tiger cat", "tabby", "espresso"))
    logits[0, [cat, tiger, tabby]] = torch.tensor([3.0, 0.8, 0.8])
    logits[1, esp] = 5.0
    rec = recognise(logits, k=3)
    assert [r.label for r in rec[0]] == ["Egyptian cat", "tiger cat", "tabby"]
    assert rec[0][0].prob == pytest.approx(torch.softmax(logits[0], -1)[cat].item())
    assert rec[0][0].words[0] == "cat" and str(rec[0][0]).endswith("-> cat")
    assert rec[1][0].to_dict()["words"][:2] == ["coffee", "cup"]
    ev = word_evidence(logits)
    # "cat" sums the three cat classes; "coffee" is the espresso's.
    assert ev[0]["cat"] == pytest.approx(sum(r.prob for r in rec[0]), abs=1e-4)
    assert ev[0]["cat"] > 0.99 and "coffee" not in ev[0]
    assert ev[1]["coffee"] > 0.99
    assert word_evidence(logits, {"cats"})[0].keys() == {"cats"}


def test_centre_weights_cover_the_central_square():
    assert torch.allclose(centre_weights((300, 300), 7), torch.full((49,), 1 / 49))
    # 700 x 300: the central 300 x 300 square is x in [2/7, 5/7] of the stretched photo, columns 2-4.
    wide = centre_weights((700, 300), 7).view(7, 7)
    assert torch.allclose(wide[:, 2:5], torch.full((7, 3), 1 / 21)) and wide[:, [0, 1, 5, 6]].sum() < 1e-6
    assert torch.allclose(centre_weights((300, 700), 7).view(7, 7), wide.T)  # tall: rows 2-4
    # Cells the square only partly covers count by how much: the square of a 640 x 427 photo starts at x = 0.166.
    w = centre_weights((640, 427), 7).view(7, 7)[0].tolist()
    assert w[0] == 0 and w[6] == 0 and 0 < w[1] < w[2] and w[1] == pytest.approx(w[5], rel=1e-4)
    assert w[1] / w[2] == pytest.approx((2 / 7 - (640 - 427) / 1280) * 7, rel=1e-4)  # column 1 is [1/7, 2/7]
    assert centre_weights((640, 427), 7).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        centre_weights((0, 10), 7)


def test_the_head_also_reads_the_central_square_of_a_photo_that_is_not_square():
    """A 700 x 300 photo whose middle (grid columns 2-4) shows class 7 and whose sides show class 3:
    read whole (stretched) the sides win; with the central square the head sees class 7 too."""
    C = 8
    head = lambda x: 4 * x.flatten(1) @ torch.eye(C, 1000)  # (B, C, 1, 1) -> (B, 1000): feature c votes class c
    grid = torch.zeros(3, 49, C)
    g = grid.view(3, 7, 7, C)
    g[:, :, [0, 1, 5, 6], 3] = 1.0
    g[:, :, 2:5, 7] = 1.0
    pooled = grid.mean(1)  # (3, C)
    out = head_log_probs(head, grid, pooled, [(700, 300), (300, 300), None])  # (3, 1000)
    whole = torch.log_softmax(head(pooled[:, :, None, None]), -1)
    centre = torch.log_softmax(head(g[:, :, 2:5].mean((1, 2))[:, :, None, None]), -1)
    assert torch.allclose(out[0].exp(), (whole[0].exp() + centre[0].exp()) / 2, atol=1e-6)
    assert torch.allclose(out[1:], whole[1:], atol=1e-6)  # a square photo or an unknown size: the whole photo only
    assert whole[0, 3] > whole[0, 7] and out[0, 7] > out[0, 3]
    assert torch.allclose(head_log_probs(head, grid, pooled), whole, atol=1e-6)


def test_a_bad_table_is_a_one_line_error(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text('{"classes": [{"name": "x", "words": []}]}')
    with pytest.raises(ValueError, match="expected 1000 classes"):
        class_words(str(bad))
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not an ImageNet word table"):
        class_words(str(bad))
    with pytest.raises(FileNotFoundError, match="not found"):
        class_words(str(tmp_path / "missing.json"))


def _fake_wordnet(tmp_path, synsets):
    """A data.noun whose lines start at their own byte offsets: [(key, lemmas, hypernym keys)]."""
    def line(key, lemmas, hyper, at):
        return f"{at(key):08d} 05 n {len(lemmas):02x} " + " ".join(f"{l} 0" for l in lemmas) + \
            f" {len(hyper):03d}" + "".join(f" @ {at(h):08d} n 0000" for h in hyper) + " | gloss  \n"

    # Offsets are 8 digits wide, so each line's length is known before the offsets are.
    offsets, pos = {}, 0
    for key, lemmas, hyper in synsets:
        offsets[key] = pos
        pos += len(line(key, lemmas, hyper, lambda k: 0))
    text = "".join(line(k, l, h, offsets.__getitem__) for k, l, h in synsets)
    (tmp_path / "data.noun").write_text(text)
    (tmp_path / "noun.exc").write_text("mice mouse\n")
    return WordNet(tmp_path), offsets


def test_climb_takes_every_level_up_to_a_too_general_synset(tmp_path):
    wn, off = _fake_wordnet(tmp_path, [
        ("animal", ["animal"], []),
        ("carnivore", ["carnivore"], ["animal"]),
        ("dog", ["dog", "domestic_dog"], ["carnivore"]),
        ("hound", ["hound", "hound_dog"], ["dog"]),
        ("beagle", ["beagle"], ["hound"]),
        ("toy", ["toy_dog", "toy"], ["dog"]),
        ("pug", ["pug", "pug-dog"], ["toy"]),
    ])
    vocab = {"dog", "dogs", "hound", "animal", "carnivore", "toy", "pug"}
    assert climb(wn, off["beagle"], vocab) == (["hound", "dog"], 1)
    assert climb(wn, off["pug"], vocab) == (["pug", "dog"], 0)  # "toy" is a second sense: left out
    assert "animal" not in climb(wn, off["dog"], vocab)[0]
    assert climb(wn, off["animal"], vocab) == ([], -1)


def test_inflections():
    v = {"dog", "dogs", "box", "boxes", "lady", "ladies", "man", "men", "mouse", "mice", "glass", "glasses"}
    assert inflections("dog", v, {}) == ["dogs"]
    assert inflections("dogs", v, {}) == ["dog"]
    assert inflections("box", v, {}) == ["boxes"]
    assert inflections("lady", v, {}) == ["ladies"]
    assert inflections("man", v, {}) == ["men"]
    assert inflections("mouse", v, {"mice": "mouse"}) == ["mice"]
    assert inflections("glass", v, {}) == ["glasses"]
