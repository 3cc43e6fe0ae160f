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
