"""Installing the package: the default model and the asset tables are found without the source
tree, in the order captioning/paths.py documents."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioning import paths

REPO = Path(__file__).resolve().parent.parent


def test_lookup_order(tmp_path, monkeypatch):
    site = tmp_path / "site"
    installed = site / "captioning_assets"
    installed.mkdir(parents=True)
    (installed / "imagenet_classes.txt").write_text("tench\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(paths.MODEL_ENV, raising=False)
    # A source checkout: its assets/ come first.
    assert paths.assets_dir() == REPO / "assets"
    assert paths.default_model() == REPO / "assets" / "models" / "show_attend_tell"
    # An installed package without the source tree: the copy installed as captioning_assets.
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "no-checkout")
    assert paths.assets_dir() == installed
    assert paths.default_model() == installed / "models" / "show_attend_tell"
    # $CAPTIONING_MODEL names the default model outright.
    monkeypatch.setenv(paths.MODEL_ENV, str(tmp_path / "mine"))
    assert paths.default_model() == tmp_path / "mine"


def test_captioning_model_env_sets_the_cli_default(tmp_path):
    env = {**os.environ, paths.MODEL_ENV: str(tmp_path / "no-such-model")}
    out = subprocess.run([sys.executable, "-m", "captioning", "caption", "--sample", "chelsea (cat)"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no-such-model" in out.stderr


def test_wheel_captions_without_the_source_tree(tmp_path):
    """`pip install .` without the repository: the wheel carries the default model and tables."""
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    had_build = (REPO / "build").exists()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if not had_build:  # setuptools builds in the source tree
        shutil.rmtree(REPO / "build", ignore_errors=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1:]}")
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != paths.MODEL_ENV}
    env["PYTHONPATH"] = str(target)  # ahead of any editable install of the checkout
    code = ("import sys, captioning, captioning.paths as p\n"
            "assert captioning.__file__.startswith(sys.argv[1]), captioning.__file__\n"
            "print(p.default_model())\n"
            "from captioning.cli import main\n"
            "sys.exit(main(['caption', '--sample', 'chelsea (cat)']))")
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first == str(target / "captioning_assets" / "models" / "show_attend_tell")
    assert second.startswith("sample:chelsea (cat)\t") and "cat" in second
