"""Build ``assets/imagenet_words.json``: each ImageNet class -> the caption words that name it.

    python -m captioning.lab.tools.imagenet_words [--wordnet /usr/share/wordnet]
        [--synsets ../shared/data/imagenet/LOC_synset_mapping.txt]

Needs WordNet 3.0 only here, at build time (Debian: ``apt-get install wordnet-base``); the
library reads the JSON it writes (captioning/recognition.py). The WordNet data files are read
directly (a data.noun line starts at the byte offset that is its synset id), so NLTK is not needed.

For each class the words come from the class synset and its hypernyms (``@``/``@i`` pointers),
nearest first: the first hypernym level that holds a word of the caption vocabulary gives the
words (Egyptian cat -> domestic cat -> *cat*; every dog breed -> *dog*; espresso -> *coffee*).
Too-general synsets (animal, device, artifact...) stop the climb, so a class with no fitting
word maps to nothing rather than to "thing". Plural forms in the vocabulary are added, since
captions say "two dogs" as often as "a dog". ``OVERRIDES`` holds the reviewed exceptions.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ...paths import REPO_ROOT

REPO = REPO_ROOT
DEFAULT_SYNSETS = REPO.parent / "shared" / "data" / "imagenet" / "LOC_synset_mapping.txt"
DEFAULT_VOCAB = REPO / "assets" / "models" / "show_attend_tell" / "vocab.json"
DEFAULT_OUT = REPO / "assets" / "imagenet_words.json"
CLASS_NAMES = REPO / "assets" / "imagenet_classes.txt"  # the short names the library shows
MAX_DEPTH = 5

# Climbing past these says nothing a caption could use ("a device", "an organism").
TOO_GENERAL = {
    "entity", "physical_entity", "abstraction", "object", "whole", "unit", "artifact", "artefact",
    "instrumentality", "instrumentation", "device", "container", "structure", "construction",
    "covering", "equipment", "implement", "commodity", "article", "matter", "substance", "material",
    "organism", "being", "living_thing", "animate_thing", "animal", "animate_being", "beast", "fauna",
    "creature", "vertebrate", "craniate", "invertebrate", "chordate", "mammal", "placental",
    "mammalian", "placental_mammal", "eutherian", "eutherian_mammal", "carnivore", "food", "nutrient",
    "solid", "foodstuff", "food_product", "conveyance", "transport", "system", "mechanism",
    "machine", "protective_covering", "decoration", "ornament", "surface", "area", "region",
    "location", "geological_formation", "formation", "natural_object", "plant", "flora",
    "plant_life", "vascular_plant", "part", "piece", "portion", "thing", "group", "collection",
    "creation", "product", "merchandise", "wares", "consumer_goods", "durables", "durable_goods",
    "clothing", "article_of_clothing", "vesture", "wear", "wearable", "habiliment", "top", "cover",
    "vessel", "fixture", "furnishing", "furniture", "piece_of_furniture", "article_of_furniture",
    "causal_agent", "cause", "causal_agency", "person", "individual", "someone", "somebody",
    "mortal", "soul", "worker", "adult", "grownup", "vehicle",
}
# Words that are real vocabulary entries but mislead as a class's name.
# Mostly second senses: "toy" (toy dog), "game" (game bird), "wind" (wind instrument), "monitor"
# (monitor lizard), "hose" (stocking); found by reading the --review listing.
BAD_WORDS = {"top", "cover", "piece", "part", "thing", "unit", "article", "item", "set", "gear",
             "body", "case", "stand", "support", "tool", "kit", "bit", "line", "toy", "game", "wind",
             "instrument", "rail", "monitor", "hose", "board", "mini", "light", "spot", "bank", "pool",
             "wood", "litter", "control", "barrier", "column", "wagon", "tights", "racer", "rubber",
             "pick", "post", "boa", "pirate", "shade", "shades", "lounge", "coach", "machine", "machines", "drink", "sign",
             "house", "home", "cream", "stick", "field", "ground", "room", "space", "point", "head",
             "hand", "back", "front", "side", "end", "block", "tank", "round", "run", "course", "play",
             "fly", "cricket", "cap", "match", "bar", "lift", "jack", "iron", "rock", "stone", "plant",
             "track", "shell", "sheet", "paper", "pad", "can", "chest", "dome", "fan", "bow", "tie",
             "trunk", "key", "pen", "rest", "hat", "wheel", "work", "works", "arm", "arms", "string", "patch",
             "beam", "vertical", "circle", "pattern", "figure", "site", "medium", "roll", "ear", "carrier",
             "display", "landing", "runner", "liquid", "beverage", "bin"}

# Reviewed by hand against the raw WordNet result: class name (assets/imagenet_classes.txt) -> words (replaces the WordNet
# words; [] maps the class to nothing). Only where the hypernyms miss or mislead.
OVERRIDES: dict[str, list[str]] = {
    "espresso": ["coffee", "cup"],  # served in a cup; people say "a cup of coffee"
    "missile": ["rocket"],  # WordNet: missile -> weapon; the photos show a rocket
    "projectile": ["rocket"],
    "space shuttle": ["rocket", "shuttle"],
    "mountain bike": ["bike", "bicycle"],
    "moped": ["motorcycle", "scooter", "bike"],
    "motor scooter": ["scooter", "motorcycle"],
    "coffee mug": ["mug", "cup", "coffee"],
    "sunglass": ["sunglasses", "glasses"],
    "television": ["tv", "television"],  # the ImageNet class is the set; WordNet's synset is the system
    "steam locomotive": ["train"],
    "electric locomotive": ["train"],
    "streetcar": ["train", "trolley"],
    "warplane": ["airplane", "plane", "jet"],
    "drilling platform": [],  # what the encoder says for rockets and cranes; no caption word fits
}


def _norm(lemma: str) -> str:
    return lemma.lower().replace("_", " ")


class WordNet:
    """The noun part of a WordNet 3.0 database folder, read by byte offset."""

    def __init__(self, folder: Path):
        self.data = (Path(folder) / "data.noun").read_bytes()
        self._cache: dict[int, tuple[list[str], list[int]]] = {}
        self.exc: dict[str, str] = {}  # irregular plural -> singular
        exc = Path(folder) / "noun.exc"
        if exc.is_file():
            for line in exc.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    self.exc[parts[0]] = parts[1]

    def synset(self, offset: int) -> tuple[list[str], list[int]]:
        """(lemmas, hypernym offsets) of the noun synset at ``offset``."""
        if offset not in self._cache:
            end = self.data.index(b"\n", offset)
            f = self.data[offset:end].decode("latin-1").split(" | ")[0].split()
            if int(f[0]) != offset:
                raise ValueError(f"no noun synset at offset {offset}")
            n = int(f[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]) for i in range(n)]
            i = 4 + 2 * n
            hyper = []
            for _ in range(int(f[i])):
                sym, off, pos = f[i + 1], int(f[i + 2]), f[i + 3]
                if sym in ("@", "@i") and pos == "n":
                    hyper.append(off)
                i += 4
            self._cache[offset] = (lemmas, hyper)
        return self._cache[offset]


def inflections(word: str, vocab: set[str], exc: dict[str, str]) -> list[str]:
    """The plural (or singular) forms of ``word`` that the vocabulary holds."""
    forms = [word + "s"]
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.append(word + "es")
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        forms.append(word[:-1] + "ies")
    if word.endswith("man"):
        forms.append(word[:-3] + "men")
    forms += [pl for pl, sg in exc.items() if sg == word]
    if word in exc:
        forms.append(exc[word])
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    elif word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.append(word[:-2])
    elif word.endswith("s") and not word.endswith("ss"):
        forms.append(word[:-1])
    return [f for f in dict.fromkeys(forms) if f in vocab and f != word]


def class_words(wn: WordNet, offset: int, vocab: set[str]) -> tuple[list[str], int]:
    """Vocabulary words of the class synset and its hypernyms up to ``MAX_DEPTH`` levels up,
    nearest first, climbing no further than a too-general synset; and the depth of the first
    word (-1: none). Every level counts, so a breed gives its group and "dog" (spaniel, dog)."""
    level, seen, words, first = [offset], set(), [], -1
    for depth in range(MAX_DEPTH + 1):
        nxt: list[int] = []
        for off in level:
            if off in seen:
                continue
            seen.add(off)
            lemmas, hyper = wn.synset(off)
            if lemmas[0].lower() in TOO_GENERAL:  # its first lemma names a synset ("car" also says "machine")
                continue
            for l in lemmas:
                w = _norm(l)
                if w in vocab and w not in BAD_WORDS and w not in words:
                    words.append(w)
                    first = depth if first < 0 else first
            nxt += hyper
        level = nxt
        if not level:
            break
    return words, first


def build(wordnet: Path, synsets: Path, vocab_path: Path) -> dict:
    wn = WordNet(wordnet)
    vocab = set(json.loads(vocab_path.read_text())["itos"][4:])
    classes, review = [], []
    names = CLASS_NAMES.read_text().splitlines()
    for line, name in zip(synsets.read_text().splitlines(), names):
        wnid = line.split()[0]
        words, depth = class_words(wn, int(wnid[1:]), vocab)
        if name in OVERRIDES:
            words, depth = [w for w in OVERRIDES[name] if w in vocab], -2
        words = list(dict.fromkeys(words + [p for w in words for p in inflections(w, vocab, wn.exc)]))
        classes.append({"wnid": wnid, "name": name, "words": words})
        review.append((name, depth, words))
    return {"source": "WordNet 3.0 hypernyms of the ILSVRC-2012 synsets, limited to the caption vocabulary "
                      "(python -m captioning.lab.tools.imagenet_words); reviewed overrides in that script",
            "vocab": str(vocab_path.relative_to(REPO)) if vocab_path.is_relative_to(REPO) else str(vocab_path),
            "classes": classes}, review


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", default="/usr/share/wordnet", type=Path)
    ap.add_argument("--synsets", default=DEFAULT_SYNSETS, type=Path)
    ap.add_argument("--vocab", default=DEFAULT_VOCAB, type=Path)
    ap.add_argument("--out", default=DEFAULT_OUT, type=Path)
    ap.add_argument("--review", action="store_true", help="print every class with its words and hypernym depth")
    a = ap.parse_args(argv)
    if not (a.wordnet / "data.noun").is_file():
        raise SystemExit(f"error: {a.wordnet}/data.noun not found; apt-get install wordnet-base")
    table, review = build(a.wordnet, a.synsets, a.vocab)
    # One class a line: small, and a reviewer's diff shows which classes changed.
    head = {k: v for k, v in table.items() if k != "classes"}
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in table["classes"])
    a.out.write_text(json.dumps(head, ensure_ascii=False)[:-1] + ',\n"classes": [\n' + lines + "\n]}\n")
    if a.review:
        for name, depth, words in review:
            print(f"{depth:2d}  {name[:50]:50s} {' '.join(words)}")
    n = sum(bool(c["words"]) for c in table["classes"])
    print(f"{a.out}: {n} of {len(table['classes'])} classes map to caption words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
