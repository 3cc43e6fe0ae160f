"""The Caption page names what the encoder recognised and shows the familiarity badge (issue 24),
with the shipped default model (it holds the familiarity model)."""
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app" / "main.py"


@pytest.fixture
def shipped_only(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "show_attend_tell").symlink_to(REPO / "assets" / "models" / "show_attend_tell")
    monkeypatch.setenv("CAPTIONING_MODELS_DIR", str(models))
    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path / "cache"))


def test_caption_page_shows_recognition_and_an_unfamiliar_badge(shipped_only):
    from streamlit.testing.v1 import AppTest

    from captioning.samples import load_sample

    buf = io.BytesIO()
    load_sample("coffee").save(buf, format="PNG")
    at = AppTest.from_file(str(APP), default_timeout=180)
    at.run()
    if at.radio(key="source").value != "Upload":
        at.radio(key="source").set_value("Upload").run()
    at.file_uploader(key="upload").set_value(("coffee.png", buf.getvalue(), "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [c.value for c in at.caption]
    assert any(c.startswith("recognised: espresso") and "→ coffee" in c for c in captions), captions
    assert any("unlike the photos the model learned from" in e.value for e in at.error), [e.value for e in at.error]


def _upload(at, name: str, im) -> None:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    if at.radio(key="source").value != "Upload":
        at.radio(key="source").set_value("Upload").run()
    at.file_uploader(key="upload").set_value((name, buf.getvalue(), "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]


def _best(at) -> str:
    return next(m.value for m in at.markdown if 'class="best-caption"' in m.value).split(">", 1)[1].rsplit("</p>", 1)[0]


def test_guidance_toggle_changes_the_caption(shipped_only):
    """The shipped default guides by default: the cat photo's caption names the cat and says it was
    guided. Turned off, the same photo gets plain beam search's caption (no cat), and the Explain
    page explains the caption the Caption page showed, guided or not."""
    import skimage.data
    from PIL import Image
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=180)
    at.run()
    _upload(at, "chelsea.png", Image.fromarray(skimage.data.chelsea()))
    toggle = next(t for t in at.toggle if t.label == "Name what the encoder recognises")
    assert toggle.value is True
    guided = _best(at)
    notes = [c.value for c in at.caption]
    assert "cat" in guided.split(), guided
    assert any(c.startswith("Guided: the caption had to contain") and "“cat”" in c
               and "the concept tagger finds no sign of" in c for c in notes), notes

    toggle.set_value(False).run()
    assert not at.exception, [e.value for e in at.exception]
    plain = _best(at)
    assert plain != guided and "cat" not in plain.split(), plain
    assert any(c.startswith("Not guided") for c in (c.value for c in at.caption))

    at.switch_page("views/explain.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(m.value == f"**Caption:** {plain}" for m in at.markdown)
