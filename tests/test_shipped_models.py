"""The shipped models themselves: the default describes what is in a photo, and every number the
README, docs/results.md and the model cards print for a shipped model is the one in its
``metrics.json``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "assets" / "models"
SHIPPED = ("show_attend_tell", "show_tell", "merge")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
DOG = re.compile(r"\bdogs?\b")


def _shipped(name: str) -> Path:
    d = MODELS / name
    if not (d / "model.safetensors").is_file() or not (d / "metrics.json").is_file():
        pytest.skip(f"needs the shipped bundle assets/models/{name}")
    return d


def _metrics(name: str) -> dict:
    return json.loads((_shipped(name) / "metrics.json").read_text())


def _table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table starting {header_start!r}")


def _same(printed: str, measured: float) -> bool:
    """A printed 3-decimal number (maybe **bold**) is ``measured`` rounded to 3 decimals."""
    return abs(float(printed.strip("*")) - measured) <= 0.0005 + 1e-9


@pytest.mark.parametrize("doc, heading", [("README.md", "### Shipped models"),
                                          ("docs/results.md", "## Shipped models")])
def test_results_tables_equal_metrics_json(doc, heading):
    text = (REPO / doc).read_text(encoding="utf-8")
    assert heading in text, f"{doc} has no {heading!r} section"
    rows = _table(text.split(heading, 1)[1], "| model | BLEU-1 |")
    # The default's row is the bold one; the other shipped decoders are named alone.
    pick = {"show_attend_tell": lambda c: c.startswith("**`show_attend_tell`**"),
            "show_tell": lambda c: c == "`show_tell`", "merge": lambda c: c == "`merge`"}
    for name in SHIPPED:
        m = _metrics(name)["metrics"]
        found = [r for r in rows if pick[name](r[0])]
        assert len(found) == 1, (name, [r[0] for r in rows])
        printed = dict(zip(METRICS, found[0][1:]))
        wrong = {k: (printed[k], m[k]) for k in METRICS if not _same(printed[k], m[k])}
        assert not wrong, f"{doc} row for {name} differs from its metrics.json: {wrong}"


@pytest.mark.parametrize("name", SHIPPED)
def test_model_card_numbers_equal_metrics_json(name):
    d = _shipped(name)
    card = (d / "MODEL_CARD.md").read_text(encoding="utf-8")
    meta = _metrics(name)
    rows = _table(card, "| BLEU-1 |")
    assert len(rows) == 1
    printed = dict(zip(METRICS, rows[0]))
    wrong = {k: (printed[k], meta["metrics"][k]) for k in METRICS if not _same(printed[k], meta["metrics"][k])}
    assert not wrong, f"{name}/MODEL_CARD.md differs from its metrics.json: {wrong}"
    assert meta["split"] == "test" and meta["n_images"] == 1000
    beam, penalty = re.search(r"Beam (\d+), length penalty ([\d.]+)", card).groups()
    assert (int(beam), float(penalty)) == (meta["beam_size"], pytest.approx(meta["length_penalty"]))
    # The decoding the numbers were measured with is the one the bundle ships (what the app and the API use).
    cfg = json.loads((d / "config.json").read_text()).get("decoding") or {}
    assert float(cfg.get("length_penalty", 0.0)) == pytest.approx(meta["length_penalty"])
    assert float(cfg.get("rerank", 0.0)) == pytest.approx(float(meta.get("rerank", 0.0)))


@pytest.mark.slow
def test_default_model_says_dog_for_dog_photos(flickr8k_dir):
    """The first 12 test photos all five of whose references mention a dog get "dog(s)" from the
    shipped default, decoded as shipped. Measured: 12 of 12 (23 of the first 24); a decoder with
    shuffled weights gets none."""
    from captioning.api import Captioner
    from captioning.lab.data import load_dataset

    ds = load_dataset(flickr8k_dir)
    dogs = [n for n in ds.split("test") if all(DOG.search(c.lower()) for c in ds.captions[n])][:12]
    assert len(dogs) == 12
    cap = Captioner.from_pretrained(_shipped("show_attend_tell"))
    texts = [r.text for r in cap.caption([str(ds.path(n)) for n in dogs])]
    said = [t for t in texts if DOG.search(t)]
    assert len(said) >= 11, texts
