"""The package's shape: the inference core (``captioning``) stands without the training lab
(``captioning.lab``), so that a user who only captions photos never loads training code."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    # A fresh interpreter: this test process has long since imported the lab through other tests.
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_core_never_imports_the_lab():
    code = ("import sys, captioning.api, captioning.cli\n"
            "from captioning import Captioner\n"
            "Captioner.from_pretrained()\n"
            "print(sorted(m for m in sys.modules if m.startswith('captioning.lab')))")
    assert _run(code) == "[]"


def test_core_modules_import_nothing_from_the_lab_at_module_level():
    core = sorted(p.stem for p in (REPO / "captioning").glob("*.py") if p.stem not in ("__init__", "__main__"))
    code = ("import importlib, sys\n"
            f"for m in {core!r}: importlib.import_module('captioning.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('captioning.lab')))")
    assert _run(code) == "[]"


def test_explain_encoder_and_attribution_do_not_import_each_other():
    code = ("import sys, explain.encoder\n"
            "print('explain.attribution' in sys.modules)")
    assert _run(code) == "False"
    src = (REPO / "explain" / "encoder.py").read_text()
    assert "attribution" not in src.replace("attribution map", "")  # not even lazily


def test_the_toy_captioner_is_a_test_fixture_not_shipped():
    assert not (REPO / "explain" / "toy.py").exists() and (REPO / "tests" / "toy.py").is_file()
